"""Qwen2-VL / Qwen2.5-VL family adapter (DESIGN §5) and a torchvision-free processor.

Token order (verified in tests/test_qwen_adapter.py): Qwen's image processor cuts the
resized view into 14x14 patches and emits them grouped by 2x2 merge block, the blocks
row-major; the vision tower merges each consecutive group of 4 patches into one token
(Qwen2.5-VL's window attention permutes the blocks internally and restores the order
before returning), and the language model fills the `<|image_pad|>` positions with
those tokens in sequence order; its M-RoPE gives the k-th pad of an image the (row,
col) = divmod(k, cols). So the k-th `<|image_pad|>` of an image covers the 28x28 cell
k of the resized view, row-major, and `cell_pos_*[k]` is that token's sequence position.

The prompt is fixed and neutral (`PROMPT`). The text is the processor's chat template
applied to one user turn [image, image, PROMPT] without a generation prompt; with the
Qwen template (the tiny tokenizer's, and Qwen2-VL / Qwen2.5-VL-Instruct's own) that is
the Python string

    "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    "Two views of the same scene.<|im_end|>\\n"

and the processor expands each `<|image_pad|>` to one pad per cell of that view.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.processing_utils import ProcessorMixin

from data.adapter import CellGrid, FamilyAdapter, batch_cat

PROMPT = "Two views of the same scene."
"""The user turn's text after the two images of a pair (no question, no answer); a clip of K
frames reads `clip_prompt(PROMPT, K)`."""


def clip_prompt(prompt: str, n_frames: int) -> str:
    """The fixed prompt after the K images of a clip: PROMPT for two, "K views of the same scene." else."""
    if n_frames == 2 or prompt != PROMPT:
        return prompt
    return f"{n_frames} views of the same scene."

HF_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


class QwenVLProcessor(Qwen2VLProcessor):
    """Qwen2-VL / Qwen2.5-VL processor for images and text only (no video processor).

    Stock `Qwen2VLProcessor` needs a video processor, which needs torchvision; for
    images the two families' processors behave identically. Saved with
    `processor_class` = the family's stock class, so stock transformers (with
    torchvision) loads the saved folder too.
    """

    fast_images = True
    """Whether images go through `fast_image_inputs` where it applies (False: always the image processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.hf_processor_class = HF_PROCESSOR_CLASS["qwen2_vl"]
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = self.hf_processor_class
        return out

    def _process_images(self, images, **kwargs):
        """The stock image step (patches + one `<|image_pad|>` run per image), by `fast_image_inputs` where it
        applies (bit-identical output), else by the image processor itself."""
        fast = fast_image_inputs(self.image_processor, images, **kwargs) if self.fast_images else None
        if fast is None:
            return super()._process_images(images, **kwargs)
        return fast, [self.replace_image_token(fast, image_idx=i) for i in range(len(images))]

    @staticmethod
    def _video_texts(images, text, videos) -> list[str]:
        """The texts of a video call, one per video; ValueError for images beside videos or a count mismatch."""
        if images is not None:
            raise ValueError("this processor takes images or videos in one call, not both")
        texts = [text] if isinstance(text, str) else list(text)
        if len(texts) != len(videos):
            raise ValueError(f"{len(texts)} texts for {len(videos)} videos: give one video per text")
        return texts

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """As the stock processor; `videos` (one list of frames per text, each text holding one
        `<|video_pad|>`) goes through `video_patches` instead of a torchvision video processor."""
        if videos is None:
            return super().__call__(images=images, text=text, **kwargs)
        texts = self._video_texts(images, text, videos)
        second_per_grid_ts = kwargs.pop("second_per_grid_ts", None)
        return_tensors = kwargs.pop("return_tensors", "pt")
        ip_kwargs = {k: kwargs.pop(k) for k in ("do_resize", "min_pixels", "max_pixels") if k in kwargs}
        merge = int(self.image_processor.merge_size) ** 2
        patches, grids, expanded = [], [], []
        for t, frames in zip(texts, videos):
            if t.count(self.video_token) != 1:
                raise ValueError(f"each text needs exactly one {self.video_token} (got {t.count(self.video_token)})")
            pv, grid = video_patches(self.image_processor, frames, self.fast_images, **ip_kwargs)
            patches.append(pv)
            grids.append(grid)
            expanded.append(t.replace(self.video_token, self.video_token * (int(grid.prod()) // merge)))
        enc = self.tokenizer(expanded, return_tensors=return_tensors, **kwargs)
        data = dict(enc)
        data["mm_token_type_ids"] = (enc["input_ids"] == self.video_token_id).long() * 2  # 0 text, 2 video
        data["pixel_values_videos"] = torch.cat(patches)
        data["video_grid_thw"] = torch.cat(grids)
        if second_per_grid_ts is not None:
            data["second_per_grid_ts"] = torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
        from transformers import BatchFeature

        return BatchFeature(data)


def video_patches(image_processor, frames: Sequence, fast: bool = True, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen video input of `frames` (PIL or uint8 arrays of one size): (patches, video_grid_thw (1, 3)).

    The image processor resizes, normalizes and cuts each frame as it does an image (an image
    fills both temporal slots of a patch with itself); here consecutive frames fill the two
    slots instead, as the stock video processor does: patch rows run frame pair by frame pair
    (temporal grid outermost), then in the image order, and each row holds channel, temporal
    slot, row, column. An odd frame count repeats the last frame. fast: by `image_inputs` (else always the
    image processor).
    """
    frames = list(frames)
    out = (image_inputs(image_processor, frames, return_tensors="pt", **kwargs) if fast
           else image_processor(images=frames, return_tensors="pt", **kwargs))
    pv, grid = out["pixel_values"], out["image_grid_thw"]
    if not bool((grid == grid[0]).all()):
        raise ValueError("the frames of one video must have one size")
    tps, p = int(image_processor.temporal_patch_size), int(image_processor.patch_size)
    T, n = len(frames), int(grid[0, 1] * grid[0, 2])
    x = pv.reshape(T, n, -1, tps, p, p)[:, :, :, 0]  # each frame once: (T, n, C, p, p)
    if pad := -T % tps:
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
    tg = x.shape[0] // tps
    x = x.reshape(tg, tps, *x.shape[1:]).permute(0, 2, 3, 1, 4, 5)  # (tg, n, C, tps, p, p)
    return x.reshape(tg * n, -1), torch.tensor([[tg, int(grid[0, 1]), int(grid[0, 2])]])


# ------------------------------------------------------------------ fast image path
#
# Qwen2VLImageProcessorPil (transformers 5.24, image_processing_pil_qwen2_vl.py `_preprocess` / `patchify`)
# turns an RGB uint8 view into patches in four steps: optional resize (the adapter has already resized,
# and calls it with do_resize=False), rescale (float64 multiply, cast to float32), normalize ((x - mean) /
# std in float32, per channel) and patchify (reshape/transpose into (n_patches, C * T * P * P), grouped by
# merge block, the image repeated in each temporal slot). The two arithmetic steps act on each value alone,
# so for uint8 input they are a table of 256 float32 values per channel; building that table by calling
# the processor's own `rescale` / `normalize` on the 256 values makes every entry bit-identical to what the
# processor computes for that value. The fast path looks each channel's values up in the table and copies
# the plane into both temporal slots of a preallocated output, already in patch order: two passes in place
# of the processor's float64 / float32 copies, transposes and concatenation. It applies only where that
# description holds (`fast_path_reason`); anywhere else the image processor runs as before.

_FAST_KWARGS = {"do_resize": (False,), "return_tensors": ("pt", "np", None)}
"""Call arguments the fast path takes (with the values it takes); any other argument goes to the processor."""


def _image_config(ip) -> tuple | None:
    """The settings the fast path depends on, hashable (None when a mean / std is not 3 values)."""
    def three(v):
        vals = tuple(float(x) for x in v) if isinstance(v, (list, tuple, np.ndarray)) else (float(v),) * 3
        return vals if len(vals) == 3 else None

    try:
        mean, std = three(ip.image_mean), three(ip.image_std)
        factor = float(ip.rescale_factor)
    except (TypeError, ValueError):
        return None
    if mean is None or std is None:
        return None
    return (type(ip), bool(ip.do_rescale), factor, bool(ip.do_normalize), mean, std,
            int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size))


@functools.lru_cache(maxsize=64)
def _lookup_table(config: tuple, methods: tuple) -> tuple[np.ndarray | None, str]:
    """(table (3, 256) float32 of the processor's rescale + normalize of each uint8 value per channel, "") or
    (None, why not): the table is checked once against the processor on a view holding every value in every
    channel (`_probe_view`), so a processor whose steps are not what the module comment says is never fast."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls, do_rescale, factor, do_normalize, mean, std, patch, merge, temporal = config
    ip = Qwen2VLImageProcessorPil(do_rescale=do_rescale, rescale_factor=factor, do_normalize=do_normalize,
                                  image_mean=list(mean), image_std=list(std), patch_size=patch, merge_size=merge,
                                  temporal_patch_size=temporal)
    x = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))  # channel-first, as the processor's steps
    if do_rescale:
        x = ip.rescale(x, factor)
    if do_normalize:
        x = ip.normalize(x, list(mean), list(std))
    table = np.ascontiguousarray(np.asarray(x, dtype=np.float32)[:, 0, :])
    probe = _probe_view(patch * merge)
    want = ip(images=[probe], do_resize=False, return_tensors="np")
    got_pv, got_thw = _fast_patches([probe], table, patch, merge, temporal)
    if not (np.array_equal(want["image_grid_thw"], got_thw) and want["pixel_values"].dtype == got_pv.dtype
            and np.array_equal(want["pixel_values"], got_pv)):
        return None, "the image processor's output on a probe view differs from the fast path's"
    return table, ""


def _probe_view(cell: int) -> np.ndarray:
    """A (2 cells, 3 cells) RGB uint8 view holding each of the 256 values in every channel, shuffled."""
    h, w = 2 * cell, 3 * cell
    vals = np.arange(h * w * 3) % 256
    return np.random.default_rng(0).permutation(vals).astype(np.uint8).reshape(h, w, 3)


def _as_rgb_array(image) -> np.ndarray | None:
    """A view as an RGB uint8 (H, W, 3) array the processor reads as channel-last, or None (then the processor
    runs): a PIL image of mode RGB, or such an array whose first side is not 1, 3 or 4 (the processor reads
    those as channel-first)."""
    if isinstance(image, Image.Image):
        return np.asarray(image) if image.mode == "RGB" else None
    if (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] not in (1, 3, 4)):
        return image
    return None


def _fast_patches(views: Sequence[np.ndarray], table: np.ndarray, patch: int, merge: int,
                  temporal: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values (sum n_k, 3 * T * P * P) float32, image_grid_thw (K, 3) int64) of RGB uint8 views whose
    sides are multiples of patch * merge: rows grouped by merge block, blocks row-major; a row holds channel,
    temporal slot (the view in each), patch row, patch column; values `table[c, v]`."""
    grids = [(v.shape[0] // patch, v.shape[1] // patch) for v in views]
    n = sum(gh * gw for gh, gw in grids)
    out = np.empty((n, 3, temporal, patch * patch), dtype=np.float32)
    first = 0
    for v, (gh, gw) in zip(views, grids):
        # out rows of this view as (blocks down, blocks across, merge row, merge col, C, T, patch row, patch col)
        rows = out[first:first + gh * gw].reshape(gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)
        for c in range(3):
            plane = table[c].take(v[..., c])  # (H, W) float32
            cut = plane.reshape(gh // merge, merge, patch, gw // merge, merge, patch).transpose(0, 3, 1, 4, 2, 5)
            for t in range(temporal):
                rows[:, :, :, :, c, t] = cut
        first += gh * gw
    return out.reshape(n, -1), np.array([[1, gh, gw] for gh, gw in grids], dtype=np.int64)


def _fast_plan(image_processor, images, kwargs) -> tuple[tuple | None, list[np.ndarray], str]:
    """(table lookup key, the views as RGB uint8 arrays, "") where the fast path applies, else (None, [], why)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if type(image_processor) is not Qwen2VLImageProcessorPil:
        return None, [], (f"image processor {type(image_processor).__name__} (the fast path mirrors "
                          "Qwen2VLImageProcessorPil)")
    for k, v in kwargs.items():
        if k not in _FAST_KWARGS or v not in _FAST_KWARGS[k]:
            return None, [], f"call argument {k}={v!r}"
    if kwargs.get("do_resize", image_processor.do_resize):
        return None, [], "do_resize is on (the fast path takes views already at their size)"
    config = _image_config(image_processor)
    if config is None:
        return None, [], "image_mean / image_std are not 3 values, or rescale_factor is not a number"
    cell = config[6] * config[7]
    views = []
    if images is not None:
        if not isinstance(images, (list, tuple)) or not images:
            return None, [], "images are not a non-empty flat list"
        for i, im in enumerate(images):
            a = _as_rgb_array(im)
            if a is None:
                return None, [], f"image {i} is not an RGB uint8 view"
            if a.shape[0] % cell or a.shape[1] % cell:
                return None, [], f"image {i} of {a.shape[1]}x{a.shape[0]} is not in whole {cell}x{cell} blocks"
            views.append(a)
    key = (config, _methods(image_processor))
    _, why = _lookup_table(*key)
    return (None, [], why) if why else (key, views, "")


def fast_path_reason(image_processor, images: Sequence | None = None, **kwargs) -> str:
    """Why `fast_image_inputs` would hand `image_processor(images, **kwargs)` to the processor ("" when it
    would not): a processor other than Qwen2VLImageProcessorPil, a call argument it does not take, a view
    that is not RGB uint8 with sides in whole merge blocks, or a probe mismatch (`_lookup_table`)."""
    return _fast_plan(image_processor, images, kwargs)[2]


def _methods(ip) -> tuple:
    """The processor class's functions the fast path mirrors (a patched one keys a new table and probe)."""
    cls = type(ip)
    return tuple(getattr(cls, m) for m in ("rescale", "normalize", "patchify", "_preprocess", "preprocess",
                                              "process_image", "convert_to_rgb", "__call__"))


def fast_image_inputs(image_processor, images, **kwargs):
    """`image_processor(images, **kwargs)` (pixel_values, image_grid_thw) computed by the fast path (module
    comment above), bit-identical; None where it does not apply (`fast_path_reason`: then call the processor)."""
    key, views, why = _fast_plan(image_processor, images, kwargs)
    if why:
        return None
    from transformers.image_processing_utils import BatchFeature

    table, _ = _lookup_table(*key)
    ip = image_processor
    pv, thw = _fast_patches(views, table, int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size))
    return BatchFeature(data={"pixel_values": pv, "image_grid_thw": thw}, tensor_type=kwargs.get("return_tensors"))


def image_inputs(image_processor, images, **kwargs):
    """`image_processor(images=images, **kwargs)`, by `fast_image_inputs` where it applies."""
    fast = fast_image_inputs(image_processor, images, **kwargs)
    return fast if fast is not None else image_processor(images=images, **kwargs)


def make_processor(image_processor, tokenizer, chat_template: str, family: str) -> QwenVLProcessor:
    """A `QwenVLProcessor` that saves as the stock processor class of `family`."""
    processor = QwenVLProcessor(image_processor, tokenizer, chat_template=chat_template)
    processor.hf_processor_class = HF_PROCESSOR_CLASS[family]
    return processor


class QwenAdapter(FamilyAdapter):
    """Family adapter for Qwen2-VL and Qwen2.5-VL (28x28-pixel cells, row-major).

    The adapter resizes each view itself (PIL bicubic) to the size Qwen's `smart_resize`
    picks for its pixel budget, then runs the image processor with `do_resize=False`, so
    the resized size, and hence every cell, is known exactly.
    """

    model_input_names = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                         "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    """Keys of a collated batch that the model's forward takes when present (the rest are labels)."""

    def __init__(self, processor: ProcessorMixin, *, family: str = "qwen2_vl", min_pixels: int | None = None,
                 max_pixels: int | None = None, prompt: str = PROMPT) -> None:
        """processor: a Qwen2-VL-style processor (image processor + tokenizer + chat template).

        min_pixels / max_pixels: per-view area budget of the resize; default: the image
        processor's own (`size['shortest_edge']`, `size['longest_edge']`).
        """
        ip = processor.image_processor
        self.family = family
        if family != "qwen2_5_vl":  # only Qwen2.5-VL's forward and M-RoPE take a video's timing as a tensor
            self.model_input_names = tuple(k for k in self.model_input_names if k != "second_per_grid_ts")
        self.processor = processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.temporal_patch_size = int(ip.temporal_patch_size)
        self.cell_px = self.patch_size * self.merge_size
        self.min_pixels = int(min_pixels or ip.size["shortest_edge"])
        self.max_pixels = int(max_pixels or ip.size["longest_edge"])
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        self.image_token_id = int(processor.image_token_id)
        self.video_token_id = int(processor.video_token_id)
        tok = processor.tokenizer
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.prompt = prompt
        self._texts: dict[int, str] = {}
        self.text = self.clip_text(2)
        """The chat text of a two-frame clip (the processor expands each `<|image_pad|>`)."""

    # ------------------------------------------------------------------ geometry

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(W', H') that Qwen's `smart_resize` gives a view of size (W, H) (multiples of 28)."""
        W, H = size
        h, w = smart_resize(H, W, factor=self.cell_px, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return int(w), int(h)

    def grid(self, size: tuple[int, int]) -> CellGrid:
        W2, H2 = self.resized_size(size)
        return CellGrid(size=(W2, H2), cell_px=self.cell_px, rows=H2 // self.cell_px, cols=W2 // self.cell_px)

    def max_cells(self) -> int:
        """smart_resize keeps the resized area within max_pixels: at most max_pixels / 28^2 cells."""
        return self.max_pixels // (self.cell_px * self.cell_px)

    def resize(self, rgb: np.ndarray) -> Image.Image:
        """uint8 (H, W, 3) -> PIL image of size `resized_size((W, H))` (bicubic)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"a view must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        H, W = rgb.shape[:2]
        img = Image.fromarray(rgb)
        new = self.resized_size((W, H))
        return img if new == (W, H) else img.resize(new, Image.BICUBIC)

    # ------------------------------------------------------------------ encoding

    def clip_text(self, n_frames: int) -> str:
        """The chat text of a clip of n frames: one `<|image_pad|>` per frame (the processor expands them)."""
        text = self._texts.get(n_frames)
        if text is None:
            messages = [{"role": "user", "content": [{"type": "image"}] * n_frames
                         + [{"type": "text", "text": clip_prompt(self.prompt, n_frames)}]}]
            text = self._texts[n_frames] = self.processor.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=False)
        return text

    def encode_clip(self, frames: Sequence[np.ndarray]) -> dict[str, Any]:
        """Model inputs of one clip of K frames, unbatched (DESIGN §5: K images of one sequence).

        Returns input_ids, attention_mask, mm_token_type_ids (S,) (1 at image tokens),
        pixel_values (P, 3 * T * 14 * 14) with P = 4 * sum(N_k) patches (each frame fills both
        temporal slots of its patches, so every frame keeps its own token grid), image_grid_thw
        (K, 3) = [[1, 2 rows_k, 2 cols_k], ...], and cell_pos: K LongTensors (N_k,), the sequence
        position of each cell's token of frame k, row-major.
        """
        images = [self.resize(rgb) for rgb in frames]
        grids = [self.grid((rgb.shape[1], rgb.shape[0])) for rgb in frames]
        out = self.processor(images=images, text=[self.clip_text(len(frames))], do_resize=False,
                             return_tensors="pt")
        input_ids = out["input_ids"][0]
        thw = out["image_grid_thw"]
        expect = torch.tensor([[1, g.rows * self.merge_size, g.cols * self.merge_size] for g in grids])
        if not torch.equal(thw.cpu(), expect):
            raise RuntimeError(f"image processor gave grids {thw.tolist()}, expected {expect.tolist()}")
        pos = torch.nonzero(input_ids == self.image_token_id).squeeze(1)  # (sum N_k,)
        counts = [g.n_cells for g in grids]
        if len(pos) != sum(counts):
            raise RuntimeError(f"{len(pos)} image tokens in the sequence, expected {' + '.join(map(str, counts))}")
        return {
            "input_ids": input_ids,
            "attention_mask": out["attention_mask"][0],
            "mm_token_type_ids": out["mm_token_type_ids"][0],
            "pixel_values": out["pixel_values"],
            "image_grid_thw": thw,
            "cell_pos": [p.clone() for p in torch.split(pos, counts)],
        }

    # ------------------------------------------------------------ conversations
    @property
    def media_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def encode_media_text(self, text: str, frames: Sequence[np.ndarray], media: str, timestamps: Sequence[float],
                          video_frames: int) -> dict[str, Any]:
        """The processor's encoding of a chat text: images resized by the clip rule (`resize`, the same
        pixel budget), a video as Qwen's video input (consecutive frames fill the two temporal slots of
        a patch; at most `video_frames` frames, spread uniformly; the family's timing of the kept frames,
        `video_kwargs`, from their timestamps: a video stored without them counts its kept frames 1 s
        apart), no media: text only."""
        from data.chat import resample

        if media == "image":
            out = self.processor(images=[self.resize(f) for f in frames], text=[text], do_resize=False,
                                 return_tensors="pt")
            item = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        elif media == "video":
            keep = resample(len(frames), min(len(frames), video_frames or len(frames)))
            ts = ([float(timestamps[k]) for k in keep] if len(timestamps) == len(frames)
                  else [float(k) for k in range(len(keep))])
            out = self.processor(videos=[[self.resize(frames[k]) for k in keep]], text=[text], do_resize=False,
                                 return_tensors="pt", **self.video_kwargs(ts))
            item = {k: out[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in out}
        else:
            out = self.processor.tokenizer([text], return_tensors="pt")
            out["mm_token_type_ids"] = torch.zeros_like(out["input_ids"])
            item = {}
        item.update(input_ids=out["input_ids"][0], attention_mask=out["attention_mask"][0],
                    mm_token_type_ids=out["mm_token_type_ids"][0])
        return item

    def video_kwargs(self, timestamps: Sequence[float]) -> dict[str, Any]:
        """Processor arguments of ONE video whose frames lie at `timestamps` (seconds), beside `videos=[frames]`:
        Qwen2.5-VL's `second_per_grid_ts` (temporal patch size x the median frame step, 1 s for one frame);
        Qwen2-VL takes no timing (Qwen3-VL: its `<t seconds>` text, `Qwen3Adapter.video_kwargs`)."""
        if self.family != "qwen2_5_vl":
            return {}
        ts = [float(t) for t in timestamps]
        step = float(np.median(np.diff(ts))) if len(ts) > 1 else 1.0
        return {"second_per_grid_ts": [self.temporal_patch_size * max(step, 1e-3)]}

    def dummy_vision_inputs(self) -> tuple[str, dict[str, Any]]:
        """One 2x2-patch image (one merged token): the tower's smallest real input."""
        m = self.merge_size
        width = 3 * self.temporal_patch_size * self.patch_size * self.patch_size
        return "get_image_features", {"pixel_values": torch.zeros((m * m, width)),
                                      "image_grid_thw": torch.tensor([[1, m, m]])}

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad the sequences to (B, S_max); concatenate the media inputs of all items in order.

        input_ids is padded with the pad token, attention_mask and mm_token_type_ids with 0, labels
        with -100 (a clip's are all -100). pixel_values / image_grid_thw (images of clips and
        conversations) and pixel_values_videos / video_grid_thw / second_per_grid_ts (videos) are
        concatenated in item order, absent when no item has them. cell_pos becomes a list of B lists
        of K LongTensors (frames may differ in cells); right padding leaves them valid. Any other
        key is gathered into a list.
        """
        B = len(items)
        S = max(int(it["input_ids"].shape[0]) for it in items)
        input_ids = torch.full((B, S), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        mm_token_type_ids = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        for b, it in enumerate(items):
            n = it["input_ids"].shape[0]
            input_ids[b, :n] = it["input_ids"]
            attention_mask[b, :n] = it["attention_mask"]
            mm_token_type_ids[b, :n] = it["mm_token_type_ids"]
            if it.get("labels") is not None:
                labels[b, :n] = it["labels"]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "mm_token_type_ids": mm_token_type_ids, "labels": labels}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            parts = [it[key] for it in items if it.get(key) is not None]
            batch[key] = batch_cat(parts) if parts else None
        for key in items[0]:
            if key not in batch:
                batch[key] = [it.get(key) for it in items]
        return batch

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a collated batch that goes into the model's forward (the keys present)."""
        return {k: batch[k] for k in self.model_input_names if batch.get(k) is not None}


@functools.lru_cache(maxsize=None)
def _rope_params(cls: type) -> frozenset:
    """The parameters `cls.get_rope_index` takes (mm_token_type_ids: transformers 5.x; second_per_grid_ts:
    Qwen2.5-VL)."""
    import inspect

    return frozenset(inspect.signature(cls.get_rope_index).parameters)


def rope_position_ids(vlm: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor | None:
    """The 3-D (M-RoPE) position ids (3, B, S) of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL batch, or None for other models.

    Computed by the model's own `get_rope_index`, on the device the inputs live on. Callers
    run it on the CPU batch and pass the result as `position_ids`: the model then skips its
    own computation, which on a GPU costs a host sync per image (tens per step).
    """
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    body = getattr(base, "model", base)
    rope_index = getattr(body, "get_rope_index", None)
    if rope_index is None or (inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None):
        return None
    params = _rope_params(type(body))
    kw = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
    for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"):
        if inputs.get(key) is not None and key in params:
            kw[key] = inputs[key]
    position_ids, _ = rope_index(**kw)
    return position_ids
