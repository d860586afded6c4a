"""The VLM wrapper: capture what every LM layer's attention reads, run the fused head.

`GaspVLM` wraps a Hugging Face VLM (any family with an adapter) and the fused head:

- A forward pre-hook on each language-model layer's query projection keeps its
  input (the hidden state after the layer's input norm) at the vision-token cell
  positions of every frame only: (F, N, D) per layer, never a full `output_hidden_states`.
- `forward(batch)` runs the VLM's base model (no LM head: logits are not needed),
  stacks the captures to per-frame features (L, F, N, D), applies the fused head once
  per frame, gathers every supervised pair (A, B) from them and computes the GASP loss
  over all pairs in one batched product (float32); returns the loss with its parts.
- What trains: `heads` (the VLM runs without autograd; only the head learns),
  `lora` (PEFT LoRA on the LM's linear layers + heads) or `full` (LM + heads). The
  vision tower is frozen unless asked otherwise; the unused LM head always is.
- Activation checkpointing (non-reentrant) works with the hooks: a layer's
  recomputation during backward fires the hook again, which is ignored because
  that layer's capture of this forward is already held.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from losses.gasp import combine, gasp_loss_terms, loss_to_backward, pair_similarities, pair_view
from losses.metrics import RAW_TAU, match_stats
from model.head import FusedCorrespondenceHead, head_dim_for

log = logging.getLogger(__name__)
TRAINABLE = ("heads", "lora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class WrapperError(Exception):
    """A model that cannot be wrapped (unknown layout); one line."""


@dataclass
class GaspConfig:
    """How the VLM is wrapped and what trains."""

    trainable: str = "heads"
    """heads | lora | full"""
    freeze_vision: bool = True
    """Keep the vision tower (and projector) frozen."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the language model (lora / full)."""
    head_dim: int = 256
    """d of the heads (min(d, D) is used)."""
    tau: float = 0.07
    lambda_depth: float = 1.0
    head: str = "linear"
    """linear | mlp (DESIGN §6)."""
    depth_loss: str = "relative"
    """relative (the paper's form) | log."""
    layer_weights: Sequence[float] | None = None
    """Per-layer loss weights w_l (default all 1)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)} (got {self.trainable!r})")
        if self.tau <= 0:
            raise ValueError(f"--tau must be > 0 (got {self.tau})")


def find_lm_layers(vlm: nn.Module) -> nn.ModuleList:
    """The decoder layers of the language model (each with `self_attn.q_proj`)."""
    base = getattr(vlm, "model", vlm)
    for path in ("language_model.layers", "language_model.model.layers", "model.layers", "layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) and hasattr(obj[0], "self_attn"):
            return obj
    raise WrapperError(f"cannot find the language model's decoder layers in {type(vlm).__name__}")


def find_vision_modules(vlm: nn.Module) -> list[nn.Module]:
    base = getattr(vlm, "model", vlm)
    return [m for name in ("visual", "vision_tower", "multi_modal_projector", "image_newline")
            if isinstance(m := getattr(base, name, None), nn.Module)]


class GaspVLM(nn.Module):
    """A VLM plus the fused all-layer correspondence head (see module docstring)."""

    def __init__(self, vlm: nn.Module, cfg: GaspConfig, head: FusedCorrespondenceHead | None = None):
        super().__init__()
        self.cfg = cfg
        text_cfg = getattr(vlm.config, "text_config", vlm.config)
        self.hidden_size = int(text_cfg.hidden_size)
        if cfg.trainable == "lora":
            vlm = _apply_lora(vlm, cfg)
        self.vlm = vlm
        # not registered as a submodule (it already is, inside the VLM): a second registration
        # would list every decoder parameter twice in state_dict()
        self.__dict__["layers"] = find_lm_layers(self._base_vlm())
        self.num_layers = len(self.layers)
        if head is None:
            head = FusedCorrespondenceHead(self.num_layers, self.hidden_size,
                                           head_dim=head_dim_for(self.hidden_size, cfg.head_dim), kind=cfg.head)
        if head.num_layers != self.num_layers or head.hidden_size != self.hidden_size:
            from model.head import HeadShapeError

            raise HeadShapeError(f"heads (L={head.num_layers}, D={head.hidden_size}) do not fit this model "
                                 f"(L={self.num_layers}, D={self.hidden_size})")
        self.head = head
        self.register_buffer("layer_weights", None if cfg.layer_weights is None else
                             torch.as_tensor(list(cfg.layer_weights), dtype=torch.float32), persistent=False)
        if self.layer_weights is not None and self.layer_weights.shape != (self.num_layers,):
            raise ValueError(f"--layer-weights needs {self.num_layers} values (one per layer), "
                             f"got {self.layer_weights.numel()}")
        self._set_trainable()
        if cfg.gradient_checkpointing and cfg.trainable != "heads":
            self._base_vlm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._positions: torch.Tensor | None = None
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = [layer.self_attn.q_proj.register_forward_pre_hook(self._make_hook(l))
                       for l, layer in enumerate(self.layers)]

    # ------------------------------------------------------------------ set-up
    def _base_vlm(self) -> nn.Module:
        """The Hugging Face model under a PEFT wrapper, if any."""
        v = self.vlm
        if hasattr(v, "get_base_model"):
            v = v.get_base_model()
        return v

    def _set_trainable(self) -> None:
        base = self._base_vlm()
        mode = self.cfg.trainable
        for n, p in self.vlm.named_parameters():
            if mode == "heads":
                p.requires_grad_(False)
            elif mode == "lora":
                p.requires_grad_("lora_" in n)
        if mode == "full":
            for p in base.parameters():
                p.requires_grad_(False)
            # every layer but the last feeds some head; of the last, only the input norm does
            # (its attention and MLP outputs reach no head), so the rest stays frozen
            for p in self.layers[:-1].parameters():
                p.requires_grad_(True)
            for p in self.layers[-1].input_layernorm.parameters():
                p.requires_grad_(True)
        if not self.cfg.freeze_vision:
            for m in find_vision_modules(base):
                for p in m.parameters():
                    p.requires_grad_(True)
            newline = getattr(getattr(base, "model", base), "image_newline", None)  # LLaVA: a bare parameter
            if isinstance(newline, nn.Parameter):
                newline.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters() if p.requires_grad)
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        log.info("trainable: %s (%.2fM of %.2fM parameters)", mode, n_train / 1e6, n_all / 1e6)

    def query_projections(self) -> list[nn.Module]:
        """Each layer's query projection (the LoRA base layer when wrapped)."""
        out = []
        for layer in self.layers:
            q = layer.self_attn.q_proj
            out.append(getattr(q, "base_layer", q))
        return out

    def init_heads(self) -> None:
        """SVD initialisation of every head from its layer's query projection (DESIGN §6)."""
        self.head.init_from_query_modules(self.query_projections())

    # ------------------------------------------------------------------ capture
    def _make_hook(self, l: int):
        def hook(module: nn.Module, args: tuple[Any, ...]):
            where = self._positions
            x = args[0]  # (B, S, D): the query projection's input
            if where is None:
                return None  # not a capturing forward
            rows, pos = where
            if int(rows.max()) >= x.shape[0] or int(pos.max()) >= x.shape[1]:
                return None  # not a capturing forward (another batch shape)
            picked = x[rows.to(x.device)[:, None], pos.to(x.device)]  # (F, N, D)
            # An activation-checkpoint recompute runs this hook again: it must repeat the
            # same ops (the checkpoint compares saved tensors), but the capture of this
            # forward is already held, so the result is dropped.
            if l not in self._captured:
                self._captured[l] = picked
            return None

        return hook

    def capture(self, batch: dict[str, Any], model_inputs: dict[str, Any]) -> torch.Tensor:
        """Run the VLM and return per-frame features (L, F, N, D) in the model dtype: what each layer's
        attention reads at the vision-token cells of every frame of the batch (padding cells point at
        position 0 of their row and are masked later)."""
        # positions stay set after the forward: a checkpoint recompute during backward needs them
        self._positions = (batch["frame_clip"].long(), batch["cell_pos"].long())  # (F,), (F, N)
        self._captured = {}
        grad = self.cfg.trainable != "heads" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            base = self._base_vlm()
            body = getattr(base, "model", base)
            body(**model_inputs, use_cache=False)
        if len(self._captured) != self.num_layers:
            raise WrapperError(f"captured {len(self._captured)} of {self.num_layers} layers: the hooks did not fire")
        return torch.stack([self._captured[l] for l in range(self.num_layers)])  # (L, F, N, D)

    def batch_to_device(self, batch: dict[str, Any], adapter, device: torch.device,
                        dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any]]:
        """(batch on `device`, the model's inputs): M-RoPE positions computed on the CPU batch first
        (Qwen; no per-image host syncs on a GPU), floating pixel values cast to `dtype`."""
        from model.qwen import rope_position_ids

        positions = rope_position_ids(self._base_vlm(), adapter.model_inputs(batch))
        out = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        inputs = adapter.model_inputs(out)
        if positions is not None:
            inputs["position_ids"] = positions.to(device, non_blocking=True)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return out, inputs

    def release(self) -> None:
        """Stop capturing (e.g. before using the VLM for generation)."""
        self._positions = None
        self._captured = {}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], model_inputs: dict[str, Any], global_counts: torch.Tensor | None = None,
                grad_accum_steps: int = 1, world_size: int = 1, return_features: bool = False):
        """Loss of a batch of clips: every supervised pair from the per-frame features in one batched op.

        With `global_counts` (3,) the returned loss is the micro-batch loss to hand
        DeepSpeed's backward (DESIGN §6 scaling); without, the batch's own mean loss.
        Returns (loss, parts) or, with return_features, (loss, parts, s, feats).
        """
        feats = self.capture(batch, model_inputs)  # (L, F, N, D)
        s = pair_similarities(self.head(feats), batch["pair_frames"], self.cfg.tau)  # (L, P, N, N) float32
        terms = gasp_loss_terms(s, batch, self.cfg.depth_loss)
        if global_counts is None:
            loss, parts = combine(terms, self.layer_weights, self.cfg.lambda_depth)
        else:
            loss, parts = loss_to_backward(terms, global_counts, grad_accum_steps, world_size,
                                           self.layer_weights, self.cfg.lambda_depth)
        parts["n_ab"], parts["n_ba"], parts["n_depth"] = terms.counts().tolist()
        if return_features:
            return loss, parts, s, feats
        return loss, parts

    @torch.no_grad()
    def match(self, batch: dict[str, Any], model_inputs: dict[str, Any], raw: bool = True, head: bool = True,
              tau_head: float | None = None):
        """Per-anchor match statistics through the heads and of the raw features (tau 0.07 always):
        (head_stats | None, raw_stats | None), one capture for both."""
        feats = self.capture(batch, model_inputs)  # (L, F, N, D)
        view = pair_view(batch)
        datasets = batch.get("datasets")
        head_stats = raw_stats = None
        if head:
            s_head = pair_similarities(self.head(feats), batch["pair_frames"], tau_head or self.cfg.tau)
            head_stats = match_stats(s_head, view, datasets)
        if raw:
            unit = torch.nn.functional.normalize(feats.float(), dim=-1)
            raw_stats = match_stats(pair_similarities(unit, batch["pair_frames"], RAW_TAU), view, datasets)
        return head_stats, raw_stats


def _apply_lora(vlm: nn.Module, cfg: GaspConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    layers = find_lm_layers(vlm)
    prefix = None
    for name, mod in vlm.named_modules():
        if mod is layers:
            prefix = name
            break
    # only the language model's linear layers (never the vision tower's), and not the last
    # layer's: its attention and MLP outputs reach no head
    last = len(layers) - 1
    idx = "|".join(str(i) for i in range(last)) or "-1"
    pattern = rf"^{re.escape(prefix)}\.({idx})\..*\b({'|'.join(LORA_TARGETS)})$"
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=pattern, bias="none")
    return get_peft_model(vlm, lcfg)
