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
from data.cli import one_line  # noqa: F401  (used as stages.one_line)
from data.seeds import derive_seed
from data.storage import fresh_fs, is_local, open_fs, public_url, read_bytes, read_json, url_join  # noqa: F401

PLAN_VERSION = 4  # 3: plan.json records its inputs (scene list, reader version); 4: clips (shard format 2)
# Self-check (DESIGN §4). A pair fails when photo_err > PHOTO_FLAG_RATIO * photo_err_shuffled;
# a scene is flagged when the median of its pairs' ratios is above it.
PHOTO_FLAG_RATIO = 0.5
PHOTO_FLAG_SHARE = 0.25  # ... or when more than this share of its pairs fail (with at least MIN_PAIRS_FOR_SHARE)
MIN_PAIRS_FOR_SHARE = 8
# A scene whose candidate pairs mostly fail the overlap filter ("pair yield collapses")
# is flagged too: with wrong pose conventions only near-duplicate frames still overlap.
# Correct synthetic scenes yield ~0.9; world2cam-as-cam2world or OpenGL axes ~0.1.
MIN_PAIR_YIELD = 0.25
MIN_TESTED_FOR_YIELD = 8  # fewer tested candidates say nothing about the yield
# Test-only fault injection: seconds each write task sleeps per clip (lets tests kill
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
    clips: pairs.ClipConfig = field(default_factory=pairs.ClipConfig)
    """Clip sampling and correspondences."""
    samples_per_shard: int = 64
    """Clips per tar shard."""
    max_side: int = 640
    """Longer side of stored views in pixels (never upscaled)."""
    val_fraction: float = 0.1
    """Fraction of scenes in the val split (split by scene)."""
    test_fraction: float = 0.0
    """Fraction of scenes in the test split (split by scene)."""
    seed: int = 0
    """Seed of clip sampling, split, shuffle and correspondence jitter."""
    depth_root: str | None = None
    """nerfstudio only: folder of per-scene depth maps."""
    excluded: tuple[str, ...] = ()
    """Scene ids dropped before planning (--exclude-scenes), sorted."""

    def content_dict(self) -> dict[str, Any]:
        """The settings that decide shard bytes (a rerun must match them); no credentials."""
        d = asdict(self)
        d.pop("output")
        d["input"] = public_url(self.input)
        d["depth_root"] = public_url(self.depth_root) if self.depth_root else None
        d["excluded"] = list(self.excluded)
        return d

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.content_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def scene_url(self, key: str) -> str:
        return url_join(self.input, key)


def reader_version(format: str) -> int:
    """Version of a corpus reader (`Scene.reader_version`; bumped when what it reads changes)."""
    from data.scenes import _resolve

    return int(getattr(_resolve(format)[0], "reader_version", 1))


def inputs_record(scene_keys: list[str], format: str) -> dict[str, Any]:
    """What a plan was made from besides the arguments: the scene list and the reader version."""
    keys = sorted(scene_keys)
    return {"scenes": len(keys), "scenes_sha256": hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16],
            "reader": f"{format}/{reader_version(format)}"}


def reader_options(cfg: JobConfig) -> dict[str, Any]:
    return {"depth_root": cfg.depth_root} if cfg.format == "nerfstudio" and cfg.depth_root else {}


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
    """Scan one scene: usable frames, broken frames by reason, candidate clips.

    Returns a status dict: {"ok": bool, "scene" (key), "name", "dataset", "frames",
    "usable", "skipped": {reason: n}, "skipped_frames": [[frame, reason], ...] (first 20),
    "clips": [{"indices": [...], "overlap": K x K}, ...], "tested", "passed", "yield",
    "reference_yield" (the share of tested candidates inside the default overlap window,
    pairs.REFERENCE_OVERLAP), "short_clips", "median_depth", "metric_depth", "frame_seconds"
    (seconds between consecutive frame indices, when the reader knows), "error" (when not ok),
    "seconds", "shell" (a `scene_shell` of the clips' frames; the driver keeps it out of plan.json)}.
    """
    t0 = time.time()
    key = scene_key(url, cfg.input)
    base = {"scene": key, "name": key.rsplit("/", 1)[-1], "frames": 0, "usable": 0, "skipped": {},
            "clips": [], "tested": 0, "passed": 0, "yield": None}
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
        views.append(pairs.scan_view(fr.index, fr.name, depth, fr.K, fr.cam2world, cfg.clips.scan_side))
        medians.append(float(np.median(depth[depth > 0])))
    n_total = len(scene.frames) + len(scene.skipped)
    out: dict[str, Any] = {**base, "ok": True, "name": scene.name, "dataset": scene.dataset,
                           "frames": n_total, "usable": len(views), "skipped": dict(skipped),
                           "skipped_frames": skipped_frames, "metric_depth": bool(scene.metric_depth),
                           "median_depth": float(np.median(medians)) if medians else None,
                           "frame_seconds": scene.frame_seconds(), "short_clips": 0}
    if len(views) >= 2:
        abs_tol = geometry.visibility_tolerance(scene.metric_depth, out["median_depth"], cfg.clips.abs_tol)
        rng = np.random.default_rng(derive_seed(cfg.seed, "scan", key))
        res = pairs.candidate_clips(views, cfg.clips, rng, abs_tol=abs_tol)
        out["clips"] = [{"indices": c.indices, "overlap": c.overlap} for c in res.clips]
        out["tested"], out["passed"], out["short_clips"] = res.tested, res.passed, res.short_clips
        out["yield"] = round(res.passed / res.tested, 4) if res.tested else None
        out["reference_yield"] = round(res.reference_passed / res.tested, 4) if res.tested else None
    used = {i for c in out["clips"] for i in c["indices"]}
    out["shell"] = scene_shell(scene, used) if used else None
    out["seconds"] = round(time.time() - t0, 3)
    return out


SCAN_SUMMARY_KEYS = ("ok", "name", "dataset", "frames", "usable", "skipped", "skipped_frames", "tested",
                     "passed", "yield", "reference_yield", "short_clips", "error", "metric_depth", "median_depth",
                     "frame_seconds")


# ----------------------------------------------------------------------------- plan

SPLITS = ("train", "val", "test")


def split_names(names: list[str], seed: int, val_fraction: float, test_fraction: float = 0.0) -> dict[str, str]:
    """{name: "train" | "val" | "test"}, deterministic per seed: round(fraction * n) names each (at least
    1 when its fraction is set and n allows; at least one name stays train). Scenes (here) and media
    units (pipeline/instruct.py) are split this way, never clips or records."""
    names = sorted(set(names))
    ranked = sorted(names, key=lambda s: derive_seed(seed, "split", s))
    out = {s: "train" for s in names}
    room = len(names) - 1
    at = 0
    for which, frac in (("val", val_fraction), ("test", test_fraction)):
        if frac <= 0 or room <= 0:
            continue
        n = min(max(int(round(frac * len(names))), 1), room)
        for s in ranked[at:at + n]:
            out[s] = which
        at, room = at + n, room - n
    return out


def split_scenes(cfg: JobConfig, all_scenes: list[str]) -> dict[str, str]:
    """{scene: "train" | "val" | "test"} by scene (never by clip): `split_names` with the job's fractions."""
    return split_names(all_scenes, cfg.seed, cfg.val_fraction, cfg.test_fraction)


def make_plan(scans: list[dict[str, Any]], cfg: JobConfig) -> dict[str, Any]:
    """Deterministic global plan: split by scene, shuffle all clips of a split, cut into shards.

    Each shard mixes many scenes. The plan also keeps each scene's scan summary (frames,
    skipped frames by reason, clip yield) for the manifest of this and later runs. Every clip
    is built once, in scene order, then placed by a seeded permutation of the split's clips.
    """
    scans = sorted(scans, key=lambda s: s["scene"])
    ok = [s for s in scans if s.get("ok")]
    split = split_scenes(cfg, [s["scene"] for s in ok])
    shards: list[dict[str, Any]] = []
    n = cfg.samples_per_shard
    for which in SPLITS:
        members = [s for s in ok if split[s["scene"]] == which]
        # built in scene order (a sequential read of the scans), then permuted as references: reading the
        # scans in the permuted order missed the CPU caches at 10,000 scenes (make_plan 13x the 1,000's)
        built = [{"scene": s["scene"], "indices": [int(i) for i in c["indices"]], "overlap": c["overlap"],
                  "median_depth": s["median_depth"]} for s in members for c in s["clips"]]
        order = np.random.default_rng(derive_seed(cfg.seed, "plan", which)).permutation(len(built))
        items = [built[k] for k in order.tolist()]
        del built
        for k in range(0, len(items), n):
            shards.append({"split": which, "shard": k // n, "name": shardformat.shard_name(which, k // n),
                           "clips": items[k:k + n]})
    return {"plan_version": PLAN_VERSION, "kind": "clips", "format_version": shardformat.FORMAT_VERSION,
            "content_hash": cfg.content_hash(), "config": cfg.content_dict(), "scenes": split,
            "inputs": inputs_record([s["scene"] for s in scans], cfg.format),
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
    objects: np.ndarray | None = None  # (H, W) uint16 object ids at the stored size, where the scene has them
    objects_png: bytes | None = None


def quantize_depth(depth: np.ndarray, depth_scale: float) -> np.ndarray:
    """Depth exactly as a reader decodes the stored uint16 PNG (shardformat.decode_depth_png).

    float32 (H, W) -> float32 (H, W). Correspondences are computed on this, so every
    stored row passes the visibility test against the STORED depth.
    """
    return shardformat.quantize_depth(depth, depth_scale).astype(np.float32) / np.float32(depth_scale)


class ShardContext:
    """What one write task shares between its clips: scenes, and views used by several clips.

    Each scene the shard touches is opened at most once per task (or comes from the scan's
    shell) and is kept as a shell of the frames this shard needs; a frame used by k clips of the
    shard is read, aligned, resized and encoded once and dropped after its last use (so memory
    stays at the views still needed).
    """

    def __init__(self, cfg: JobConfig, entry: dict[str, Any], shells: dict[str, Scene] | None,
                 timings: dict[str, float]):
        self.cfg, self.shells, self.timings = cfg, shells or {}, timings
        self.uses = collections.Counter()
        self.needed: dict[str, set[int]] = collections.defaultdict(set)  # scene -> frame indices of this shard
        for it in entry["clips"]:
            for index in it["indices"]:
                self.uses[(it["scene"], int(index))] += 1
                self.needed[it["scene"]].add(int(index))
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
            objects = scene.load_objects(fr, rgb.shape[:2])
        except FrameError as e:
            return e
        t1 = time.perf_counter()
        self.timings["read"] += t1 - t
        rgb, depth, K = fit_view(rgb, depth, fr.K, self.cfg.max_side)
        if objects is not None and objects.shape != depth.shape:  # ids resize as depth does: nearest-exact
            objects = geometry.resize_depth_nearest(objects, (depth.shape[1], depth.shape[0]))
        self.timings["resize"] += time.perf_counter() - t1
        return View(rgb, depth, K, fr, objects=objects)


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


def render_clip(item: dict[str, Any], cfg: JobConfig, key: str, timings: dict[str, float],
                ctx: ShardContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load, align, resize, match every pair i < j, self-check and encode one planned clip.

    Each frame is loaded once for all its pairs (and for all the clips of the shard that use
    it). Returns (sample dict of bytes for webdataset's TarWriter, its metadata). Raises
    FrameError when a frame turns out broken (the clip is skipped and counted).
    """
    scene, _ = ctx.scene(item["scene"])
    views, errors = [], []
    for index in item["indices"]:  # every frame, so that use counts stay right
        try:
            views.append(ctx.view(item["scene"], int(index)))
        except FrameError as e:
            errors.append(e)
    if errors:
        raise errors[0]
    max_depth = float(max(v.depth.max() for v in views))
    scale = shardformat.depth_scale_for(max_depth, scene.metric_depth)
    enc = [_encoded(v, scale, timings) for v in views]
    abs_tol = geometry.visibility_tolerance(scene.metric_depth, item.get("median_depth"), cfg.clips.abs_tol)
    cap = cfg.clips.corr_per_pair(len(views))
    rows, n_corr, errs, errs_sh = [], [], [], []
    for i, j in shardformat.clip_pairs(len(views)):
        t2 = time.perf_counter()
        rng = np.random.default_rng(derive_seed(cfg.seed, "pair", key, i, j))  # pair (i, j)'s jitter and self-check
        corr = pairs.correspondences(enc[i][1], views[i].K, views[i].frame.cam2world, enc[j][1], views[j].K,
                                     views[j].frame.cam2world, rng, stride=cfg.clips.stride, max_corr=cap,
                                     abs_tol=abs_tol, rel_tol=cfg.clips.rel_tol)
        t3 = time.perf_counter()
        timings["corr"] += t3 - t2
        err, err_sh = pairs.photo_check(views[i].rgb, views[j].rgb, corr, rng)
        timings["check"] += time.perf_counter() - t3
        ij = np.tile(np.array([[i, j]], dtype=np.float32), (len(corr), 1))
        rows.append(np.concatenate([ij, corr], axis=1))
        n_corr.append(int(len(corr)))
        errs.append(None if not np.isfinite(err) else round(err, 4))
        errs_sh.append(None if not np.isfinite(err_sh) else round(err_sh, 4))
    t4 = time.perf_counter()
    meta = {
        "version": shardformat.FORMAT_VERSION, "kind": "clip", "dataset": scene.dataset, "scene": scene.name,
        "frames": [v.frame.name for v in views], "indices": [int(v.frame.index) for v in views],
        "K": [v.K.tolist() for v in views],
        "T_w": [np.asarray(v.frame.cam2world, dtype=np.float64).tolist() for v in views],
        "sizes": [[int(v.rgb.shape[1]), int(v.rgb.shape[0])] for v in views],
        "overlap": item["overlap"], "pairs": [list(p) for p in shardformat.clip_pairs(len(views))],
        "n_corr": n_corr, "depth_scale": scale, "metric_depth": bool(scene.metric_depth),
        "photo_err": errs, "photo_err_shuffled": errs_sh, "source": public_url(cfg.scene_url(item["scene"])),
    }
    objects = None
    if scene.object_groups is not None and all(v.objects is not None for v in views):
        for v in views:
            if v.objects_png is None:
                v.objects_png = shardformat.encode_objects_png(v.objects)
        objects = [v.objects_png for v in views]
        meta["objects"], meta["object_groups"] = True, [list(g) for g in scene.object_groups]
    corr = np.concatenate(rows, axis=0) if rows else np.zeros((0, 6), np.float32)
    sample = shardformat.make_clip_sample(key, [v.rgb for v in views], [v.depth for v in views], corr, meta,
                                          jpgs=[e[0] for e in enc], pngs=[e[2] for e in enc], objects=objects)
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
    last and marks the shard done. Clips whose frames turn out broken are skipped and
    counted. `shells` ({scene key: scene_shell}) spare re-opening scenes.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    name = entry["name"]
    timings: dict[str, float] = collections.defaultdict(float)
    per_scene: dict[str, dict[str, Any]] = {}
    skipped: collections.Counter = collections.Counter()
    dt_hist: dict[str, collections.Counter] = {}
    counts = {"samples": 0, "pairs": 0, "frames": 0}
    shard_idx = int(entry["shard"])
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0.0)
    ctx = ShardContext(cfg, entry, shells, timings)

    def samples():
        for i, item in enumerate(entry["clips"]):
            if delay:
                time.sleep(delay)
            key = shardformat.sample_key(shard_idx, i)
            try:
                sample, meta = render_clip(item, cfg, key, timings, ctx)
            except FrameError as e:
                skipped[reason_of(e)] += 1
                continue
            counts["samples"] += 1
            counts["pairs"] += len(meta["pairs"])
            counts["frames"] += len(meta["frames"])
            hist = dt_hist.setdefault(str(meta["dataset"]), collections.Counter())
            ix = meta["indices"]
            hist.update(str(ix[j] - ix[i]) for i, j in meta["pairs"])
            acc = per_scene.setdefault(item["scene"], {"clips": 0, "pairs": 0, "checked": 0, "photo_err": 0.0,
                                                       "photo_err_shuffled": 0.0, "ratios": []})
            acc["clips"] += 1
            acc["pairs"] += len(meta["pairs"])
            for err, err_sh in zip(meta["photo_err"], meta["photo_err_shuffled"]):
                if err is not None and err_sh:
                    acc["checked"] += 1
                    acc["photo_err"] += err
                    acc["photo_err_shuffled"] += err_sh
                    acc["ratios"].append(round(err / err_sh, 4))
            yield sample

    try:
        digest, size = publish_tar(cfg.output, name, samples(), timings)
        for acc in per_scene.values():
            acc["photo_err"] = round(acc["photo_err"], 4)
            acc["photo_err_shuffled"] = round(acc["photo_err_shuffled"], 4)
        stats = {"name": name, "split": entry["split"], "shard": shard_idx, **counts,
                 "planned": len(entry["clips"]), "bytes": size, "sha256": digest,
                 "skipped_clips": dict(skipped), "scenes": per_scene,
                 "dt_histogram": {ds: dict(sorted(h.items(), key=lambda kv: int(kv[0]))) for ds, h in dt_hist.items()},
                 "scenes_opened": len(ctx.opened),
                 "seconds": {k: round(v, 4) for k, v in sorted(timings.items())},
                 "total_seconds": round(time.perf_counter() - t0, 4),
                 "cpu_seconds": round(time.process_time() - c0, 4)}
        _write_text(stats_url_of(cfg.output, name), json.dumps(stats, indent=1, sort_keys=True))
        return {"ok": True, **stats}
    except Exception as e:
        return {"ok": False, "name": name, "error": one_line(f"{type(e).__name__}: {e}"),
                "trace": traceback.format_exc(limit=6)}


def publish_tar(output: str, name: str, samples, timings: dict[str, float] | None = None) -> tuple[str, int]:
    """Write the samples (dicts of bytes) as tar `name` of `output`, published only when whole.

    Assembled under a hidden temporary name (`.NAME.<random>.part`, in the output folder when it
    is local, else in a local temp folder of this output), fsynced, then renamed (local) or
    uploaded in one PUT (object stores): a shard appears whole or not at all. Tar members carry
    mtime 0, uid/gid 0 and the writer's sorted order, so equal samples give equal bytes.
    Returns (sha256, bytes). Shared by the clip and the instruction shard jobs.
    """
    import webdataset as wds

    timings = timings if timings is not None else collections.defaultdict(float)
    final = url_join(output, name)
    folder, local = part_dir(output)
    remove_stale_parts(folder, name)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}{PART_SUFFIX}")
    try:
        with open(tmp, "wb") as raw:
            out = _HashingWriter(raw)
            sink = wds.TarWriter(out, user="", group="", mtime=0, encoder=False)
            it = iter(samples)
            while True:
                try:
                    sample = next(it)
                except StopIteration:
                    break
                tw = time.perf_counter()
                sink.write(sample)
                timings["write"] = timings.get("write", 0.0) + time.perf_counter() - tw
            tw = time.perf_counter()
            sink.close()
            raw.flush()
            os.fsync(raw.fileno())
        if local:
            os.replace(tmp, open_fs(final)[1])
        else:  # object stores: one PUT (or a completed multipart upload) appears whole or not at all
            fs, path = open_fs(final)
            fs.put_file(tmp, path)
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - tw
        return out.sha.hexdigest(), out.size
    finally:
        if os.path.exists(tmp):
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
        lo = pairs.REFERENCE_OVERLAP[0]
        return (f"clip yield collapsed (only {y:.0%} of {tested} candidate frames overlap a clip's frames by "
                f"{lo:g}): wrong pose convention?")
    if agg and agg.get("ratios"):
        ratios = np.asarray(agg["ratios"], dtype=np.float64)
        med = float(np.median(ratios))
        failing = float((ratios > PHOTO_FLAG_RATIO).mean())
        if med > PHOTO_FLAG_RATIO:
            return (f"photometric self-check failed (median photo_err/shuffled {med:.2f} > {PHOTO_FLAG_RATIO}): "
                    f"wrong pose convention?")
        # clips hold many small frame distances, where a wrong convention barely shows: a quarter of the
        # pairs failing is as telling (correct scenes keep every pair well below the ratio)
        if len(ratios) >= MIN_PAIRS_FOR_SHARE and failing > PHOTO_FLAG_SHARE:
            return (f"photometric self-check failed on {failing:.0%} of {len(ratios)} pairs (photo_err/shuffled > "
                    f"{PHOTO_FLAG_RATIO}; at most {PHOTO_FLAG_SHARE:.0%} allowed): wrong pose convention?")
    return None

