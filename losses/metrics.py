"""Layer-wise correspondence metrics (DESIGN §6). Imports only torch (and stdlib).

"raw": cosine of the captured features without the head; "head": f_l. Either
way build s with tau = 0.07 (probabilities are softmax(s)), then:

    stats = match_stats(s, batch)          # per-anchor tensors, no grad
    acc = MatchMetrics(gap_buckets=[1, 5, 15, 40]); acc.update(stats); acc.compute()

Gap buckets (DESIGN §4): |gap| falls into bucket k when edges[k] <= |gap| < edges[k+1],
the last bucket open-ended; gaps below edges[0] are in no bucket (counted apart).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from losses.gasp import Batch, item_masks, similarities

MIN_BUCKET_ANCHORS = 200
MIN_CHANCE_RATIO = 3.0
RAW_TAU = 0.07
"""Temperature of the "raw" scores (DESIGN §6): fixed, whatever the training tau, so a training
validation and a probe of the same features agree."""


def raw_similarities(fa: torch.Tensor, fb: torch.Tensor, tau: float = RAW_TAU) -> torch.Tensor:
    """Cosine of the captured features (no head) / tau: (L, B, Na, D), (L, B, Nb, D) -> (L, B, Na, Nb) float32."""
    return similarities(F.normalize(fa.float(), dim=-1), F.normalize(fb.float(), dim=-1), tau)


@dataclass
class MatchStats:
    """Per real anchor (K of them, flattened over pairs), per layer."""

    dist: torch.Tensor
    """(L, K) long: Chebyshev distance in cells between argmax cell of B and the target."""
    max_prob: torch.Tensor
    """(L, K) float: max softmax probability over B's real cells."""
    chance0: torch.Tensor
    """(K,) float64: 1 / (real cells of B)."""
    chance1: torch.Tensor
    """(K,) float64: fraction of B's real cells within 1 cell of the target."""
    gap: torch.Tensor
    """(K,) long: frame gap of the anchor's pair."""


def _chebyshev(i: torch.Tensor, j: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Chebyshev distance in cells between row-major cell indices i and j of grids with `cols` columns."""
    return torch.maximum((i // cols - j // cols).abs(), (i % cols - j % cols).abs())


@torch.no_grad()
def match_stats(s: torch.Tensor, batch: Batch) -> MatchStats:
    """s (L, B, Na, Nb) similarities / tau; batch as in `losses.gasp` plus grid_b (B, 2), gap (B,)."""
    s = s.float()
    L, B, Na, Nb = s.shape
    m = item_masks(batch)
    M = m.anchor.shape[1]
    mask_b = batch["cell_mask_b"].bool()
    rows = s.gather(2, m.a_idx[None, :, :, None].expand(L, B, M, Nb))  # (L, B, M, Nb)
    rows = rows.masked_fill(~mask_b[None, :, None, :], float("-inf"))
    best, arg = rows.max(-1)  # (L, B, M)
    max_prob = torch.exp(best - torch.logsumexp(rows, -1))  # (L, B, M); NaN only on non-anchors

    cols = batch["grid_b"][:, 1].long().to(s.device).clamp_min(1)  # (B,)
    dist = _chebyshev(arg, m.t_idx[None], cols[:, None])  # (L, B, M)
    cells = torch.arange(Nb, device=s.device)[None, None, :]  # (1, 1, Nb)
    near = (_chebyshev(cells, m.t_idx[:, :, None], cols[:, None, None]) <= 1) & mask_b[:, None, :]  # (B, M, Nb)
    n_real = mask_b.sum(1, keepdim=True).clamp_min(1).double()  # (B, 1); chance in float64
    chance0 = (1.0 / n_real).expand(B, M)  # (B, M)
    chance1 = near.sum(-1).double() / n_real  # (B, M)
    gap = batch["gap"].long().to(s.device)[:, None].expand(B, M)  # (B, M)
    k = m.anchor  # (B, M) -> K real anchors, flattened in (b, m) order
    return MatchStats(dist[:, k], max_prob[:, k], chance0[k], chance1[k], gap[k])


def pearson(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float | None:
    """Pearson correlation; None with fewer than 2 items or when either is constant."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.numel() < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = dx.square().sum().sqrt(), dy.square().sum().sqrt()
    if sx.item() <= 1e-12 * max(1.0, x.abs().max().item()) or sy.item() <= 1e-12 * max(1.0, y.abs().max().item()):
        return None
    return float((dx * dy).sum() / (sx * sy))


def _mean(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


class MatchMetrics:
    """Accumulates `MatchStats` over held-out pairs; `compute()` gives plain JSON-able values."""

    def __init__(self, gap_buckets: Sequence[int] = (1, 5, 15, 40), min_bucket_anchors: int = MIN_BUCKET_ANCHORS,
                 min_chance_ratio: float = MIN_CHANCE_RATIO) -> None:
        edges = [int(e) for e in gap_buckets]
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"gap_buckets must be strictly increasing edges; got {list(gap_buckets)}")
        self.edges, self.min_bucket_anchors, self.min_chance_ratio = edges, min_bucket_anchors, min_chance_ratio
        self._stats: list[MatchStats] = []

    def update(self, stats: MatchStats) -> None:
        if self._stats and stats.dist.shape[0] != self._stats[0].dist.shape[0]:
            raise ValueError(f"stats of {stats.dist.shape[0]} layers after {self._stats[0].dist.shape[0]}")
        self._stats.append(MatchStats(*(t.detach().cpu() for t in
                                        (stats.dist, stats.max_prob, stats.chance0, stats.chance1, stats.gap))))

    def reset(self) -> None:
        self._stats.clear()

    def bucket_of(self, gap: torch.Tensor) -> torch.Tensor:
        """(K,) bucket index of each |gap|, -1 below the first edge."""
        edges = torch.tensor(self.edges)
        return torch.bucketize(gap.abs(), edges, right=True) - 1

    def bucket_labels(self) -> list[str]:
        e = self.edges
        return [f"{a}-{b - 1}" for a, b in zip(e, e[1:])] + [f"{e[-1]}+"]

    def compute(self) -> dict[str, Any]:
        """Per layer: pck0, pck1, chance0, chance1, n_anchors, conf_acc_corr, pck1_by_gap, temporal_robustness.

        Top level: n_anchors, chance0, chance1, gap_buckets (edges, labels, counts,
        chance1, unbucketed), best_layer / best_pck1 (by PCK@1), layers (list of dicts).
        """
        nb = len(self.edges)
        if not self._stats:
            return {"n_anchors": 0, "chance0": None, "chance1": None, "best_layer": None, "best_pck1": None,
                    "gap_buckets": {"edges": self.edges, "labels": self.bucket_labels(), "counts": [0] * nb,
                                    "chance1": [None] * nb, "unbucketed": 0}, "layers": []}
        dist = torch.cat([st.dist for st in self._stats], 1)  # (L, K)
        max_prob = torch.cat([st.max_prob for st in self._stats], 1)  # (L, K)
        chance0, chance1, gap = (torch.cat([getattr(st, f) for st in self._stats])
                                 for f in ("chance0", "chance1", "gap"))  # (K,) each
        L, K = dist.shape
        bucket = self.bucket_of(gap)  # (K,)
        in_b = [bucket == k for k in range(nb)]
        counts = [int(b.sum()) for b in in_b]
        c0, c1 = _mean(chance0), _mean(chance1)
        chance1_by_gap = [_mean(chance1[b]) for b in in_b]
        layers = []
        for l in range(L):
            ok0, ok1 = (dist[l] == 0).double(), (dist[l] <= 1).double()  # (K,)
            by_gap = [_mean(ok1[b]) for b in in_b]
            small, large = by_gap[0], by_gap[-1]
            robust = None
            if (counts[0] >= self.min_bucket_anchors and counts[-1] >= self.min_bucket_anchors
                    and small is not None and small > 0 and small >= self.min_chance_ratio * chance1_by_gap[0]):
                robust = large / small
            layers.append({"layer": l, "pck0": _mean(ok0), "pck1": _mean(ok1), "chance0": c0, "chance1": c1,
                           "n_anchors": K, "conf_acc_corr": pearson(max_prob[l], ok1),
                           "pck1_by_gap": by_gap, "temporal_robustness": robust})
        scored = [(d["pck1"], d["layer"]) for d in layers if d["pck1"] is not None]
        best = max(scored, key=lambda t: (t[0], -t[1])) if scored else (None, None)
        return {"n_anchors": K, "chance0": c0, "chance1": c1, "best_layer": best[1], "best_pck1": best[0],
                "gap_buckets": {"edges": self.edges, "labels": self.bucket_labels(), "counts": counts,
                                "chance1": chance1_by_gap, "unbucketed": int((bucket < 0).sum())},
                "layers": layers}


def flatten_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """`compute()` output -> flat {name: float} for a tracker (None values are left out)."""
    flat: dict[str, float] = {f"{prefix}/n_anchors": float(result["n_anchors"])}
    for key in ("chance0", "chance1", "best_layer", "best_pck1"):
        if result[key] is not None:
            flat[f"{prefix}/{key}"] = float(result[key])
    labels = result["gap_buckets"]["labels"]
    for d in result["layers"]:
        l = d["layer"]
        for key in ("pck0", "pck1", "conf_acc_corr", "temporal_robustness"):
            if d[key] is not None and math.isfinite(d[key]):
                flat[f"{prefix}/{key}/layer_{l:02d}"] = float(d[key])
        for lab, v in zip(labels, d["pck1_by_gap"]):
            if v is not None:
                flat[f"{prefix}/pck1_gap_{lab.replace('+', 'plus')}/layer_{l:02d}"] = float(v)  # MLflow names: no "+"
    return flat
