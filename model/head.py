"""The fused all-layer correspondence head (DESIGN §6).

Layer l's head reads the input of layer l's query projection at the vision-token
cells and maps it to a unit vector: `f_l(x) = normalize(W_l x)`, W_l of shape
(d, D), d = min(256, D). The L heads are ONE float32 parameter of shape
(L, d, D) applied in one batched product (`FusedCorrespondenceHead`); the
per-layer loop `PerLayerHeads` is kept only as the test and benchmark reference.

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


class FusedCorrespondenceHead(nn.Module):
    """All L per-layer heads as one parameter `weight` (L, d, D), applied in one bmm."""

    def __init__(self, num_layers: int, hidden_size: int, head_dim: int | None = None,
                 max_dim: int = DEFAULT_MAX_DIM) -> None:
        super().__init__()
        d = head_dim if head_dim is not None else head_dim_for(hidden_size, max_dim)
        if num_layers < 1 or hidden_size < 1 or not 1 <= d <= hidden_size:
            raise ValueError(f"head needs L >= 1, D >= 1 and 1 <= d <= D; got L={num_layers}, D={hidden_size}, d={d}")
        # Random start (replaced by `init_from_query_weights` in training); float32 always.
        self.weight = nn.Parameter(torch.randn(num_layers, d, hidden_size) / hidden_size ** 0.5)

    @property
    def num_layers(self) -> int:
        return int(self.weight.ds_shape[0]) if hasattr(self.weight, "ds_shape") else self.weight.shape[0]

    @property
    def head_dim(self) -> int:
        return int(self.weight.ds_shape[1]) if hasattr(self.weight, "ds_shape") else self.weight.shape[1]

    @property
    def hidden_size(self) -> int:
        return int(self.weight.ds_shape[2]) if hasattr(self.weight, "ds_shape") else self.weight.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (L, ..., D), any float dtype -> normalize(W_l x_l) (L, ..., d), float32."""
        L, D, d = self.num_layers, self.hidden_size, self.head_dim
        if x.dim() < 2 or x.shape[0] != L or x.shape[-1] != D:
            raise ValueError(f"head expects input (L={L}, ..., D={D}); got {tuple(x.shape)}")
        lead = x.shape[1:-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float().reshape(L, -1, D)  # (L, T, D)
            y = torch.bmm(x32, self.weight.float().transpose(1, 2))  # (L, T, d)
            y = F.normalize(y, dim=-1)
        return y.reshape(L, *lead, d)  # (L, ..., d)

    @torch.no_grad()
    def init_from_query_weights(self, weights: Iterable[torch.Tensor]) -> None:
        """Set W_l = S[:d, None] * Vh[:d] / S[0] from layer l's query weight (out, D).

        `weights` may be a generator (e.g. `iter_query_weights(q_projs)`), so only
        one full projection is held at a time. Under ZeRO-3 this is a collective.
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
        with gathered([self.weight], modifier_rank=0):
            self.weight.copy_(torch.stack(new).to(self.weight.device))  # (L, d, D)

    def init_from_query_modules(self, modules: Iterable[nn.Module | torch.Tensor]) -> None:
        """`init_from_query_weights` from each layer's `q_proj` module (ZeRO-3 gathered)."""
        self.init_from_query_weights(iter_query_weights(modules))


class PerLayerHeads(nn.Module):
    """Reference: L separate `nn.Linear(D, d, bias=False)` in a Python loop (tests, benchmarks)."""

    def __init__(self, num_layers: int, hidden_size: int, head_dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, head_dim, bias=False) for _ in range(num_layers))

    @classmethod
    def from_fused(cls, head: FusedCorrespondenceHead) -> "PerLayerHeads":
        ref = cls(head.num_layers, head.hidden_size, head.head_dim).to(head.weight.device)
        with torch.no_grad():
            for lin, w in zip(ref.heads, head.weight):
                lin.weight.copy_(w)
        return ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (L, ..., D) -> (L, ..., d), float32."""
        return torch.stack([F.normalize(lin(x[l].float()), dim=-1) for l, lin in enumerate(self.heads)])


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

    with gathered([head.weight], modifier_rank=None):
        weight = head.weight.detach().float().cpu().contiguous()
    full = {**(meta or {}), "format_version": HEADS_FORMAT_VERSION,
            "L": weight.shape[0], "d": weight.shape[1], "D": weight.shape[2]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight}, str(path), metadata={"gasp_heads": json.dumps(full, sort_keys=True)})


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
    if tuple(state["weight"].shape) != (meta["L"], meta["d"], meta["D"]):
        raise HeadShapeError(f"{path}: weight {tuple(state['weight'].shape)} disagrees with its meta "
                             f"(L={meta['L']}, d={meta['d']}, D={meta['D']})")
    if num_layers is not None or hidden_size is not None:
        check_head_shape(meta, num_layers if num_layers is not None else int(meta["L"]),
                         hidden_size if hidden_size is not None else int(meta["D"]))
    return state, meta


def head_from_file(path: str | Path, num_layers: int,
                   hidden_size: int) -> tuple[FusedCorrespondenceHead, dict[str, Any]]:
    """A `FusedCorrespondenceHead` loaded from `save_heads` output, checked against the model's L and D."""
    state, meta = load_heads(path, num_layers, hidden_size)
    head = FusedCorrespondenceHead(meta["L"], meta["D"], head_dim=meta["d"])
    head.load_state_dict(state)
    return head, meta
