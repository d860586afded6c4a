"""The three stages of the shard job as plain functions (Ray wraps them in pipeline/ray_tasks.py).

scan (per scene)  -> plan (driver, deterministic)  -> write (per shard)

Every function here is deterministic for its inputs and seed, returns a status dict
instead of raising for data problems, and touches storage only through fsspec, so
local paths and s3:// are one code path. Nothing here imports Ray.

Scenes are named in the plan by their key: the path of the scene folder relative to
the corpus root (`--input`), so plan.json holds no absolute URL (and no credential).
"""
from __future__ import annotations

import collections
import copy
import glob
import hashlib
import json
import os
import tempfile
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data import geometry, pairs, shardformat
from data.scenes import FrameError, SceneError, open_scene
from data.scenes.base import Scene, fit_view
from data.storage import fresh_fs, is_local, open_fs, read_json, url_join  # noqa: F401  (used as stages.*)

PLAN_VERSION = 2
# Self-check (DESIGN §4). A pair fails when photo_err > PHOTO_FLAG_RATIO * photo_err_shuffled;
# a scene is flagged when the median of its pairs' ratios is above it.
PHOTO_FLAG_RATIO = 0.5
# A scene whose candidate pairs mostly fail the overlap filter ("pair yield collapses")
# is flagged too: with wrong pose conventions only near-duplicate frames still overlap.
# Correct synthetic scenes yield ~0.9; world2cam-as-cam2world or OpenGL axes ~0.1.
MIN_PAIR_YIELD = 0.25
MIN_TESTED_FOR_YIELD = 8  # fewer tested candidates say nothing about the yield
# Test-only fault injection: seconds each write task sleeps per pair (lets tests kill
# a worker or the whole job mid-shard reliably). Never set in production.
TEST_DELAY_ENV = "GASP_TEST_WRITE_DELAY"
PART_SUFFIX = ".part"


@dataclass
class JobConfig:
    """What determines the content of the shards (recorded in plan.json and the manifest)."""

    input: str
    """Corpus root (local path or s3://), one folder per scene."""
    format: str
    """Corpus layout (data.scenes.FORMATS)."""
    output: str
    """Output folder or s3:// prefix (not part of the content: shards do not depend on it)."""
    pairs: pairs.PairConfig = field(default_factory=pairs.PairConfig)
    """Pair sampling and correspondences."""
    samples_per_shard: int = 64
    """Pairs per tar shard."""
    max_side: int = 640
    """Longer side of stored views in pixels (never upscaled)."""
    val_fraction: float = 0.1
    """Fraction of scenes in the val split (split by scene)."""
    seed: int = 0
    """Seed of pair sampling, split, shuffle and correspondence jitter."""
    depth_root: str | None = None
    """nerfstudio only: folder of per-scene depth maps."""

    def content_dict(self) -> dict[str, Any]:
        """The settings that decide shard bytes (a rerun must match them); no credentials."""
        d = asdict(self)
        d.pop("output")
        d["input"] = public_url(self.input)
        d["depth_root"] = public_url(self.depth_root) if self.depth_root else None
        d["pairs"]["gap_buckets"] = list(self.pairs.gap_buckets)
        return d

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.content_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def scene_url(self, key: str) -> str:
        return url_join(self.input, key)


def scene_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the job seed and names (independent of Python's hash)."""
    h = hashlib.sha256(("|".join([str(seed)] + [str(p) for p in parts])).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def reader_options(cfg: JobConfig) -> dict[str, Any]:
    return {"depth_root": cfg.depth_root} if cfg.format == "nerfstudio" and cfg.depth_root else {}


def public_url(url: str | None) -> str | None:
    """A URL without credentials (`user:password@` is dropped, query strings too)."""
    if not url or "://" not in url:
        return url
    proto, rest = url.split("://", 1)
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = host.rsplit("@", 1)[1]
    return proto + "://" + host + slash + path.split("?", 1)[0]



def scene_key(url: str, root: str) -> str:
    """Path of a scene folder relative to the corpus root (the scene's name in the plan)."""
    if "://" not in root and "://" not in url:
        return os.path.relpath(os.path.abspath(url), os.path.abspath(root)).replace(os.sep, "/")
    r = root.rstrip("/") + "/"
    if url.startswith(r):
        return url[len(r):].strip("/")
    # same bucket and path, different spelling (e.g. protocol dropped by a lister)
    tail = r.split("://", 1)[-1]
    u = url.split("://", 1)[-1]
    return u[len(tail):].strip("/") if u.startswith(tail) else url.rstrip("/").rsplit("/", 1)[-1]


def reason_of(e: FrameError) -> str:
    """The countable part of a FrameError reason: 'unreadable rgb (OSError: ...)' -> 'unreadable rgb'."""
    return e.reason.split(" (")[0]


def one_line(text: str, limit: int = 300) -> str:
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


# ----------------------------------------------------------------------------- scan

def scene_shell(scene: Scene, indices: set[int]) -> Scene:
    """A copy of an opened scene holding only the frames in `indices` (what write tasks need).

    Write tasks then read those frames without re-opening the scene (listing folders,
    reading every pose file). Large per-scene metadata (the posed / nerfstudio
    'frames' list) is dropped from the copy; frames keep their exact metadata, so the
    bytes written are the same as after a fresh `open_scene`.
    """
    shell = copy.copy(scene)
    shell.frames = [f for f in scene.frames if f.index in indices]
    shell.skipped = []
    meta = getattr(scene, "meta", None)
    if isinstance(meta, dict) and "frames" in meta:
        shell.meta = {k: v for k, v in meta.items() if k != "frames"}
    if hasattr(shell, "_depth_cache"):
        shell._depth_cache = None
    return shell


def scan_scene(url: str, cfg: JobConfig) -> dict[str, Any]:
    """Scan one scene: usable frames, broken frames by reason, candidate pairs.

    Returns a status dict: {"ok": bool, "scene" (key), "name", "dataset", "frames",
    "usable", "skipped": {reason: n}, "skipped_frames": [[frame, reason], ...] (first 20),
    "pairs": [[ia, ib, ov_ab, ov_ba], ...], "tested", "passed", "yield", "reference_yield" (the
    share of tested candidates inside the default overlap window, pairs.REFERENCE_OVERLAP), "by_bucket",
    "median_depth", "metric_depth", "error" (when not ok), "seconds",
    "shell" (a `scene_shell` of the paired frames; the driver keeps it out of plan.json)}.
    """
    t0 = time.time()
    key = scene_key(url, cfg.input)
    base = {"scene": key, "name": key.rsplit("/", 1)[-1], "frames": 0, "usable": 0, "skipped": {},
            "pairs": [], "tested": 0, "passed": 0, "yield": None}
    try:
        scene = open_scene(url, cfg.format, **reader_options(cfg))
    except SceneError as e:
        return {**base, "ok": False, "retryable": False, "error": one_line(e), "seconds": time.time() - t0}
    except Exception as e:  # unexpected: keep the job going, report it
        return {**base, "ok": False, "error": one_line(f"{type(e).__name__}: {e}"),
                "trace": traceback.format_exc(limit=5), "seconds": time.time() - t0}
    skipped = collections.Counter(reason.split(" (")[0] for _, reason in scene.skipped)
    skipped_frames = [list(x) for x in scene.skipped[:20]]
    views: list[pairs.ScanView] = []
    medians = []
    for fr in scene.frames:
        try:
            depth = scene.load_depth(fr)  # RGB only checked: the scan needs depth
        except FrameError as e:
            skipped[reason_of(e)] += 1
            if len(skipped_frames) < 20:
                skipped_frames.append([fr.name, e.reason])
            continue
        views.append(pairs.scan_view(fr.index, fr.name, depth, fr.K, fr.cam2world, cfg.pairs.scan_side))
        medians.append(float(np.median(depth[depth > 0])))
    n_total = len(scene.frames) + len(scene.skipped)
    out: dict[str, Any] = {**base, "ok": True, "name": scene.name, "dataset": scene.dataset,
                           "frames": n_total, "usable": len(views), "skipped": dict(skipped),
                           "skipped_frames": skipped_frames, "metric_depth": bool(scene.metric_depth),
                           "median_depth": float(np.median(medians)) if medians else None,
                           "by_bucket": [0] * len(cfg.pairs.gap_buckets)}
    if len(views) >= 2:
        abs_tol = geometry.visibility_tolerance(scene.metric_depth, out["median_depth"], cfg.pairs.abs_tol)
        rng = np.random.default_rng(scene_seed(cfg.seed, "scan", key))
        res = pairs.candidate_pairs(views, cfg.pairs, rng, abs_tol=abs_tol)
        out["pairs"] = [[c.index_a, c.index_b, c.overlap_ab, c.overlap_ba] for c in res.pairs]
        out["tested"], out["passed"] = res.tested, res.passed
        out["yield"] = round(res.passed / res.tested, 4) if res.tested else None
        out["reference_yield"] = round(res.reference_passed / res.tested, 4) if res.tested else None
        out["by_bucket"] = res.by_bucket
    used = {i for p in out["pairs"] for i in p[:2]}
    out["shell"] = scene_shell(scene, used) if used else None
    out["seconds"] = round(time.time() - t0, 3)
    return out


SCAN_SUMMARY_KEYS = ("ok", "name", "dataset", "frames", "usable", "skipped", "skipped_frames", "tested",
                     "passed", "yield", "reference_yield", "by_bucket", "error", "metric_depth", "median_depth")


# ----------------------------------------------------------------------------- plan

def split_of(scene: str, cfg: JobConfig, all_scenes: list[str]) -> str:
    """train/val by scene (never by pair), deterministic per seed."""
    return split_scenes(cfg, all_scenes).get(scene, "train")


def split_scenes(cfg: JobConfig, all_scenes: list[str]) -> dict[str, str]:
    """{scene: "train" | "val"}: round(val_fraction * n) scenes (at least 1 when n >= 2) are val."""
    names = sorted(set(all_scenes))
    if cfg.val_fraction <= 0 or len(names) < 2:
        return {s: "train" for s in names}
    ranked = sorted(names, key=lambda s: scene_seed(cfg.seed, "split", s))
    n_val = min(max(int(round(cfg.val_fraction * len(names))), 1), len(names) - 1)
    val = set(ranked[:n_val])
    return {s: ("val" if s in val else "train") for s in names}


def make_plan(scans: list[dict[str, Any]], cfg: JobConfig) -> dict[str, Any]:
    """Deterministic global plan: split by scene, shuffle all pairs of a split, cut into shards.

    Each shard mixes many scenes. The plan also keeps each scene's scan summary (frames,
    skipped frames by reason, pair yield) for the manifest of this and later runs.
    """
    scans = sorted(scans, key=lambda s: s["scene"])
    ok = [s for s in scans if s.get("ok")]
    split = split_scenes(cfg, [s["scene"] for s in ok])
    shards: list[dict[str, Any]] = []
    for which in ("train", "val"):
        items = []
        for s in ok:
            if split[s["scene"]] != which:
                continue
            for ia, ib, ov_ab, ov_ba in s["pairs"]:
                items.append({"scene": s["scene"], "index_a": int(ia), "index_b": int(ib),
                              "overlap_ab": ov_ab, "overlap_ba": ov_ba, "median_depth": s["median_depth"]})
        rng = np.random.default_rng(scene_seed(cfg.seed, "plan", which))
        items = [items[i] for i in rng.permutation(len(items))]
        n = cfg.samples_per_shard
        for k in range(0, len(items), n):
            shards.append({"split": which, "shard": k // n, "name": shardformat.shard_name(which, k // n),
                           "pairs": items[k:k + n]})
    return {"plan_version": PLAN_VERSION, "format_version": shardformat.FORMAT_VERSION,
            "content_hash": cfg.content_hash(), "config": cfg.content_dict(), "scenes": split,
            "scan": {s["scene"]: {k: s.get(k) for k in SCAN_SUMMARY_KEYS} for s in scans},
            "shards": shards}


# ---------------------------------------------------------------------------- write

_SCENE_CACHE: "collections.OrderedDict[str, Scene]" = collections.OrderedDict()
SCENE_CACHE_SIZE = 16  # opened scenes a write worker keeps across the tasks of one run


def _open_cached(url: str, cfg: JobConfig) -> Scene:
    """A scene this worker opened (the most recent SCENE_CACHE_SIZE kept across tasks), else opened now.

    Used when a write task has no shell from the scan (a rerun that reuses plan.json). A task
    asks once per scene it touches (ShardContext keeps what it needs), so a shard mixing more
    scenes than the cache holds does not reopen any of them.
    """
    key = f"{cfg.format}|{url}|{cfg.depth_root}"
    if key in _SCENE_CACHE:
        _SCENE_CACHE.move_to_end(key)
        return _SCENE_CACHE[key]
    sc = _SCENE_CACHE[key] = open_scene(url, cfg.format, **reader_options(cfg))
    while len(_SCENE_CACHE) > SCENE_CACHE_SIZE:
        _SCENE_CACHE.popitem(last=False)
    return sc


def clear_scene_cache() -> None:
    _SCENE_CACHE.clear()


@dataclass
class View:
    """A frame as stored: RGB, depth and K at the stored size, plus encoded bytes (lazily)."""

    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32, metres
    K: np.ndarray  # (3, 3)
    frame: Any
    jpg: bytes | None = None
    png: dict[float, tuple[np.ndarray, bytes]] = field(default_factory=dict)  # scale -> (quantised, bytes)


def quantize_depth(depth: np.ndarray, depth_scale: float) -> np.ndarray:
    """Depth exactly as a reader decodes the stored uint16 PNG (shardformat.decode_depth_png).

    float32 (H, W) -> float32 (H, W). Correspondences are computed on this, so every
    stored row passes the visibility test against the STORED depth.
    """
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0) * depth_scale
    q = np.rint(d)
    q[(q > shardformat.UINT16_MAX) | (q < 0)] = 0
    return q.astype(np.uint16).astype(np.float32) / np.float32(depth_scale)


class ShardContext:
    """What one write task shares between its pairs: scenes, and views used by several pairs.

    Each scene the shard touches is opened at most once per task (or comes from the scan's
    shell) and is kept as a shell of the frames this shard needs; a frame used by k pairs of the
    shard is read, aligned, resized and encoded once and dropped after its last use (so memory
    stays at the views still needed).
    """

    def __init__(self, cfg: JobConfig, entry: dict[str, Any], shells: dict[str, Scene] | None,
                 timings: dict[str, float]):
        self.cfg, self.shells, self.timings = cfg, shells or {}, timings
        self.uses = collections.Counter()
        self.needed: dict[str, set[int]] = collections.defaultdict(set)  # scene -> frame indices of this shard
        for it in entry["pairs"]:
            for index in (int(it["index_a"]), int(it["index_b"])):
                self.uses[(it["scene"], index)] += 1
                self.needed[it["scene"]].add(index)
        self.views: dict[tuple[str, int], View | FrameError] = {}
        self._scenes: dict[str, tuple[Scene, dict[int, Any]]] = {}
        self.opened: set[str] = set()  # scenes this task had to open (no shell)

    def scene(self, key: str) -> tuple[Scene, dict[int, Any]]:
        """(scene, its frames by index) for a scene of this shard; opened on first use only."""
        hit = self._scenes.get(key)
        if hit is None:
            sc = self.shells.get(key)
            if sc is None:
                self.opened.add(key)
                sc = scene_shell(_open_cached(self.cfg.scene_url(key), self.cfg), self.needed[key])
            hit = self._scenes[key] = (sc, {f.index: f for f in sc.frames})
        return hit

    def view(self, key: str, index: int) -> View:
        k = (key, index)
        self.uses[k] -= 1
        hit = self.views.get(k)
        if hit is None:
            hit = self._load(key, index)
            if self.uses[k] > 0:
                self.views[k] = hit
        elif self.uses[k] <= 0:
            del self.views[k]
        if isinstance(hit, FrameError):
            raise hit
        return hit

    def _load(self, key: str, index: int) -> View | FrameError:
        t = time.perf_counter()
        scene, frames = self.scene(key)
        fr = frames.get(index)
        if fr is None:
            return FrameError(scene.name, str(index), "frame vanished (the corpus changed since plan.json)")
        try:
            rgb, depth = scene.load(fr)
        except FrameError as e:
            return e
        t1 = time.perf_counter()
        self.timings["read"] += t1 - t
        rgb, depth, K = fit_view(rgb, depth, fr.K, self.cfg.max_side)
        self.timings["resize"] += time.perf_counter() - t1
        return View(rgb, depth, K, fr)


def _encoded(view: View, depth_scale: float, timings: dict[str, float]) -> tuple[bytes, np.ndarray, bytes]:
    """(jpg, quantised depth, png) of a view; encoded once per view and scale."""
    t = time.perf_counter()
    if view.jpg is None:
        view.jpg = shardformat.encode_jpeg(view.rgb)
    if depth_scale not in view.png:
        q = quantize_depth(view.depth, depth_scale)
        view.png[depth_scale] = (q, shardformat.encode_depth_png(q, depth_scale))
    timings["encode"] += time.perf_counter() - t
    q, png = view.png[depth_scale]
    return view.jpg, q, png


def render_pair(item: dict[str, Any], cfg: JobConfig, key: str, timings: dict[str, float],
                ctx: ShardContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load, align, resize, match, self-check and encode one planned pair.

    Returns (sample dict of bytes for webdataset's TarWriter, its metadata).
    Raises FrameError when a frame turns out broken.
    """
    scene, _ = ctx.scene(item["scene"])
    views, errors = [], []
    for index in (int(item["index_a"]), int(item["index_b"])):  # both, so that use counts stay right
        try:
            views.append(ctx.view(item["scene"], index))
        except FrameError as e:
            errors.append(e)
    if errors:
        raise errors[0]
    va, vb = views
    fa, fb = va.frame, vb.frame
    max_depth = float(max(va.depth.max(), vb.depth.max()))
    scale = shardformat.depth_scale_for(max_depth, scene.metric_depth)
    jpg_a, qa, png_a = _encoded(va, scale, timings)
    jpg_b, qb, png_b = _encoded(vb, scale, timings)
    t2 = time.perf_counter()
    abs_tol = geometry.visibility_tolerance(scene.metric_depth, item.get("median_depth"), cfg.pairs.abs_tol)
    rng = np.random.default_rng(scene_seed(cfg.seed, "pair", key))
    corr = pairs.correspondences(qa, va.K, fa.cam2world, qb, vb.K, fb.cam2world, rng,
                                 stride=cfg.pairs.stride, max_corr=cfg.pairs.max_corr,
                                 abs_tol=abs_tol, rel_tol=cfg.pairs.rel_tol)
    t3 = time.perf_counter()
    timings["corr"] += t3 - t2
    err, err_sh = pairs.photo_check(va.rgb, vb.rgb, corr, rng)
    t4 = time.perf_counter()
    timings["check"] += t4 - t3
    meta = {
        "version": shardformat.FORMAT_VERSION, "dataset": scene.dataset, "scene": scene.name,
        "frame_a": fa.name, "frame_b": fb.name, "index_a": fa.index, "index_b": fb.index,
        "gap": fb.index - fa.index, "K_a": va.K.tolist(), "K_b": vb.K.tolist(),
        "T_wa": np.asarray(fa.cam2world, dtype=np.float64).tolist(),
        "T_wb": np.asarray(fb.cam2world, dtype=np.float64).tolist(),
        "size_a": [int(va.rgb.shape[1]), int(va.rgb.shape[0])],
        "size_b": [int(vb.rgb.shape[1]), int(vb.rgb.shape[0])],
        "overlap_ab": item["overlap_ab"], "overlap_ba": item["overlap_ba"], "n_corr": int(len(corr)),
        "depth_scale": scale, "metric_depth": bool(scene.metric_depth),
        "photo_err": None if not np.isfinite(err) else round(err, 4),
        "photo_err_shuffled": None if not np.isfinite(err_sh) else round(err_sh, 4),
        "source": public_url(cfg.scene_url(item["scene"])),
    }
    missing = [k for k in shardformat.META_KEYS if k not in meta]
    if missing:  # the same contract as shardformat.make_sample
        raise ValueError(f"sample {key}: metadata lacks {missing}")
    sample = {"__key__": key, "a.jpg": jpg_a, "b.jpg": jpg_b, "a.depth.png": png_a, "b.depth.png": png_b,
              "corr.npy": shardformat.encode_npy(np.ascontiguousarray(corr, dtype=np.float32)),
              "json": shardformat.encode_json(meta)}
    timings["encode"] += time.perf_counter() - t4
    return sample, meta


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def stats_url_of(output: str, name: str) -> str:
    return url_join(output, name[: -len(".tar")] + ".stats.json")


def part_dir(output: str) -> tuple[str, bool]:
    """Where a shard is assembled: (folder, output is local): the output folder itself, or a local
    temp folder of this output (object stores)."""
    fs, path = open_fs(output)
    if is_local(fs):
        return path, True
    # one folder per output, so that cleaning leftovers never touches another job's files
    tag = hashlib.sha256(public_url(output).encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"gasp-shards-{tag}")
    os.makedirs(folder, exist_ok=True)
    return folder, False


def remove_stale_parts(folder: str, name: str) -> int:
    """Delete leftovers of a killed attempt at shard NAME (`.NAME.*.part`, `.STEM.stats.json.*.part`).

    Only call it while no other attempt at that shard runs. Returns how many were removed.
    """
    n = 0
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    pats = [f".{glob.escape(name)}.*{PART_SUFFIX}", f".{glob.escape(stem)}.stats.json.*{PART_SUFFIX}"]
    for p in [q for pat in pats for q in glob.glob(os.path.join(glob.escape(folder), pat))]:
        try:
            os.unlink(p)
            n += 1
        except FileNotFoundError:
            pass
    return n


def sweep_parts(folder: str, shard_names: list[str]) -> int:
    """remove_stale_parts for many shards with one listing of the folder (driver, no task running)."""
    stems = {n[: -len(".tar")] for n in shard_names}
    n = 0
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for f in entries:
        if not (f.startswith(".") and f.endswith(PART_SUFFIX)):
            continue
        base = f[1:].split(".tar.", 1)[0] if ".tar." in f else f[1:].split(".stats.json.", 1)[0]
        if base in stems:
            try:
                os.unlink(os.path.join(folder, f))
                n += 1
            except FileNotFoundError:
                pass
    return n


def write_shard(entry: dict[str, Any], cfg: JobConfig, shells: dict[str, Scene] | None = None) -> dict[str, Any]:
    """Write one planned shard (tar, then its stats.json). Returns a status dict, never raises.

    The tar is assembled under a hidden temporary name (`.NAME.<random>.part`, in the
    output folder when it is local, else in a local temp dir) and renamed (local) or
    uploaded in one PUT (s3://) under its final name only when whole; stats.json goes
    last and marks the shard done. Pairs whose frames turn out broken are skipped and
    counted. `shells` ({scene key: scene_shell}) spare re-opening scenes.
    """
    import webdataset as wds

    t0, c0 = time.perf_counter(), time.process_time()
    name = entry["name"]
    final = url_join(cfg.output, name)
    timings: dict[str, float] = collections.defaultdict(float)
    per_scene: dict[str, dict[str, Any]] = {}
    skipped: collections.Counter = collections.Counter()
    by_bucket = [0] * len(cfg.pairs.gap_buckets)
    n = 0
    shard_idx = int(entry["shard"])
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0.0)
    tmp = None
    try:
        folder, local = part_dir(cfg.output)
        remove_stale_parts(folder, name)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}")
        ctx = ShardContext(cfg, entry, shells, timings)
        with open(tmp, "wb") as raw:
            out = _HashingWriter(raw)
            sink = wds.TarWriter(out, user="", group="", mtime=0, encoder=False)
            for i, item in enumerate(entry["pairs"]):
                if delay:
                    time.sleep(delay)
                key = shardformat.sample_key(shard_idx, i)
                try:
                    sample, meta = render_pair(item, cfg, key, timings, ctx)
                except FrameError as e:
                    skipped[reason_of(e)] += 1
                    continue
                tw = time.perf_counter()
                sink.write(sample)
                timings["write"] += time.perf_counter() - tw
                n += 1
                b = int(pairs.bucket_of(meta["gap"], cfg.pairs.gap_buckets))
                if 0 <= b < len(by_bucket):
                    by_bucket[b] += 1
                acc = per_scene.setdefault(item["scene"], {"pairs": 0, "checked": 0, "photo_err": 0.0,
                                                           "photo_err_shuffled": 0.0, "ratios": []})
                acc["pairs"] += 1
                if meta["photo_err"] is not None and meta["photo_err_shuffled"]:
                    acc["checked"] += 1
                    acc["photo_err"] += meta["photo_err"]
                    acc["photo_err_shuffled"] += meta["photo_err_shuffled"]
                    acc["ratios"].append(round(meta["photo_err"] / meta["photo_err_shuffled"], 4))
            tw = time.perf_counter()
            sink.close()
            raw.flush()
            os.fsync(raw.fileno())
        digest, size = out.sha.hexdigest(), out.size
        if local:
            os.replace(tmp, open_fs(final)[1])
        else:  # object stores: one PUT (or a completed multipart upload) appears whole or not at all
            fs, path = open_fs(final)
            fs.put_file(tmp, path)
        timings["write"] += time.perf_counter() - tw
        for acc in per_scene.values():
            acc["photo_err"] = round(acc["photo_err"], 4)
            acc["photo_err_shuffled"] = round(acc["photo_err_shuffled"], 4)
        stats = {"name": name, "split": entry["split"], "shard": shard_idx, "samples": n,
                 "planned": len(entry["pairs"]), "bytes": size, "sha256": digest,
                 "skipped_pairs": dict(skipped), "scenes": per_scene, "by_bucket": by_bucket,
                 "scenes_opened": len(ctx.opened),
                 "seconds": {k: round(v, 4) for k, v in sorted(timings.items())},
                 "total_seconds": round(time.perf_counter() - t0, 4),
                 "cpu_seconds": round(time.process_time() - c0, 4)}
        _write_text(stats_url_of(cfg.output, name), json.dumps(stats, indent=1, sort_keys=True))
        return {"ok": True, **stats}
    except Exception as e:
        return {"ok": False, "name": name, "error": one_line(f"{type(e).__name__}: {e}"),
                "trace": traceback.format_exc(limit=6)}
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- storage

def _write_text(url: str, text: str | None = None, obj: Any = None) -> None:
    """Write `text`, or `obj` as JSON, to url so that it appears whole or not at all: a hidden part
    file renamed (local) or uploaded in one PUT (object stores). JSON is streamed into the part file
    (the same bytes as json.dumps): a plan.json of 10,000 scenes (64 MB) took 380 MB of strings in
    memory when it was built whole first."""
    fs, path = open_fs(url)
    local = is_local(fs)
    folder = os.path.dirname(path) if local else tempfile.gettempdir()
    part = f"{folder}/.{os.path.basename(path)}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
    try:
        with open(part, "w", encoding="utf-8") as f:
            if text is not None:
                f.write(text)
            else:
                json.dump(obj, f, indent=1, sort_keys=True)
        if local:
            os.replace(part, path)
        else:
            fs.put_file(part, path)
            fs.invalidate_cache(path)
    finally:
        if os.path.exists(part):
            os.unlink(part)


def write_json(url: str, obj: Any) -> None:
    _write_text(url, obj=obj)


def list_names(folder: str) -> set[str]:
    """Base names of the files directly in a folder (local or s3://); empty when it is missing."""
    fs, path = fresh_fs(folder)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def read_many_json(urls: list[str]) -> dict[str, Any]:
    """{url: parsed JSON} of many small files in one batched read (concurrent on s3)."""
    if not urls:
        return {}
    fs, _ = fresh_fs(urls[0])
    paths = [open_fs(u)[1] for u in urls]
    raw = fs.cat(paths, on_error="return")
    out = {}
    for u, p in zip(urls, paths):
        v = raw.get(p)
        if isinstance(v, (bytes, bytearray)):
            try:
                out[u] = json.loads(bytes(v).decode("utf-8"))
            except ValueError:
                pass
    return out


def done_shards(cfg: JobConfig, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{shard name: stats} of planned shards already written (tar and stats.json both there).

    One listing of the output folder and one batched read of the stats files.
    """
    names = list_names(cfg.output)
    want = [e["name"] for e in plan["shards"]
            if e["name"] in names and os.path.basename(stats_url_of(cfg.output, e["name"])) in names]
    stats = read_many_json([stats_url_of(cfg.output, n) for n in want])
    return {n: stats[stats_url_of(cfg.output, n)] for n in want if stats_url_of(cfg.output, n) in stats}


def scene_verdict(scan: dict[str, Any] | None, agg: dict[str, Any] | None) -> str | None:
    """Why a scene is flagged (DESIGN §4 self-check), or None."""
    scan = scan or {}
    if not scan.get("ok", True):
        return "unreadable: " + str(scan.get("error"))
    tested = scan.get("tested") or 0
    # against the default window: a narrow --min/--max-overlap lowers "yield" on a correct scene
    y = scan.get("reference_yield", scan.get("yield"))
    if scan.get("usable", 2) < 2:
        return f"fewer than 2 usable frames ({scan.get('usable')} of {scan.get('frames')})"
    if tested >= MIN_TESTED_FOR_YIELD and y is not None and y < MIN_PAIR_YIELD:
        lo, hi = pairs.REFERENCE_OVERLAP
        return (f"pair yield collapsed (only {y:.0%} of {tested} candidates overlap by {lo:g}-{hi:g}): "
                f"wrong pose convention?")
    if agg and agg.get("ratios"):
        med = float(np.median(agg["ratios"]))
        if med > PHOTO_FLAG_RATIO:
            return (f"photometric self-check failed (median photo_err/shuffled {med:.2f} > {PHOTO_FLAG_RATIO}): "
                    f"wrong pose convention?")
    return None

