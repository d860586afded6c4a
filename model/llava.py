"""LLaVA-OneVision / LLaVA-NeXT-Video family adapter (DESIGN §5) and torchvision-free processors.

Single-crop setting. The adapter resizes every view itself (PIL bicubic, anisotropic) to
exactly the vision tower's square input, S x S (`vision_config.image_size`: 384 for
LLaVA-OneVision's SigLIP, 336 for LLaVA-NeXT-Video's CLIP), and runs the image processor
with `do_resize=False`, so what the tower sees is known to the pixel. The tower cuts it
into p x p patches (`vision_config.patch_size`, 14) with a stride-p convolution: a grid of
`side = S // p` patches a side (27 for 384: the last S - 27 p = 6 pixel rows and columns
belong to no patch and so to no cell), row-major. Those `side * side` base-image tokens
are the cells: `cell_px = p`, no pooling (LLaVA pools video frames, never images).
`max_pixels` has no meaning here: the resolution is the tower's, whatever the view.

Token layout (transformers 5.24):

- LLaVA-OneVision (`models/llava_onevision`). With two images in one prompt the
  processor takes the multi-image path (images passed as one nested list ->
  `batch_num_images = [2]`): `image_processing_pil_llava_onevision._preprocess` pads to
  square (a no-op here) and keeps ONE patch per image (no any-resolution crops), and
  `processing_llava_onevision.replace_image_token` expands each `<image>` to
  `num_image_tokens + 1` tokens. The model (`modeling_llava_onevision.get_image_features`
  with `batch_num_images`) runs the tower on that patch only, and `pack_image_features`
  (the `image_feature.shape[0] == 1` branch) appends one `image_newline` after the
  `side * side` patch features. So an image's run of `<image>` tokens is
  [cell 0, ..., cell side*side - 1, newline]. `vision_feature_select_strategy` must be
  'full' for SigLIP (no CLS token; 'default' would drop cell 0) and 'default' for a tower
  with one (the DINOv2 tower of model/pretrained.py: 'default' drops its class token, patch
  14, S a multiple of 14, so cells = patches); the processor's `num_image_tokens` counts the
  tower's tokens, class token included (side * side + 1).
- LLaVA-NeXT-Video (`models/llava_next_video`), images only, any-resolution always: per
  image `pack_image_features` puts the base image's `side * side` features FIRST, then the
  unpadded crop features with one `image_newline` per crop row; the processor's
  `_get_number_of_features` counts the same. The crops (the view again, at the selected
  grid pinpoint) are fed to the LM and ignored here. 'default' drops CLIP's CLS token.

In both, the k-th token of an image's run is cell k for k < side * side; `cell_pos_*`
are those positions, never a newline or crop token. The text is the processor's chat
template applied to one user turn [image, image, PROMPT]; with the tiny template (and
LLaVA-OneVision's Hugging Face checkpoints') that is

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

from data.adapter import CellGrid, FamilyAdapter
from model.qwen import PROMPT

FAMILIES = ("llava_onevision", "llava_next_video")
"""`model_type`s served by this module."""

HF_PROCESSOR_CLASS = {"llava_onevision": "LlavaOnevisionProcessor", "llava_next_video": "LlavaNextVideoProcessor"}

_TOWER_HAS_CLS = {"siglip_vision_model": False, "clip_vision_model": True, "dinov2": True}
"""Whether a vision tower prepends a class token to its patch tokens."""

MODEL_INPUT_NAMES = {
    "llava_onevision": ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"),
    "llava_next_video": ("input_ids", "attention_mask", "pixel_values", "image_sizes"),
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
        self.cell_px = self.patch_size
        self.side = self.image_size // self.patch_size
        self.n_cells = self.side * self.side
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
        else:
            if processor.patch_size is None or int(processor.patch_size) != self.patch_size:
                raise ValueError(f"processor's patch_size {processor.patch_size} differs from the tower's "
                                 f"{self.patch_size}")
            if int(processor.num_additional_image_tokens) != int(has_cls):
                raise ValueError(f"processor's num_additional_image_tokens {processor.num_additional_image_tokens} "
                                 f"does not fit the {vc.model_type} tower (CLS token: {has_cls})")
            S = self.image_size
            n = processor._get_number_of_features(S, S, S, S) - (1 if strategy == "default" else 0)
            self.tokens_per_image = n  # base grid + unpadded crops + one newline per crop row

        tok = processor.tokenizer
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.prompt = prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": prompt}]}]
        self.text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        """The chat text with one `<image>` per view (the processor expands them)."""

    # ------------------------------------------------------------------ geometry

    def grid(self, size: tuple[int, int]) -> CellGrid:
        """Every view: S x S resized pixels, `side x side` cells of `patch_size` pixels."""
        S = self.image_size
        return CellGrid(size=(S, S), cell_px=self.cell_px, rows=self.side, cols=self.side)

    def resize(self, rgb: np.ndarray) -> Image.Image:
        """uint8 (H, W, 3) -> PIL image of size (S, S) (bicubic, anisotropic)."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"a view must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        H, W = rgb.shape[:2]
        img = Image.fromarray(rgb)
        S = self.image_size
        return img if (W, H) == (S, S) else img.resize((S, S), Image.BICUBIC)

    # ------------------------------------------------------------------ encoding

    def encode_pair(self, rgb_a: np.ndarray, rgb_b: np.ndarray) -> dict[str, Any]:
        """Model inputs of one pair, unbatched.

        Returns input_ids, attention_mask (L,), pixel_values (2, P, 3, S, S) (P = 1 for
        LLaVA-OneVision: the base patch only; 1 + crops for LLaVA-NeXT-Video), image_sizes
        (2, 2), for LLaVA-OneVision batch_num_images (1,) = [2], and cell_pos_a, cell_pos_b
        (side * side,) LongTensors: the sequence position of each cell's token, row-major.
        """
        images = [self.resize(rgb_a), self.resize(rgb_b)]
        if self.family == "llava_onevision":
            # one nested list = one prompt with two images: the multi-image path (no crops)
            out = self.processor(images=[images], text=[self.text], do_resize=False, return_tensors="pt")
            if out["batch_num_images"].tolist() != [2] or out["pixel_values"].shape[1] != 1:
                raise RuntimeError(f"processor took the single-image path (batch_num_images "
                                   f"{out['batch_num_images'].tolist()}, {out['pixel_values'].shape[1]} patches)")
        else:
            out = self.processor(images=images, text=[self.text], do_resize=False, do_center_crop=False,
                                 return_tensors="pt")
        input_ids = out["input_ids"][0]
        pos = torch.nonzero(input_ids == self.image_token_id).squeeze(1)  # (2 T,)
        T = self.tokens_per_image
        if len(pos) != 2 * T:
            raise RuntimeError(f"{len(pos)} image tokens in the sequence, expected 2 x {T}")
        runs = pos[:T], pos[T:]
        for run in runs:
            if int(run[-1] - run[0]) != T - 1:
                raise RuntimeError("an image's tokens are not contiguous in the sequence")
        item = {
            "input_ids": input_ids,
            "attention_mask": out["attention_mask"][0],
            "pixel_values": out["pixel_values"],  # (2, P, 3, S, S)
            "image_sizes": out["image_sizes"],  # (2, 2)
            "cell_pos_a": runs[0][:self.n_cells].clone(),
            "cell_pos_b": runs[1][:self.n_cells].clone(),
        }
        if "batch_num_images" in self.model_input_names:
            item["batch_num_images"] = out["batch_num_images"]  # (1,)
        return item

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad the sequences to (B, L_max); concatenate the images of all pairs.

        input_ids is padded with the pad token, attention_mask with 0; pixel_values
        (2B, P, 3, S, S) (patch slots zero-padded to the largest P, as the image processor
        pads a batch), image_sizes (2B, 2), batch_num_images (B,). cell_pos_a / cell_pos_b
        become lists of B LongTensors; right padding leaves them valid. Any other key is
        gathered into a list.
        """
        B = len(items)
        L = max(int(it["input_ids"].shape[0]) for it in items)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, it in enumerate(items):
            n = it["input_ids"].shape[0]
            input_ids[b, :n] = it["input_ids"]
            attention_mask[b, :n] = it["attention_mask"]
        P = max(int(it["pixel_values"].shape[1]) for it in items)
        pixel_values = torch.cat([_pad_patches(it["pixel_values"], P) for it in items], dim=0)  # (2B, P, 3, S, S)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_sizes": torch.cat([it["image_sizes"] for it in items], dim=0),  # (2B, 2)
        }
        if "batch_num_images" in self.model_input_names:
            batch["batch_num_images"] = torch.cat([it["batch_num_images"] for it in items], dim=0)  # (B,)
        for key in items[0]:
            if key not in batch:
                batch[key] = [it[key] for it in items]
        return batch

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a collated batch that goes into the model's forward."""
        return {k: batch[k] for k in self.model_input_names}

