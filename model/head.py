"""The fused all-layer correspondence head (DESIGN §6).

Layer l's head reads the input of layer l's query projection at the vision-token
cells and maps it to a unit vector, d = min(256, D):
- `linear`: `f_l(x) = normalize(W_l x)`, W_l of shape (d, D);
- `mlp` (the paper's two-layer head): `f_l(x) = normalize(W2_l GELU(W1_l x))`, W1_l (2d, D),
  W2_l (d, 2d), no biases; initialised `W1 = [W; -W]`, `W2 = [I, -I]` from the linear head's
  SVD init, which it then equals exactly (GELU(a) - GELU(-a) = a).
The L heads are ONE set of float32 parameters with a leading layer axis, applied in
batched products (`FusedCorrespondenceHead`); the per-layer loop `PerLayerHeads` is kept
only as the test and benchmark reference. The heads file records the kind.

Precision: the head always computes in float32. The input (bf16 on GPU) is cast
up, autocast is switched off inside `forward`, and the weight is used as float32
(it is created float32; an engine that keeps a bf16 working copy of it, such as
DeepSpeed bf16, is cast back up here, with its fp32 master weights untouched).

Imports only torch at module level: deepspeed is imported lazily, only when a
parameter is ZeRO-3 partitioned (has `ds_id`), and safetensors only to save/load.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEADS_FORMAT_VERSION = 1
DEFAULT_MAX_DIM = 256


class HeadShapeError(ValueError):
    """Saved heads do not fit the model: number of layers L or hidden width D differ."""


def head_dim_for(hidden_size: int, max_dim: int = DEFAULT_MAX_DIM) -> int:
    """d = min(max_dim, D)."""
    return min(max_dim, hidden_size)


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full ZeRO-3 parameters inside the block (`deepspeed.zero.GatheredParameters`).

    A no-op unless some parameter is partitioned. Under ZeRO-3 it is a collective:
    every rank must enter it, in the same order. `modifier_rank` is the rank whose
    in-place changes are kept (None: read only).
    """
    params = list(params)
    if any(_is_partitioned(p) for p in params):
        import deepspeed  # lazy: model/ imports without DeepSpeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def iter_query_weights(modules: Iterable[nn.Module | torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield each query projection's full weight (out, D) as a float32 copy, one at a time.

    Accepts modules with a `.weight` (e.g. each layer's `q_proj`) or the weight
    tensors. Partitioned ZeRO-3 weights are gathered read-only (modifier_rank=None)
    one layer at a time, so at most one full projection is materialised per rank.
    """
    for m in modules:
        w = m if isinstance(m, torch.Tensor) else m.weight
        with gathered([w], modifier_rank=None):
            yield w.detach().float().clone()  # clone: the gathered storage is freed on exit


def gather_query_weights(modules: Iterable[nn.Module | torch.Tensor]) -> list[torch.Tensor]:
    """List of the full query-projection weights (out, D), float32 copies (see `iter_query_weights`)."""
    return list(iter_query_weights(modules))


def svd_init(w_q: torch.Tensor, d: int) -> torch.Tensor:
    """W = S[:d, None] * Vh[:d] / S[0] for W_q = U S Vh; (out, D) -> (d, D), float32.

    Then W^T W = V_d S_d^2 V_d^T / S_0^2. If rank(W_q) <= min(out, D) < d the
    missing rows are zero.
    """
    _, S, Vh = torch.linalg.svd(w_q.float(), full_matrices=False)  # S (k,), Vh (k, D)
    k = min(d, S.shape[0])
    w = w_q.new_zeros(d, w_q.shape[1], dtype=torch.float32)
    w[:k] = S[:k, None] * Vh[:k] / S[0].clamp_min(torch.finfo(torch.float32).tiny)
    return w


HEAD_KINDS = ("linear", "mlp")


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape of a parameter (a ZeRO-3 partition keeps it in `ds_shape`)."""
    return tuple(int(x) for x in (p.ds_shape if hasattr(p, "ds_shape") else p.shape))


class FusedCorrespondenceHead(nn.Module):
    """All L per-layer heads as ONE set of parameters with a leading layer axis, applied in batched products.

    kind "linear": `weight` (L, d, D), f_l(x) = normalize(W_l x).
    kind "mlp" (the paper's two-layer head): `w1` (L, 2d, D), `w2` (L, d, 2d), no biases,
    f_l(x) = normalize(W2_l GELU(W1_l x)) with the exact (erf) GELU.
    """

    def __init__(self, num_layers: int, hidden_size: int, head_dim: int | None = None,
                 max_dim: int = DEFAULT_MAX_DIM, kind: str = "linear") -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {', '.join(HEAD_KINDS)} (got {kind!r})")
        d = head_dim if head_dim is not None else head_dim_for(hidden_size, max_dim)
        if num_layers < 1 or hidden_size < 1 or not 1 <= d <= hidden_size:
            raise ValueError(f"head needs L >= 1, D >= 1 and 1 <= d <= D; got L={num_layers}, D={hidden_size}, d={d}")
        self.kind = kind
        # Random start (replaced by `init_from_query_weights` in training); float32 always.
        if kind == "linear":
            self.weight = nn.Parameter(torch.randn(num_layers, d, hidden_size) / hidden_size ** 0.5)
        else:
            self.w1 = nn.Parameter(torch.randn(num_layers, 2 * d, hidden_size) / hidden_size ** 0.5)
            self.w2 = nn.Parameter(torch.randn(num_layers, d, 2 * d) / (2 * d) ** 0.5)

    @property
    def _first(self) -> torch.Tensor:
        return self.weight if self.kind == "linear" else self.w1

    @property
    def num_layers(self) -> int:
        return _shape(self._first)[0]

    @property
    def head_dim(self) -> int:
        return _shape(self.weight)[1] if self.kind == "linear" else _shape(self.w2)[1]

    @property
    def hidden_size(self) -> int:
        return _shape(self._first)[2]

    @property
    def weights(self) -> list[torch.Tensor]:
        """The parameters, each with the leading layer axis: [weight] (linear) or [w1, w2] (mlp)."""
        return [self.weight] if self.kind == "linear" else [self.w1, self.w2]

    def apply_chunk(self, x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """The head of a chunk of layers: x (Lc, ..., D) any float dtype and the weights of those layers
        (`weights` sliced on the layer axis) -> (Lc, ..., d) unit vectors, float32. The one place the
        head's arithmetic is written: `forward` applies it to all layers, the chunked loss to chunks."""
        Lc, D = x.shape[0], x.shape[-1]
        lead = x.shape[1:-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float().reshape(Lc, -1, D)  # (Lc, T, D)
            if self.kind == "linear":
                y = torch.bmm(x32, weights[0].float().transpose(1, 2))  # (Lc, T, d)
            else:
                h = F.gelu(torch.bmm(x32, weights[0].float().transpose(1, 2)))  # (Lc, T, 2d)
                y = torch.bmm(h, weights[1].float().transpose(1, 2))  # (Lc, T, d)
            y = F.normalize(y, dim=-1)
        return y.reshape(Lc, *lead, y.shape[-1])

    def forward(self, x: torch.Tensor, loss: dict[str, Any] | None = None):
        """x (L, ..., D), any float dtype -> f_l(x_l) (L, ..., d), unit vectors, float32.

        With `loss` (keyword arguments of `losses.gasp.head_pair_loss_sums`: batch, tau, depth_loss,
        chunk_bytes), x is per-frame (L, F, N, D) and the result is the GASP loss of the batch's pairs as
        plain tensors (sums (3, L), counts (3,); `losses.gasp.LossTerms.of` makes the terms), the head
        recomputed per chunk of layers in backward (memory: DESIGN §6). It runs here, in the head's own
        forward, so ZeRO-3 gathers the weights for it, and for its backward, as for any forward of the head.
        """
        L, D = self.num_layers, self.hidden_size
        if x.dim() < 2 or x.shape[0] != L or x.shape[-1] != D:
            raise ValueError(f"head expects input (L={L}, ..., D={D}); got {tuple(x.shape)}")
        if loss is not None:
            from losses.gasp import head_pair_loss_sums  # losses/ imports only torch

            return head_pair_loss_sums(x, self.weights, self.apply_chunk, **loss)
        return self.apply_chunk(x, self.weights)

    @torch.no_grad()
    def init_from_query_weights(self, weights: Iterable[torch.Tensor]) -> None:
        """From layer l's query weight (out, D): W_l = S[:d, None] * Vh[:d] / S[0] (linear); for the MLP
        W1_l = [W_l; -W_l], W2_l = [I_d, -I_d], which equals the linear head exactly at initialisation
        (GELU(a) - GELU(-a) = a).

        `weights` may be a generator (e.g. `iter_query_weights(q_projs)`), so only one full
        projection is held at a time. Under ZeRO-3 this is a collective.
        """
        L, D, d = self.num_layers, self.hidden_size, self.head_dim
        new = []
        for l, w_q in enumerate(weights):
            if l >= L or w_q.dim() != 2 or w_q.shape[1] != D:
                raise HeadShapeError(f"query weight {l} of shape {tuple(w_q.shape)} does not fit heads "
                                     f"(L={L}, d={d}, D={D})")
            new.append(svd_init(w_q, d))
        if len(new) != L:
            raise HeadShapeError(f"got {len(new)} query weights for heads with L={L} layers")
        W = torch.stack(new)  # (L, d, D)
        if self.kind == "linear":
            with gathered([self.weight], modifier_rank=0):
                self.weight.copy_(W.to(self.weight.device))
            return
        eye = torch.eye(d, dtype=torch.float32)
        with gathered([self.w1, self.w2], modifier_rank=0):
            self.w1.copy_(torch.cat([W, -W], dim=1).to(self.w1.device))  # (L, 2d, D)
            self.w2.copy_(torch.cat([eye, -eye], dim=1).expand(L, d, 2 * d).to(self.w2.device))  # (L, d, 2d)

    def init_from_query_modules(self, modules: Iterable[nn.Module | torch.Tensor]) -> None:
        """`init_from_query_weights` from each layer's `q_proj` module (ZeRO-3 gathered)."""
        self.init_from_query_weights(iter_query_weights(modules))


class PerLayerHeads(nn.Module):
    """Reference: L separate heads (`nn.Linear`, no bias) in a Python loop (tests, benchmarks)."""

    def __init__(self, num_layers: int, hidden_size: int, head_dim: int, kind: str = "linear") -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.heads = nn.ModuleList(nn.Linear(hidden_size, head_dim, bias=False) for _ in range(num_layers))
        else:
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(hidden_size, 2 * head_dim, bias=False), nn.GELU(),
                                                     nn.Linear(2 * head_dim, head_dim, bias=False))
                                       for _ in range(num_layers))

    @classmethod
    def from_fused(cls, head: FusedCorrespondenceHead) -> "PerLayerHeads":
        ref = cls(head.num_layers, head.hidden_size, head.head_dim, head.kind).to(head._first.device)
        with torch.no_grad():
            for l, mod in enumerate(ref.heads):
                if head.kind == "linear":
                    mod.weight.copy_(head.weight[l])
                else:
                    mod[0].weight.copy_(head.w1[l])
                    mod[2].weight.copy_(head.w2[l])
        return ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (L, ..., D) -> (L, ..., d), float32."""
        return torch.stack([F.normalize(mod(x[l].float()), dim=-1) for l, mod in enumerate(self.heads)])


def check_head_shape(meta: dict[str, Any], num_layers: int, hidden_size: int) -> None:
    """Raise `HeadShapeError` unless saved heads (meta L, D) fit a model with L layers of width D."""
    if int(meta["L"]) != num_layers or int(meta["D"]) != hidden_size:
        raise HeadShapeError(
            f"heads of shape (L={meta['L']}, d={meta['d']}, D={meta['D']}) from {meta.get('model', '?')} do not fit "
            f"this model (L={num_layers}, D={hidden_size}); use heads trained for this model")


def save_heads(path: str | Path, head: FusedCorrespondenceHead, meta: dict[str, Any] | None = None) -> None:
    """Write the fused weight (L, d, D) float32 as safetensors, with meta (L, d, D, + yours: model family/name).

    Under ZeRO-3 this gathers the weight (a collective: call it on every rank;
    only the caller decides who writes).
    """
    from safetensors.torch import save_file

    params = dict(head.named_parameters())
    with gathered(list(params.values()), modifier_rank=None):
        state = {n: p.detach().float().cpu().contiguous() for n, p in params.items()}
    full = {**(meta or {}), "format_version": HEADS_FORMAT_VERSION, "kind": head.kind,
            "L": head.num_layers, "d": head.head_dim, "D": head.hidden_size}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"gasp_heads": json.dumps(full, sort_keys=True)})


def load_heads(path: str | Path, num_layers: int | None = None,
               hidden_size: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read `save_heads` output -> (state {"weight": (L, d, D)}, meta).

    With `num_layers` / `hidden_size` given, raise `HeadShapeError` when they do not fit.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("gasp_heads")
    if raw is None:
        raise ValueError(f"{path} is not a GASP heads file (no 'gasp_heads' metadata)")
    meta = json.loads(raw)
    if int(meta.get("format_version", 0)) > HEADS_FORMAT_VERSION:
        raise ValueError(f"{path}: heads format_version {meta['format_version']} is newer than this code knows")
    state = load_file(str(path))
    meta.setdefault("kind", "linear")  # files written before the MLP head existed
    L, d, D = int(meta["L"]), int(meta["d"]), int(meta["D"])
    want = {"weight": (L, d, D)} if meta["kind"] == "linear" else {"w1": (L, 2 * d, D), "w2": (L, d, 2 * d)}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if meta["kind"] not in HEAD_KINDS or got != want:
        raise HeadShapeError(f"{path}: tensors {got} disagree with its meta (kind {meta['kind']!r}, L={L}, d={d}, "
                             f"D={D})")
    if num_layers is not None or hidden_size is not None:
        check_head_shape(meta, num_layers if num_layers is not None else int(meta["L"]),
                         hidden_size if hidden_size is not None else int(meta["D"]))
    return state, meta


def head_from_file(path: str | Path, num_layers: int, hidden_size: int,
                   kind: str | None = None) -> tuple[FusedCorrespondenceHead, dict[str, Any]]:
    """A `FusedCorrespondenceHead` loaded from `save_heads` output, checked against the model's L and D
    (and, when given, the head kind the caller expects: HeadShapeError, one line, on a mismatch)."""
    state, meta = load_heads(path, num_layers, hidden_size)
    if kind is not None and meta["kind"] != kind:
        raise HeadShapeError(f"{path} holds {meta['kind']} heads, but {kind} heads are asked for "
                             f"(--head {kind}); pass --head {meta['kind']} or use heads of that kind")
    head = FusedCorrespondenceHead(meta["L"], meta["D"], head_dim=meta["d"], kind=meta["kind"])
    head.load_state_dict(state)
    return head, meta
