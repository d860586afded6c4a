"""LLaVA-OneVision / LLaVA-NeXT-Video family adapter (DESIGN §5) and torchvision-free processors.

The adapter resizes every frame itself (PIL bicubic, anisotropic) to exactly the vision tower's
square input, S x S (`vision_config.image_size`: 384 for LLaVA-OneVision's SigLIP, 336 for
LLaVA-NeXT-Video's CLIP), so what the tower sees is known to the pixel. The tower cuts it into
p x p patches (`vision_config.patch_size`, 14) with a stride-p convolution: `side = S // p`
patches a side (27 for 384: the last S - 27 p = 6 pixel rows and columns belong to no patch and
so to no cell), row-major. `max_pixels` has no meaning here: the resolution is the tower's.

Token layout of a clip of K frames (transformers 5.24):

- LLaVA-OneVision (`models/llava_onevision`): K images of one prompt, the processor's
  multi-image path (images passed as one nested list -> `batch_num_images = [K]`):
  `image_processing_pil_llava_onevision._preprocess` pads to square (a no-op here) and keeps ONE
  patch per image (no any-resolution crops), `processing_llava_onevision.replace_image_token`
  expands each `<image>` to `num_image_tokens + 1` tokens, and the model's `pack_image_features`
  (the `image_feature.shape[0] == 1` branch) appends one `image_newline` after the `side * side`
  patch features. So frame k's run of `<image>` tokens is [cell 0, ..., cell side*side - 1,
  newline]; cells are the patches (`cell_px = p`). `vision_feature_select_strategy` must be
  'full' for SigLIP (no CLS token; 'default' would drop cell 0) and 'default' for a tower with
  one (the DINOv2 tower of model/pretrained.py: 'default' drops its class token, patch 14, S a
  multiple of 14, so cells = patches); the processor's `num_image_tokens` counts the tower's
  tokens, class token included (side * side + 1).
- LLaVA-NeXT-Video (`models/llava_next_video`): one video of K frames, as its video input:
  `get_video_features` runs the tower on each frame, drops CLIP's CLS token ('default'), and the
  `LlavaNextVideoPooler` pools each frame's side x side grid with a `spatial_pool_stride` window
  (2: a 336 px frame becomes 12 x 12), flattened row-major, frames in order, no newline. The
  pooled tokens are the cells (`cell_px = p * stride`, `side // stride` a side). The chat text
  holds one `<video>`, expanded here to K x cells video tokens; `pixel_values_videos` holds each
  frame as a 1-frame video (K, 1, 3, S, S): the tower and the pooling are per frame, so the
  result is the same and a batch may mix clips of different K.

In both, `cell_pos[k]` are the sequence positions of frame k's cells, never a newline token. The
text is the processor's chat template applied to one user turn [media, prompt]; with the tiny
template (and LLaVA-OneVision's Hugging Face checkpoints') a two-frame clip reads

    "<|im_start|>user\\n<image>\\n<image>\\nTwo views of the same scene.<|im_end|>\\n"
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextVideoProcessor, LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin

from data.adapter import CellGrid, FamilyAdapter, batch_cat
from model.qwen import PROMPT, clip_prompt

FAMILIES = ("llava_onevision", "llava_next_video")
"""`model_type`s served by this module."""

HF_PROCESSOR_CLASS = {"llava_onevision": "LlavaOnevisionProcessor", "llava_next_video": "LlavaNextVideoProcessor"}

_TOWER_HAS_CLS = {"siglip_vision_model": False, "clip_vision_model": True, "dinov2": True}
"""Whether a vision tower prepends a class token to its patch tokens."""

MODEL_INPUT_NAMES = {
    "llava_onevision": ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images",
                        "pixel_values_videos"),
    "llava_next_video": ("input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos"),
}


def _placeholders(processor: ProcessorMixin, tokenizer, image_token: str, video_token: str) -> None:
    """Set the processor's image / video placeholder strings and ids (as the stock processors do)."""
    processor.image_token = getattr(tokenizer, "image_token", None) or image_token
    processor.video_token = getattr(tokenizer, "video_token", None) or video_token
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)


class OnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision processor for images and text only (no video processor).

    Stock `LlavaOnevisionProcessor` needs a video processor, which needs torchvision.
    Saved with `processor_class` = 'LlavaOnevisionProcessor', so stock transformers (with
    torchvision) reads the saved folder too.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        _placeholders(self, tokenizer, image_token, video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = HF_PROCESSOR_CLASS["llava_onevision"]
        return out


class NextVideoProcessor(LlavaNextVideoProcessor):
    """LLaVA-NeXT-Video processor for images and text only (no video processor); see
    `OnevisionProcessor`. Saved as 'LlavaNextVideoProcessor'."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, patch_size=None,
                 vision_feature_select_strategy=None, video_token="<video>", image_token="<image>",
                 num_additional_image_tokens=0, **kwargs):
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        _placeholders(self, tokenizer, image_token, video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = HF_PROCESSOR_CLASS["llava_next_video"]
        return out


PROCESSORS = {"llava_onevision": OnevisionProcessor, "llava_next_video": NextVideoProcessor}


def image_processor_class(family: str):
    """The PIL (torchvision-free) image processor class of a family."""
    if family == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        return LlavaOnevisionImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil


def build_image_processor(family: str, image_size: int, grid_pinpoints: list[list[int]], **kwargs):
    """A PIL image processor whose base patch is the tower's S x S input; kwargs: further settings
    (e.g. image_mean / image_std of a tower trained with other statistics)."""
    cls = image_processor_class(family)
    if family == "llava_onevision":
        return cls(size={"height": image_size, "width": image_size}, image_grid_pinpoints=grid_pinpoints, **kwargs)
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
               image_grid_pinpoints=grid_pinpoints, **kwargs)


def make_processor(family: str, image_processor, tokenizer, chat_template: str, **kwargs) -> ProcessorMixin:
    """The video-free processor of `family`; kwargs: the stock processor's settings
    (num_image_tokens, vision_feature_select_strategy, patch_size, ...)."""
    return PROCESSORS[family](image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_processor(path: str | Path, family: str, tokenizer, chat_template: str) -> ProcessorMixin:
    """A checkpoint's processor: its image processor settings and `processor_config.json`."""
    path = Path(path)
    image_processor = image_processor_class(family).from_pretrained(path, local_files_only=True)
    known = set(inspect.signature(PROCESSORS[family].__init__).parameters) - {
        "self", "image_processor", "tokenizer", "chat_template", "kwargs"}
    settings: dict[str, Any] = {}
    cfg = path / "processor_config.json"
    if cfg.is_file():
        settings = {k: v for k, v in json.loads(cfg.read_text()).items() if k in known}
    return make_processor(family, image_processor, tokenizer, chat_template, **settings)


def _size_of(spec: Any, key: str) -> int | None:
    """`spec[key]` of an image processor size (a dict or a SizeDict), or None."""
    if spec is None:
        return None
    value = spec.get(key) if isinstance(spec, dict) else getattr(spec, key, None)
    return None if value is None else int(value)


def _pad_patches(pixel_values: torch.Tensor, P: int) -> torch.Tensor:
    """(n, p, 3, S, S) -> (n, P, 3, S, S), zeros in the added patch slots (the model reads only its own)."""
    n, p = pixel_values.shape[:2]
    if p == P:
        return pixel_values
    pad = pixel_values.new_zeros((n, P - p) + tuple(pixel_values.shape[2:]))
    return torch.cat([pixel_values, pad], dim=1)


class LlavaAdapter(FamilyAdapter):
    """Family adapter for LLaVA-OneVision and LLaVA-NeXT-Video (single crop, 14 px cells).

    The cell grid of a view is the tower's `side x side` base-image patch grid, whatever
    the view's size (see the module docstring for the token layout).
    """

    def __init__(self, processor: ProcessorMixin, config, *, prompt: str = PROMPT) -> None:
        """processor: the family's processor; config: the model's Hugging Face config
        (`LlavaOnevisionConfig` / `LlavaNextVideoConfig`): tower size, patch, feature strategy."""
        family = config.model_type
        if family not in FAMILIES:
            raise ValueError(f"LlavaAdapter serves {', '.join(FAMILIES)}, not {family!r}")
        self.family = family
        self.processor = processor
        vc = config.vision_config
        self.image_size = int(vc.image_size)
        self.patch_size = int(vc.patch_size)
        self.side = self.image_size // self.patch_size  # patches a side
        # LLaVA-NeXT-Video: a frame's cells are its pooled grid (spatial_pool_stride^2 patches each)
        self.pool = int(getattr(config, "spatial_pool_stride", 1)) if family == "llava_next_video" else 1
        if family == "llava_next_video" and getattr(config, "spatial_pool_mode", "average") not in ("average", "max"):
            raise ValueError(f"spatial_pool_mode {config.spatial_pool_mode!r} mixes channels across cells; "
                             f"supported: average, max")
        self.cell_px = self.patch_size * self.pool
        self.cell_side = self.side // self.pool
        self.n_cells = self.cell_side * self.cell_side
        self.max_pixels = self.image_size * self.image_size
        """The fixed per-view pixel count (S * S); kept for logs shared with other families."""
        self.model_input_names = MODEL_INPUT_NAMES[family]
        """Keys of a collated batch that the model's forward takes (the rest are labels)."""

        strategy = config.vision_feature_select_strategy
        has_cls = _TOWER_HAS_CLS.get(vc.model_type)
        if has_cls is None:
            raise ValueError(f"vision tower {vc.model_type!r} is not one of {', '.join(_TOWER_HAS_CLS)}")
        if (strategy == "default") != has_cls:
            raise ValueError(f"vision_feature_select_strategy {strategy!r} does not fit the {vc.model_type} tower "
                             f"({'drops its CLS token' if has_cls else 'no CLS token'}): use "
                             f"{'default' if has_cls else 'full'}")
        if processor.vision_feature_select_strategy not in (None, strategy):
            raise ValueError(f"processor's vision_feature_select_strategy {processor.vision_feature_select_strategy!r}"
                             f" differs from the model's {strategy!r}")
        self.image_token_id = int(processor.image_token_id)
        if self.image_token_id != int(config.image_token_id):
            raise ValueError(f"processor's image token id {self.image_token_id} differs from the model's "
                             f"{config.image_token_id}")

        ip = processor.image_processor
        tower_in = (_size_of(ip.size, "height"), _size_of(ip.size, "width")) if family == "llava_onevision" else \
            (_size_of(ip.crop_size, "height"), _size_of(ip.crop_size, "width"))
        if tower_in != (self.image_size, self.image_size):
            raise ValueError(f"image processor feeds {tower_in} but the vision tower takes "
                             f"{self.image_size}x{self.image_size}")
        if family == "llava_onevision":
            # num_image_tokens counts the tower's output tokens, class token included ('default' drops it)
            if processor.num_image_tokens is None or int(processor.num_image_tokens) != self.n_cells + int(has_cls):
                raise ValueError(f"processor's num_image_tokens {processor.num_image_tokens} differs from the "
                                 f"tower's {self.side}x{self.side} patches" + (" + class token" if has_cls else ""))
            self.tokens_per_image = self.n_cells + 1  # base grid + one image_newline (multi-image path)
            self.video_token_id = int(processor.video_token_id)
            pooled = -(-self.side // 2)  # the video path's 2x bilinear pooling, ceil
            self.tokens_per_video_frame = pooled * pooled
        else:
            if processor.patch_size is None or int(processor.patch_size) != self.patch_size:
                raise ValueError(f"processor's patch_size {processor.patch_size} differs from the tower's "
                                 f"{self.patch_size}")
            if int(processor.num_additional_image_tokens) != int(has_cls):
                raise ValueError(f"processor's num_additional_image_tokens {processor.num_additional_image_tokens} "
                                 f"does not fit the {vc.model_type} tower (CLS token: {has_cls})")
            self.tokens_per_image = self.n_cells  # one frame of the video: its pooled grid, no newline
            self.tokens_per_video_frame = self.n_cells
            self.video_token_id = int(processor.video_token_id)
            if self.video_token_id != int(config.video_token_id):
                raise ValueError(f"processor's video token id {self.video_token_id} differs from the model's "
                                 f"{config.video_token_id}")

        tok = processor.tokenizer
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.prompt = prompt
        self._texts: dict[int, str] = {}
        self.text = self.clip_text(2)
        """The chat text of a two-frame clip (one `<image>` per view, or one `<video>`)."""

    # ------------------------------------------------------------------ geometry

    def max_cells(self) -> int:
        """Every view is the tower's S x S input: always side x side cells."""
        return self.n_cells

    def grid(self, size: tuple[int, int]) -> CellGrid:
        """Every view: S x S resized pixels, `cell_side x cell_side` cells of `cell_px` pixels (patches;
        LLaVA-NeXT-Video: pooled blocks of patches)."""
        S = self.image_size
        return CellGrid(size=(S, S), cell_px=self.cell_px, rows=self.cell_side, cols=self.cell_side)

    def resize(self, rgb: np.ndarray) -> Image.Image:
        """uint8 (H, W, 3) -> PIL image of size (S, S) (bicubic, anisotropic)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"a view must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        H, W = rgb.shape[:2]
        img = Image.fromarray(rgb)
        S = self.image_size
        return img if (W, H) == (S, S) else img.resize((S, S), Image.BICUBIC)

    # ------------------------------------------------------------------ encoding

    def clip_text(self, n_frames: int) -> str:
        """The chat text of a clip: one `<image>` per frame (LLaVA-OneVision), or one `<video>`
        (LLaVA-NeXT-Video), then the fixed prompt."""
        text = self._texts.get(n_frames)
        if text is None:
            media = ([{"type": "image"}] * n_frames if self.family == "llava_onevision" else [{"type": "video"}])
            messages = [{"role": "user", "content": media + [{"type": "text",
                                                              "text": clip_prompt(self.prompt, n_frames)}]}]
            text = self._texts[n_frames] = self.processor.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=False)
        return text

    def video_frames(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(K, 1, 3, S, S) float32: each resized frame rescaled and normalised as the image processor
        does, one 1-frame "video" per frame (the tower and the pooling treat frames one by one, so a
        batch may mix clips of different K)."""
        ip = self.processor.image_processor
        x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])
        if getattr(ip, "do_rescale", True):
            x = x * float(getattr(ip, "rescale_factor", 1 / 255))
        if getattr(ip, "do_normalize", True):
            mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
            x = (x - mean) / std
        return x[:, None]

    def encode_clip(self, frames: Sequence[np.ndarray]) -> dict[str, Any]:
        """Model inputs of one clip of K frames, unbatched (DESIGN §5).

        LLaVA-OneVision: K images of one prompt (the multi-image path: one base patch each, no
        crops): input_ids, attention_mask, pixel_values (K, 1, 3, S, S), image_sizes (K, 2),
        batch_num_images (1,) = [K]. LLaVA-NeXT-Video: one video of K frames whose per-frame
        pooled grids are the cells: input_ids with K * cells video tokens, attention_mask,
        pixel_values_videos (K, 1, 3, S, S). Both: cell_pos, K LongTensors (cells,), the sequence
        position of each cell's token of frame k, row-major.
        """
        images = [self.resize(rgb) for rgb in frames]
        K = len(images)
        T = self.tokens_per_image
        if self.family == "llava_onevision":
            # one nested list = one prompt with K images: the multi-image path (no crops)
            out = self.processor(images=[images], text=[self.clip_text(K)], do_resize=False, return_tensors="pt")
            if out["batch_num_images"].tolist() != [K] or out["pixel_values"].shape[1] != 1:
                raise RuntimeError(f"processor took the single-image path (batch_num_images "
                                   f"{out['batch_num_images'].tolist()}, {out['pixel_values'].shape[1]} patches)")
            input_ids, token = out["input_ids"][0], self.image_token_id
            item = {"input_ids": input_ids, "attention_mask": out["attention_mask"][0],
                    "pixel_values": out["pixel_values"],  # (K, 1, 3, S, S)
                    "image_sizes": out["image_sizes"],  # (K, 2)
                    "batch_num_images": out["batch_num_images"]}  # (1,)
        else:
            token = self.video_token_id
            ids = self.processor.tokenizer(self.clip_text(K), return_tensors="pt")["input_ids"][0]
            at = torch.nonzero(ids == token).squeeze(1)
            if len(at) != 1:
                raise RuntimeError(f"the chat text holds {len(at)} video placeholders, expected 1")
            i = int(at[0])
            input_ids = torch.cat([ids[:i], torch.full((K * T,), token, dtype=ids.dtype), ids[i + 1:]])
            item = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                    "pixel_values_videos": self.video_frames(images)}
        pos = torch.nonzero(input_ids == token).squeeze(1)  # (K T,)
        if len(pos) != K * T:
            raise RuntimeError(f"{len(pos)} vision tokens in the sequence, expected {K} x {T}")
        runs = torch.split(pos, T)
        for run in runs:
            if int(run[-1] - run[0]) != T - 1:
                raise RuntimeError("a frame's tokens are not contiguous in the sequence")
        item["cell_pos"] = [run[:self.n_cells].clone() for run in runs]
        return item

    # ------------------------------------------------------------ conversations
    @property
    def media_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def encode_media_text(self, text: str, frames: Sequence[np.ndarray], media: str, timestamps: Sequence[float],
                          video_frames: int) -> dict[str, Any]:
        """The processor's encoding of a chat text with its media.

        Images: the family's own image path (the processor resizes; one image takes the
        any-resolution crops, several the multi-image path). A video: LLaVA-OneVision's video input
        (1, T, 3, S, S), its `<video>` expanded to T x ceil(side/2)^2 pooled tokens + one newline,
        with exactly T = `video_frames` frames spread over the video (the model stacks the videos of a
        batch, so they need one length); LLaVA-NeXT-Video's video input as T one-frame videos (its
        tower and pooling run per frame, so this equals one T-frame video), at most `video_frames`.
        """
        from data.chat import resample

        if media == "image":
            pil = [Image.fromarray(f) for f in frames]
            out = self.processor(images=[pil] if self.family == "llava_onevision" else pil, text=[text],
                                 return_tensors="pt")
            item = {"input_ids": out["input_ids"][0], "attention_mask": out["attention_mask"][0],
                    "pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
            if self.family == "llava_onevision":
                item["batch_num_images"] = out["batch_num_images"]
            return item
        ids = self.processor.tokenizer(text, return_tensors="pt")["input_ids"][0]
        if media == "none":
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        at = torch.nonzero(ids == self.video_token_id).squeeze(1)
        if len(at) != 1:
            raise RuntimeError(f"the chat text holds {len(at)} video placeholders, expected 1")
        count = video_frames if self.family == "llava_onevision" else min(len(frames), video_frames or len(frames))
        images = [self.resize(frames[k]) for k in resample(len(frames), count)]
        x = self.video_frames(images)  # (T, 1, 3, S, S)
        n = len(images) * self.tokens_per_video_frame
        if self.family == "llava_onevision":
            x, n = x.transpose(0, 1), n + 1  # one video of T frames; one newline after its frames
        i = int(at[0])
        input_ids = torch.cat([ids[:i], torch.full((n,), self.video_token_id, dtype=ids.dtype), ids[i + 1:]])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": x}

    def dummy_vision_inputs(self) -> tuple[str, dict[str, Any]]:
        """One frame as a one-frame video: the tower (and projector) on one S x S input."""
        S = self.image_size
        return "get_video_features", {"pixel_values_videos": torch.zeros((1, 1, 3, S, S))}

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad the sequences to (B, L_max); concatenate the media of all items in order.

        input_ids is padded with the pad token, attention_mask with 0, labels with -100 (a clip's
        are all -100). pixel_values (sum of images, P, 3, S, S; patch slots padded with zeros to the
        most any image has), image_sizes, batch_num_images (LLaVA-OneVision: one entry per item with
        images) and pixel_values_videos are concatenated in item order, absent when no item has
        them. cell_pos becomes a list of B lists of K LongTensors; right padding leaves them valid.
        Any other key is gathered into a list.
        """
        B = len(items)
        L = max(int(it["input_ids"].shape[0]) for it in items)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, it in enumerate(items):
            n = it["input_ids"].shape[0]
            input_ids[b, :n] = it["input_ids"]
            attention_mask[b, :n] = it["attention_mask"]
            if it.get("labels") is not None:
                labels[b, :n] = it["labels"]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [it for it in items if it.get("pixel_values") is not None]
        if with_images:
            P = max(int(it["pixel_values"].shape[1]) for it in with_images)
            batch["pixel_values"] = batch_cat([_pad_patches(it["pixel_values"], P) for it in with_images])
            batch["image_sizes"] = torch.cat([it["image_sizes"] for it in with_images], dim=0)  # (images, 2)
            if self.family == "llava_onevision":
                batch["batch_num_images"] = torch.cat([it["batch_num_images"] for it in with_images], dim=0)
        else:
            batch["pixel_values"] = batch["image_sizes"] = batch["batch_num_images"] = None
        videos = [it["pixel_values_videos"] for it in items if it.get("pixel_values_videos") is not None]
        if videos and len({tuple(v.shape[1:]) for v in videos}) > 1:
            raise ValueError(f"videos of {sorted({int(v.shape[1]) for v in videos})} frames in one batch: the "
                             f"model stacks a batch's videos, give them one length")
        batch["pixel_values_videos"] = batch_cat(videos) if videos else None
        for key in items[0]:
            if key not in batch:
                batch[key] = [it.get(key) for it in items]
        return batch

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a collated batch that goes into the model's forward (the keys present)."""
        return {k: batch[k] for k in self.model_input_names if batch.get(k) is not None}

