"""Matching metrics: PCK@0/1 and chance, Chebyshev distances, confidence-accuracy correlation, temporal robustness."""
from __future__ import annotations

import json
import math

import pytest
import torch

from losses.gasp import similarities
from losses.metrics import MatchMetrics, MatchStats, flatten_metrics, match_stats, pearson, raw_similarities
from model.head import FusedCorrespondenceHead


def full_batch(B: int, rows: int, cols: int, targets: torch.Tensor, gap: list[int] | None = None) -> dict:
    """Every cell of A is an anchor; targets (B, N) cell of B."""
    N = rows * cols
    ones = torch.ones(B, N, dtype=torch.bool)
    return {"cell_mask_a": ones, "cell_mask_b": ones, "anchor_a": torch.arange(N).repeat(B, 1),
            "target_b": targets, "anchor_mask": ones, "z_b": torch.ones(B, N), "depth_b": torch.ones(B, N),
            "depth_b_valid": ones, "grid_b": torch.tensor([[rows, cols]] * B),
            "gap": torch.tensor(gap if gap is not None else [1] * B)}


def test_identical_views_give_pck0_one_raw_and_head():
    g = torch.Generator().manual_seed(0)
    L, B, R, C, D = 3, 2, 4, 5, 32
    N = R * C
    f = torch.randn(L, B, N, D, generator=g)
    batch = full_batch(B, R, C, torch.arange(N).repeat(B, 1))
    head = FusedCorrespondenceHead(L, D, head_dim=16)
    for s in (raw_similarities(f, f.bfloat16()), similarities(head(f), head(f), 0.07)):
        acc = MatchMetrics()
        acc.update(match_stats(s, batch))
        out = acc.compute()
        assert out["n_anchors"] == B * N and math.isclose(out["chance0"], 1 / N)
        assert [d["pck0"] for d in out["layers"]] == [1.0] * L
        assert [d["pck1"] for d in out["layers"]] == [1.0] * L


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
    K, c0, c1 = out["n_anchors"], out["chance0"], out["chance1"]
    assert K == B * N and math.isclose(c0, 1 / 64)
    # chance@1 of a uniform target on an 8x8 grid: mean over cells of |3x3 window inside the grid| / 64.
    per_axis = [min(i + 1, 7) - max(i - 1, 0) + 1 for i in range(8)]
    assert math.isclose(c1, sum(a * b for a in per_axis for b in per_axis) / 64 / 64, rel_tol=1e-9)
    for d in out["layers"]:
        assert abs(d["pck0"] - c0) < 5 * math.sqrt(c0 * (1 - c0) / K)
        assert abs(d["pck1"] - c1) < 5 * math.sqrt(c1 * (1 - c1) / K)


def test_match_stats_chebyshev_chance_and_confidence_on_padded_grids():
    # Pair 0: B grid 3x4 (12 cells). Pair 1: B grid 2x5 (10 cells, 2 padded). One anchor each.
    Nb = 12
    mask_b = torch.ones(2, Nb, dtype=torch.bool)
    mask_b[1, 10:] = False
    s = torch.zeros(1, 2, 1, Nb)  # (L, B, Na, Nb)
    s[0, 0, 0, 11] = 3.0  # argmax (r2, c3); target 5 = (r1, c1) -> Chebyshev 2
    s[0, 1, 0, 8] = 2.0   # argmax (r1, c3) in a 5-wide grid; target 4 = (r0, c4) -> 1
    s[0, 1, 0, 11] = 9.0  # padding: must be ignored
    batch = {"cell_mask_a": torch.ones(2, 1, dtype=torch.bool), "cell_mask_b": mask_b,
             "anchor_a": torch.zeros(2, 2, dtype=torch.long), "target_b": torch.tensor([[5, 0], [4, 0]]),
             "anchor_mask": torch.tensor([[True, False], [True, False]]), "z_b": torch.ones(2, 2),
             "depth_b": torch.ones(2, Nb), "depth_b_valid": mask_b, "grid_b": torch.tensor([[3, 4], [2, 5]]),
             "gap": torch.tensor([3, 17])}
    st = match_stats(s, batch)
    assert st.dist.tolist() == [[2, 1]]
    assert st.gap.tolist() == [3, 17]
    assert torch.allclose(st.chance0, torch.tensor([1 / 12, 1 / 10], dtype=torch.float64))
    assert torch.allclose(st.chance1, torch.tensor([9 / 12, 4 / 10], dtype=torch.float64))  # 3x3 window; corner 2x2
    p0 = math.exp(3) / (math.exp(3) + 11)
    p1 = math.exp(2) / (math.exp(2) + 9)
    assert torch.allclose(st.max_prob, torch.tensor([[p0, p1]]), rtol=1e-6)


def stats(dist: list[list[int]], max_prob: list[list[float]], gap: list[int], chance1: float = 0.1) -> MatchStats:
    K = len(gap)
    return MatchStats(torch.tensor(dist), torch.tensor(max_prob), torch.full((K,), 0.01, dtype=torch.float64),
                      torch.full((K,), chance1, dtype=torch.float64), torch.tensor(gap))


def test_confidence_accuracy_correlation_and_none_cases():
    conf = [0.9, 0.8, 0.2, 0.7, 0.4, 0.5]
    dist = [0, 1, 3, 0, 2, 1]  # PCK@1 correct: 1 1 0 1 0 1
    ok = [1.0 if d <= 1 else 0.0 for d in dist]
    mx, my = sum(conf) / 6, sum(ok) / 6
    cov = sum((a - mx) * (b - my) for a, b in zip(conf, ok))
    want = cov / math.sqrt(sum((a - mx) ** 2 for a in conf) * sum((b - my) ** 2 for b in ok))
    acc = MatchMetrics()
    acc.update(stats([dist, dist], [conf, [0.5] * 6], [1] * 6))  # layer 1: constant confidence
    out = acc.compute()["layers"]
    assert math.isclose(out[0]["conf_acc_corr"], want, rel_tol=1e-6) and want > 0.5
    assert out[1]["conf_acc_corr"] is None
    acc = MatchMetrics()
    acc.update(stats([[0, 1, 0]], [[0.1, 0.5, 0.9]], [1, 1, 1]))  # all correct: constant accuracy
    assert acc.compute()["layers"][0]["conf_acc_corr"] is None
    assert pearson([0.3], [1.0]) is None


def robustness_stats(n_small: int, ok_small: int, n_large: int, ok_large: int, chance1: float) -> MatchStats:
    gaps = [1 + i % 4 for i in range(n_small)] + [40 + i for i in range(n_large)] + [0, 5, 14, 15, 39, -2]
    dist = [0] * ok_small + [5] * (n_small - ok_small) + [1] * ok_large + [4] * (n_large - ok_large) + [0] * 6
    return stats([dist], [[0.5] * len(gaps)], gaps, chance1)


def test_gap_buckets_and_temporal_robustness():
    acc = MatchMetrics(gap_buckets=[1, 5, 15, 40])
    acc.update(robustness_stats(250, 150, 210, 105, chance1=0.1))
    out = acc.compute()
    gb = out["gap_buckets"]
    # gaps 0 -> none; -2 -> |gap| 2 in 1-4; 5, 14 -> 5-14; 15, 39 -> 15-39; >= 40 -> 40+
    assert gb["labels"] == ["1-4", "5-14", "15-39", "40+"]
    assert gb["counts"] == [251, 2, 2, 210] and gb["unbucketed"] == 1
    layer = out["layers"][0]
    assert layer["pck1_by_gap"] == [151 / 251, 1.0, 1.0, 105 / 210]
    assert math.isclose(layer["temporal_robustness"], (105 / 210) / (151 / 251), rel_tol=1e-12)
    json.dumps(out)  # plain python values
    edge = MatchMetrics()
    edge.update(robustness_stats(199, 120, 200, 100, chance1=0.2))  # 200 and 200 anchors, 121/200 >= 3 x 0.2
    assert math.isclose(edge.compute()["layers"][0]["temporal_robustness"], 0.5 / (121 / 200))


@pytest.mark.parametrize("n_small,n_large,chance1", [(250, 199, 0.1), (198, 250, 0.1), (250, 210, 0.25)])
def test_temporal_robustness_none_cases(n_small: int, n_large: int, chance1: float):
    """Smallest bucket holds n_small + 1 anchors (gap -2); 199 in a bucket or PCK@1 0.6 < 3 x 0.25 -> None."""
    acc = MatchMetrics()
    acc.update(robustness_stats(n_small, int(0.6 * n_small), n_large, n_large // 2, chance1))
    layer = acc.compute()["layers"][0]
    assert layer["temporal_robustness"] is None
    assert all(v is not None for v in layer["pck1_by_gap"])  # the curve is always reported


def test_accumulation_best_layer_and_flat_export():
    a = stats([[0, 3], [1, 0]], [[0.9, 0.1], [0.4, 0.6]], [1, 50])
    b = stats([[2, 2], [0, 5]], [[0.3, 0.2], [0.8, 0.1]], [7, 2])
    acc = MatchMetrics()
    acc.update(a)
    acc.update(b)
    out = acc.compute()
    assert out["n_anchors"] == 4
    assert [d["pck0"] for d in out["layers"]] == [0.25, 0.5]
    assert [d["pck1"] for d in out["layers"]] == [0.25, 0.75]
    assert out["best_layer"] == 1 and out["best_pck1"] == 0.75
    flat = flatten_metrics(out, "head")
    assert flat["head/pck1/layer_01"] == 0.75 and flat["head/best_layer"] == 1.0
    assert all(isinstance(v, float) for v in flat.values())
    empty = MatchMetrics().compute()
    assert empty["n_anchors"] == 0 and empty["best_layer"] is None
    json.dumps(empty)
