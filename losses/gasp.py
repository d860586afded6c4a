"""GASP objectives over the supervised pairs of a batch of clips (DESIGN §6). Imports only torch.

A clip batch (`data.stream`) holds per-frame cell masks, depths and grids and per-pair
labels; `pair_view` gathers the frame-level part for each pair's A and B, and
`pair_similarities` gathers each pair's per-frame head features, so every pair of a batch
goes through one batched product. The per-pair keys (padded, B pairs, N_a / N_b cells, M
anchor slots):
  cell_mask_a (B, Na) bool, cell_mask_b (B, Nb) bool     False = padding
  anchor_a (B, M) long, target_b (B, M) long, anchor_mask (B, M) bool, z_b (B, M) float
  depth_b (B, Nb) float, depth_b_valid (B, Nb) bool

An anchor counts when `anchor_mask` is set and both its cell of A and its target
cell of B are real (a label pointing into padding is ignored). Its depth term
counts when, in addition, B has at least one valid-depth cell and z_b > 0.

All similarity / softmax math is float32. Every masked reduction goes through
`_masked_lse`, so empty sets (M = 0, all-masked rows, pairs without valid depth)
give finite values with zero gradient, never NaN, and the graph always reaches
the head (sums over nothing are zeros *of the graph*, not skipped).

Distributed use (DESIGN §6): counts depend on labels only (`count_items`), so a
trainer can sum them over the step's micro-batches and all-reduce them before
the first forward; each micro-batch then back-propagates
`loss_to_backward(terms, global_counts, GAS, world)`, which DeepSpeed divides by
GAS and averages over ranks: the step's gradient equals one process on the union.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]


DEPTH_LOSSES = ("relative", "log")


def similarities(fa: torch.Tensor, fb: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """fa (L, B, Na, d), fb (L, B, Nb, d) -> s = fa @ fb^T / tau (L, B, Na, Nb), float32."""
    with torch.autocast(device_type=fa.device.type, enabled=False):
        return torch.matmul(fa.float(), fb.float().transpose(-1, -2)) / tau  # (L, B, Na, Nb)


def pair_similarities(f: torch.Tensor, pair_frames: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Per-frame features f (L, F, N, d) and pairs (P, 2) [frame A, frame B] -> s (L, P, N, N), float32.

    Every supervised pair of a batch in one gather and one batched product (DESIGN §6).
    """
    pf = pair_frames.to(f.device).long()
    return similarities(f[:, pf[:, 0]], f[:, pf[:, 1]], tau)  # (L, P, N, d) x (L, P, N, d)


def pair_view(batch: Batch) -> dict[str, torch.Tensor]:
    """The per-pair label tensors of a clip batch (`data.stream`): frame-level cell masks, depths and
    grids gathered for each pair's A and B, so every pair reads as a (A, B) pair batch.

    A batch that already is per-pair (has `cell_mask_a`) is returned as is.
    """
    if "cell_mask_a" in batch:
        return dict(batch)
    pf = batch["pair_frames"].long()
    a, b = pf[:, 0], pf[:, 1]
    out = {"cell_mask_a": batch["cell_mask"][a], "cell_mask_b": batch["cell_mask"][b],  # (P, N)
           "anchor_a": batch["anchor_a"], "target_b": batch["target_b"], "anchor_mask": batch["anchor_mask"],
           "z_b": batch["z_b"], "depth_b": batch["depth"][b], "depth_b_valid": batch["depth_valid"][b]}
    for key in ("grid", "dt", "pair_clip", "lookalike", "objects_known"):
        if key in batch:
            if key == "grid":
                out["grid_a"], out["grid_b"] = batch["grid"][a], batch["grid"][b]
            else:
                out[key] = batch[key]
    return out


LOSS_CHUNK_BYTES = 16 * 2 ** 20
"""`pair_loss_terms` takes the layers in chunks whose float32 work stays under this many bytes (at
least one layer a chunk): the most the loss holds at a time beyond the head features it keeps."""
WORK_PER_SIMILARITY = 2.0
"""Similarity-sized float32 tensors of one layer alive at once in the loss (s and its gradient) ..."""
WORK_PER_ANCHOR_ROW = 6.0
"""... plus this many per unit of anchors-per-cell-of-A (M / N_a): the anchors' rows and columns of s
and their softmaxes; tests/test_traps.py keeps the estimate above the measured peak."""


def _layer_work(pairs: int, cells_a: int, cells_b: int, dim: int, anchors: int | None = None,
                frames: int | None = None, hidden: int | None = None) -> float:
    """Float32 bytes one layer of the loss holds at its peak: similarity-sized work (above) plus the
    features of A and B gathered per pair and their gradients (2 x pairs x (N_a + N_b) x dim); with
    the head inside the chunks (`hidden` = its input width D), also the head's recomputed work on the
    layer's `frames` x N cells: its input in float32 and its gradient (2 D), and the hidden
    activations, output and their gradients (12 d)."""
    m = cells_a if anchors is None else min(anchors, cells_a)
    sim = (WORK_PER_SIMILARITY + WORK_PER_ANCHOR_ROW * m / max(cells_a, 1)) * cells_a * cells_b
    work = 4.0 * pairs * (sim + 2 * (cells_a + cells_b) * dim)
    if hidden:
        frames = 2 * pairs if frames is None else frames
        work += 4.0 * frames * max(cells_a, cells_b) * (2 * hidden + 12 * dim)
    return work


def _layer_chunk(L: int, pairs: int, cells_a: int, cells_b: int, dim: int, chunk_bytes: int,
                 frames: int | None = None, hidden: int | None = None) -> int:
    """Layers per chunk of the loss (at least 1; every cell an anchor, the worst case)."""
    per_layer = _layer_work(pairs, cells_a, cells_b, dim, frames=frames, hidden=hidden)
    return max(1, min(L, int(chunk_bytes // max(per_layer, 1.0))))


def similarity_bytes(num_layers: int, pairs: int, cells_a: int, cells_b: int, anchors: int | None = None,
                     dim: int = 256, frames: int | None = None, chunk_bytes: int = LOSS_CHUNK_BYTES,
                     hidden: int | None = None) -> int:
    """Estimated peak bytes of the GASP loss of one micro-batch, forward and backward, beyond its input.

    One chunk of layers' work (`_layer_work` x layers per chunk; `anchors` per pair, default cells_a,
    the worst case: every cell of A an anchor). Without `hidden` (`pair_loss_terms`) also the per-frame
    head features it keeps for backward, (L, frames, N, dim) float32 (`frames` default 2 x pairs, the
    most `pairs` pairs can name); with `hidden` (`head_pair_loss_sums`, what training runs) nothing
    more: the head is recomputed per chunk too. The similarities (L, pairs, N_a, N_b) are never all
    held at once.
    """
    chunk = _layer_chunk(num_layers, pairs, cells_a, cells_b, dim, chunk_bytes, frames, hidden)
    frames = 2 * pairs if frames is None else frames
    kept = 0 if hidden else 4 * num_layers * frames * max(cells_a, cells_b) * dim
    return int(chunk * _layer_work(pairs, cells_a, cells_b, dim, anchors, frames, hidden) + kept)


def _masked_lse(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp of x over `dim` where `keep` (broadcast to x); an empty slice gives 0 with zero gradient."""
    any_kept = keep.any(dim, keepdim=True)
    x = x.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)  # empty slices: finite dummies
    return torch.logsumexp(x, dim).masked_fill(~any_kept.squeeze(dim), 0.0)


@dataclass
class ItemMasks:
    """Which label items count, (B, M) bool each, and clamped indices (B, M) long."""

    anchor: torch.Tensor
    """Anchor counts for A->B InfoNCE."""
    first_of_target: torch.Tensor
    """Anchor is the first counted one with its target: one B->A item per distinct target."""
    same_target: torch.Tensor
    """(B, M, M): counted anchors m, m' share a target."""
    depth: torch.Tensor
    """Anchor counts for the depth term."""
    depth_cells: torch.Tensor
    """(B, Nb): real cells of B with valid depth > 0."""
    a_idx: torch.Tensor
    t_idx: torch.Tensor
    log_depth: torch.Tensor
    """(B, Nb) float32: log D_b on the valid-depth cells, 0 elsewhere."""
    cells_a: int
    """N_a."""

    def counts(self) -> torch.Tensor:
        """(3,) float32 [n_ab, n_ba, n_depth]."""
        return torch.stack([self.anchor.sum(), self.first_of_target.sum(), self.depth.sum()]).float()

    @functools.cached_property
    def positives(self) -> torch.Tensor:
        """(B, M, Na) bool: P_{target(m)}, the A cells of the counted anchors sharing anchor m's target
        (computed once a batch, however many chunks of layers use it)."""
        B, M = self.anchor.shape
        onehot_a = torch.zeros(B, M, self.cells_a, device=self.anchor.device)
        onehot_a.scatter_(2, self.a_idx[:, :, None], self.anchor[:, :, None].float())  # (B, M, Na)
        return torch.bmm(self.same_target.float(), onehot_a) > 0


def item_masks(batch: Batch) -> ItemMasks:
    """Masks of the counted items of a batch (labels only, no features)."""
    mask_a, mask_b = batch["cell_mask_a"].bool(), batch["cell_mask_b"].bool()
    Na, Nb = mask_a.shape[1], mask_b.shape[1]
    a_idx = batch["anchor_a"].long().clamp(0, max(Na - 1, 0))  # (B, M)
    t_idx = batch["target_b"].long().clamp(0, max(Nb - 1, 0))  # (B, M)
    in_range = ((batch["anchor_a"] >= 0) & (batch["anchor_a"] < Na)
                & (batch["target_b"] >= 0) & (batch["target_b"] < Nb))
    anchor = batch["anchor_mask"].bool() & in_range
    if Na and Nb:
        anchor = anchor & mask_a.gather(1, a_idx) & mask_b.gather(1, t_idx)
    M = anchor.shape[1]
    same = (t_idx[:, :, None] == t_idx[:, None, :]) & anchor[:, :, None] & anchor[:, None, :]  # (B, M, M)
    earlier = torch.ones(M, M, dtype=torch.bool, device=anchor.device).tril(-1)  # [m, m']: m' < m
    first = anchor & ~(same & earlier).any(-1)
    depth_b = batch["depth_b"].float()
    depth_cells = batch["depth_b_valid"].bool() & mask_b & (depth_b > 0) & torch.isfinite(depth_b)  # (B, Nb)
    z_b = batch["z_b"].float()
    depth = anchor & depth_cells.any(1, keepdim=True) & (z_b > 0) & torch.isfinite(z_b)
    log_depth = torch.where(depth_cells, depth_b.clamp_min(1e-30).log(), 0.0)  # (B, Nb)
    return ItemMasks(anchor, first, same, depth, depth_cells, a_idx, t_idx, log_depth, Na)


def count_items(batch: Batch) -> torch.Tensor:
    """(4,) float32 [n_ab, n_ba, n_depth, n_lm] of a batch, from its labels alone (sum these, then all-reduce).

    n_lm: the LM label positions the shifted loss uses (`labels[:, 1:] != -100`; 0 without labels).
    """
    m = item_masks(pair_view(batch))
    if batch.get("labels") is not None:
        n_lm = (batch["labels"][:, 1:] != -100).sum()
    else:
        n_lm = torch.zeros((), dtype=torch.long)
    return torch.cat([m.counts(), n_lm.to(m.anchor.device).float()[None]])


def lm_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (float32) and the count of correct argmax predictions of (n, V) logits
    against (n,) targets: L_LM's numerator over the labelled positions of a batch (DESIGN §6)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        total = nn.functional.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum() if logits.shape[0] else torch.zeros((), dtype=torch.long)
    return total, correct


@dataclass
class LossTerms:
    """Per-layer SUMS over items (L,) and item COUNTS (scalar float32 tensors)."""

    nce_ab_sum: torch.Tensor
    nce_ba_sum: torch.Tensor
    depth_sum: torch.Tensor
    n_ab: torch.Tensor
    n_ba: torch.Tensor
    n_depth: torch.Tensor

    def counts(self) -> torch.Tensor:
        """(3,) [n_ab, n_ba, n_depth]."""
        return torch.stack([self.n_ab, self.n_ba, self.n_depth])

    @classmethod
    def of(cls, sums: torch.Tensor, counts: torch.Tensor) -> "LossTerms":
        """From sums (3, L) [nce_ab, nce_ba, depth] and counts (3,) [n_ab, n_ba, n_depth]."""
        return cls(sums[0], sums[1], sums[2], counts[0], counts[1], counts[2])


def gasp_loss_terms(s: torch.Tensor, batch: Batch, depth_loss: str = "relative") -> LossTerms:
    """Sums of A->B InfoNCE, B->A InfoNCE and depth loss per layer, and their counts.

    s (L, B, Na, Nb): similarities / tau (from `similarities` / `pair_similarities`; B = pairs).
    Fully batched over L, B, M. `batch`: per-pair labels (`pair_view` of a clip batch).
    - A->B, anchor i -> target j: logsumexp_{k real in B} s[i, k] - s[i, j].
    - B->A, distinct target j with anchors P_j: logsumexp_{k real in A} s[k, j]
      - logsumexp_{i in P_j} s[i, j]  (= -log sum_{i in P_j} softmax(s[:, j])_i).
    - depth, with p = softmax of s[i, :] over B's valid cells and z_hat = p @ D_b, computed as
      log z_hat = logsumexp_{k valid}(s[i, k] + log D_k) - logsumexp_{k valid} s[i, k]:
      `relative` (the paper's form) |z_b - z_hat| / (z_b + z_hat); `log` |log z_hat - log z_b|.
    """
    if depth_loss not in DEPTH_LOSSES:
        raise ValueError(f"depth_loss must be one of {', '.join(DEPTH_LOSSES)} (got {depth_loss!r})")
    with torch.autocast(device_type=s.device.type, enabled=False):
        return _loss_terms(s.float(), pair_view(batch), depth_loss)


def _loss_terms(s: torch.Tensor, batch: Batch, depth_loss: str = "relative",
                masks: ItemMasks | None = None) -> LossTerms:
    L, B, Na, Nb = s.shape
    m = item_masks(batch) if masks is None else masks
    M = m.anchor.shape[1]
    mask_a, mask_b = batch["cell_mask_a"].bool(), batch["cell_mask_b"].bool()

    # A->B: rows of the anchors.
    rows = s.gather(2, m.a_idx[None, :, :, None].expand(L, B, M, Nb))  # (L, B, M, Nb)
    tgt = rows.gather(3, m.t_idx[None, :, :, None].expand(L, B, M, 1)).squeeze(3)  # (L, B, M)
    lse_ab = _masked_lse(rows, mask_b[None, :, None, :], -1)  # (L, B, M)
    nce_ab = torch.where(m.anchor, lse_ab - tgt, 0.0).sum((1, 2))  # (L,)

    # B->A: columns of the targets; positives = A cells of the anchors sharing the target (a set).
    cols = s.gather(3, m.t_idx[None, :, None, :].expand(L, B, Na, M))  # (L, B, Na, M)
    lse_col = _masked_lse(cols, mask_a[None, :, :, None], 2)  # (L, B, M)
    lse_pos = _masked_lse(cols, m.positives.transpose(1, 2)[None], 2)  # (L, B, M)
    nce_ba = torch.where(m.first_of_target, lse_col - lse_pos, 0.0).sum((1, 2))  # (L,)

    # Depth: soft-argmax over B's valid-depth cells, in log space.
    log_d = m.log_depth  # (B, Nb)
    keep = m.depth_cells[None, :, None, :]  # (1, B, 1, Nb)
    log_zhat = _masked_lse(rows + log_d[None, :, None, :], keep, -1) - _masked_lse(rows, keep, -1)  # (L, B, M)
    if depth_loss == "log":
        log_zb = torch.where(m.depth, batch["z_b"].float().clamp_min(1e-30).log(), 0.0)  # (B, M)
        per_item = (log_zhat - log_zb).abs()  # (L, B, M)
    else:  # relative: z_b > 0 for a depth item and z_hat > 0 over valid cells, so no epsilon
        z_b = torch.where(m.depth, batch["z_b"].float(), 1.0)[None]  # (1, B, M)
        z_hat = torch.where(m.depth[None], log_zhat, 0.0).exp()  # (L, B, M)
        per_item = (z_b - z_hat).abs() / (z_b + z_hat)
    depth = torch.where(m.depth, per_item, 0.0).sum((1, 2))  # (L,)

    return LossTerms.of(torch.stack([nce_ab, nce_ba, depth]), m.counts())


def _masked_softmax(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax of x over `dim` where `keep`, zeros elsewhere; an empty slice gives all zeros."""
    lse = _masked_lse(x, keep, dim).unsqueeze(dim)
    return torch.where(keep, (x - lse).exp(), 0.0)


def _loss_grad(s: torch.Tensor, view: Batch, m: ItemMasks, g: torch.Tensor, depth_loss: str) -> torch.Tensor:
    """d(g[0] . nce_ab + g[1] . nce_ba + g[2] . depth) / ds of `_loss_terms`, in closed form.

    s (Lc, B, Na, Nb) float32, g (3, Lc) the upstream gradients of the three per-layer sums.
    - A->B, anchor i -> j: softmax over B's real cells of s[i, :] minus one-hot j, on row i.
    - B->A, target j: softmax over A's real cells of s[:, j] minus the softmax over P_j, on column j.
    - depth: d per_item / d log z_hat times (softmax of s[i, :] + log D - softmax of s[i, :]) over valid cells.
    Items that do not count (and empty slices) contribute nothing.
    """
    Lc, B, Na, Nb = s.shape
    M = m.anchor.shape[1]
    mask_a, mask_b = view["cell_mask_a"].bool(), view["cell_mask_b"].bool()
    a_ix = m.a_idx[None, :, :, None].expand(Lc, B, M, Nb)
    rows = s.gather(2, a_ix)  # (Lc, B, M, Nb)
    w_ab = torch.where(m.anchor, g[0][:, None, None], 0.0)  # (Lc, B, M)
    g_rows = _masked_softmax(rows, mask_b[None, :, None, :], -1)
    g_rows.scatter_add_(3, m.t_idx[None, :, :, None].expand(Lc, B, M, 1), torch.full((Lc, B, M, 1), -1.0,
                                                                                    device=s.device))
    g_rows.mul_(w_ab[..., None])

    keep = m.depth_cells[None, :, None, :]  # (1, B, 1, Nb)
    log_d = m.log_depth[None, :, None, :]
    lse_p, lse_r = _masked_lse(rows, keep, -1), _masked_lse(rows + log_d, keep, -1)  # (Lc, B, M)
    log_zhat = lse_r - lse_p
    if depth_loss == "log":
        log_zb = torch.where(m.depth, view["z_b"].float().clamp_min(1e-30).log(), 0.0)
        d_log = torch.sign(log_zhat - log_zb)  # d |log z_hat - log z_b| / d log z_hat
    else:
        z_b = torch.where(m.depth, view["z_b"].float(), 1.0)[None]
        z_hat = torch.where(m.depth[None], log_zhat, 0.0).exp()
        u, v = z_b - z_hat, z_b + z_hat
        d_log = z_hat * (-torch.sign(u) * v - u.abs()) / (v * v)  # d (|u| / v) / d log z_hat
    w_dep = torch.where(m.depth, g[2][:, None, None] * d_log, 0.0)[..., None]  # (Lc, B, M, 1)
    r = torch.where(keep, (rows + log_d - lse_r[..., None]).exp(), 0.0)
    p = torch.where(keep, (rows - lse_p[..., None]).exp(), 0.0)
    del rows
    g_rows.add_(w_dep * (r - p))
    del r, p
    ds = torch.zeros_like(s)
    ds.scatter_add_(2, a_ix, g_rows)
    del g_rows

    t_ix = m.t_idx[None, :, None, :].expand(Lc, B, Na, M)
    cols = s.gather(3, t_ix)  # (Lc, B, Na, M)
    pos = m.positives.transpose(1, 2)[None]  # (1, B, Na, M)
    w_ba = torch.where(m.first_of_target, g[1][:, None, None], 0.0)[:, :, None, :]  # (Lc, B, 1, M)
    g_cols = (_masked_softmax(cols, mask_a[None, :, :, None], 2) - _masked_softmax(cols, pos, 2)).mul_(w_ba)
    ds.scatter_add_(3, t_ix, g_cols)
    return ds


def _feature_grad(fc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, view: Batch, m: ItemMasks, g: torch.Tensor,
                  tau: float, depth_loss: str) -> torch.Tensor:
    """d(g . loss sums) / d fc for one chunk of per-frame features fc (Lc, F, N, d) float32: the
    similarities of every pair recomputed in one batched product, their gradient in closed form."""
    fa, fb = fc[:, a], fc[:, b]  # (Lc, P, N, d)
    s = torch.matmul(fa, fb.transpose(-1, -2)) / tau
    ds = _loss_grad(s, view, m, g, depth_loss).div_(tau)
    del s
    out = torch.zeros_like(fc)
    out.index_add_(1, a, torch.matmul(ds, fb))
    out.index_add_(1, b, torch.matmul(ds.transpose(-1, -2), fa))
    return out


class _PairLoss(torch.autograd.Function):
    """Loss sums (3, L) of every pair of a batch, chunked over layers, with the similarities (and, given
    `head_fn`, the head) recomputed per chunk in backward: autograd keeps only the function's inputs,
    never (L, P, N_a, N_b). Without `head_fn`, x is the per-frame features f (L, F, N, d); with it, x is
    the head's input (L, F, N, D) and `weights` its parameters (leading layer axis), f = head_fn(x, w)."""

    @staticmethod
    def forward(ctx, x, pair_frames, view, m, tau, depth_loss, chunk, head_fn, *weights):
        L = x.shape[0]
        sums = []
        for l0 in range(0, L, chunk):
            f = x[l0:l0 + chunk] if head_fn is None else head_fn(x[l0:l0 + chunk], [w[l0:l0 + chunk] for w in weights])
            t = _loss_terms(pair_similarities(f, pair_frames, tau), view, depth_loss, m)
            sums.append(torch.stack([t.nce_ab_sum, t.nce_ba_sum, t.depth_sum]))  # (3, Lc)
            del f, t
        ctx.save_for_backward(x, pair_frames, *weights)
        ctx.view, ctx.masks, ctx.tau, ctx.depth_loss, ctx.chunk, ctx.head_fn = view, m, tau, depth_loss, chunk, head_fn
        return torch.cat(sums, 1)  # (3, L)

    @staticmethod
    def backward(ctx, grad):
        x, pf, *weights = ctx.saved_tensors
        pf = pf.to(x.device).long()
        a, b = pf[:, 0], pf[:, 1]
        grad = grad.float()
        need_x = ctx.needs_input_grad[0]
        gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        gw = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        for l0 in range(0, x.shape[0], ctx.chunk):
            c = slice(l0, l0 + ctx.chunk)
            with torch.autocast(device_type=x.device.type, enabled=False):
                if ctx.head_fn is None:
                    gf = _feature_grad(x[c].float(), a, b, ctx.view, ctx.masks, grad[:, c], ctx.tau, ctx.depth_loss)
                    if need_x:
                        gx[c] = gf
                    continue
                with torch.enable_grad():
                    xc = x[c].detach().requires_grad_(need_x)
                    wc = [w[c].detach().requires_grad_() for w in weights]
                    f = ctx.head_fn(xc, wc)
                    gf = _feature_grad(f.detach(), a, b, ctx.view, ctx.masks, grad[:, c], ctx.tau, ctx.depth_loss)
                    grads = torch.autograd.grad(f, ([xc] if need_x else []) + wc, gf)
                if need_x:
                    gx[c], grads = grads[0], grads[1:]
                for g_all, g_c in zip(gw, grads):
                    g_all[c] = g_c
            del gf
        return (None if gx is None else gx.to(x.dtype), None, None, None, None, None, None, None,
                *(g.to(w.dtype) for g, w in zip(gw, weights)))


def _pair_loss(x: torch.Tensor, batch: Batch, tau: float, depth_loss: str, chunk_bytes: int, head_fn=None,
               weights: Sequence[torch.Tensor] = (), hidden: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (3, L) [nce_ab, nce_ba, depth] per layer, counts (3,) [n_ab, n_ba, n_depth])."""
    if depth_loss not in DEPTH_LOSSES:
        raise ValueError(f"depth_loss must be one of {', '.join(DEPTH_LOSSES)} (got {depth_loss!r})")
    if tau <= 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    view = pair_view(batch)
    pf = batch["pair_frames"].to(x.device).long()
    L, F_, N, _ = x.shape
    d = x.shape[-1] if head_fn is None else int(weights[-1].shape[1])
    chunk = _layer_chunk(L, int(pf.shape[0]), N, N, d, chunk_bytes, frames=F_, hidden=hidden)
    m = item_masks(view)
    with torch.autocast(device_type=x.device.type, enabled=False):
        sums = _PairLoss.apply(x, pf, view, m, tau, depth_loss, chunk, head_fn, *weights)  # (3, L)
    return sums, m.counts()


def pair_loss_terms(f: torch.Tensor, batch: Batch, tau: float = 0.07, depth_loss: str = "relative",
                    chunk_bytes: int = LOSS_CHUNK_BYTES) -> LossTerms:
    """`gasp_loss_terms(pair_similarities(f, batch["pair_frames"], tau), batch)`, the same values and
    gradients, in bounded memory: layers in chunks of at most `chunk_bytes` of work, every pair of a
    chunk in one batched product, and backward in closed form from similarities recomputed per chunk
    (DESIGN §6: chunking saves memory only with recomputation). f (L, F, N, d) per-frame head features.
    """
    return LossTerms.of(*_pair_loss(f, batch, tau, depth_loss, chunk_bytes))


def head_pair_loss_sums(x: torch.Tensor, weights: Sequence[torch.Tensor], head_fn, batch: Batch, tau: float = 0.07,
                        depth_loss: str = "relative", chunk_bytes: int = LOSS_CHUNK_BYTES
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of `pair_loss_terms(head_fn(x, weights), ...)` with the head inside the chunks too, as
    (sums (3, L), counts (3,)) (`LossTerms.of` makes the terms): x (L, F, N, D) the head's input,
    `weights` its parameters (leading layer axis L), head_fn(x_c, [w_c, ...]) -> f_c (Lc, F, N, d)
    float32 for any chunk of layers. Backward recomputes the head per chunk, so nothing of the head or
    the similarities is kept between forward and backward beyond x and the weights. Call it inside the
    head module's forward and return its plain tensors from there (`FusedCorrespondenceHead.forward(x,
    loss=...)`): an engine that gathers parameters around a module's forward and backward (ZeRO-3)
    then sees it as the head's work and hooks its outputs."""
    return _pair_loss(x, batch, tau, depth_loss, chunk_bytes, head_fn, weights, hidden=int(x.shape[-1]))


def _per_count(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x / n, and x * 0 (zero, still in the graph) where n == 0."""
    return torch.where(n > 0, x / n.clamp_min(1.0), x * 0.0)


def combine(terms: LossTerms, layer_weights: torch.Tensor | Sequence[float] | None = None,
            lambda_depth: float = 1.0, global_counts: torch.Tensor | None = None, *, lambda_corr: float = 1.0,
            lm_sum: torch.Tensor | None = None, n_lm: torch.Tensor | float | None = None, lambda_lm: float = 0.0,
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """total = lambda_lm L_LM + sum_l w_l (lambda_corr 0.5 (ab_l/N_ab + ba_l/N_ba) + lambda_depth depth_l/N_depth)
    / sum_l w_l, with L_LM = lm_sum / N_lm (DESIGN §6).

    `global_counts` (3,) [N_ab, N_ba, N_depth] or (4,) [.., N_lm] over all ranks and micro-batches
    of the step (else this batch's counts, N_lm = `n_lm`); a zero count makes its term 0. With
    global counts, `total` is this micro-batch's share of the step loss (shares add up).
    Returns (total scalar tensor, parts: floats for logging, one device sync).
    """
    nce_ab = terms.nce_ab_sum
    L = nce_ab.shape[0]
    counts = (terms.counts() if global_counts is None else global_counts).to(nce_ab.device, torch.float32)
    if global_counts is not None and counts.shape[0] > 3:
        count_lm = counts[3]
    else:
        count_lm = torch.as_tensor(0.0 if n_lm is None else n_lm, dtype=torch.float32, device=nce_ab.device)
    w = (torch.ones(L) if layer_weights is None else torch.as_tensor(layer_weights)).to(nce_ab.device, torch.float32)
    if w.shape != (L,):
        raise ValueError(f"layer_weights must have shape ({L},); got {tuple(w.shape)}")
    ab = _per_count(nce_ab, counts[0])  # (L,)
    ba = _per_count(terms.nce_ba_sum, counts[1])  # (L,)
    dep = _per_count(terms.depth_sum, counts[2])  # (L,)
    per_layer = lambda_corr * 0.5 * (ab + ba) + lambda_depth * dep  # (L,)
    wn = w / w.sum()
    total = (wn * per_layer).sum()
    lm = _per_count(lm_sum.float(), count_lm) if lm_sum is not None else torch.zeros((), device=nce_ab.device)
    if lm_sum is not None:
        total = total + lambda_lm * lm
    with torch.no_grad():
        summary = torch.stack([total, (wn * ab).sum(), (wn * ba).sum(), (wn * dep).sum(), lm]).tolist()
        layers = per_layer.tolist()
    parts = {"total": summary[0], "nce_ab": summary[1], "nce_ba": summary[2],
             "nce": 0.5 * (summary[1] + summary[2]), "depth": summary[3], "lm": summary[4]}
    parts.update({f"layer_{l:02d}": v for l, v in enumerate(layers)})
    return total, parts


def distributed_scale(grad_accum_steps: int, world_size: int) -> float:
    """GAS * world: undoes DeepSpeed's 1/GAS loss scaling and its average over ranks.

    Each micro-batch back-propagates `local_sum * GAS * world / global_count`;
    DeepSpeed's sum over micro-batches / GAS and mean over ranks then leaves
    sum(all local sums) / global_count, the loss of one process on the union batch.
    """
    if grad_accum_steps < 1 or world_size < 1:
        raise ValueError(f"grad_accum_steps and world_size must be >= 1; got {grad_accum_steps}, {world_size}")
    return float(grad_accum_steps * world_size)


def loss_to_backward(terms: LossTerms, global_counts: torch.Tensor, grad_accum_steps: int, world_size: int,
                     layer_weights: torch.Tensor | Sequence[float] | None = None, lambda_depth: float = 1.0,
                     **kw) -> tuple[torch.Tensor, dict[str, float]]:
    """(the micro-batch loss to hand DeepSpeed's backward, parts of its unscaled share); `kw` as `combine`'s."""
    total, parts = combine(terms, layer_weights, lambda_depth, global_counts, **kw)
    return total * distributed_scale(grad_accum_steps, world_size), parts


class GaspLoss(nn.Module):
    """head + similarities + loss terms + combine.

    forward(feat_a (L, B, Na, D), feat_b (L, B, Nb, D), batch) -> (loss, parts).
    With `global_counts` (and GAS / world) the loss is the one to back-propagate
    under DeepSpeed (`loss_to_backward`); without them, the batch's own mean loss.
    """

    def __init__(self, head: nn.Module, tau: float = 0.07, lambda_depth: float = 1.0,
                 layer_weights: Sequence[float] | torch.Tensor | None = None, depth_loss: str = "relative") -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0; got {tau}")
        self.head, self.tau, self.lambda_depth, self.depth_loss = head, tau, lambda_depth, depth_loss
        self.register_buffer("layer_weights",
                             None if layer_weights is None else torch.as_tensor(layer_weights, dtype=torch.float32),
                             persistent=False)

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor, batch: Batch,
                global_counts: torch.Tensor | None = None, grad_accum_steps: int = 1, world_size: int = 1,
                ) -> tuple[torch.Tensor, dict[str, float]]:
        s = similarities(self.head(feat_a), self.head(feat_b), self.tau)  # (L, B, Na, Nb)
        terms = gasp_loss_terms(s, batch, self.depth_loss)
        if global_counts is None:
            return combine(terms, self.layer_weights, self.lambda_depth)
        return loss_to_backward(terms, global_counts, grad_accum_steps, world_size,
                                self.layer_weights, self.lambda_depth)
