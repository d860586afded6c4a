"""Matching metrics (DESIGN §6): PCK@0/1/2patch and their chance, the same-cell baseline, the
confidence-correctness correlation, the per-dataset temporal curve and temporal robustness, with
every null and its reason.

(Revised with DESIGN §6 for clips: PCK@2patch is the reported measure, the correlation is on
PCK@2patch correctness, and the gap buckets became the per-dataset curve over every dt present.)
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from losses.gasp import similarities
from losses.metrics import (MatchMetrics, MatchStats, flatten_metrics, match_stats, pearson, raw_similarities,
                            temporal_series)
from model.head import FusedCorrespondenceHead


def full_batch(B: int, rows: int, cols: int, targets: torch.Tensor, dt: list[int] | None = None) -> dict:
    """Every cell of A is an anchor; targets (B, N) cell of B."""
    N = rows * cols
    ones = torch.ones(B, N, dtype=torch.bool)
    return {"cell_mask_a": ones, "cell_mask_b": ones, "anchor_a": torch.arange(N).repeat(B, 1),
            "target_b": targets, "anchor_mask": ones, "z_b": torch.ones(B, N), "depth_b": torch.ones(B, N),
            "depth_b_valid": ones, "grid_a": torch.tensor([[rows, cols]] * B), "grid_b": torch.tensor([[rows, cols]] * B),
            "dt": torch.tensor(dt if dt is not None else [1] * B)}


def test_identical_views_give_pck_one_raw_and_head():
    g = torch.Generator().manual_seed(0)
    L, B, R, C, D = 3, 2, 4, 5, 32
    N = R * C
    f = torch.randn(L, B, N, D, generator=g)
    batch = full_batch(B, R, C, torch.arange(N).repeat(B, 1))
    head = FusedCorrespondenceHead(L, D, head_dim=16, kind="mlp")
    for s in (raw_similarities(f, f.bfloat16()), similarities(head(f), head(f), 0.07)):
        acc = MatchMetrics()
        acc.update(match_stats(s, batch))
        out = acc.compute()
        assert out["n_anchors"] == B * N and math.isclose(out["chance0"], 1 / N)
        for key in ("pck0", "pck1", "pck2patch"):
            assert [d[key] for d in out["layers"]] == [1.0] * L
        assert out["same_cell"] == {"pck0": 1.0, "pck1": 1.0, "pck2patch": 1.0}  # no motion at all


def _window_counts(n: int, r: int) -> list[list[int]]:
    """cells of an n x n grid within Euclidean distance r of each cell (brute force)."""
    return [[sum(1 for a in range(n) for b in range(n) if (a - i) ** 2 + (b - j) ** 2 <= r * r)
             for j in range(n)] for i in range(n)]


def test_random_features_give_pck_near_chance():
    g = torch.Generator().manual_seed(1)
    L, B, R, C, D = 3, 16, 8, 8, 32
    N = R * C
    targets = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    batch = full_batch(B, R, C, targets)
    s = raw_similarities(torch.randn(L, B, N, D, generator=g), torch.randn(L, B, N, D, generator=g))
    acc = MatchMetrics()
    acc.update(match_stats(s, batch))
    out = acc.compute()
    K, c0, c1, c2 = out["n_anchors"], out["chance0"], out["chance1"], out["chance2"]
    assert K == B * N and math.isclose(c0, 1 / 64)
    # chance@1 of a uniform target on an 8x8 grid: mean over cells of |3x3 window inside the grid| / 64.
    per_axis = [min(i + 1, 7) - max(i - 1, 0) + 1 for i in range(8)]
    assert math.isclose(c1, sum(a * b for a in per_axis for b in per_axis) / 64 / 64, rel_tol=1e-9)
    # chance@2patch: cells within Euclidean 2 (the 5x5 window minus its corners, clipped), brute force
    assert math.isclose(c2, sum(map(sum, _window_counts(8, 2))) / 64 / 64, rel_tol=1e-9)
    for d in out["layers"]:
        for key, c in (("pck0", c0), ("pck1", c1), ("pck2patch", c2)):
            assert abs(d[key] - c) < 5 * math.sqrt(c * (1 - c) / K), (key, d[key], c)


def test_pck2patch_is_euclidean_within_two_cells_and_chebyshev_for_pck1():
    """One anchor per pair on a 5x5 grid, target at the centre (2, 2); the argmax cell moves."""
    grid, N = 5, 25
    argmax = [(2, 2), (2, 4), (4, 4), (3, 3), (4, 3), (0, 2), (1, 1)]  # (row, col)
    P = len(argmax)
    s = torch.zeros(1, P, 1, N)
    for p, (r, c) in enumerate(argmax):
        s[0, p, 0, r * grid + c] = 5.0
    batch = full_batch(P, 1, 1, torch.full((P, 1), 12))  # A has one cell; the target is cell 12 = (2, 2)
    batch.update({"cell_mask_b": torch.ones(P, N, dtype=torch.bool), "grid_b": torch.tensor([[grid, grid]] * P),
                  "depth_b": torch.ones(P, N), "depth_b_valid": torch.ones(P, N, dtype=torch.bool)})
    st = match_stats(s, batch)
    # distances from (2, 2): 0, 2, sqrt 8, sqrt 2, sqrt 5, 2, sqrt 2
    assert st.near2.tolist() == [[True, True, False, True, False, True, True]]
    assert st.dist.tolist() == [[0, 2, 2, 1, 2, 2, 1]]
    # the same-cell guess (A's only cell -> B's centre cell) is right: B's grid is scaled from A's 1x1
    assert st.same_near2.all() and (st.same_dist == 0).all()
    assert torch.allclose(st.chance2, torch.full((P,), 13 / 25, dtype=torch.float64))  # 13 cells within 2 of centre


def test_match_stats_chance_and_confidence_on_padded_grids():
    # Pair 0: B grid 3x4 (12 cells). Pair 1: B grid 2x5 (10 cells, 2 padded). One anchor each.
    Nb = 12
    mask_b = torch.ones(2, Nb, dtype=torch.bool)
    mask_b[1, 10:] = False
    s = torch.zeros(1, 2, 1, Nb)  # (L, P, Na, Nb)
    s[0, 0, 0, 11] = 3.0  # argmax (r2, c3); target 5 = (r1, c1) -> Chebyshev 2, Euclidean sqrt 5
    s[0, 1, 0, 8] = 2.0   # argmax (r1, c3) in a 5-wide grid; target 4 = (r0, c4) -> 1
    s[0, 1, 0, 11] = 9.0  # padding: must be ignored
    batch = {"cell_mask_a": torch.ones(2, 1, dtype=torch.bool), "cell_mask_b": mask_b,
             "anchor_a": torch.zeros(2, 2, dtype=torch.long), "target_b": torch.tensor([[5, 0], [4, 0]]),
             "anchor_mask": torch.tensor([[True, False], [True, False]]), "z_b": torch.ones(2, 2),
             "depth_b": torch.ones(2, Nb), "depth_b_valid": mask_b, "grid_a": torch.tensor([[1, 1], [1, 1]]),
             "grid_b": torch.tensor([[3, 4], [2, 5]]), "dt": torch.tensor([3, 17]),
             "pair_clip": torch.tensor([0, 1])}
    st = match_stats(s, batch, datasets=["scannet", "dl3dv"])
    assert st.dist.tolist() == [[2, 1]] and st.near2.tolist() == [[False, True]]
    assert st.dt.tolist() == [3, 17] and [st.datasets[i] for i in st.dataset.tolist()] == ["scannet", "dl3dv"]
    assert torch.allclose(st.chance0, torch.tensor([1 / 12, 1 / 10], dtype=torch.float64))
    assert torch.allclose(st.chance1, torch.tensor([9 / 12, 4 / 10], dtype=torch.float64))  # 3x3 window; corner 2x2
    p0 = math.exp(3) / (math.exp(3) + 11)
    p1 = math.exp(2) / (math.exp(2) + 9)
    assert torch.allclose(st.max_prob, torch.tensor([[p0, p1]]), rtol=1e-6)


def stats(near2: list[list[bool]], max_prob: list[list[float]], dt: list[int], chance2: float = 0.1,
          datasets: list[str] | None = None) -> MatchStats:
    K = len(dt)
    names = tuple(dict.fromkeys(datasets)) if datasets else ("synthetic",)
    ids = torch.tensor([names.index(d) for d in datasets]) if datasets else torch.zeros(K, dtype=torch.long)
    ok = torch.tensor(near2)
    return MatchStats(dist=torch.where(ok, 0, 3), near2=ok, max_prob=torch.tensor(max_prob),
                      chance0=torch.full((K,), 0.01, dtype=torch.float64),
                      chance1=torch.full((K,), 0.05, dtype=torch.float64),
                      chance2=torch.full((K,), chance2, dtype=torch.float64),
                      same_dist=torch.full((K,), 5), same_near2=torch.zeros(K, dtype=torch.bool),
                      dt=torch.tensor(dt), dataset=ids, datasets=names)


def test_confidence_correctness_correlation_and_its_null_reasons():
    conf = [0.9, 0.8, 0.2, 0.7, 0.4, 0.5]
    ok = [True, True, False, True, False, True]  # PCK@2patch correctness
    y = [1.0 if o else 0.0 for o in ok]
    mx, my = sum(conf) / 6, sum(y) / 6
    cov = sum((a - mx) * (b - my) for a, b in zip(conf, y))
    want = cov / math.sqrt(sum((a - mx) ** 2 for a in conf) * sum((b - my) ** 2 for b in y))
    acc = MatchMetrics()
    acc.update(stats([ok, ok], [conf, [0.5] * 6], [1] * 6))  # layer 1: constant confidence
    out = acc.compute()["layers"]
    assert math.isclose(out[0]["conf_acc_corr"], want, rel_tol=1e-6) and want > 0.5
    assert out[0]["conf_acc_corr_null_reason"] is None
    assert out[1]["conf_acc_corr"] is None and out[1]["conf_acc_corr_null_reason"] == "the confidence is constant"
    acc = MatchMetrics()
    acc.update(stats([[True, True, True]], [[0.1, 0.5, 0.9]], [1, 1, 1]))  # all correct: constant correctness
    layer = acc.compute()["layers"][0]
    assert layer["conf_acc_corr"] is None and "correctness is constant" in layer["conf_acc_corr_null_reason"]
    assert pearson([0.3], [1.0]) is None


def curve_stats(n_small: int, ok_small: int, n_far: int, ok_far: int, far_dt: int = 24, chance2: float = 0.1,
                dataset: str = "synthetic") -> MatchStats:
    """n_small anchors at dt 1, n_far at dt far_dt, and a few in between (dt 5 and 30)."""
    dts = [1] * n_small + [far_dt] * n_far + [5, 5, 30]
    ok = [True] * ok_small + [False] * (n_small - ok_small) + [True] * ok_far + [False] * (n_far - ok_far) \
        + [True, False, True]
    return stats([ok], [[0.5] * len(dts)], dts, chance2, [dataset] * len(dts))


def test_temporal_curve_normalised_by_the_smallest_dt_and_robustness_at_24():
    acc = MatchMetrics()
    acc.update(curve_stats(250, 200, 210, 105))
    curve = acc.compute()["layers"][0]["temporal"]["synthetic"]
    assert curve["dt"] == [1, 5, 24, 30] and curve["n"] == [250, 2, 210, 1]
    assert curve["pck2"] == [0.8, 0.5, 0.5, 1.0]
    assert curve["normalised"] == [1.0, 0.5 / 0.8, 0.5 / 0.8, 1.0 / 0.8]
    assert curve["robustness_dt"] == 24 and math.isclose(curve["robustness"], 0.5 / 0.8)
    assert curve["robustness_null_reason"] is None
    # no dt 24: the largest dt below it is used, and named
    acc = MatchMetrics()
    acc.update(curve_stats(250, 200, 210, 105, far_dt=20))
    curve = acc.compute()["layers"][0]["temporal"]["synthetic"]
    assert curve["robustness_dt"] == 20 and math.isclose(curve["robustness"], 0.5 / 0.8)
    json.dumps(acc.compute())  # plain python values


@pytest.mark.parametrize("n_small,n_far,chance2,why", [
    (199, 250, 0.1, "fewer than 200 anchors at an end"),
    (250, 199, 0.1, "fewer than 200 anchors at an end"),
    (250, 250, 0.3, "below 3x chance"),  # PCK@2patch 0.8 < 3 x 0.3
])
def test_temporal_robustness_null_rules(n_small, n_far, chance2, why):
    acc = MatchMetrics()
    acc.update(curve_stats(n_small, int(0.8 * n_small), n_far, n_far // 2, chance2=chance2))
    curve = acc.compute()["layers"][0]["temporal"]["synthetic"]
    assert curve["robustness"] is None and why in curve["robustness_null_reason"]
    assert all(v is not None for v in curve["normalised"])  # the curve itself is always reported


def test_curves_are_per_dataset():
    acc = MatchMetrics()
    acc.update(curve_stats(250, 250, 250, 250, dataset="scannet"))  # flat: robustness 1
    acc.update(curve_stats(250, 200, 250, 50, dataset="dl3dv"))  # collapses: 0.2 / 0.8
    out = acc.compute()
    assert out["datasets"] == ["scannet", "dl3dv"] and out["anchors_by_dataset"] == {"scannet": 503, "dl3dv": 503}
    t = out["layers"][0]["temporal"]
    assert math.isclose(t["scannet"]["robustness"], 1.0) and math.isclose(t["dl3dv"]["robustness"], 0.25)
    series = temporal_series(out, "probe/head")
    assert series["probe/head/norm_pck2_by_dt/scannet"][0] == (1, 1.0)
    assert dict(series["probe/head/norm_pck2_by_dt/dl3dv"])[24] == 0.25


def test_accumulation_best_layer_and_flat_export():
    a = stats([[True, False], [True, True]], [[0.9, 0.1], [0.4, 0.6]], [1, 50])
    b = stats([[False, False], [True, False]], [[0.3, 0.2], [0.8, 0.1]], [7, 2])
    acc = MatchMetrics()
    acc.update(a)
    acc.update(b)
    out = acc.compute()
    assert out["n_anchors"] == 4
    assert [d["pck2patch"] for d in out["layers"]] == [0.25, 0.75]
    assert out["best_layer"] == 1 and out["best_pck2patch"] == 0.75
    flat = flatten_metrics(out, "head")
    assert flat["head/pck2patch/layer_01"] == 0.75 and flat["head/best_layer"] == 1.0
    assert flat["head/same_cell/pck2patch"] == 0.0
    assert all(isinstance(v, float) for v in flat.values())
    empty = MatchMetrics().compute()
    assert empty["n_anchors"] == 0 and empty["best_layer"] is None
    json.dumps(empty)
