"""Token labels of a clip (DESIGN §5): per supervised pair anchors, targets, z_b; per frame D_b.

`clip_labels` labels a decoded `ClipSample` (either shard version; a version-1 pair is a
clip of two frames) pair by pair; `pair_labels` labels a version-1 `PairSample` alone
(the reference the clip labels are tested against). Everything is computed from the
samples and the `CellGrid` of each view
(from the family adapter), with vectorised numpy (bincount / lexsort / one sort per
cell block), never a Python loop over cells or pixels.

- A point at stored pixel (u, v) of a view of stored size (W, H) moves to the resized
  image by the §3 rule (`geometry.resize_points`), `u' = (u + 0.5) W'/W - 0.5`, and lies
  in cell `(row, col) = (floor((v' + 0.5) / cell_px), floor((u' + 0.5) / cell_px))`,
  numbered row-major (`row * cols + col`). A point outside the grid has no cell.
- A correspondence counts when both its ends have a cell.
- Anchor: a cell of A with at least `min_corr` (4) correspondences of which MORE than
  half land in one cell of B; that cell is its target.
- z_b: median depth in B's camera of the 3D points of that majority (A's pixel
  unprojected with A's stored depth at the pixel containing it and K_a, moved by T_wa,
  then world-to-B). Correspondences without depth in A do not count; an anchor none of
  whose majority has depth gets z_b = 0 (the depth loss ignores z_b <= 0).
- D_b: for each cell of B, the median of the valid (> 0) depths of the stored-resolution
  pixels whose centres fall in that cell (same mapping rule); the cell is valid when at
  least half of its pixels have depth. An invalid cell gets depth 0.

- Look-alike anchors (clips with per-pixel object ids, synthetic data): the anchor's object is
  the most frequent id among the stored pixels of its cell of A (`cell_objects`); the anchor is
  a look-alike anchor when B shows another object of the same look-alike group (some cell of B
  whose most frequent id it is, with valid D_b) at another depth: that cell's D_b differs from
  the anchor's z_b by more than `LOOKALIKE_REL_DEPTH` of z_b. Those are the anchors where a
  match by appearance alone can land on the wrong object.

Medians are the mean of the two middle values for an even count (`np.median`),
computed in float64 and returned as float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data import geometry
from data.adapter import CellGrid
from data.shardformat import PairSample

MIN_CORR = 4
"""A cell of A needs at least this many correspondences to be an anchor."""
LOOKALIKE_REL_DEPTH = 0.1
"""A look-alike in B counts when its cell's depth differs from the anchor's z_b by more than this fraction."""


@dataclass
class PairLabels:
    """Labels of one pair; cell indices are row-major in each view's grid."""

    anchor_a: np.ndarray
    """(M,) int64 cell of A of each anchor, ascending."""
    target_b: np.ndarray
    """(M,) int64 target cell of B of each anchor."""
    z_b: np.ndarray
    """(M,) float32 median depth in B's camera of the anchor's majority points (0: none had depth)."""
    depth_b: np.ndarray
    """(N_b,) float32 median valid depth of each cell of B (0 where the cell is invalid)."""
    depth_b_valid: np.ndarray
    """(N_b,) bool: at least half of the cell's pixels have depth."""
    grid_a: tuple[int, int]
    """(rows, cols) of A's grid."""
    grid_b: tuple[int, int]
    """(rows, cols) of B's grid."""
    gap: int
    """Frame gap index_b - index_a of the pair."""

    @property
    def n_anchors(self) -> int:
        return int(len(self.anchor_a))


# ------------------------------------------------------------------------- cells

def point_cells(uv: np.ndarray, size: tuple[int, int], grid: CellGrid) -> tuple[np.ndarray, np.ndarray]:
    """Cell of each stored-pixel point of a view of stored size (W, H).

    uv (N, 2) -> cell index (N,) int64 (row-major; -1 outside the grid), inside (N,) bool.
    """
    uv2 = geometry.resize_points(uv, size, grid.size)  # (N, 2) resized pixels
    with np.errstate(invalid="ignore"):
        col = np.floor((uv2[:, 0] + 0.5) / grid.cell_px)
        row = np.floor((uv2[:, 1] + 0.5) / grid.cell_px)
    inside = np.isfinite(col) & np.isfinite(row) & (col >= 0) & (col < grid.cols) & (row >= 0) & (row < grid.rows)
    idx = np.where(inside, row * grid.cols + col, -1)
    return idx.astype(np.int64), inside


def _axis_cells(n: int, n_new: int, cell_px: int, n_cells: int) -> np.ndarray:
    """Cell index along one axis of each stored pixel centre 0..n-1 (-1 outside). (n,) int64."""
    centres = np.zeros((n, 2))
    centres[:, 0] = np.arange(n)
    moved = geometry.resize_points(centres, (n, 1), (n_new, 1))[:, 0]  # (n,) resized coordinate
    c = np.floor((moved + 0.5) / cell_px).astype(np.int64)
    return np.where((c >= 0) & (c < n_cells), c, -1)


def cell_depth(depth: np.ndarray, grid: CellGrid) -> tuple[np.ndarray, np.ndarray]:
    """D_b: median valid depth per cell and its validity.

    depth (H, W) float (0 = invalid) at the stored resolution -> (N,) float32, (N,) bool.

    The cell of a pixel is separable (column from u, row from v) and monotone in each, so
    each cell is a rectangular block of pixels. The blocks are gathered into one padded
    (N, bh * bw) array (padding and invalid pixels = +inf), sorted along the block, and the
    median read at the middle of each row's valid count.
    """
    H, W = depth.shape
    col_of_u = _axis_cells(W, grid.size[0], grid.cell_px, grid.cols)  # (W,)
    row_of_v = _axis_cells(H, grid.size[1], grid.cell_px, grid.rows)  # (H,)
    widths = np.bincount(col_of_u[col_of_u >= 0], minlength=grid.cols)  # (cols,) pixels per cell column
    heights = np.bincount(row_of_v[row_of_v >= 0], minlength=grid.rows)  # (rows,)
    # first pixel of each cell column / row (monotone map: in-grid pixels are contiguous)
    u_first = np.argmax(col_of_u >= 0) if (col_of_u >= 0).any() else 0
    v_first = np.argmax(row_of_v >= 0) if (row_of_v >= 0).any() else 0
    u0 = u_first + np.concatenate([[0], np.cumsum(widths)[:-1]])  # (cols,)
    v0 = v_first + np.concatenate([[0], np.cumsum(heights)[:-1]])  # (rows,)
    bw, bh = max(int(widths.max(initial=0)), 1), max(int(heights.max(initial=0)), 1)
    u_idx = u0[:, None] + np.arange(bw)[None, :]  # (cols, bw)
    v_idx = v0[:, None] + np.arange(bh)[None, :]  # (rows, bh)
    u_in = np.arange(bw)[None, :] < widths[:, None]  # (cols, bw) real pixel of the block
    v_in = np.arange(bh)[None, :] < heights[:, None]  # (rows, bh)
    blocks = (depth.take(np.minimum(v_idx, H - 1).ravel(), axis=0).take(np.minimum(u_idx, W - 1).ravel(), axis=1)
              .reshape(grid.rows, bh, grid.cols, bw))  # (rows, bh, cols, bw), two 1-D gathers
    real = v_in[:, :, None, None] & u_in[None, None, :, :]  # (rows, bh, cols, bw)
    ok = real & (blocks > 0) & np.isfinite(blocks)
    vals = np.where(ok, blocks, np.inf)  # sorted in the stored dtype; the middle pair is averaged in float64
    vals = vals.transpose(0, 2, 1, 3).reshape(grid.n_cells, bh * bw)  # (N, bh * bw) per cell
    n_pix = (heights[:, None] * widths[None, :]).reshape(-1)  # (N,)
    n_valid = ok.transpose(0, 2, 1, 3).reshape(grid.n_cells, bh * bw).sum(1)  # (N,)
    vals.sort(axis=1)
    lo = np.clip((n_valid - 1) // 2, 0, None)
    hi = np.clip(n_valid // 2, 0, bh * bw - 1)
    med = 0.5 * (np.take_along_axis(vals, lo[:, None], 1)[:, 0].astype(np.float64)
                 + np.take_along_axis(vals, hi[:, None], 1)[:, 0].astype(np.float64))
    valid = (n_pix > 0) & (n_valid > 0) & (2 * n_valid >= n_pix)
    return np.where(valid, med, 0.0).astype(np.float32), valid


def cell_objects(ids: np.ndarray, grid: CellGrid) -> np.ndarray:
    """The most frequent object id among the stored pixels of each cell (ties: the smaller id; 0, "no
    object", counts like any id). ids (H, W) uint16 at the stored resolution -> (N,) int64."""
    H, W = ids.shape
    col_of_u = _axis_cells(W, grid.size[0], grid.cell_px, grid.cols)  # (W,)
    row_of_v = _axis_cells(H, grid.size[1], grid.cell_px, grid.rows)  # (H,)
    cell = row_of_v[:, None] * grid.cols + col_of_u[None, :]  # (H, W)
    inside = (row_of_v[:, None] >= 0) & (col_of_u[None, :] >= 0)
    n_ids = int(ids.max(initial=0)) + 1
    counts = np.bincount(cell[inside] * n_ids + ids[inside].astype(np.int64), minlength=grid.n_cells * n_ids)
    return counts.reshape(grid.n_cells, n_ids).argmax(1).astype(np.int64)


def lookalike_anchors(objects_a: np.ndarray, objects_b: np.ndarray, depth_b: np.ndarray, valid_b: np.ndarray,
                      anchor_a: np.ndarray, z_b: np.ndarray, groups: list[list[int]],
                      rel: float = LOOKALIKE_REL_DEPTH) -> np.ndarray:
    """(M,) bool: which anchors of a pair are look-alike anchors (module docstring).

    objects_a / objects_b: `cell_objects` of A and B; depth_b, valid_b: D_b of B; groups: the clip's
    `object_groups`.
    """
    own = objects_a[anchor_a]  # (M,) each anchor's object
    z = np.asarray(z_b, dtype=np.float64)
    out = np.zeros(len(anchor_a), dtype=bool)
    for group in groups:
        for o in group:
            mine = (own == o) & (z > 0)
            if not mine.any():
                continue
            for other in group:
                shown = (objects_b == other) & valid_b
                if other == o or not shown.any():
                    continue
                d = depth_b[shown].astype(np.float64)
                out |= mine & ((d.max() > (1 + rel) * z) | (d.min() < (1 - rel) * z))
    return out


# ----------------------------------------------------------------------- anchors

def _group_median(groups: np.ndarray, values: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Median of `values` per group id in [0, n_groups). -> (n_groups,) float64, count (n_groups,)."""
    order = np.lexsort((values, groups))  # by group, then value
    g, v = groups[order], values[order].astype(np.float64)
    count = np.bincount(g, minlength=n_groups)  # (G,)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])  # (G,)
    has = count > 0
    lo = np.where(has, start + (count - 1) // 2, 0)
    hi = np.where(has, start + count // 2, 0)
    med = np.zeros(n_groups)
    if len(v):
        med = np.where(has, 0.5 * (v[lo] + v[hi]), 0.0)
    return med, count


def _majority(ca: np.ndarray, cb: np.ndarray, keep: np.ndarray, n_a: int, n_b: int,
              min_corr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The anchor rule on correspondences with cell ca (in [0, n_a)) of A and cb (in [0, n_b)) of B, rows
    `keep`: (anchor cells of A ascending, their targets in B, rows in some anchor's majority, that anchor's
    slot). Callers number several pairs' cells of A apart to decide them all in one pass."""
    codes, counts = np.unique(ca[keep] * n_b + cb[keep], return_counts=True)  # sorted by (A, B)
    cell_a, cell_b = codes // n_b, codes % n_b
    total = np.bincount(ca[keep], minlength=n_a)  # correspondences per cell of A
    order = np.lexsort((counts, cell_a))  # the most populated B cell of each A cell: its group's last
    last = np.ones(len(order), dtype=bool)
    last[:-1] = cell_a[order][1:] != cell_a[order][:-1]
    best = order[last]
    best_a, best_b, best_n = cell_a[best], cell_b[best], counts[best]
    is_anchor = (total[best_a] >= min_corr) & (2 * best_n > total[best_a])
    anchor_a, target_b = best_a[is_anchor], best_b[is_anchor]
    slot_of = np.full(n_a, -1, dtype=np.int64)
    slot_of[anchor_a] = np.arange(len(anchor_a))
    idx = np.nonzero(keep)[0]
    m = slot_of[ca[idx]]
    hit = m >= 0
    hit[hit] = target_b[m[hit]] == cb[idx[hit]]
    return anchor_a.astype(np.int64), target_b.astype(np.int64), idx[hit], m[hit]


def anchors(corr: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int], grid_a: CellGrid,
            grid_b: CellGrid, min_corr: int = MIN_CORR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchor cells of A, their targets in B, and which correspondences are each anchor's majority.

    corr (N, 4) uA, vA, uB, vB in stored pixels -> anchor_a (M,), target_b (M,) int64 (anchor
    ascending), majority (N,) int64: the anchor slot m of each correspondence that belongs
    to anchor m's majority, else -1.
    """
    corr = np.asarray(corr, dtype=np.float64).reshape(-1, 4)
    ca, in_a = point_cells(corr[:, :2], size_a, grid_a)  # (N,)
    cb, in_b = point_cells(corr[:, 2:], size_b, grid_b)  # (N,)
    keep = in_a & in_b
    anchor_a, target_b, idx, m = _majority(ca, cb, keep, grid_a.n_cells, grid_b.n_cells, min_corr)
    majority = np.full(len(corr), -1, dtype=np.int64)
    majority[idx] = m
    return anchor_a.astype(np.int64), target_b.astype(np.int64), majority


def points_in(depth_a: np.ndarray, K_a: np.ndarray, T_wa: np.ndarray, T_wb: np.ndarray,
              uv_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-depth in B's camera of A's pixels moved with A's stored depth.

    uv_a (N, 2) -> z_b (N,) float64, has_depth (N,) bool (A has depth at the pixel).
    """
    z_a, inside = geometry.sample_nearest(depth_a, uv_a)
    z_a = z_a.astype(np.float64)
    has = inside & (z_a > 0) & np.isfinite(z_a)
    X_a = geometry.unproject(uv_a[has], z_a[has], K_a)  # (n, 3) in A's camera
    X_b = geometry.transform(geometry.invert_pose(T_wb), geometry.transform(T_wa, X_a))
    z_b = np.zeros(len(uv_a))
    z_b[has] = X_b[:, 2]
    return z_b, has


def anchor_labels(corr: np.ndarray, depth_a: np.ndarray, K_a: np.ndarray, T_wa: np.ndarray, T_wb: np.ndarray,
                  size_a: tuple[int, int], size_b: tuple[int, int], grid_a: CellGrid, grid_b: CellGrid,
                  min_corr: int = MIN_CORR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor_a (M,), target_b (M,) int64, z_b (M,) float32) of one ordered pair (A, B).

    corr (N, 4) `uA, vA, uB, vB` in stored pixels; z_b: median depth in B's camera of the
    anchor's majority points that have depth in A (0 when none has).
    """
    corr = np.asarray(corr, dtype=np.float64).reshape(-1, 4)
    anchor_a, target_b, majority = anchors(corr, size_a, size_b, grid_a, grid_b, min_corr)
    sel = np.nonzero(majority >= 0)[0]
    z, has = points_in(depth_a, K_a, T_wa, T_wb, corr[sel, :2])
    z_med, _ = _group_median(majority[sel][has], z[has], len(anchor_a))  # (M,)
    return anchor_a, target_b, z_med.astype(np.float32)


def pair_labels(sample: PairSample, grid_a: CellGrid, grid_b: CellGrid, min_corr: int = MIN_CORR) -> PairLabels:
    """All labels of one version-1 pair (see the module docstring)."""
    size_a = (sample.rgb_a.shape[1], sample.rgb_a.shape[0])
    size_b = (sample.rgb_b.shape[1], sample.rgb_b.shape[0])
    anchor_a, target_b, z_b = anchor_labels(sample.corr, sample.depth_a, sample.K_a, sample.T_wa, sample.T_wb,
                                            size_a, size_b, grid_a, grid_b, min_corr)
    depth_b, depth_b_valid = cell_depth(sample.depth_b, grid_b)
    return PairLabels(anchor_a=anchor_a, target_b=target_b, z_b=z_b, depth_b=depth_b, depth_b_valid=depth_b_valid,
                      grid_a=(grid_a.rows, grid_a.cols), grid_b=(grid_b.rows, grid_b.cols),
                      gap=int(sample.meta.get("gap", 0)))


# ------------------------------------------------------------------------ clips

@dataclass
class ClipPairLabels:
    """Labels of one supervised pair (A, B) = (i, j) of a clip; cells row-major in each frame's grid."""

    i: int
    j: int
    anchor_a: np.ndarray
    """(M,) int64 cell of frame i of each anchor, ascending."""
    target_b: np.ndarray
    """(M,) int64 target cell of frame j."""
    z_b: np.ndarray
    """(M,) float32 median depth in j's camera of the anchor's majority (0: none had depth)."""
    dt: int
    """Frame distance index_j - index_i."""
    lookalike: np.ndarray | None = None
    """(M,) bool look-alike anchors (`lookalike_anchors`) when the clip has object ids, else None."""

    @property
    def n_anchors(self) -> int:
        return int(len(self.anchor_a))


@dataclass
class ClipLabels:
    """Labels of a clip: D_b of every frame (computed once per frame) and the supervised pairs."""

    grids: list[tuple[int, int]]
    """(rows, cols) of each frame's grid."""
    depth: list[np.ndarray]
    """Per frame (N_k,) float32 median valid depth per cell (0 where invalid)."""
    depth_valid: list[np.ndarray]
    """Per frame (N_k,) bool: at least half of the cell's pixels have depth."""
    pairs: list[ClipPairLabels]

    @property
    def n_anchors(self) -> int:
        return sum(p.n_anchors for p in self.pairs)


def clip_labels(sample, grids: list[CellGrid], pairs: list[tuple[int, int]] | None = None,
                min_corr: int = MIN_CORR) -> ClipLabels:
    """Labels of a `shardformat.ClipSample` for its supervised pairs (default every i < j).

    grids: the CellGrid of each frame (from the family adapter). D_b is computed once per
    frame that is some pair's B (the pairs share it); a frame that is no pair's B gets zeros
    (no cell valid), which no loss term reads.

    The anchors of all pairs are found together, each pair's cells of A numbered apart
    (pair slot x the most cells of a frame + cell), so one unique / lexsort / median serves
    the clip: the same rule as `anchor_labels` on each pair alone (tests compare them).
    """
    n = sample.n_frames
    if len(grids) != n:
        raise ValueError(f"{len(grids)} grids for a clip of {n} frames")
    todo = pairs if pairs is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]
    need_depth = {j for _, j in todo}
    depth, valid = [], []
    for k in range(n):
        if k in need_depth:
            d, v = cell_depth(sample.depth[k], grids[k])
        else:
            d, v = np.zeros(grids[k].n_cells, np.float32), np.zeros(grids[k].n_cells, bool)
        depth.append(d)
        valid.append(v)
    P = len(todo)
    slot_of = np.full(n * n, -1, dtype=np.int64)  # pair code i * n + j -> its slot in todo
    for q, (i, j) in enumerate(todo):
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"pair ({i}, {j}) outside a clip of {n} frames")
        slot_of[i * n + j] = q
    corr = np.asarray(sample.corr, dtype=np.float64).reshape(-1, 6)
    fi, fj = corr[:, 0].astype(np.int64), corr[:, 1].astype(np.int64)
    in_clip = (fi >= 0) & (fi < n) & (fj >= 0) & (fj < n)
    slot = np.full(len(corr), -1, dtype=np.int64)
    slot[in_clip] = slot_of[fi[in_clip] * n + fj[in_clip]]
    rows = slot >= 0
    corr, fi, fj, slot = corr[rows], fi[rows], fj[rows], slot[rows]  # the supervised pairs' rows
    ca = np.full(len(corr), -1, dtype=np.int64)
    cb = np.full(len(corr), -1, dtype=np.int64)
    for k in range(n):
        a, b = fi == k, fj == k
        if a.any():
            ca[a] = point_cells(corr[a, 2:4], sample.size(k), grids[k])[0]
        if b.any():
            cb[b] = point_cells(corr[b, 4:6], sample.size(k), grids[k])[0]
    keep = (ca >= 0) & (cb >= 0)
    NA = NB = max(g.n_cells for g in grids)
    group = np.where(keep, slot * NA + ca, -1)  # (R,) the pair's cell of A, numbered apart per pair
    anc_g, anc_b, maj, maj_slot = _majority(group, cb, keep, P * NA, NB, min_corr)  # by pair, then cell of A
    # z_b: A's pixel with A's stored depth, to the world by A's pose, into B's camera
    z = np.zeros(len(maj))
    has = np.zeros(len(maj), dtype=bool)
    X_w = np.zeros((len(maj), 3))
    for k in range(n):
        a = fi[maj] == k
        if a.any():
            z_a, inside = geometry.sample_nearest(sample.depth[k], corr[maj[a], 2:4])
            z_a = z_a.astype(np.float64)
            ok = inside & (z_a > 0) & np.isfinite(z_a)
            X_a = geometry.unproject(corr[maj[a], 2:4][ok], z_a[ok], sample.K(k))
            has[np.nonzero(a)[0][ok]] = True
            X_w[np.nonzero(a)[0][ok]] = geometry.transform(sample.T_w(k), X_a)
    for k in range(n):
        b = (fj[maj] == k) & has
        if b.any():
            z[b] = geometry.transform(geometry.invert_pose(sample.T_w(k)), X_w[b])[:, 2]
    z_med, _ = _group_median(maj_slot[has], z[has], len(anc_g))
    z_med = z_med.astype(np.float32)
    bounds = np.searchsorted(anc_g // NA, np.arange(P + 1))  # anchors of pair q: bounds[q]:bounds[q + 1]
    ids = getattr(sample, "objects", None)
    groups = sample.meta.get("object_groups") or []
    cell_obj: dict[int, np.ndarray] = {}

    def objects_of(k: int) -> np.ndarray:
        if k not in cell_obj:
            cell_obj[k] = cell_objects(ids[k], grids[k])
        return cell_obj[k]

    out = []
    for q, (i, j) in enumerate(todo):
        s, e = bounds[q], bounds[q + 1]
        a = (anc_g[s:e] % NA).astype(np.int64)
        alike = (lookalike_anchors(objects_of(i), objects_of(j), depth[j], valid[j], a, z_med[s:e], groups)
                 if ids is not None else None)
        out.append(ClipPairLabels(i, j, a, anc_b[s:e].astype(np.int64), z_med[s:e], sample.index(j) - sample.index(i),
                                  alike))
    return ClipLabels([(g.rows, g.cols) for g in grids], depth, valid, out)
