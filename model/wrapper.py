"""The VLM wrapper: capture what every LM layer's attention reads, run the fused head.

`GaspVLM` wraps a Hugging Face VLM (any family with an adapter) and the fused head:

- A forward pre-hook on each language-model layer's query projection keeps its
  input (the hidden state after the layer's input norm) at the vision-token cell
  positions of every frame only: (F, N, D) per layer, never a full `output_hidden_states`.
- `forward(batch)` runs the VLM's base model once, stacks the captures to per-frame
  features (L, F, N, D), applies the fused head once per frame, gathers every supervised
  pair (A, B) from them and computes the GASP loss over all pairs in one batched product
  (float32). With `lambda_lm > 0` the LM head runs on the final hidden states at the
  labelled positions only (no (B, S, V) logits) for L_LM (DESIGN §5, §6). Returns the
  joint loss with its parts.
- What trains: `heads` (the VLM runs without autograd; only the head learns; refused
  with L_LM), `lora` (PEFT LoRA on the LM's linear layers + heads) or `full` (LM +
  heads). Without L_LM the last layer's attention and MLP and the LM head reach no loss
  and stay frozen (LoRA leaves the last layer out); with L_LM they train (`full`: the
  whole LM, its final norm and LM head; `lora`: LoRA on every layer, the LM head frozen as
  LoRA recipes keep it). The vision tower is frozen unless asked otherwise.
- ZeRO-3 (DESIGN §6): every rank runs every module on every micro-batch. The trainer
  passes `vision_dummies` when another rank's micro-batch runs the vision tower more often
  than this one's (a clip-only batch has no video, a text-only one no media): each dummy
  runs the tower on its smallest real input and enters the loss times zero; the heads and
  the LM head always run (on no rows, times zero, when there is nothing to supervise).
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

from losses.gasp import LossTerms, combine, loss_to_backward, pair_loss_terms, pair_similarities, pair_view
from losses.metrics import RAW_TAU, match_stats
from model.head import FusedCorrespondenceHead, head_dim_for

log = logging.getLogger(__name__)
TRAINABLE = ("heads", "lora", "full", "projector")
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
    train_projector: bool = False
    """Train the vision-language projector (LLaVA: multi_modal_projector + image_newline, which stays
    frozen under ZeRO-3; Qwen: the tower's merger) even with the tower frozen. `trainable="projector"`
    trains it alone (+ heads)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the language model (lora / full)."""
    head_dim: int = 256
    """d of the heads (min(d, D) is used)."""
    tau: float = 0.07
    lambda_depth: float = 1.0
    lambda_corr: float = 1.0
    lambda_lm: float = 0.0
    """Weight of L_LM; > 0 runs the LM head on the labelled positions (DESIGN §6)."""
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
        for name in ("lambda_depth", "lambda_corr", "lambda_lm"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.trainable == "projector" and not self.freeze_vision:
            raise ValueError("--trainable projector trains the projector alone; --no-freeze-vision would train "
                             "the tower too: drop one of them")
        if self.lambda_lm > 0 and self.trainable == "heads":
            raise ValueError("--trainable heads trains the correspondence heads only and runs the model without "
                             "autograd: L_LM (--lambda-lm > 0) needs --trainable lora or full")


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


def trainable_newline(vlm: nn.Module) -> nn.Parameter | None:
    """LLaVA's image_newline (a bare parameter of the model body) when it may train; None otherwise.

    Under ZeRO-3 (DeepSpeed 0.19) it stays as loaded. It is used after the projector for every media
    input, and by the dummy tower call of a text-only micro-batch. Once a step repeats the previous
    step's module order, ZeRO-3 replays its trace and releases the parameter before its gradient arrives
    ("The size of tensor a (0) must match the size of tensor b (D)", measured on two text-only steps
    in a row; marking it persistent did not help). It is one D-vector, a separator."""
    newline = getattr(getattr(vlm, "model", vlm), "image_newline", None)
    if not isinstance(newline, nn.Parameter):
        return None
    if hasattr(newline, "ds_id"):
        log.info("ZeRO-3: image_newline stays frozen (a bare parameter ZeRO-3 releases before its gradient)")
        return None
    return newline


def find_projector_params(vlm: nn.Module) -> list[nn.Parameter]:
    """The vision-language projector's parameters: LLaVA's multi_modal_projector and image_newline
    (`trainable_newline`: not under ZeRO-3), Qwen's patch merger (the last stage of its tower)."""
    base = getattr(vlm, "model", vlm)
    out: list[nn.Parameter] = []
    for name in ("multi_modal_projector",):
        m = getattr(base, name, None)
        if isinstance(m, nn.Module):
            out += list(m.parameters())
    newline = trainable_newline(vlm)
    if newline is not None:
        out.append(newline)
    merger = getattr(getattr(base, "visual", None), "merger", None)
    if isinstance(merger, nn.Module):
        out += list(merger.parameters())
    if not out:
        raise WrapperError(f"cannot find the vision-language projector of {type(vlm).__name__}")
    return out


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
            if self.cfg.lambda_lm > 0:  # L_LM reaches every layer, the final norm and the LM head
                for p in self.layers.parameters():
                    p.requires_grad_(True)
                for m in (self._final_norm(), self.lm_head()):
                    for p in m.parameters():
                        p.requires_grad_(True)
            else:
                # every layer but the last feeds some head; of the last, only the input norm does
                # (its attention and MLP outputs reach no head), so the rest stays frozen
                for p in self.layers[:-1].parameters():
                    p.requires_grad_(True)
                for p in self.layers[-1].input_layernorm.parameters():
                    p.requires_grad_(True)
        if mode == "projector":
            for p in base.parameters():
                p.requires_grad_(False)
        if mode == "projector" or self.cfg.train_projector:
            for p in find_projector_params(base):
                p.requires_grad_(True)
        if not self.cfg.freeze_vision:
            for m in find_vision_modules(base):
                for p in m.parameters():
                    p.requires_grad_(True)
            newline = trainable_newline(base)  # LLaVA: a bare parameter, not in the modules above
            if newline is not None:
                newline.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters() if p.requires_grad)
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        log.info("trainable: %s (%.2fM of %.2fM parameters)", mode, n_train / 1e6, n_all / 1e6)

    def lm_head(self) -> nn.Module:
        """The VLM's LM head (output embedding)."""
        head = self._base_vlm().get_output_embeddings()
        if head is None:
            raise WrapperError(f"{type(self._base_vlm()).__name__} has no LM head (get_output_embeddings)")
        return head

    def _final_norm(self) -> nn.Module:
        """The language model's final norm (after the last layer)."""
        base = self._base_vlm()
        body = getattr(base, "model", base)
        lm = getattr(body, "language_model", body)
        norm = getattr(lm, "norm", None) or getattr(getattr(lm, "model", lm), "norm", None)
        if not isinstance(norm, nn.Module):
            raise WrapperError(f"cannot find the language model's final norm in {type(base).__name__}")
        return norm

    def _lm_body(self) -> nn.Module:
        """The language model's decoder stack (the module that holds the layers; its input is inputs_embeds)."""
        for m in self._base_vlm().modules():
            if getattr(m, "layers", None) is self.layers:
                return m
        raise WrapperError(f"cannot find the module holding the decoder layers in {type(self._base_vlm()).__name__}")

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
            if rows.numel() and (int(rows.max()) >= x.shape[0] or int(pos.max()) >= x.shape[1]):
                return None  # not a capturing forward (another batch shape)
            picked = x[rows.to(x.device)[:, None], pos.to(x.device)]  # (F, N, D)
            # An activation-checkpoint recompute runs this hook again: it must repeat the
            # same ops (the checkpoint compares saved tensors), but the capture of this
            # forward is already held, so the result is dropped.
            if l not in self._captured:
                self._captured[l] = picked
            return None

        return hook

    def capture(self, batch: dict[str, Any], model_inputs: dict[str, Any], vision_dummies: Sequence = (),
                keep_hidden: bool = False, lm_input: bool = False):
        """Run the VLM and return per-frame features (L, F, N, D) in the model dtype: what each layer's
        attention reads at the vision-token cells of every frame of the batch (padding cells point at
        position 0 of their row and are masked later). With `keep_hidden`, returns (features, the final
        hidden states (B, S, D), the zero-valued sum of the dummy vision outputs). With `lm_input`, the
        language model's input at the same cells (its `inputs_embeds`: the projector's output as the LM
        receives it, before any layer or norm) comes first: (1 + L, F, N, D). Optional, for the probe."""
        # positions stay set after the forward: a checkpoint recompute during backward needs them
        self._positions = (batch["frame_clip"].long(), batch["cell_pos"].long())  # (F,), (F, N)
        self._captured = {}
        lm_in: list[torch.Tensor] = []
        grad = self.cfg.trainable != "heads" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            base = self._base_vlm()
            body = getattr(base, "model", base)
            zero_box: list = [0.0]
            hook = None
            if vision_dummies:
                # run the dummies where the body runs its own vision tower: right after the token embedding
                # (every family embeds the tokens first), so every rank calls the modules in one order
                # (ZeRO-3 gathers each module's weights with a collective when it is called)
                def after_embedding(module, args, output):
                    if isinstance(zero_box[0], float):
                        zero_box[0] = self._run_dummies(body, vision_dummies) + output.sum() * 0.0
                    return None

                hook = body.get_input_embeddings().register_forward_hook(after_embedding)
            in_hook = None
            if lm_input:
                def before_lm(module, args, kwargs):
                    x = kwargs.get("inputs_embeds")  # (B, S, D); every family hands the LM inputs_embeds
                    if x is not None and not lm_in:
                        rows, pos = self._positions
                        lm_in.append(x[rows.to(x.device)[:, None], pos.to(x.device)])  # (F, N, D)
                    return None

                in_hook = self._lm_body().register_forward_pre_hook(before_lm, with_kwargs=True)
            try:
                out = body(**model_inputs, use_cache=False)
            finally:
                for h in (hook, in_hook):
                    if h is not None:
                        h.remove()
            zero = zero_box[0]
        if len(self._captured) != self.num_layers:
            raise WrapperError(f"captured {len(self._captured)} of {self.num_layers} layers: the hooks did not fire")
        feats = torch.stack([self._captured[l] for l in range(self.num_layers)])  # (L, F, N, D)
        # the per-layer pieces are copied into feats: drop them (backward does not need them; holding
        # them to the next forward cost a second copy of the features) but keep the keys, so a
        # checkpoint recompute during backward still finds its layer captured and drops its repeat
        self._captured = dict.fromkeys(self._captured)
        if lm_input:
            if not lm_in:
                raise WrapperError(f"{type(self._base_vlm()).__name__}'s language model was not called with "
                                   f"inputs_embeds: its input at the vision tokens cannot be captured")
            feats = torch.cat([lm_in[0][None], feats])  # (1 + L, F, N, D)
        if keep_hidden:
            return feats, out.last_hidden_state, zero
        return feats

    def _run_dummies(self, body: nn.Module, dummies: Sequence) -> torch.Tensor | float:
        """Run the vision tower on each dummy input; the sum of all outputs times zero (still in the graph)."""
        zero: torch.Tensor | float = 0.0
        if not dummies:
            return zero
        ref = next(p for p in self.vlm.parameters())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        for name, kwargs in dummies:
            kw = {k: (v.to(ref.device, dtype) if v.is_floating_point() else v.to(ref.device))
                  if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            out = getattr(body, name)(**kw)
            zero = zero + 0.0 * _tensor_sum(out)
        return zero

    def lm_terms(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """(summed cross-entropy, labelled positions, correct predictions) of the LM labels: the LM head
        on the final hidden states at the positions whose next token is labelled (shifted, DESIGN §5).
        Runs the LM head on no rows when nothing is labelled (ZeRO-3: the module still runs)."""
        from losses.gasp import lm_sums

        head = self.lm_head()
        if labels is None:
            labels = torch.full(hidden.shape[:2], -100, dtype=torch.long, device=hidden.device)
        labels = labels.to(hidden.device)
        nxt = labels[:, 1:]
        rows, cols = torch.nonzero(nxt != -100, as_tuple=True)
        logits = head(hidden[:, :-1][rows, cols])  # (n, V)
        total, correct = lm_sums(logits, nxt[rows, cols])
        return total, torch.tensor(float(rows.numel()), device=hidden.device), correct

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
                grad_accum_steps: int = 1, world_size: int = 1, return_features: bool = False,
                vision_dummies: Sequence = ()):
        """Joint loss of a batch of clips and conversations (DESIGN §6): every supervised pair from the
        per-frame features in one batched op, and L_LM (with `lambda_lm > 0`) from one LM-head call on
        the labelled positions.

        With `global_counts` (4,) [n_ab, n_ba, n_depth, n_lm] the returned loss is the micro-batch loss
        to hand DeepSpeed's backward (DESIGN §6 scaling); without, the batch's own mean loss.
        Returns (loss, parts) or, with return_features, (loss, parts, s, feats).
        """
        cfg = self.cfg
        use_lm = cfg.lambda_lm > 0
        feats, hidden, zero = self.capture(batch, model_inputs, vision_dummies, keep_hidden=True)
        if isinstance(self.head, FusedCorrespondenceHead):  # head and loss per chunk of layers: DESIGN §6 memory
            terms = LossTerms.of(*self.head(feats, loss=dict(batch=batch, tau=cfg.tau, depth_loss=cfg.depth_loss)))
        else:  # the per-layer reference loop (tests, benchmarks)
            terms = pair_loss_terms(self.head(feats), batch, cfg.tau, cfg.depth_loss)
        lm_sum = n_lm = correct = None
        if use_lm:
            lm_sum, n_lm, correct = self.lm_terms(hidden, batch.get("labels"))
        kw = dict(lambda_corr=cfg.lambda_corr, lm_sum=lm_sum, n_lm=n_lm, lambda_lm=cfg.lambda_lm)
        if global_counts is None:
            loss, parts = combine(terms, self.layer_weights, cfg.lambda_depth, **kw)
        else:
            loss, parts = loss_to_backward(terms, global_counts, grad_accum_steps, world_size,
                                           self.layer_weights, cfg.lambda_depth, **kw)
        loss = loss + zero
        parts["n_ab"], parts["n_ba"], parts["n_depth"] = terms.counts().tolist()
        parts["n_lm"] = float(n_lm) if n_lm is not None else 0.0
        parts["lm_sum"] = float(lm_sum.detach()) if lm_sum is not None else 0.0
        parts["lm_correct"] = float(correct) if correct is not None else 0.0
        if return_features:
            with torch.no_grad():
                s = pair_similarities(self.head(feats), batch["pair_frames"], cfg.tau)  # (L, P, N, N) float32
            return loss, parts, s, feats
        return loss, parts

    @torch.no_grad()
    def lm_eval(self, batch: dict[str, Any], model_inputs: dict[str, Any]) -> tuple[float, float, float]:
        """(summed LM loss, labelled positions, correct next-token predictions) of a batch: LM retention."""
        _, hidden, _ = self.capture(batch, model_inputs, keep_hidden=True)
        total, n, correct = self.lm_terms(hidden, batch.get("labels"))
        return float(total), float(n), float(correct)

    @torch.no_grad()
    def match(self, batch: dict[str, Any], model_inputs: dict[str, Any], raw: bool = True, head: bool = True,
              tau_head: float | None = None, lm_input: bool = False):
        """Per-anchor match statistics through the heads and of the raw features (tau 0.07 always):
        (head_stats | None, raw_stats | None), one capture for both. With `lm_input`, a third item: the raw
        statistics (one layer) of the LM's input at the vision tokens, the projector output (no head)."""
        # (L, F, N, D); (1 + L, ...) with lm_input (capture is called as before without it: probes patch it)
        feats = self.capture(batch, model_inputs, lm_input=True) if lm_input else self.capture(batch, model_inputs)
        view = pair_view(batch)
        datasets = batch.get("datasets")

        def raw_of(f: torch.Tensor):
            unit = torch.nn.functional.normalize(f.float(), dim=-1)
            return match_stats(pair_similarities(unit, batch["pair_frames"], RAW_TAU), view, datasets)

        in_stats = None
        if lm_input:
            in_stats, feats = raw_of(feats[:1]), feats[1:]
        head_stats = raw_stats = None
        if head:
            s_head = pair_similarities(self.head(feats), batch["pair_frames"], tau_head or self.cfg.tau)
            head_stats = match_stats(s_head, view, datasets)
        if raw:
            raw_stats = raw_of(feats)
        if lm_input:
            return head_stats, raw_stats, in_stats
        return head_stats, raw_stats


def _tensor_sum(out: Any) -> torch.Tensor | float:
    """Sum of every floating tensor in a model output (tensors, tuples, lists, dicts, ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else 0.0
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        total: torch.Tensor | float = 0.0
        for x in out:
            total = total + _tensor_sum(x)
        return total
    return 0.0


def _apply_lora(vlm: nn.Module, cfg: GaspConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    layers = find_lm_layers(vlm)
    prefix = None
    for name, mod in vlm.named_modules():
        if mod is layers:
            prefix = name
            break
    # only the language model's linear layers (never the vision tower's), and not the last
    # layer's unless L_LM trains: without it, its attention and MLP outputs reach no loss
    last = len(layers) if cfg.lambda_lm > 0 else len(layers) - 1
    idx = "|".join(str(i) for i in range(last)) or "-1"
    pattern = rf"^{re.escape(prefix)}\.({idx})\..*\b({'|'.join(LORA_TARGETS)})$"
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=pattern, bias="none")
    return get_peft_model(vlm, lcfg)
