"""Token labels (DESIGN §5) against a slow per-pixel / per-correspondence reference, pair by pair of clips."""
from __future__ import annotations

import collections
import glob
import math
import os
import statistics

import numpy as np
import pytest

from data import geometry
from data.adapter import CellGrid
from data.labels import cell_depth, pair_labels, point_cells
from data.shardformat import PairSample, decode_sample
from data.stream import tar_samples


def make_grid(width: int, height: int, cell: int = 28) -> CellGrid:
    return CellGrid(size=(width, height), cell_px=cell, rows=height // cell, cols=width // cell)


# ------------------------------------------------------------------ brute force

def _cell(u: float, v: float, size: tuple[int, int], grid: CellGrid) -> int | None:
    """DESIGN §3 resize rule, then §5 cell rule, one point at a time."""
    sx, sy = grid.size[0] / size[0], grid.size[1] / size[1]
    u2, v2 = (float(u) + 0.5) * sx - 0.5, (float(v) + 0.5) * sy - 0.5
    col, row = math.floor((u2 + 0.5) / grid.cell_px), math.floor((v2 + 0.5) / grid.cell_px)
    if 0 <= row < grid.rows and 0 <= col < grid.cols:
        return row * grid.cols + col
    return None


def _z_in_b(sample: PairSample, u: float, v: float) -> float | None:
    H, W = sample.depth_a.shape
    ui, vi = math.floor(float(u) + 0.5), math.floor(float(v) + 0.5)
    if not (0 <= ui < W and 0 <= vi < H):
        return None
    d = float(sample.depth_a[vi, ui])
    if d <= 0:
        return None
    K = sample.K_a
    y = (float(v) - K[1, 2]) / K[1, 1]
    x = (float(u) - K[0, 2] - K[0, 1] * y) / K[0, 0]
    X_w = sample.T_wa @ np.array([x * d, y * d, d, 1.0])
    X_b = np.linalg.inv(sample.T_wb) @ X_w
    return float(X_b[2])


def brute_labels(sample: PairSample, grid_a: CellGrid, grid_b: CellGrid):
    size_a = (sample.rgb_a.shape[1], sample.rgb_a.shape[0])
    size_b = (sample.rgb_b.shape[1], sample.rgb_b.shape[0])
    by_a: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for i, (ua, va, ub, vb) in enumerate(sample.corr.tolist()):
        ca, cb = _cell(ua, va, size_a, grid_a), _cell(ub, vb, size_b, grid_b)
        if ca is None or cb is None:
            continue
        by_a[ca].append((cb, i))
    anchors = []
    for ca in sorted(by_a):
        counts = collections.Counter(cb for cb, _ in by_a[ca])
        cb, n = counts.most_common(1)[0]
        total = len(by_a[ca])
        if total >= 4 and 2 * n > total:
            zs = [_z_in_b(sample, *sample.corr[i, :2]) for c, i in by_a[ca] if c == cb]
            zs = [z for z in zs if z is not None]
            anchors.append((ca, cb, statistics.median(zs) if zs else 0.0))
    n_pix = collections.Counter()
    depths: dict[int, list[float]] = collections.defaultdict(list)
    H, W = sample.depth_b.shape
    for v in range(H):
        for u in range(W):
            c = _cell(u, v, size_b, grid_b)
            if c is None:
                continue
            n_pix[c] += 1
            d = float(sample.depth_b[v, u])
            if d > 0:
                depths[c].append(d)
    D = np.zeros(grid_b.n_cells)
    valid = np.zeros(grid_b.n_cells, dtype=bool)
    for c, n in n_pix.items():
        if depths[c] and 2 * len(depths[c]) >= n:
            D[c] = statistics.median(depths[c])
            valid[c] = True
    return anchors, D, valid


def check_against_brute(sample: PairSample, grid_a: CellGrid, grid_b: CellGrid) -> int:
    lab = pair_labels(sample, grid_a, grid_b)
    anchors, D, valid = brute_labels(sample, grid_a, grid_b)
    assert lab.anchor_a.tolist() == [a for a, _, _ in anchors]
    assert lab.target_b.tolist() == [b for _, b, _ in anchors]
    np.testing.assert_allclose(lab.z_b, [z for _, _, z in anchors], rtol=1e-5, atol=1e-6)
    assert lab.depth_b_valid.tolist() == valid.tolist()
    np.testing.assert_allclose(lab.depth_b, D, rtol=1e-6)
    assert lab.anchor_a.dtype == np.int64 and lab.target_b.dtype == np.int64
    assert lab.z_b.dtype == np.float32 and lab.depth_b.dtype == np.float32 and lab.depth_b_valid.dtype == bool
    assert lab.grid_a == (grid_a.rows, grid_a.cols) and lab.grid_b == (grid_b.rows, grid_b.cols)
    assert lab.gap == sample.meta["gap"]
    return len(anchors)


def _shard_clips(folder: str) -> list:
    out = []
    for url in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        for raw in tar_samples(url, lambda reason, msg: pytest.fail(msg)):
            out.append(decode_sample(raw))
    return out


def pair_of(clip, i: int, j: int) -> PairSample:
    """Pair (i, j) of a clip as a stand-alone version-1 pair (the reference labels are computed on it)."""
    meta = {"K_a": clip.meta["K"][i], "K_b": clip.meta["K"][j], "T_wa": clip.meta["T_w"][i],
            "T_wb": clip.meta["T_w"][j], "gap": clip.index(j) - clip.index(i)}
    return PairSample(f"{clip.key}:{i}-{j}", clip.rgb[i], clip.rgb[j], clip.depth[i], clip.depth[j],
                      clip.pair_corr(i, j), meta)


def _holes(sample: PairSample, seed: int) -> PairSample:
    """The same pair with depth holes in A and B (blocks of zeros and salt noise)."""
    rng = np.random.default_rng(seed)
    da, db = sample.depth_a.copy(), sample.depth_b.copy()
    for d in (da, db):
        H, W = d.shape
        d[rng.random((H, W)) < 0.3] = 0  # salt: some cells lose under half, some over half
        y0, x0 = rng.integers(0, H // 2), rng.integers(0, W // 2)
        d[y0:y0 + H // 3, x0:x0 + W // 3] = 0
    return PairSample(sample.key, sample.rgb_a, sample.rgb_b, da, db, sample.corr, sample.meta)


GRIDS = [make_grid(168, 112), make_grid(224, 168), make_grid(112, 84), make_grid(150, 100, cell=16),
         make_grid(300, 200, cell=28)]


def _family_grids():
    """The cell grid of a stored 160x120 view for each family's adapter (Qwen 28 px cells after its resize,
    LLaVA-OneVision 14 px patches of its 118 px square, LLaVA-NeXT-Video 28 px pooled cells)."""
    from model.loading import build_model_and_processor

    out = {}
    for name in ("tiny", "tiny-llava-ov", "tiny-llava-next-video"):
        _, _, adapter = build_model_and_processor(name)
        out[name] = adapter.grid((160, 120))
    return out


# ------------------------------------------------------------------------ tests

def test_clip_labels_equal_each_pair_labelled_alone_for_each_family(tiny_shards):
    """Labels of a clip (D_b once per frame, anchors per pair) equal, pair by pair, the brute-force labels
    of that pair alone, for each family's cell layout."""
    from data.labels import clip_labels
    from data.shardformat import clip_pairs

    clips = _shard_clips(tiny_shards)
    assert len(clips) >= 6 and max(c.n_frames for c in clips) == 4
    n_anchors = n_pairs = 0
    for family, grid in _family_grids().items():
        for clip in clips[:4]:
            lab = clip_labels(clip, [grid] * clip.n_frames)
            assert [(p.i, p.j) for p in lab.pairs] == clip_pairs(clip.n_frames)
            for p in lab.pairs:
                pair = pair_of(clip, p.i, p.j)
                anchors, D, valid = brute_labels(pair, grid, grid)
                assert p.anchor_a.tolist() == [a for a, _, _ in anchors], (family, clip.key, p.i, p.j)
                assert p.target_b.tolist() == [b for _, b, _ in anchors]
                np.testing.assert_allclose(p.z_b, [z for _, _, z in anchors], rtol=1e-5, atol=1e-6)
                assert lab.depth_valid[p.j].tolist() == valid.tolist()
                np.testing.assert_allclose(lab.depth[p.j], D, rtol=1e-6)
                assert p.dt == clip.index(p.j) - clip.index(p.i) > 0
                n_anchors += p.n_anchors
                n_pairs += 1
    assert n_anchors > 100 and n_pairs >= 24  # the check saw real anchors


def test_clip_labels_of_all_pairs_at_once_equal_each_pair_alone_with_mixed_grids_and_holes(tiny_shards):
    """clip_labels finds the anchors of every pair together (one unique / lexsort / median a clip); with a
    different grid per frame (other cell sizes, so other cell counts), depth holes and a subset of pairs
    (out of order, one repeated frame pair dropped) each pair's labels equal `anchor_labels` on that pair
    alone, which the brute-force tests above check."""
    from data.labels import anchor_labels, clip_labels

    clips = _shard_clips(tiny_shards)
    n_anchors = 0
    for c, clip in enumerate(clips[:4]):
        holed = [_holes(pair_of(clip, k, k), c * 10 + k).depth_a for k in range(clip.n_frames)]
        clip.depth = holed
        grids = [GRIDS[(c + k) % len(GRIDS)] for k in range(clip.n_frames)]
        for pairs in (None, [(1, 3), (0, 2), (0, 1)]):
            lab = clip_labels(clip, grids, pairs)
            want = pairs or [(i, j) for i in range(clip.n_frames) for j in range(i + 1, clip.n_frames)]
            assert [(p.i, p.j) for p in lab.pairs] == want
            for p in lab.pairs:
                a, t, z = anchor_labels(clip.pair_corr(p.i, p.j), clip.depth[p.i], clip.K(p.i), clip.T_w(p.i),
                                        clip.T_w(p.j), clip.size(p.i), clip.size(p.j), grids[p.i], grids[p.j])
                assert np.array_equal(p.anchor_a, a) and np.array_equal(p.target_b, t), (clip.key, p.i, p.j)
                assert p.anchor_a.dtype == p.target_b.dtype == np.int64 and p.z_b.dtype == np.float32
                np.testing.assert_allclose(p.z_b, z, rtol=1e-6, atol=0)
                n_anchors += p.n_anchors
    assert n_anchors > 100


def test_pairs_per_clip_subsamples_a_seeded_subset():
    from data.stream import choose_pairs

    every = choose_pairs(8, 0, None)
    assert len(every) == 28 and every == sorted(every)
    a = choose_pairs(8, 6, np.random.default_rng(1))
    b = choose_pairs(8, 6, np.random.default_rng(1))
    c = choose_pairs(8, 6, np.random.default_rng(2))
    assert a == b and a != c and len(a) == 6 and a == sorted(a) and set(a) <= set(every)
    assert choose_pairs(3, 6, np.random.default_rng(1)) == [(0, 1), (0, 2), (1, 2)]  # fewer than asked: all


def test_labels_match_brute_force_on_shards(tiny_shards):
    clips = _shard_clips(tiny_shards)
    samples = [pair_of(c, i, j) for c in clips for i, j in [(0, 1), (0, c.n_frames - 1)]]
    assert len(samples) >= 12
    n_anchors = 0
    for i, sample in enumerate(samples[:8]):
        for g in (GRIDS[i % len(GRIDS)], GRIDS[(i + 2) % len(GRIDS)]):
            n_anchors += check_against_brute(sample, g, GRIDS[(i + 1) % len(GRIDS)])
    assert n_anchors > 50  # the check saw real anchors


def test_labels_match_brute_force_with_depth_holes(tiny_shards):
    clips = _shard_clips(tiny_shards)
    checked_invalid = 0
    for i, clip in enumerate(clips[:4]):
        holed = _holes(pair_of(clip, 0, 1), i)
        check_against_brute(holed, GRIDS[i % 3], GRIDS[(i + 1) % 3])
        checked_invalid += int((~pair_labels(holed, GRIDS[0], GRIDS[0]).depth_b_valid).sum())
    assert checked_invalid > 0  # the validity rule was exercised


def _view(width: int = 168, height: int = 112, seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth = (1.0 + rng.random((height, width))).astype(np.float32)
    K = np.array([[100.0, 0, width / 2], [0, 100.0, height / 2], [0, 0, 1]])
    return rgb, depth, K


def _meta(K_a, K_b, T_wa, T_wb, size, gap=3):
    return {"version": 1, "K_a": K_a.tolist(), "K_b": K_b.tolist(), "T_wa": T_wa.tolist(), "T_wb": T_wb.tolist(),
            "size_a": list(size), "size_b": list(size), "gap": gap}


def test_identity_pair_maps_every_valid_cell_to_itself():
    rgb, depth, K = _view()
    depth[:28, :28] = 0  # cell 0 has no depth in A (and B): no correspondence, no anchor
    T = np.eye(4)
    T[:3, 3] = [0.3, -0.2, 1.0]
    v, u = np.nonzero(depth > 0)
    corr = np.stack([u, v, u, v], axis=1).astype(np.float32)
    sample = PairSample("id", rgb, rgb, depth, depth, corr, _meta(K, K, T, T, (168, 112)))
    grid = make_grid(168, 112)
    lab = pair_labels(sample, grid, grid)
    assert lab.anchor_a.tolist() == list(range(1, grid.n_cells))
    assert lab.target_b.tolist() == lab.anchor_a.tolist()
    assert lab.depth_b_valid.tolist() == [False] + [True] * (grid.n_cells - 1)
    # same camera: z_b is the median depth of the cell's pixels, i.e. D_b of the same cell
    np.testing.assert_allclose(lab.z_b, lab.depth_b[lab.anchor_a], rtol=1e-6)
    check_against_brute(sample, grid, grid)


def test_pair_shifted_by_one_cell_maps_each_cell_to_its_neighbour():
    rgb, _, K = _view()
    Z = 2.0
    depth = np.full((112, 168), Z, dtype=np.float32)
    T_wa = np.eye(4)
    T_wb = np.eye(4)
    T_wb[0, 3] = 28 * Z / K[0, 0]  # B moved right: every point appears 28 px (one cell) to the left
    v, u = np.mgrid[0:112, 0:168]
    uv_a = np.stack([u.ravel(), v.ravel()], axis=1).astype(np.float64)
    uv_b, z_b = geometry.reproject(uv_a, np.full(len(uv_a), Z), K, T_wa, K, T_wb)
    np.testing.assert_allclose(uv_b[:, 0], uv_a[:, 0] - 28, atol=1e-9)
    vis = geometry.visible_in(uv_b, z_b, depth)
    corr = np.concatenate([uv_a[vis], uv_b[vis]], axis=1).astype(np.float32)
    sample = PairSample("shift", rgb, rgb, depth, depth, corr, _meta(K, K, T_wa, T_wb, (168, 112)))
    grid = make_grid(168, 112)
    lab = pair_labels(sample, grid, grid)
    rows, cols = np.divmod(lab.anchor_a, grid.cols)
    expect = [r * grid.cols + c for r in range(grid.rows) for c in range(1, grid.cols)]
    assert lab.anchor_a.tolist() == expect  # column 0 falls outside B
    assert (lab.target_b == rows * grid.cols + cols - 1).all()
    np.testing.assert_allclose(lab.z_b, Z, rtol=1e-6)
    check_against_brute(sample, grid, grid)


def test_majority_rule_needs_more_than_half_and_four_points():
    rgb, depth, K = _view()
    T = np.eye(4)
    grid = make_grid(168, 112)
    # cell 0 of A: 4 points, 2 to cell 0 and 2 to cell 1 of B (a tie: not more than half) -> no anchor
    # cell 1 of A: 3 points all to cell 5 (fewer than 4) -> no anchor
    # cell 2 of A: 5 points, 3 to cell 7, 2 elsewhere -> anchor, target 7
    pts = [(5, 5, 5, 5), (6, 5, 6, 5), (5, 6, 33, 6), (6, 6, 34, 6),
           (30, 5, 145, 5), (31, 5, 146, 5), (32, 5, 147, 5),
           (60, 5, 150, 30), (61, 5, 151, 30), (62, 5, 152, 30), (63, 5, 1, 1), (64, 5, 2, 80)]
    corr = np.array(pts, dtype=np.float32)
    sample = PairSample("rule", rgb, rgb, depth, depth, corr, _meta(K, K, T, T, (168, 112)))
    lab = pair_labels(sample, grid, grid)
    assert lab.anchor_a.tolist() == [2]
    assert lab.target_b.tolist() == [_cell(corr[7, 2], corr[7, 3], (168, 112), grid)]
    check_against_brute(sample, grid, grid)


def test_no_correspondences_gives_no_anchors():
    rgb, depth, K = _view()
    T = np.eye(4)
    sample = PairSample("none", rgb, rgb, depth, depth, np.zeros((0, 4), np.float32), _meta(K, K, T, T, (168, 112)))
    grid = make_grid(168, 112)
    lab = pair_labels(sample, grid, grid)
    assert lab.anchor_a.shape == (0,) and lab.target_b.shape == (0,) and lab.z_b.shape == (0,)
    assert lab.depth_b.shape == (grid.n_cells,) and lab.depth_b_valid.all()


def test_points_outside_the_grid_have_no_cell():
    grid = make_grid(150, 100, cell=16)  # 9 x 6 cells cover 144 x 96 of the 150 x 100 image
    uv = np.array([[0, 0], [143.4, 95.4], [143.6, 0], [0, 95.6], [-0.6, 3], [np.nan, 1]])
    idx, inside = point_cells(uv, (150, 100), grid)
    assert inside.tolist() == [True, True, False, False, False, False]
    assert idx.tolist() == [0, 5 * 9 + 8, -1, -1, -1, -1]


def test_cell_depth_median_and_half_rule():
    grid = make_grid(56, 28)  # two cells of 28 x 28 at stored = resized size
    depth = np.zeros((28, 56), np.float32)
    depth[:, :28] = np.arange(28 * 28, dtype=np.float32).reshape(28, 28) + 1  # all valid
    depth[:14, 28:] = 5.0  # exactly half valid -> valid
    D, valid = cell_depth(depth, grid)
    assert valid.tolist() == [True, True]
    assert D[0] == pytest.approx(np.median(np.arange(1, 28 * 28 + 1))) and D[1] == 5.0
    depth[13, 28] = 0  # one pixel short of half -> invalid, depth 0
    D, valid = cell_depth(depth, grid)
    assert valid.tolist() == [True, False] and D[1] == 0
