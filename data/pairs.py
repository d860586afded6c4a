"""Frame pairs and their correspondences (DESIGN §4).

- `candidate_pairs`: per scene, pairs by frame gap and overlap, spread across gap
  buckets, deterministic per seed.
- `correspondences`: a jittered grid of A's pixels where A has depth, kept where
  they pass the visibility test in B, capped at a count.
- `photo_check`: the self-check figures `photo_err`, `photo_err_shuffled`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data import geometry

DEFAULT_GAP_BUCKETS = (1, 5, 15, 40)


@dataclass
class PairConfig:
    """How pairs are chosen and correspondences sampled."""

    min_gap: int = 1
    """Smallest frame gap (index_b - index_a) of a pair."""
    max_gap: int = 40
    """Largest frame gap of a pair."""
    min_overlap: float = 0.3
    """Smallest fraction of A's valid grid pixels visible in B."""
    max_overlap: float = 0.98
    """Largest overlap (drops near-duplicate views)."""
    gap_buckets: tuple[int, ...] = DEFAULT_GAP_BUCKETS
    """Bucket edges in frames; pairs are spread evenly across buckets."""
    pairs_per_scene: int = 24
    """Pairs drawn per scene (fewer when the scene has fewer good candidates)."""
    candidates_per_pair: int = 6
    """How many (frame, gap) candidates the scan tests per wanted pair, per bucket."""
    scan_side: int = 80
    """Longer side of the low-resolution depth the scan uses for overlaps."""
    scan_stride: int = 4
    """Grid stride (scan pixels) of the overlap test during the scan."""
    stride: int = 8
    """Jittered-grid cell (stored pixels) of correspondence sampling."""
    max_corr: int = 4096
    """Cap on correspondences per pair."""
    abs_tol: float = geometry.DEFAULT_ABS_TOL
    rel_tol: float = geometry.DEFAULT_REL_TOL

    def __post_init__(self) -> None:
        if self.min_gap < 1:
            raise ValueError(f"--min-gap must be >= 1 (got {self.min_gap})")
        if self.max_gap < self.min_gap:
            raise ValueError(f"--max-gap ({self.max_gap}) must be >= --min-gap ({self.min_gap})")
        if not 0.0 <= self.min_overlap <= self.max_overlap <= 1.0:
            raise ValueError(f"need 0 <= --min-overlap ({self.min_overlap}) <= --max-overlap "
                             f"({self.max_overlap}) <= 1")
        b = tuple(int(x) for x in self.gap_buckets)
        if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"--gap-buckets must be increasing positive integers (got {self.gap_buckets})")
        self.gap_buckets = b
        if self.pairs_per_scene < 1:
            raise ValueError(f"--pairs-per-scene must be >= 1 (got {self.pairs_per_scene})")


def bucket_of(gap: int | np.ndarray, edges: tuple[int, ...]) -> np.ndarray:
    """Bucket k of a gap: edges[k] <= gap < edges[k+1], last bucket open; -1 below edges[0]."""
    return np.searchsorted(np.asarray(edges), np.asarray(gap), side="right") - 1


def bucket_ranges(cfg: PairConfig) -> list[tuple[int, int]]:
    """Inclusive gap ranges [lo, hi] of each bucket, clipped to [min_gap, max_gap] (may be empty)."""
    edges = list(cfg.gap_buckets)
    out = []
    for k, lo in enumerate(edges):
        hi = edges[k + 1] - 1 if k + 1 < len(edges) else cfg.max_gap
        out.append((max(lo, cfg.min_gap), min(hi, cfg.max_gap)))
    return out


@dataclass
class ScanView:
    """A frame as the scan sees it: low-resolution depth and its K."""

    index: int
    name: str
    depth: np.ndarray  # (h, w) float32
    K: np.ndarray  # (3, 3)
    cam2world: np.ndarray  # (4, 4)


@dataclass
class Candidate:
    index_a: int
    index_b: int
    overlap_ab: float
    overlap_ba: float

    @property
    def gap(self) -> int:
        return self.index_b - self.index_a


REFERENCE_OVERLAP = (PairConfig.min_overlap, PairConfig.max_overlap)
"""The default overlap window: the pose-convention check measures the yield against it, so a
narrow --min/--max-overlap window of the user's does not read as a broken scene."""


@dataclass
class ScanResult:
    pairs: list[Candidate] = field(default_factory=list)
    tested: int = 0
    passed: int = 0
    by_bucket: list[int] = field(default_factory=list)
    reference_passed: int = 0
    """Tested candidates whose overlap lies in REFERENCE_OVERLAP (whatever the job's window)."""


def scan_view(index: int, name: str, depth: np.ndarray, K: np.ndarray, cam2world: np.ndarray,
              scan_side: int) -> ScanView:
    """Shrink a frame's depth (nearest-exact) for the overlap scan."""
    H, W = depth.shape
    new = geometry.fit_size((W, H), scan_side)
    return ScanView(index, name, geometry.resize_depth_nearest(depth, new),
                    geometry.resize_intrinsics(K, (W, H), new), cam2world)


def grid_points(size: tuple[int, int], stride: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pixels of a (jittered) grid: one per stride x stride cell. -> (N, 2) float64 integer-valued.

    With rng, each cell's pixel is drawn uniformly inside the cell; else the cell centre.
    """
    W, H = size
    gy, gx = np.mgrid[0:H:stride, 0:W:stride]
    gx, gy = gx.ravel(), gy.ravel()
    if rng is None:
        ox = np.full(gx.shape, stride // 2)
        oy = np.full(gy.shape, stride // 2)
    else:
        ox = rng.integers(0, stride, size=gx.shape)
        oy = rng.integers(0, stride, size=gy.shape)
    u = np.minimum(gx + ox, W - 1)
    v = np.minimum(gy + oy, H - 1)
    return np.stack([u, v], axis=-1).astype(np.float64)


def _overlap(a: ScanView, b: ScanView, stride: int, abs_tol: float, rel_tol: float) -> float:
    h, w = a.depth.shape
    return geometry.overlap(a.depth, a.K, a.cam2world, b.depth, b.K, b.cam2world,
                            uv_a=grid_points((w, h), stride), abs_tol=abs_tol, rel_tol=rel_tol)


def candidate_pairs(views: list[ScanView], cfg: PairConfig, rng: np.random.Generator,
                    abs_tol: float | None = None) -> ScanResult:
    """Choose up to cfg.pairs_per_scene pairs, spread evenly across gap buckets.

    views: the scene's usable frames in order (their `index` is the frame position).
    Each bucket holds every (a, b) with both frames usable and b - a in the bucket's
    gap range, in a seeded random order. Buckets take turns (round robin): a turn tests
    that bucket's next candidates (at most candidates_per_pair) until one has an
    overlap (A in B) in [min_overlap, max_overlap]. A bucket that runs dry leaves its
    turns to the others. At most pairs_per_scene * candidates_per_pair candidates are
    tested in all. Deterministic for a given rng.
    """
    abs_tol = cfg.abs_tol if abs_tol is None else abs_tol
    by_index = {v.index: v for v in views}
    indices = np.array(sorted(by_index), dtype=np.int64)
    ranges = bucket_ranges(cfg)
    res = ScanResult(by_bucket=[0] * len(ranges))
    queues: dict[int, list[tuple[int, int]]] = {}
    for k, (lo, hi) in enumerate(ranges):
        if lo > hi:
            continue
        a_idx, gaps = np.meshgrid(indices, np.arange(lo, hi + 1), indexing="ij")  # (F, G)
        a_idx, gaps = a_idx.ravel(), gaps.ravel()
        ok = np.isin(a_idx + gaps, indices)
        a_idx, gaps = a_idx[ok], gaps[ok]
        if len(a_idx):
            order = rng.permutation(len(a_idx))
            queues[k] = [(int(a_idx[j]), int(a_idx[j] + gaps[j])) for j in order]
    budget = cfg.pairs_per_scene * cfg.candidates_per_pair
    pos = {k: 0 for k in queues}
    while len(res.pairs) < cfg.pairs_per_scene and queues and res.tested < budget:
        for k in list(queues):
            q = queues[k]
            for _ in range(cfg.candidates_per_pair):
                if pos[k] >= len(q) or res.tested >= budget:
                    break
                ia, ib = q[pos[k]]
                pos[k] += 1
                res.tested += 1
                ov_ab = _overlap(by_index[ia], by_index[ib], cfg.scan_stride, abs_tol, cfg.rel_tol)
                res.reference_passed += REFERENCE_OVERLAP[0] <= ov_ab <= REFERENCE_OVERLAP[1]
                if not cfg.min_overlap <= ov_ab <= cfg.max_overlap:
                    continue
                ov_ba = _overlap(by_index[ib], by_index[ia], cfg.scan_stride, abs_tol, cfg.rel_tol)
                res.passed += 1
                res.by_bucket[k] += 1
                res.pairs.append(Candidate(ia, ib, round(ov_ab, 4), round(ov_ba, 4)))
                break
            if pos[k] >= len(q):
                del queues[k]
            if len(res.pairs) >= cfg.pairs_per_scene:
                break
    return res


def correspondences(depth_a: np.ndarray, K_a: np.ndarray, cam2world_a: np.ndarray,
                    depth_b: np.ndarray, K_b: np.ndarray, cam2world_b: np.ndarray,
                    rng: np.random.Generator, stride: int = 8, max_corr: int = 4096,
                    abs_tol: float = geometry.DEFAULT_ABS_TOL,
                    rel_tol: float = geometry.DEFAULT_REL_TOL) -> np.ndarray:
    """Dense correspondences of DESIGN §4: float32 (N, 4) rows `uA, vA, uB, vB`.

    A's pixels come from a jittered grid (one integer pixel per stride x stride cell)
    where A has depth; each is moved into B with A's depth and kept if it passes the
    visibility test in B. At most max_corr rows (a seeded random subset, in grid order).
    """
    H, W = depth_a.shape
    uv_a = grid_points((W, H), stride, rng)
    z_a = depth_a[uv_a[:, 1].astype(np.int64), uv_a[:, 0].astype(np.int64)].astype(np.float64)
    keep = z_a > 0
    uv_a, z_a = uv_a[keep], z_a[keep]
    uv_b, z_b = geometry.reproject(uv_a, z_a, K_a, cam2world_a, K_b, cam2world_b)
    vis = geometry.visible_in(uv_b, z_b, depth_b, abs_tol, rel_tol)
    uv_a, uv_b = uv_a[vis], uv_b[vis]
    if len(uv_a) > max_corr:
        pick = np.sort(rng.choice(len(uv_a), size=max_corr, replace=False))
        uv_a, uv_b = uv_a[pick], uv_b[pick]
    return np.concatenate([uv_a, uv_b], axis=1).astype(np.float32)


def photo_check(rgb_a: np.ndarray, rgb_b: np.ndarray, corr: np.ndarray,
                rng: np.random.Generator) -> tuple[float, float]:
    """(photo_err, photo_err_shuffled): mean absolute RGB difference (0-255).

    photo_err compares A's pixel with B's colour (bilinear) at the matched point;
    the shuffled figure does the same after a random permutation of B's points.
    Both are nan for fewer than 2 correspondences.
    """
    if len(corr) < 2:
        return float("nan"), float("nan")
    ca, _ = geometry.sample_nearest(rgb_a, corr[:, :2].astype(np.float64))
    cb, _ = geometry.sample_bilinear(rgb_b, corr[:, 2:].astype(np.float64))
    err = np.abs(ca.astype(np.float64) - cb).mean()
    perm = rng.permutation(len(corr))
    err_sh = np.abs(ca.astype(np.float64) - cb[perm]).mean()
    return float(err), float(err_sh)


def photo_flag(photo_err: float, photo_err_shuffled: float, ratio: float = 0.5) -> bool:
    """True when a pair (or scene mean) fails the self-check: err not well below shuffled."""
    if not np.isfinite(photo_err) or not np.isfinite(photo_err_shuffled):
        return False
    return photo_err > ratio * photo_err_shuffled
