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
    for key in ("grid", "dt", "pair_clip"):
        if key in batch:
            if key == "grid":
                out["grid_a"], out["grid_b"] = batch["grid"][a], batch["grid"][b]
            else:
                out[key] = batch[key]
    return out


SAVED_PER_SIMILARITY = 3.0
"""What autograd keeps of the loss terms, in units of one float32 similarity tensor s
(L, B, Na, Nb), when no cell of A is an anchor ..."""
SAVED_PER_ANCHOR_ROW = 10.6
"""... plus this much per unit of anchors-per-cell-of-A (M / Na): measured with
`saved_tensors_hooks` (tests/test_losses.py keeps the estimate above the measured bytes)."""
BACKWARD_TRANSIENT = 2.0
"""Gradient buffers of s-sized tensors alive at once during backward (the grad of s and one more)."""


def similarity_bytes(num_layers: int, pairs: int, cells_a: int, cells_b: int, anchors: int | None = None) -> int:
    """Estimated peak bytes of the similarity tensors of one micro-batch, forward and backward.

    (L, pairs, cells_a, cells_b) float32 and what backward keeps of the loss over it; `anchors`
    per pair (default cells_a, the worst case: every cell of A an anchor).
    """
    m = cells_a if anchors is None else min(anchors, cells_a)
    s = 4 * num_layers * pairs * cells_a * cells_b
    return int(s * (SAVED_PER_SIMILARITY + SAVED_PER_ANCHOR_ROW * m / max(cells_a, 1) + BACKWARD_TRANSIENT))


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
    return ItemMasks(anchor, first, same, depth, depth_cells, a_idx, t_idx)


def count_items(batch: Batch) -> torch.Tensor:
    """(4,) float32 [n_ab, n_ba, n_depth, n_lm] of a batch, from its labels alone (sum these, then all-reduce).

    n_lm: the LM label positions the shifted loss uses (`labels[:, 1:] != -100`; 0 without labels).
    """
    m = item_masks(pair_view(batch))
    if batch.get("labels") is not None:
        n_lm = (batch["labels"][:, 1:] != -100).sum()
    else:
        n_lm = torch.zeros((), dtype=torch.long)
    return torch.stack([m.anchor.sum(), m.first_of_target.sum(), m.depth.sum(), n_lm.to(m.anchor.device)]).float()


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


def _loss_terms(s: torch.Tensor, batch: Batch, depth_loss: str = "relative") -> LossTerms:
    L, B, Na, Nb = s.shape
    m = item_masks(batch)
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
    onehot_a = torch.zeros(B, M, Na, dtype=s.dtype, device=s.device)
    onehot_a.scatter_(2, m.a_idx[:, :, None], m.anchor[:, :, None].to(s.dtype))  # (B, M, Na)
    pos = torch.bmm(m.same_target.to(s.dtype), onehot_a) > 0  # (B, M, Na): P_{target(m)}
    lse_pos = _masked_lse(cols, pos.transpose(1, 2)[None], 2)  # (L, B, M)
    nce_ba = torch.where(m.first_of_target, lse_col - lse_pos, 0.0).sum((1, 2))  # (L,)

    # Depth: soft-argmax over B's valid-depth cells, in log space.
    depth_b = batch["depth_b"].float()
    log_d = torch.where(m.depth_cells, depth_b.clamp_min(1e-30).log(), 0.0)  # (B, Nb)
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

    n = torch.stack([m.anchor.sum(), m.first_of_target.sum(), m.depth.sum()]).float()
    return LossTerms(nce_ab, nce_ba, depth, n[0], n[1], n[2])


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
