"""Packed attention for the Qwen2-VL / Qwen2.5-VL vision towers (one SDPA call per window size).

The towers attend within blocks given by `cu_seqlens`: Qwen2.5-VL's windowed layers
use 8x8-patch windows (64 tokens), its full layers and all of Qwen2-VL's one block per
image. With `attn_implementation="sdpa"` Hugging Face runs one SDPA call per block:
for 16 pairs of 448x448 views that is 512 calls per windowed layer, about 14,000 per
step on the 3B shape, and on an H200 the frozen tower took 0.91 s of a 1.25 s forward
(tests/benchmarks/results/h200_mfu_3b_p16_persist.json). Flash-attn's varlen kernel
avoids the loop, but needs the flash_attn package.

`install_packed_vision_attention(vlm)` swaps each vision attention module's forward
for one that gathers the blocks of equal length into a (n, heads, len, head_dim) batch
and runs one SDPA call per distinct length (usually one or two: full windows and the
image-edge remainders). It is exact (the same per-block softmax; no padding, no mask,
so SDPA can pick its flash kernel) and differentiable. The q/k/v projection and the
rotary embedding are those of the model's own module, so weights and numerics are
unchanged. Modules under flash_attention_2 keep their varlen path.
"""
from __future__ import annotations

import logging
import sys
import types
import weakref
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# class name -> transformers module holding it (the rotary helper is looked up there)
_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "VisionAttention", "Qwen3VLVisionAttention",
                      "Qwen3VLMoeVisionAttention")


@lru_cache(maxsize=64)
def _groups(lengths: tuple[int, ...]) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """Blocks by length: ((length, count, starts), ...) in first-seen order."""
    starts: dict[int, list[int]] = {}
    pos = 0
    for n in lengths:
        if n > 0:
            starts.setdefault(n, []).append(pos)
        pos += n
    return tuple((n, len(s), tuple(s)) for n, s in starts.items())


_INDEX_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}


def _block_index(length: int, starts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(count, length) token indices of the blocks starting at `starts` (cached per device)."""
    key = (length, starts, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        idx = (torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(length)).to(device)
        _INDEX_CACHE[key] = idx
    return idx


_LENGTHS: dict[int, tuple[Any, int, tuple[int, ...]]] = {}


def _block_lengths(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """Block lengths of `cu_seqlens`, read back once per tensor: the tower hands the same tensor to
    every windowed layer (and another to every full layer), so a GPU forward syncs twice, not per layer.
    Keyed by identity, checked by a weak reference and the tensor's version counter."""
    key = id(cu_seqlens)
    hit = _LENGTHS.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    lengths = tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
    _LENGTHS[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, lengths)
    weakref.finalize(cu_seqlens, _LENGTHS.pop, key, None)
    return lengths


def packed_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Attention within the blocks of `cu_seqlens`; q, k, v and the result are (S, heads, head_dim).

    Equal to running SDPA on each block alone (non-causal). One SDPA call per distinct block
    length; blocks that tile the sequence uniformly need no gather at all.
    """
    S = q.shape[0]
    lengths = _block_lengths(cu_seqlens)
    groups = _groups(lengths)
    if int(sum(lengths)) != S:
        raise ValueError(f"cu_seqlens covers {sum(lengths)} tokens, the sequence has {S}")
    if len(groups) == 1 and groups[0][0] * groups[0][1] == S:  # uniform tiling: a reshape is enough
        n, c, _ = groups[0]
        qb, kb, vb = (t.reshape(c, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qb, kb, vb, scale=scale).transpose(1, 2).reshape(q.shape)
    out = q.new_empty(q.shape)
    for n, c, starts in groups:
        idx = _block_index(n, starts, q.device)  # (c, n)
        qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # (c, heads, n, head_dim)
        ob = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        out = out.index_put((idx.reshape(-1),), ob.transpose(1, 2).reshape(c * n, *q.shape[1:]))
    return out


def _packed_forward(self: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                    max_seqlen: int | None = None, **kwargs: Any) -> torch.Tensor:
    """Drop-in forward of a Qwen vision attention module (see the module docstring)."""
    if self.config._attn_implementation not in ("sdpa", None):  # e.g. set to flash_attention_2 later
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    S = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(S, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._gasp_rotary(q, k, cos, sin)
    out = packed_block_attention(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(S, -1).contiguous())


def install_packed_vision_attention(vlm: nn.Module) -> int:
    """Give every Qwen vision attention module of `vlm` the packed forward; returns how many.

    A no-op (0) for other families and for modules whose attention implementation is not
    "sdpa" (flash_attention_2 already runs varlen; eager stays the reference).
    """
    n = 0
    for m in vlm.modules():
        if type(m).__name__ not in _ATTENTION_CLASSES or not hasattr(m, "qkv") or not hasattr(m, "proj"):
            continue
        if getattr(m.config, "_attn_implementation", None) != "sdpa":
            continue
        rotary = getattr(sys.modules.get(type(m).__module__), "apply_rotary_pos_emb_vision", None)
        if rotary is None:
            log.warning("%s: no apply_rotary_pos_emb_vision beside it; keeping Hugging Face's attention",
                        type(m).__name__)
            return 0
        m._gasp_rotary = rotary
        m.forward = types.MethodType(_packed_forward, m)
        n += 1
    if n:
        log.info("packed vision attention: %d modules", n)
    return n


def uninstall_packed_vision_attention(vlm: nn.Module) -> int:
    """Undo `install_packed_vision_attention` (benchmarks compare both)."""
    n = 0
    for m in vlm.modules():
        if "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) is _packed_forward:
            del m.forward
            n += 1
    return n
