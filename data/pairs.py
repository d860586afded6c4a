"""Scene clips and their correspondences (DESIGN §4.1).

- `candidate_clips`: per scene, clips of K frames inside a window of R consecutive frame
  indices, chosen by co-visibility (every frame overlaps some other frame of its clip by
  `min_overlap`, no two are near-duplicates), so that frame distances cover the window;
  deterministic per seed.
- `correspondences`: a jittered grid of A's pixels where A has depth, kept where they pass
  the visibility test in B, capped at a count (one ordered pair i < j of a clip).
- `photo_check`: the self-check figures `photo_err`, `photo_err_shuffled`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from data import geometry


@dataclass
class ClipConfig:
    """How clips are chosen and correspondences sampled."""

    clip_frames: int = 8
    """K: frames per clip (2..32; 2 is a pair)."""
    clip_window: int = 48
    """R: a clip's frames lie within R consecutive frame indices (so 1 <= dt <= R - 1)."""
    clips_per_scene: int = 8
    """Clips drawn per scene (fewer when the scene has fewer good windows)."""
    min_overlap: float = 0.3
    """Every frame of a clip overlaps at least one other frame of it by this fraction."""
    max_overlap: float = 0.98
    """No two frames of a clip overlap more than this both ways (near-duplicates)."""
    candidates_per_frame: int = 6
    """Candidate frames the scan tests per frame wanted in a clip."""
    scan_side: int = 80
    """Longer side of the low-resolution depth the scan uses for overlaps."""
    scan_stride: int = 4
    """Grid stride (scan pixels) of the overlap test during the scan."""
    stride: int = 8
    """Jittered-grid cell (stored pixels) of correspondence sampling."""
    max_corr: int = 4096
    """Cap on correspondences per pair."""
    max_corr_clip: int = 65536
    """Cap on correspondences per clip (each pair then gets at most max_corr_clip // pairs)."""
    abs_tol: float = geometry.DEFAULT_ABS_TOL
    rel_tol: float = geometry.DEFAULT_REL_TOL

    def __post_init__(self) -> None:
        if not 2 <= self.clip_frames <= 32:
            raise ValueError(f"--clip-frames must be in 2..32 (got {self.clip_frames})")
        if self.clip_window < 2:
            raise ValueError(f"--clip-window must be >= 2 (got {self.clip_window})")
        if self.clip_window < self.clip_frames:
            raise ValueError(f"--clip-window ({self.clip_window}) must be >= --clip-frames ({self.clip_frames}): "
                             f"a clip's frames lie inside the window")
        if not 0.0 <= self.min_overlap <= self.max_overlap <= 1.0:
            raise ValueError(f"need 0 <= --min-overlap ({self.min_overlap}) <= --max-overlap "
                             f"({self.max_overlap}) <= 1")
        if self.clips_per_scene < 1:
            raise ValueError(f"--clips-per-scene must be >= 1 (got {self.clips_per_scene})")
        if self.max_corr < 1 or self.max_corr_clip < 1:
            raise ValueError("--max-corr and --max-corr-clip must be >= 1")

    def corr_per_pair(self, n_frames: int) -> int:
        """The cap on a pair's correspondences in a clip of n frames."""
        pairs = n_frames * (n_frames - 1) // 2
        return max(1, min(self.max_corr, self.max_corr_clip // max(pairs, 1)))


@dataclass
class ScanView:
    """A frame as the scan sees it: low-resolution depth and its K."""

    index: int
    name: str
    depth: np.ndarray  # (h, w) float32
    K: np.ndarray  # (3, 3)
    cam2world: np.ndarray  # (4, 4)


@dataclass
class Clip:
    """A planned clip: its frame indices (ascending) and the overlaps between them."""

    indices: list[int]
    overlap: list[list[float]]
    """(K, K): overlap[i][j] = fraction of frame i's valid grid pixels visible in frame j (1 on the diagonal)."""


REFERENCE_OVERLAP = (ClipConfig.min_overlap, ClipConfig.max_overlap)
"""The default overlap window: the pose-convention check measures the yield against it, so a
narrow --min/--max-overlap window of the user's does not read as a broken scene."""


@dataclass
class ScanResult:
    clips: list[Clip] = field(default_factory=list)
    tested: int = 0
    """Candidate frames tested against a clip under construction."""
    passed: int = 0
    """Candidates accepted into a clip."""
    reference_passed: int = 0
    """Tested candidates co-visible with the clip: best overlap at least REFERENCE_OVERLAP's low end, whatever the
    job's window (a wrong pose convention leaves almost none co-visible; near-duplicates are co-visible)."""
    overlaps_computed: int = 0
    short_clips: int = 0
    """Clips that stopped below K frames (the window held no more suitable frame)."""


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
    return np.stack(_grid_pixels(size, stride, rng), axis=-1).astype(np.float64)


@functools.lru_cache(maxsize=16)
def _grid_cells(W: int, H: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-left pixel (x, y) of every stride x stride cell, row-major (read-only, shared)."""
    gy, gx = np.mgrid[0:H:stride, 0:W:stride]
    gx, gy = gx.ravel(), gy.ravel()
    gx.flags.writeable = gy.flags.writeable = False
    return gx, gy


def _grid_pixels(size: tuple[int, int], stride: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """grid_points as two int64 arrays (u, v); the same draws from rng."""
    W, H = size
    gx, gy = _grid_cells(int(W), int(H), int(stride))
    if rng is None:
        ox = oy = stride // 2
    else:
        ox = rng.integers(0, stride, size=gx.shape)
        oy = rng.integers(0, stride, size=gy.shape)
    return np.minimum(gx + ox, W - 1), np.minimum(gy + oy, H - 1)


def _overlap(a: ScanView, b: ScanView, stride: int, abs_tol: float, rel_tol: float) -> float:
    h, w = a.depth.shape
    return geometry.overlap(a.depth, a.K, a.cam2world, b.depth, b.K, b.cam2world,
                            uv_a=grid_points((w, h), stride), abs_tol=abs_tol, rel_tol=rel_tol)


class _Overlaps:
    """Scan overlaps of frame pairs, computed once each (ov(a -> b) is not ov(b -> a))."""

    def __init__(self, by_index: dict[int, ScanView], cfg: ClipConfig, abs_tol: float):
        self.by_index, self.cfg, self.abs_tol = by_index, cfg, abs_tol
        self.cache: dict[tuple[int, int], float] = {}

    def __call__(self, a: int, b: int) -> float:
        key = (a, b)
        if key not in self.cache:
            self.cache[key] = _overlap(self.by_index[a], self.by_index[b], self.cfg.scan_stride, self.abs_tol,
                                       self.cfg.rel_tol)
        return self.cache[key]


def candidate_clips(views: list[ScanView], cfg: ClipConfig, rng: np.random.Generator,
                    abs_tol: float | None = None) -> ScanResult:
    """Choose up to cfg.clips_per_scene clips of cfg.clip_frames frames by co-visibility.

    views: the scene's usable frames in order (their `index` is the frame position). Clip c
    starts at a frame drawn from the c-th of clips_per_scene equal strata of the usable frames
    whose window lies inside the scene (so clips spread over the scene; in a scene shorter than
    a window, of every frame but the last); its window is [start, start + clip_window - 1]. The other
    frames of the window are tried in a seeded random order (so frame distances cover the
    window): a candidate joins when it overlaps at least one frame of the clip by min_overlap
    (in either direction) and is a near-duplicate of none of them (overlaps above max_overlap in
    BOTH directions; one direction near 1 is ordinary forward motion). A
    clip stops at K frames, after K * candidates_per_frame candidates, or when the window runs
    dry; it is kept with at least 2 frames (fewer than K counts as short). Deterministic for a
    given rng.
    """
    abs_tol = cfg.abs_tol if abs_tol is None else abs_tol
    by_index = {v.index: v for v in views}
    indices = np.array(sorted(by_index), dtype=np.int64)
    res = ScanResult()
    if len(indices) < 2:
        return res
    ov = _Overlaps(by_index, cfg, abs_tol)
    lo = REFERENCE_OVERLAP[0]
    # starts whose window lies inside the scene (else, in a scene shorter than a window, any frame but the last)
    starts = indices[indices <= indices[-1] - (cfg.clip_window - 1)]
    if len(starts) == 0:
        starts = indices[:-1]
    strata = np.array_split(starts, min(cfg.clips_per_scene, len(starts)))
    for stratum in strata:
        start = int(rng.choice(stratum))
        window = indices[(indices > start) & (indices < start + cfg.clip_window)]
        chosen = [start]
        for cand in rng.permutation(window)[: cfg.clip_frames * cfg.candidates_per_frame]:
            if len(chosen) >= cfg.clip_frames:
                break
            cand = int(cand)
            res.tested += 1
            both = [(ov(cand, k), ov(k, cand)) for k in chosen]
            best = max(max(pair) for pair in both)
            res.reference_passed += best >= lo  # co-visible (near-duplicates too: they are no sign of a bad pose)
            # a near-duplicate sees almost all of the other frame AND is almost all seen by it; one direction
            # near 1 is ordinary forward motion (the later view is a subset of the earlier one)
            if best >= cfg.min_overlap and all(min(pair) <= cfg.max_overlap for pair in both):
                chosen.append(cand)
                res.passed += 1
        if len(chosen) < 2:
            continue
        chosen.sort()
        res.short_clips += len(chosen) < cfg.clip_frames
        matrix = [[1.0 if a == b else round(ov(a, b), 4) for b in chosen] for a in chosen]
        res.clips.append(Clip(chosen, matrix))
    res.overlaps_computed = len(ov.cache)
    return res


def clip_dts(clip: Clip) -> list[int]:
    """The frame distance of every pair i < j of a clip, in pair order."""
    ix = clip.indices
    return [ix[j] - ix[i] for i in range(len(ix)) for j in range(i + 1, len(ix))]


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
    u, v = _grid_pixels((W, H), stride, rng)
    flat = v * W + u
    z_a = (depth_a.reshape(-1).take(flat) if depth_a.flags.c_contiguous else depth_a[v, u]).astype(np.float64)
    keep = np.flatnonzero(z_a > 0)  # index arrays and take: boolean masks of (N, 2) rows cost more
    uv_a = np.stack([u.take(keep), v.take(keep)], axis=-1).astype(np.float64)
    uv_b, z_b = geometry.reproject(uv_a, z_a.take(keep), K_a, cam2world_a, K_b, cam2world_b)
    vis = np.flatnonzero(geometry.visible_in(uv_b, z_b, depth_b, abs_tol, rel_tol))
    if len(vis) > max_corr:
        vis = vis.take(np.sort(rng.choice(len(vis), size=max_corr, replace=False)))
    out = np.empty((len(vis), 4), dtype=np.float32)
    out[:, :2] = uv_a.take(vis, axis=0)
    out[:, 2:] = uv_b.take(vis, axis=0)
    return out


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
    ca = ca.astype(np.float64)
    err = np.abs(ca - cb).mean()
    perm = rng.permutation(len(corr))
    err_sh = np.abs(ca - cb[perm]).mean()
    return float(err), float(err_sh)


def photo_flag(photo_err: float, photo_err_shuffled: float, ratio: float = 0.5) -> bool:
    """True when a pair (or scene mean) fails the self-check: err not well below shuffled."""
    if not np.isfinite(photo_err) or not np.isfinite(photo_err_shuffled):
        return False
    return photo_err > ratio * photo_err_shuffled
