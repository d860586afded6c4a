"""Layer-wise correspondence metrics (DESIGN §6). Imports torch, the stdlib and data.tracking (no mlflow).

"raw": cosine of the captured features without the head, at tau = 0.07 whatever the training
tau; "head": f_l at the heads' tau. Either way build s (L, P, N_a, N_b) over the supervised
pairs of a batch (`losses.gasp.pair_similarities`), then:

    stats = match_stats(s, pair_view(batch), datasets=batch["datasets"])   # per anchor, no grad
    acc = MatchMetrics(); acc.update(stats); acc.compute()                   # JSON-able values

Per layer: PCK@0 and PCK@1 (the argmax cell of B within 0 / 1 cells, Chebyshev, of the target),
PCK@2patch (the paper's measure: the argmax cell's centre at most 2 cells, Euclidean, from the
target's centre), the chance of each (the fraction of B's real cells that would count), the
same-cell baseline (the anchor's own grid position as the guess: no motion), the Pearson
correlation of the max softmax probability with PCK@2patch correctness, and per dataset the
temporal curve PCK@2patch(dt) / PCK@2patch(dt_min) for every frame distance dt present with
temporal robustness (that ratio at dt = 24, or at the largest dt below 24, named). Every value
DESIGN §6 declares null comes with its reason (`*_null_reason`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from data.tracking import mlflow_key
from losses.gasp import Batch, item_masks, similarities

MIN_CURVE_ANCHORS = 200
"""Both ends of the temporal curve need this many anchors for temporal robustness."""
MIN_CHANCE_RATIO = 3.0
"""...and the smallest-dt PCK@2patch at least this multiple of its chance."""
ROBUSTNESS_DT = 24
"""The frame distance temporal robustness is read at (the paper's right end)."""
NO_ANCHORS = "no anchors scored"
"""Why a layer's every value is null when nothing was scored (or no layer could be chosen)."""
PCK2_RADIUS = 2.0
RAW_TAU = 0.07
"""Temperature of the "raw" scores (DESIGN §6): fixed, whatever the training tau, so a training
validation and a probe of the same features agree."""


def raw_similarities(fa: torch.Tensor, fb: torch.Tensor, tau: float = RAW_TAU) -> torch.Tensor:
    """Cosine of the captured features (no head) / tau: (L, P, Na, D), (L, P, Nb, D) -> (L, P, Na, Nb) float32."""
    return similarities(F.normalize(fa.float(), dim=-1), F.normalize(fb.float(), dim=-1), tau)


@dataclass
class MatchStats:
    """Per real anchor (K of them, flattened over pairs in (pair, slot) order), per layer."""

    dist: torch.Tensor
    """(L, K) long: Chebyshev distance in cells between the argmax cell of B and the target."""
    near2: torch.Tensor
    """(L, K) bool: the argmax cell's centre lies within 2 cells (Euclidean) of the target's (PCK@2patch)."""
    max_prob: torch.Tensor
    """(L, K) float: max softmax probability over B's real cells."""
    chance0: torch.Tensor
    """(K,) float64: 1 / (real cells of B)."""
    chance1: torch.Tensor
    """(K,) float64: fraction of B's real cells within 1 cell (Chebyshev) of the target."""
    chance2: torch.Tensor
    """(K,) float64: fraction of B's real cells within 2 cells (Euclidean) of the target."""
    same_dist: torch.Tensor
    """(K,) long: Chebyshev distance of the target from the anchor's own grid position in B."""
    same_near2: torch.Tensor
    """(K,) bool: that position within 2 cells (Euclidean) of the target."""
    dt: torch.Tensor
    """(K,) long: frame distance index_B - index_A of the anchor's pair."""
    dataset: torch.Tensor
    """(K,) long: index into `datasets`."""
    datasets: tuple[str, ...] = ("?",)
    lookalike: torch.Tensor | None = None
    """(K,) bool: a look-alike anchor (`data.labels`: B shows a look-alike of its object at another depth)."""
    objects_known: torch.Tensor | None = None
    """(K,) bool: the anchor's clip stores object ids, so `lookalike` is known for it."""

    def __post_init__(self) -> None:
        for name in ("lookalike", "objects_known"):  # not given: no anchor's objects are known
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.dist.shape[-1], dtype=torch.bool, device=self.dist.device))

    def cpu(self) -> "MatchStats":
        return replace(self, **{f.name: getattr(self, f.name).cpu() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def _rc(i: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return i // cols, i % cols


def _chebyshev(i: torch.Tensor, j: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Chebyshev distance in cells between row-major cell indices i and j of grids with `cols` columns."""
    (ri, ci), (rj, cj) = _rc(i, cols), _rc(j, cols)
    return torch.maximum((ri - rj).abs(), (ci - cj).abs())


def _within2(i: torch.Tensor, j: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Cell centres of i and j at most PCK2_RADIUS cells apart (Euclidean)."""
    (ri, ci), (rj, cj) = _rc(i, cols), _rc(j, cols)
    return ((ri - rj).square() + (ci - cj).square()) <= PCK2_RADIUS ** 2


def same_cell_guess(batch: Batch, m) -> torch.Tensor:
    """(P, M) the cell of B at the anchor's own grid position (scaled when the grids differ)."""
    rows_a, cols_a = batch["grid_a"][:, 0:1].clamp_min(1), batch["grid_a"][:, 1:2].clamp_min(1)  # (P, 1)
    rows_b, cols_b = batch["grid_b"][:, 0:1].clamp_min(1), batch["grid_b"][:, 1:2].clamp_min(1)
    r_a, c_a = m.a_idx // cols_a, m.a_idx % cols_a  # (P, M)
    r = torch.minimum(((r_a + 0.5) * rows_b / rows_a).floor().long(), rows_b - 1)  # (P, M)
    c = torch.minimum(((c_a + 0.5) * cols_b / cols_a).floor().long(), cols_b - 1)
    return r * cols_b + c


@torch.no_grad()
def match_stats(s: torch.Tensor, batch: Batch, datasets: Sequence[str] | None = None) -> MatchStats:
    """s (L, P, Na, Nb) similarities / tau; batch: per-pair labels (`pair_view`) with grid_a, grid_b (P, 2),
    dt (P,) and, with `datasets` (one name per clip), pair_clip (P,)."""
    s = s.float()
    L, P, Na, Nb = s.shape
    m = item_masks(batch)
    M = m.anchor.shape[1]
    dev = s.device
    mask_b = batch["cell_mask_b"].bool().to(dev)
    rows = s.gather(2, m.a_idx[None, :, :, None].to(dev).expand(L, P, M, Nb))  # (L, P, M, Nb)
    rows = rows.masked_fill(~mask_b[None, :, None, :], float("-inf"))
    best, arg = rows.max(-1)  # (L, P, M)
    max_prob = torch.exp(best - torch.logsumexp(rows, -1))  # (L, P, M); NaN only on non-anchors
    cols = batch["grid_b"][:, 1].long().to(dev).clamp_min(1)  # (P,)
    t_idx = m.t_idx.to(dev)
    dist = _chebyshev(arg, t_idx[None], cols[:, None])  # (L, P, M)
    near2 = _within2(arg, t_idx[None], cols[:, None])  # (L, P, M)
    cells = torch.arange(Nb, device=dev)[None, None, :]  # (1, 1, Nb)
    real = mask_b[:, None, :]  # (P, 1, Nb)
    n_real = mask_b.sum(1, keepdim=True).clamp_min(1).double()  # (P, 1); chance in float64
    chance0 = (1.0 / n_real).expand(P, M)  # (P, M)
    chance1 = ((_chebyshev(cells, t_idx[:, :, None], cols[:, None, None]) <= 1) & real).sum(-1).double() / n_real
    chance2 = (_within2(cells, t_idx[:, :, None], cols[:, None, None]) & real).sum(-1).double() / n_real
    guess = same_cell_guess({k: batch[k].to(dev) for k in ("grid_a", "grid_b")}, m)  # (P, M)
    same_dist = _chebyshev(guess.to(dev), t_idx, cols[:, None])
    same_near2 = _within2(guess.to(dev), t_idx, cols[:, None])
    dt = batch["dt"].long().to(dev)[:, None].expand(P, M)  # (P, M)
    names = tuple(datasets) if datasets else ("?",)
    if datasets and "pair_clip" in batch:
        ids = torch.tensor([names.index(n) for n in datasets], dtype=torch.long, device=dev)  # per clip
        ds = ids[batch["pair_clip"].long().to(dev)][:, None].expand(P, M)
    else:
        ds = torch.zeros(P, M, dtype=torch.long, device=dev)
    k = m.anchor.to(dev)  # (P, M) -> K real anchors, flattened in (pair, m) order
    uniq = tuple(dict.fromkeys(names))
    remap = torch.tensor([uniq.index(n) for n in names], dtype=torch.long, device=dev)
    alike = batch["lookalike"].bool().to(dev) if "lookalike" in batch else torch.zeros(P, M, dtype=torch.bool,
                                                                                         device=dev)
    known = (batch["objects_known"].bool().to(dev)[:, None].expand(P, M) if "objects_known" in batch
             else torch.zeros(P, M, dtype=torch.bool, device=dev))
    return MatchStats(dist[:, k], near2[:, k], max_prob[:, k], chance0[k], chance1[k], chance2[k], same_dist[k],
                      same_near2[k], dt[k], remap[ds[k]], uniq, alike[k], known[k])


def pearson(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float | None:
    """Pearson correlation; None with fewer than 2 items or when either is constant."""
    return pearson_with_reason(x, y)[0]


def pearson_with_reason(x, y) -> tuple[float | None, str | None]:
    """(Pearson correlation, None) or (None, why it is null)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.numel() < 2:
        return None, f"fewer than 2 anchors ({x.numel()})"
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = dx.square().sum().sqrt(), dy.square().sum().sqrt()
    if sx.item() <= 1e-12 * max(1.0, x.abs().max().item()):
        return None, "the confidence is constant"
    if sy.item() <= 1e-12 * max(1.0, y.abs().max().item()):
        return None, "the correctness is constant (all right or all wrong)"
    return float((dx * dy).sum() / (sx * sy)), None


def _mean(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def temporal_curve(ok2: torch.Tensor, chance2: torch.Tensor, dt: torch.Tensor,
                   min_anchors: int = MIN_CURVE_ANCHORS, min_chance_ratio: float = MIN_CHANCE_RATIO,
                   at_dt: int = ROBUSTNESS_DT) -> dict[str, Any]:
    """PCK@2patch per frame distance of one layer and dataset, normalised by the smallest dt present.

    ok2 (K,) bool, chance2 (K,), dt (K,). Returns dt, n, pck2, chance2, normalised (lists over the
    dt present, ascending), and temporal robustness = normalised at `at_dt` (or the largest dt
    below it, `robustness_dt`) with `robustness_null_reason` when DESIGN §6's rules null it.
    """
    dts = sorted(int(d) for d in torch.unique(dt.abs()).tolist()) if dt.numel() else []
    n, pck, ch = [], [], []
    for d in dts:
        sel = dt.abs() == d
        n.append(int(sel.sum()))
        pck.append(_mean(ok2[sel].double()))
        ch.append(_mean(chance2[sel]))
    base = pck[0] if pck else None
    norm = [None if (base is None or base <= 0 or p is None) else p / base for p in pck]
    out: dict[str, Any] = {"dt": dts, "n": n, "pck2": pck, "chance2": ch, "normalised": norm,
                           "robustness": None, "robustness_dt": None, "robustness_null_reason": None}
    below = [i for i, d in enumerate(dts) if d <= at_dt]
    if not dts:
        out["robustness_null_reason"] = "no anchors"
        return out
    end = below[-1] if below else None
    if end is None or end == 0:
        out["robustness_null_reason"] = f"one frame distance only at or below {at_dt} (dt {dts[0]})" \
            if end == 0 else f"no frame distance at or below {at_dt}"
        return out
    out["robustness_dt"] = dts[end]
    if n[0] < min_anchors or n[end] < min_anchors:
        out["robustness_null_reason"] = (f"fewer than {min_anchors} anchors at an end (dt {dts[0]}: {n[0]}, "
                                         f"dt {dts[end]}: {n[end]})")
    elif base is None or base <= 0 or base < min_chance_ratio * (ch[0] or 0.0):
        out["robustness_null_reason"] = (f"PCK@2patch at dt {dts[0]} ({_fmt(base)}) is below {min_chance_ratio:g}x "
                                         f"chance ({_fmt(ch[0])})")
    else:
        out["robustness"] = norm[end]
    return out


def unscored_layer() -> dict[str, Any]:
    """The values of a layer with no anchors behind it: every number null, with `NO_ANCHORS` as the reason."""
    return {"pck0": None, "pck1": None, "pck2patch": None, "conf_acc_corr": None,
            "conf_acc_corr_null_reason": NO_ANCHORS, "temporal": {}}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


class MatchMetrics:
    """Accumulates `MatchStats` over held-out clips; `compute()` gives plain JSON-able values."""

    def __init__(self, min_curve_anchors: int = MIN_CURVE_ANCHORS, min_chance_ratio: float = MIN_CHANCE_RATIO,
                 robustness_dt: int = ROBUSTNESS_DT) -> None:
        self.min_curve_anchors, self.min_chance_ratio = min_curve_anchors, min_chance_ratio
        self.robustness_dt = robustness_dt
        self._stats: list[MatchStats] = []

    def update(self, stats: MatchStats) -> None:
        if self._stats and stats.dist.shape[0] != self._stats[0].dist.shape[0]:
            raise ValueError(f"stats of {stats.dist.shape[0]} layers after {self._stats[0].dist.shape[0]}")
        self._stats.append(stats.cpu())

    def _cat(self) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        names: list[str] = []
        for st in self._stats:
            names += [n for n in st.datasets if n not in names]
        out: dict[str, list[torch.Tensor]] = {}
        for st in self._stats:
            remap = torch.tensor([names.index(n) for n in st.datasets], dtype=torch.long)
            for f in fields(st):
                v = getattr(st, f.name)
                if not isinstance(v, torch.Tensor):
                    continue
                out.setdefault(f.name, []).append(remap[v] if f.name == "dataset" else v)
        return {k: torch.cat(v, -1) for k, v in out.items()}, tuple(names)

    def compute(self) -> dict[str, Any]:
        """Top level: n_anchors, chance0/1/2, same_cell {pck0, pck1, pck2patch}, datasets, best_layer and
        best_pck2patch (by PCK@2patch, on THIS split), layers (per layer: pck0, pck1, pck2patch,
        conf_acc_corr (+ null reason), temporal {dataset: curve (see `temporal_curve`)}), and lookalike:
        None unless some scored clip stores object ids, else {n_anchors (look-alike anchors), of_anchors
        (anchors whose clips store ids), chance2, same_cell_pck2patch, pck2patch (per layer)} over the
        look-alike anchors."""
        if not self._stats:
            return {"n_anchors": 0, "chance0": None, "chance1": None, "chance2": None,
                    "same_cell": {"pck0": None, "pck1": None, "pck2patch": None}, "datasets": [],
                    "anchors_by_dataset": {}, "best_layer": None, "best_pck2patch": None, "layers": [],
                    "lookalike": None}
        t, names = self._cat()
        L, K = t["dist"].shape
        layers = []
        for l in range(L):
            ok2 = t["near2"][l]
            corr, why = pearson_with_reason(t["max_prob"][l], ok2.double())
            temporal = {}
            for i, name in enumerate(names):
                sel = t["dataset"] == i
                temporal[name] = temporal_curve(ok2[sel], t["chance2"][sel], t["dt"][sel], self.min_curve_anchors,
                                                self.min_chance_ratio, self.robustness_dt)
            layers.append({"layer": l, "pck0": _mean((t["dist"][l] == 0).double()),
                           "pck1": _mean((t["dist"][l] <= 1).double()), "pck2patch": _mean(ok2.double()),
                           "conf_acc_corr": corr, "conf_acc_corr_null_reason": why, "temporal": temporal})
        scored = [(d["pck2patch"], d["layer"]) for d in layers if d["pck2patch"] is not None]
        best = max(scored, key=lambda x: (x[0], -x[1])) if scored else (None, None)
        lookalike = None
        if "objects_known" in t and bool(t["objects_known"].any()):
            sel = t["lookalike"] & t["objects_known"]  # (K,)
            lookalike = {"n_anchors": int(sel.sum()), "of_anchors": int(t["objects_known"].sum()),
                         "chance2": _mean(t["chance2"][sel]),
                         "same_cell_pck2patch": _mean(t["same_near2"][sel].double()),
                         "pck2patch": [_mean(t["near2"][l][sel].double()) for l in range(L)]}
        return {"n_anchors": K, "chance0": _mean(t["chance0"]), "chance1": _mean(t["chance1"]),
                "chance2": _mean(t["chance2"]),
                "same_cell": {"pck0": _mean((t["same_dist"] == 0).double()),
                              "pck1": _mean((t["same_dist"] <= 1).double()),
                              "pck2patch": _mean(t["same_near2"].double())},
                "datasets": list(names),
                "anchors_by_dataset": {n: int((t["dataset"] == i).sum()) for i, n in enumerate(names)},
                "best_layer": best[1], "best_pck2patch": best[0], "layers": layers, "lookalike": lookalike}

    def raw(self) -> dict[str, torch.Tensor]:
        """The concatenated per-anchor tensors (for plots such as the reliability diagram)."""
        return self._cat()[0]


def flatten_metrics(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """`compute()` output -> flat {name: float} for a tracker (None values are left out).

    Per layer pck0 / pck1 / pck2patch / conf_acc_corr and per dataset temporal robustness; the
    curves themselves go to the tracker as series (`temporal_series`).
    """
    flat: dict[str, float] = {f"{prefix}/n_anchors": float(result["n_anchors"])}
    for key in ("chance0", "chance1", "chance2", "best_layer", "best_pck2patch"):
        if result.get(key) is not None:
            flat[f"{prefix}/{key}"] = float(result[key])
    for key, v in (result.get("same_cell") or {}).items():
        if v is not None:
            flat[f"{prefix}/same_cell/{key}"] = float(v)
    for d in result["layers"]:
        l = d["layer"]
        for key in ("pck0", "pck1", "pck2patch", "conf_acc_corr"):
            if d[key] is not None and math.isfinite(d[key]):
                flat[f"{prefix}/{key}/layer_{l:02d}"] = float(d[key])
        for name, curve in d["temporal"].items():
            if curve["robustness"] is not None:
                flat[f"{prefix}/temporal_robustness/{mlflow_key(name)}/layer_{l:02d}"] = float(curve["robustness"])
    la = result.get("lookalike")
    if la:
        flat[f"{prefix}/lookalike/n_anchors"] = float(la["n_anchors"])
        for key in ("chance2", "same_cell_pck2patch"):
            if la[key] is not None:
                flat[f"{prefix}/lookalike/{key}"] = float(la[key])
        for l, v in enumerate(la["pck2patch"]):
            if v is not None:
                flat[f"{prefix}/lookalike/pck2patch/layer_{l:02d}"] = float(v)
    return flat


def temporal_series(result: dict[str, Any], prefix: str, layer: int | None = None) -> dict[str, list[tuple[int, float]]]:
    """{metric name: [(dt, normalised PCK@2patch), ...]} of one layer (default: the best), per dataset:
    the temporal curve as MLflow metric series (step = frame distance)."""
    layer = result.get("best_layer") if layer is None else layer
    if layer is None:
        return {}
    out = {}
    for name, curve in result["layers"][layer]["temporal"].items():
        pts = [(d, v) for d, v in zip(curve["dt"], curve["normalised"]) if v is not None]
        if pts:
            out[f"{prefix}/norm_pck2_by_dt/{mlflow_key(name)}"] = pts
    return out
