"""Named model presets: random-weight Qwen2-VL / Qwen2.5-VL models built from a config.

`--preset NAME` (DESIGN §7) means one of `PRESETS`. A preset is a plain dataclass:
the family, the text and vision config values, the processor's pixel budget and the
init seed. Nothing is downloaded: the tokenizer is the tiny local one
(`model.tokenizer`), so every preset's special-token ids are the tiny vocabulary's.

- `tiny` (Qwen2-VL) and `tiny-qwen2.5` (Qwen2.5-VL): a few hundred thousand
  parameters, 4 LM layers, for CPU tests and CI.
- `qwen2-vl-7b` and `qwen2.5-vl-7b`: the architecture of the published
  Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct `config.json` (hidden 3584, 28 layers,
  28 heads, 4 KV heads, vocabulary 152064, 32-block vision tower) with random weights,
  for GPU benchmarks. Only the special-token ids differ from the published ones (they
  are the local tokenizer's); the embedding table keeps the real 152064 rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from model.tokenizer import VOCAB_SIZE, config_token_ids

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
"""Supported `model_type`s (Hugging Face config families)."""


@dataclass(frozen=True)
class Preset:
    """A random-weight model described by its config values."""

    name: str
    """The `--preset` name."""
    family: str
    """Hugging Face `model_type`: 'qwen2_vl' or 'qwen2_5_vl'."""
    text: dict[str, Any] = field(default_factory=dict)
    """Language-model config values (Qwen2VLTextConfig / Qwen2_5_VLTextConfig fields)."""
    vision: dict[str, Any] = field(default_factory=dict)
    """Vision-tower config values (Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig fields)."""
    min_pixels: int = 56 * 56
    """The processor's smallest resized image area (pixels)."""
    max_pixels: int = 28 * 28 * 1280
    """The processor's largest resized image area (pixels): the per-view budget."""
    seed: int = 0
    """Seed of the random init (the same preset gives the same weights on one device)."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the LM head."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"preset {self.name!r}: family {self.family!r} is not one of {FAMILIES}")
        head_dim = self.text["hidden_size"] // self.text["num_attention_heads"]
        section = self.text["rope_parameters"]["mrope_section"]
        if 2 * sum(section) != head_dim:
            raise ValueError(f"preset {self.name!r}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")

    def config(self):
        """The Hugging Face config (`Qwen2VLConfig` or `Qwen2_5_VLConfig`) of this preset."""
        from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

        ids = config_token_ids()
        text_ids = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        cls = Qwen2VLConfig if self.family == "qwen2_vl" else Qwen2_5_VLConfig
        return cls(
            text_config={**self.text, **text_ids},
            vision_config=dict(self.vision),
            image_token_id=ids["image_token_id"],
            video_token_id=ids["video_token_id"],
            vision_start_token_id=ids["vision_start_token_id"],
            vision_end_token_id=ids["vision_end_token_id"],
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def n_params(self) -> int:
        """Parameter count, computed on the meta device (no memory)."""
        import torch

        from model.loading import model_class

        with torch.device("meta"):
            model = model_class(self.family)(self.config())
        return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- presets

def tiny() -> Preset:
    """Qwen2-VL, random weights: LM 4 layers x 64 wide, vision 2 blocks x 32 wide, 48 cells a view."""
    return Preset(
        name="tiny",
        family="qwen2_vl",
        text=dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, max_window_layers=4,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=4, num_heads=4, in_channels=3,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        min_pixels=56 * 56,
        max_pixels=48 * 28 * 28,  # 320x240 -> 224x168 = 8 x 6 cells
        seed=0,
    )


def tiny_qwen25() -> Preset:
    """Qwen2.5-VL, random weights, the `tiny` LM; vision with windowed attention in block 0.

    window_size 56 px = 2x2 cells, so a 8 x 6 cell view is cut into 4 x 3 windows and the
    tower's window permutation (and its inverse) is exercised.
    """
    base = tiny()
    return dataclasses.replace(
        base, name="tiny-qwen2.5", family="qwen2_5_vl",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                    out_hidden_size=base.text["hidden_size"], hidden_act="silu", patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                    fullatt_block_indexes=[1], tokens_per_second=2),
        seed=1,
    )


def qwen2_vl_7b() -> Preset:
    """Architecture of Qwen/Qwen2-VL-7B-Instruct (config.json), random weights."""
    return Preset(
        name="qwen2-vl-7b",
        family="qwen2_vl",
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, max_window_layers=28, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_channels=3,
                    hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        seed=0,
    )


def qwen25_vl_7b() -> Preset:
    """Architecture of Qwen/Qwen2.5-VL-7B-Instruct (config.json), random weights."""
    base = qwen2_vl_7b()
    return dataclasses.replace(
        base, name="qwen2.5-vl-7b", family="qwen2_5_vl",
        text={**base.text, "max_position_embeddings": 128000},
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                    out_hidden_size=3584, hidden_act="silu", patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2),
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny,
    "tiny-qwen2.5": tiny_qwen25,
    "qwen2-vl-7b": qwen2_vl_7b,
    "qwen2.5-vl-7b": qwen25_vl_7b,
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; KeyError if there is none (see `PRESETS`)."""
    return PRESETS[name]()
