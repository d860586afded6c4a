"""Named model presets: random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL / LLaVA models built from a config.

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
- `tiny-qwen3-vl` (Qwen3-VL) and `tiny-qwen3-vl-moe` (Qwen3-VL-MoE, 4 experts a layer): the `tiny` LM
  width, 16 px patches (32 px cells), a 3-block tower feeding DeepStack into LM layers 0 and 1.
- `qwen3-vl-4b` and `qwen3-vl-8b`: the architecture of Qwen/Qwen3-VL-4B-Instruct / -8B-Instruct
  (Qwen3-4B / Qwen3-8B LMs, 24- / 27-block towers) with random weights, for GPU benchmarks.
- `tiny-llava-ov` (LLaVA-OneVision: SigLIP tower + Qwen2 LM) and `tiny-llava-next-video`
  (LLaVA-NeXT-Video: CLIP tower + Llama LM): the `tiny` LM size, a 2-layer tower on
  118 x 118 pixels = 8 x 8 patches of 14 (plus a 6-pixel margin no patch covers, as
  384 = 27 x 14 + 6 in the real model), 64 cells a view. Their tokenizer is
  `model.llava_tokenizer`: the same tiny vocabulary, `<image>` / `<video>` in the
  image / video placeholder slots.
- `llava-onevision-qwen2-7b` and `llava-next-video-7b`: the architecture of
  llava-hf/llava-onevision-qwen2-7b-ov-hf (Qwen2-7B LM, vocabulary 152128, 26-layer
  SigLIP-so400m at 384) and llava-hf/LLaVA-NeXT-Video-7B-hf (Vicuna-7B LM, vocabulary
  32064, CLIP ViT-L/14 at 336) with random weights, for GPU benchmarks; special-token ids
  are the local tokenizer's, as for the Qwen ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from model.tokenizer import VOCAB_SIZE, config_token_ids

QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl") + QWEN3_FAMILIES
LLAVA_FAMILIES = ("llava_onevision", "llava_next_video")
FAMILIES = QWEN_FAMILIES + LLAVA_FAMILIES
"""Supported `model_type`s (Hugging Face config families)."""


@dataclass(frozen=True)
class Preset:
    """A random-weight model described by its config values."""

    name: str
    """The `--preset` name."""
    family: str
    """Hugging Face `model_type`: one of FAMILIES."""
    text: dict[str, Any] = field(default_factory=dict)
    """Language-model config values (Qwen2VLTextConfig / Qwen2_5_VLTextConfig fields; for LLaVA the
    text config's, with its `model_type`, e.g. 'qwen2' or 'llama')."""
    vision: dict[str, Any] = field(default_factory=dict)
    """Vision-tower config values (Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig fields; for LLaVA the
    tower config's, with its `model_type`, e.g. 'siglip_vision_model' or 'clip_vision_model')."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further top-level config values (LLaVA: vision_feature_select_strategy, vision_feature_layer,
    image_grid_pinpoints, ...)."""
    min_pixels: int = 56 * 56
    """The processor's smallest resized image area (pixels). Qwen only: LLaVA views are S x S."""
    max_pixels: int = 28 * 28 * 1280
    """The processor's largest resized image area (pixels): the per-view budget. Qwen only."""
    seed: int = 0
    """Seed of the random init (the same preset gives the same weights on one device)."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the LM head."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"preset {self.name!r}: family {self.family!r} is not one of {FAMILIES}")
        if self.family in LLAVA_FAMILIES:
            return
        head_dim = self.text.get("head_dim") or self.text["hidden_size"] // self.text["num_attention_heads"]
        section = self.text["rope_parameters"]["mrope_section"]
        if 2 * sum(section) != head_dim:
            raise ValueError(f"preset {self.name!r}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")

    def config(self):
        """The Hugging Face config (`Qwen2VLConfig`, `Qwen2_5_VLConfig`, `Qwen3VLConfig`, `Qwen3VLMoeConfig`,
        `LlavaOnevisionConfig`, `LlavaNextVideoConfig`) of this preset."""
        from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

        if self.family in LLAVA_FAMILIES:
            return self._llava_config()
        ids = config_token_ids()
        text_ids = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        cls = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig,
               "qwen3_vl_moe": Qwen3VLMoeConfig}[self.family]
        return cls(
            text_config={**self.text, **text_ids},
            vision_config=dict(self.vision),
            image_token_id=ids["image_token_id"],
            video_token_id=ids["video_token_id"],
            vision_start_token_id=ids["vision_start_token_id"],
            vision_end_token_id=ids["vision_end_token_id"],
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def _llava_config(self):
        from transformers import LlavaNextVideoConfig, LlavaOnevisionConfig

        from model.llava_tokenizer import config_token_ids as llava_token_ids

        ids = llava_token_ids()
        text_ids = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        cls = LlavaOnevisionConfig if self.family == "llava_onevision" else LlavaNextVideoConfig
        return cls(
            text_config={**self.text, **text_ids},
            vision_config=dict(self.vision),
            image_token_index=ids["image_token_id"],
            video_token_index=ids["video_token_id"],
            tie_word_embeddings=self.tie_word_embeddings,
            **self.extra,
        )

    def n_params(self) -> int:
        """Parameter count, computed on the meta device (no memory)."""
        import torch

        with torch.device("meta"):
            model = model_class(self.family)(self.config())
        return sum(p.numel() for p in model.parameters())


def model_class(family: str):
    """The `...ForConditionalGeneration` class of a supported family (one of FAMILIES)."""
    from transformers import (LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
                              Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)

    return {"qwen2_vl": Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration,
            "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration,
            "llava_next_video": LlavaNextVideoForConditionalGeneration}[family]


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


def tiny_qwen3_vl() -> Preset:
    """Qwen3-VL, random weights: the `tiny` LM width (4 layers x 64, head_dim 16, interleaved M-RoPE), a
    3-block tower of 16 px patches whose blocks 0 and 1 feed DeepStack into LM layers 0 and 1; 48 cells
    of 32 px a 320 x 240 view.

    mrope_section [4, 2, 2] over head_dim / 2 = 8 frequencies interleaves as the real [24, 20, 20] over
    64 does: h and w on every third frequency from 1 and 2, t on the rest (T H W T H W T T).
    """
    lm = tiny().text
    return Preset(
        name="tiny-qwen3-vl",
        family="qwen3_vl",
        text=dict(vocab_size=VOCAB_SIZE, hidden_size=lm["hidden_size"], intermediate_size=lm["intermediate_size"],
                  num_hidden_layers=lm["num_hidden_layers"], num_attention_heads=lm["num_attention_heads"],
                  num_key_value_heads=lm["num_key_value_heads"], head_dim=16, max_position_embeddings=32768,
                  rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                   "mrope_interleaved": True}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                    out_hidden_size=lm["hidden_size"], hidden_act="gelu_pytorch_tanh", patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                    deepstack_visual_indexes=[0, 1]),
        min_pixels=64 * 64,
        max_pixels=48 * 32 * 32,  # 320x240 -> 256x192 = 8 x 6 cells
        seed=4,
    )


def tiny_qwen3_vl_moe() -> Preset:
    """Qwen3-VL-MoE, random weights: `tiny-qwen3-vl` with every LM MLP a mixture of 4 experts (top 2)."""
    base = tiny_qwen3_vl()
    return dataclasses.replace(
        base, name="tiny-qwen3-vl-moe", family="qwen3_vl_moe",
        text={**base.text, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "decoder_sparse_step": 1, "mlp_only_layers": []},
        seed=5,
    )


def qwen3_vl_4b() -> Preset:
    """Architecture of Qwen/Qwen3-VL-4B-Instruct (config.json), random weights: Qwen3-4B LM (hidden 2560,
    36 layers, 32 heads, 8 KV heads, head_dim 128, tied embeddings) and the 24-block, 1024-wide tower
    with DeepStack from blocks 5, 11, 17.

    Pixel budget: 1280 cells of 32 px a view (the 1280 tokens qwen-vl-utils gives Qwen2.5-VL), not the
    published processor's 16,777,216 pixels (16,384 cells, far beyond what training fits).
    """
    return Preset(
        name="qwen3-vl-4b",
        family="qwen3_vl",
        text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3,
                    out_hidden_size=2560, hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        min_pixels=64 * 32 * 32,  # the published processor's 65,536
        max_pixels=1280 * 32 * 32,
        seed=0,
        tie_word_embeddings=True,
    )


def qwen3_vl_8b() -> Preset:
    """Architecture of Qwen/Qwen3-VL-8B-Instruct (config.json), random weights: Qwen3-8B LM (hidden 4096,
    36 layers, 32 heads, 8 KV heads, head_dim 128) and the 27-block, 1152-wide tower with DeepStack from
    blocks 8, 16, 24. Pixel budget as `qwen3-vl-4b`."""
    base = qwen3_vl_4b()
    return dataclasses.replace(
        base, name="qwen3-vl-8b",
        text={**base.text, "hidden_size": 4096, "intermediate_size": 12288},
        vision={**base.vision, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096,
                "deepstack_visual_indexes": [8, 16, 24]},
        tie_word_embeddings=False,
    )


def tiny_llava_ov() -> Preset:
    """LLaVA-OneVision, random weights: the `tiny` LM as Qwen2, SigLIP 2 layers x 32 on 118 px, 8 x 8 cells."""
    lm = tiny().text
    S = 118  # 8 x 14 + 6: like 384 = 27 x 14 + 6, the last 6 pixel rows / columns feed no patch
    return Preset(
        name="tiny-llava-ov",
        family="llava_onevision",
        text=dict(model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=lm["hidden_size"],
                  intermediate_size=lm["intermediate_size"], num_hidden_layers=lm["num_hidden_layers"],
                  num_attention_heads=lm["num_attention_heads"], num_key_value_heads=lm["num_key_value_heads"],
                  max_position_embeddings=32768, rms_norm_eps=1e-6, max_window_layers=lm["num_hidden_layers"],
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=S, patch_size=14, vision_use_head=False),
        extra=dict(vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                   image_grid_pinpoints=[[S, S], [S, 2 * S], [2 * S, S], [2 * S, 2 * S]]),
        seed=2,
    )


def tiny_llava_next_video() -> Preset:
    """LLaVA-NeXT-Video, random weights: the `tiny` LM as Llama, CLIP 2 layers x 32 on 118 px, 8 x 8 cells.

    Its images go through any-resolution: the grid pinpoints (as the real model's, in tower
    tiles) hold no 1 x 1 tile, so a square view gets the base patch and 2 crops.
    """
    base = tiny_llava_ov()
    S = base.vision["image_size"]
    text = {k: v for k, v in base.text.items() if k not in ("model_type", "max_window_layers")}
    return dataclasses.replace(
        base, name="tiny-llava-next-video", family="llava_next_video",
        text={**text, "model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
        vision=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=S, patch_size=14, projection_dim=32),
        extra=dict(vision_feature_select_strategy="default", vision_feature_layer=-2,
                   image_grid_pinpoints=[[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]),
        seed=3,
    )


def llava_onevision_qwen2_7b() -> Preset:
    """Architecture of llava-hf/llava-onevision-qwen2-7b-ov-hf (config.json), random weights."""
    return Preset(
        name="llava-onevision-qwen2-7b",
        family="llava_onevision",
        text=dict(model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, max_window_layers=28, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                    num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                    vision_use_head=False),
        extra=dict(vision_feature_select_strategy="full", vision_feature_layer=-1,
                   vision_aspect_ratio="anyres_max_9"),  # image_grid_pinpoints: the config's default (384 tiles)
        seed=0,
    )


def llava_next_video_7b() -> Preset:
    """Architecture of llava-hf/LLaVA-NeXT-Video-7B-hf (config.json), random weights."""
    return Preset(
        name="llava-next-video-7b",
        family="llava_next_video",
        text=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                    projection_dim=768, hidden_act="quick_gelu"),
        extra=dict(vision_feature_select_strategy="default", vision_feature_layer=-2,
                   image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        seed=0,
    )


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny,
    "tiny-qwen2.5": tiny_qwen25,
    "qwen2-vl-7b": qwen2_vl_7b,
    "qwen2.5-vl-7b": qwen25_vl_7b,
    "tiny-qwen3-vl": tiny_qwen3_vl,
    "tiny-qwen3-vl-moe": tiny_qwen3_vl_moe,
    "qwen3-vl-4b": qwen3_vl_4b,
    "qwen3-vl-8b": qwen3_vl_8b,
    "tiny-llava-ov": tiny_llava_ov,
    "tiny-llava-next-video": tiny_llava_next_video,
    "llava-onevision-qwen2-7b": llava_onevision_qwen2_7b,
    "llava-next-video-7b": llava_next_video_7b,
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; KeyError if there is none (see `PRESETS`)."""
    return PRESETS[name]()
