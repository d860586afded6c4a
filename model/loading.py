"""One way in for every entry point: `--preset NAME` or `--model PATH` (DESIGN §7, §8).

`build_model_and_processor` returns (model, processor, adapter). A preset name builds a
random-weight model from its config (seeded) and the local tiny processor; a directory
loads a Hugging Face checkpoint of a supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE, LLaVA-OneVision, LLaVA-NeXT-Video: `model.presets.FAMILIES`) with its own processor files.
The family (`model_type` of config.json) picks the model class, processor and adapter.
After that both take the same path: device, eval mode, adapter. Anything that cannot
be loaded fails with one `ModelLoadError` line naming the preset or path.

Attention: `attn_implementation=None` picks `flash_attention_2` when the flash_attn
package imports, the device is CUDA and the dtype is bf16/fp16; otherwise `sdpa`. The
choice is logged. An explicit request that cannot be honoured fails. Under `sdpa` the
Qwen vision towers get packed attention (model/vision_attention.py): one SDPA call per
window size instead of one per window, same numbers.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from data.cli import one_line
from model.presets import FAMILIES, LLAVA_FAMILIES, PRESETS, QWEN3_FAMILIES, Preset, get_preset, model_class
from model.qwen import QwenAdapter, make_processor

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
_HALF = (torch.bfloat16, torch.float16)


SAME_WEIGHTS_UNDER_ZERO3_MAX_WIDTH = 1024
"""Presets up to this LM width (the tiny ones) get identical random weights with and without ZeRO-3."""


class ModelLoadError(Exception):
    """A model or processor could not be built; the message is one line."""


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken build (undefined CUDA symbols)
        return False
    return True


def resolve_attn_implementation(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation to use; ModelLoadError if `requested` cannot be honoured."""
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if requested is None:
        if not on_cuda:
            choice, why = "sdpa", f"device is {device.type}"
        elif dtype not in _HALF:
            choice, why = "sdpa", f"dtype {dtype} is not bf16/fp16"
        elif not _flash_attn_importable():
            choice, why = "sdpa", "flash_attn is not installed"
        else:
            choice, why = "flash_attention_2", "flash_attn found, CUDA, half precision"
        log.info("attention implementation: %s (automatic: %s)", choice, why)
        return choice
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(f"attn_implementation {requested!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if requested == "flash_attention_2":
        if not _flash_attn_importable():
            raise ModelLoadError("attn_implementation 'flash_attention_2' needs the flash_attn package, which "
                                 "does not import here; use 'sdpa' or leave it automatic")
        if not on_cuda:
            raise ModelLoadError(f"attn_implementation 'flash_attention_2' needs a CUDA device, got {device}; "
                                 "use 'sdpa' or leave it automatic")
        if dtype not in _HALF:
            raise ModelLoadError(f"attn_implementation 'flash_attention_2' needs bf16 or fp16, got {dtype}")
    log.info("attention implementation: %s (requested)", requested)
    return requested


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's RNG (CPU, and the CUDA device if any) inside; restore it after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


# --------------------------------------------------------------------------- builders

def build_preset_processor(preset: Preset):
    """The local processor of a preset: tiny tokenizer, PIL image processor, chat template."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if preset.family in LLAVA_FAMILIES:
        return _build_llava_preset_processor(preset)

    from model.tokenizer import CHAT_TEMPLATE, build_tokenizer

    patch, merge, temporal = (preset.vision[k] for k in ("patch_size", "spatial_merge_size", "temporal_patch_size"))
    if preset.family in QWEN3_FAMILIES:
        from model import qwen3

        tokenizer = build_tokenizer()
        tokenizer.chat_template = qwen3.QWEN3_CHAT_TEMPLATE
        image_processor = qwen3.build_image_processor(preset.min_pixels, preset.max_pixels, patch, merge, temporal)
        return qwen3.make_processor(image_processor, tokenizer, qwen3.QWEN3_CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=preset.min_pixels, max_pixels=preset.max_pixels,
                                               patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    return make_processor(image_processor, build_tokenizer(), CHAT_TEMPLATE, preset.family)


def _build_llava_preset_processor(preset: Preset):
    """LLaVA preset: the tiny LLaVA tokenizer; base patch = the tower's S x S input."""
    from model import llava
    from model.llava_tokenizer import CHAT_TEMPLATE, build_tokenizer

    cfg = preset.config()
    vc = cfg.vision_config
    S, p = int(vc.image_size), int(vc.patch_size)
    image_processor = llava.build_image_processor(preset.family, S, cfg.image_grid_pinpoints)
    strategy = cfg.vision_feature_select_strategy
    if preset.family == "llava_onevision":
        settings = dict(num_image_tokens=(S // p) ** 2, vision_feature_select_strategy=strategy,
                        vision_aspect_ratio=cfg.vision_aspect_ratio)
    else:
        settings = dict(patch_size=p, vision_feature_select_strategy=strategy,
                        num_additional_image_tokens=1 if vc.model_type == "clip_vision_model" else 0)
    return llava.make_processor(preset.family, image_processor, build_tokenizer(), CHAT_TEMPLATE, **settings)


def build_preset_model(preset: Preset, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                       device: torch.device | str = "cpu"):
    """Random-weight model of a preset, initialised under `torch.manual_seed(preset.seed)`."""
    device = torch.device(device)
    cls = model_class(preset.family)
    if _zero3() and int(preset.text["hidden_size"]) <= SAME_WEIGHTS_UNDER_ZERO3_MAX_WIDTH:
        # zero.Init draws different random numbers than a plain build: build the plain model
        # (outside ZeRO-3, the same on every rank), then copy it into the partitioned one, so a
        # preset is the same model everywhere (training, probe, evaluation). Larger presets (GPU
        # benchmarks) are drawn partitioned.
        import deepspeed
        import transformers.integrations.deepspeed as hf_ds

        ref = hf_ds._hf_deepspeed_config_weak_ref
        hf_ds._hf_deepspeed_config_weak_ref = None
        try:
            plain = build_preset_model(preset, dtype=dtype, attn_implementation=attn_implementation, device="cpu")
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = ref
        with _seeded(preset.seed, device):
            model = cls._from_config(preset.config(), dtype=dtype, attn_implementation=attn_implementation)
        source = dict(plain.named_parameters())
        params = list(model.named_parameters())
        with torch.no_grad(), deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            for name, p in params:
                p.copy_(source[name].to(p.device, p.dtype))
        return model
    # under ZeRO-3, deepspeed.zero.Init (inside _from_config) places the weights itself
    place = contextlib.nullcontext() if _zero3() else torch.device(device)
    with _seeded(preset.seed, device), place:
        return cls._from_config(preset.config(), dtype=dtype, attn_implementation=attn_implementation)


def _read_chat_template(path: Path, tokenizer, family: str = "qwen2_vl") -> str:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if family in LLAVA_FAMILIES:
        from model.llava_tokenizer import CHAT_TEMPLATE
    elif family in QWEN3_FAMILIES:
        from model.qwen3 import QWEN3_CHAT_TEMPLATE as CHAT_TEMPLATE
    else:
        from model.tokenizer import CHAT_TEMPLATE

    log.warning("%s has no chat template; using the built-in %s-style one", path,
                "LLaVA-OneVision" if family in LLAVA_FAMILIES else "Qwen3-VL" if family in QWEN3_FAMILIES else "Qwen")
    return CHAT_TEMPLATE


def load_processor(path: str | Path, family: str):
    """A checkpoint's own processor (tokenizer, image processor settings, chat template), video-free."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if family in LLAVA_FAMILIES:
        from model import llava

        return llava.load_processor(path, family, tokenizer, _read_chat_template(path, tokenizer, family))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    if family in QWEN3_FAMILIES:
        from model import qwen3

        return qwen3.make_processor(image_processor, tokenizer, _read_chat_template(path, tokenizer, family))
    return make_processor(image_processor, tokenizer, _read_chat_template(path, tokenizer), family)


def checkpoint_family(path: str | Path) -> str:
    """`model_type` of a checkpoint directory; ModelLoadError unless it is a supported family."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{str(path)!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                             "directory with a config.json")
    try:
        family = json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {cfg}: {one_line(e)}") from None
    if family not in FAMILIES:
        raise ModelLoadError(f"{path}: model_type {family!r} is not supported; supported families: "
                             f"{', '.join(FAMILIES)}")
    return family


def build_model_and_processor(preset_or_path: str, *, dtype: torch.dtype | str = torch.float32,
                              attn_implementation: str | None = None, device: torch.device | str = "cpu",
                              max_pixels: int | None = None):
    """(model, processor, adapter) for `--preset NAME` or `--model PATH`.

    dtype: weights' dtype (e.g. torch.bfloat16 on GPU). attn_implementation: None for
    automatic, or one of ATTN_IMPLEMENTATIONS. max_pixels: per-view pixel budget of the
    adapter's resize (default: the processor's); LLaVA families ignore it (each view is
    resized to the vision tower's square input, see model/llava.py). The model is returned on `device`
    (left to DeepSpeed under ZeRO-3) and in eval mode. A name in PRESETS is always the
    preset, even if a directory of that name exists.
    """
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ModelLoadError(f"dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = getattr(torch, dtype)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"bad device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available")
    zero3 = _zero3()

    if preset_or_path in PRESETS:
        preset = get_preset(preset_or_path)
        family = preset.family
        attn = resolve_attn_implementation(attn_implementation, device, dtype)
        model = build_preset_model(preset, dtype=dtype, attn_implementation=attn, device=device)
        processor = build_preset_processor(preset)
        source = f"preset {preset.name}"
    else:
        path = Path(preset_or_path)
        family = checkpoint_family(path)
        attn = resolve_attn_implementation(attn_implementation, device, dtype)
        kwargs = dict(dtype=dtype, attn_implementation=attn, local_files_only=True)
        if device.type != "cpu" and not zero3:
            kwargs["device_map"] = {"": device}
        try:
            model = model_class(family).from_pretrained(path, **kwargs)
            processor = load_processor(path, family)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load {path}: {one_line(e)}") from None
        source = f"checkpoint {path}"

    # ---- one path from here on
    if not zero3:
        model.to(device)
    model.eval()
    if attn == "sdpa":  # one SDPA call per window size in the Qwen vision towers, not one per window
        from model.vision_attention import install_packed_vision_attention

        install_packed_vision_attention(model)
    try:
        adapter = make_adapter(family, processor, model.config, max_pixels=max_pixels)
    except ValueError as e:
        raise ModelLoadError(f"{source}: {one_line(e)}") from None
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: full size
    log.info("model: %s (%s, %.1fM parameters, %s, attention %s, max %d pixels a view)", source, family,
             n_params / 1e6, dtype, attn, adapter.max_pixels)
    return model, processor, adapter


def make_adapter(family: str, processor, config, *, max_pixels: int | None = None):
    """The family adapter (`data.adapter.FamilyAdapter`) of a model's processor and config."""
    if family in LLAVA_FAMILIES:
        from model.llava import LlavaAdapter

        adapter = LlavaAdapter(processor, config)
        if max_pixels is not None and max_pixels != adapter.max_pixels:
            log.info("max_pixels %d ignored: %s views are resized to the vision tower's %dx%d", max_pixels, family,
                     adapter.image_size, adapter.image_size)
        return adapter
    if family in QWEN3_FAMILIES:
        from model.qwen3 import Qwen3Adapter

        return Qwen3Adapter(processor, family=family, max_pixels=max_pixels)
    return QwenAdapter(processor, family=family, max_pixels=max_pixels)


def processor_and_adapter(preset_or_path: str, *, max_pixels: int | None = None):
    """(family, L, D, adapter) without building the weights: for checks before a model is loaded
    (the adapter knows the cell grid, hence the size of the similarity tensors). ModelLoadError."""
    if preset_or_path in PRESETS:
        preset = get_preset(preset_or_path)
        family, config = preset.family, preset.config()
        processor = build_preset_processor(preset)
    else:
        from transformers import AutoConfig

        family = checkpoint_family(preset_or_path)
        try:
            config = AutoConfig.from_pretrained(preset_or_path, local_files_only=True)
            processor = load_processor(preset_or_path, family)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load {preset_or_path}: {one_line(e)}") from None
    text = getattr(config, "text_config", None) or config
    try:
        adapter = make_adapter(family, processor, config, max_pixels=max_pixels)
    except ValueError as e:
        raise ModelLoadError(f"{preset_or_path}: {one_line(e)}") from None
    return family, int(text.num_hidden_layers), int(text.hidden_size), adapter


def save_preset_checkpoint(name: str, out_dir: str | Path) -> Path:
    """Write preset `name` (weights, config, processor) as a Hugging Face checkpoint folder."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    out = Path(out_dir)
    preset = get_preset(name)
    model = build_preset_model(preset)
    model.save_pretrained(out)
    build_preset_processor(preset).save_pretrained(out)
    return out
