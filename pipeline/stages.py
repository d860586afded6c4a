"""The three stages of the shard job as plain functions (Ray wraps them in shard.py).

scan (per scene)  -> plan (driver, deterministic)  -> write (per shard)

Every function here is deterministic for its inputs and seed, returns a status dict
instead of raising for data problems, and touches storage only through fsspec, so
local paths and s3:// are one code path.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import tempfile
import time
import traceback
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import webdataset as wds

from data import geometry, pairs, shardformat
from data.scenes import FrameError, SceneError, open_scene
from data.scenes.base import open_fs, url_join

PLAN_VERSION = 1
# A scene whose pairs' mean photo_err is above this fraction of the shuffled figure
# looks like a wrong pose convention (DESIGN §4 self-check).
PHOTO_FLAG_RATIO = 0.5
# A scene where fewer than this fraction of tested candidates passes the overlap
# filter ("pair yield collapses") is flagged too.
MIN_PAIR_YIELD = 0.05


@dataclass
class JobConfig:
    """What determines the content of the shards (recorded in plan.json and the manifest)."""

    input: str
    format: str
    output: str
    pairs: pairs.PairConfig = field(default_factory=pairs.PairConfig)
    samples_per_shard: int = 64
    max_side: int = 640
    val_fraction: float = 0.1
    seed: int = 0
    depth_root: str | None = None

    def content_dict(self) -> dict[str, Any]:
        """The settings that decide shard bytes (a rerun must match them)."""
        d = asdict(self)
        d.pop("output")
        d["pairs"]["gap_buckets"] = list(self.pairs.gap_buckets)
        return d

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.content_dict(), sort_keys=True).encode()).hexdigest()[:16]


def scene_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the job seed and names (independent of Python's hash)."""
    h = hashlib.sha256(("|".join([str(seed)] + [str(p) for p in parts])).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def reader_options(cfg: JobConfig) -> dict[str, Any]:
    return {"depth_root": cfg.depth_root} if cfg.format == "nerfstudio" and cfg.depth_root else {}


# ----------------------------------------------------------------------------- scan

def scan_scene(url: str, cfg: JobConfig) -> dict[str, Any]:
    """Scan one scene: usable frames, broken frames by reason, candidate pairs.

    Returns a status dict: {"ok": bool, "scene", "url", "frames", "skipped": {reason: n},
    "skipped_frames": [[frame, reason], ...] (first 20), "pairs": [[ia, ib, ov_ab, ov_ba], ...],
    "tested", "passed", "yield", "median_depth", "metric_depth", "names": {index: name},
    "error" (when not ok), "seconds"}.
    """
    t0 = time.time()
    name = url.rstrip("/").split("/")[-1]
    try:
        scene = open_scene(url, cfg.format, **reader_options(cfg))
    except SceneError as e:
        return {"ok": False, "scene": name, "url": url, "error": str(e), "frames": 0, "skipped": {},
                "seconds": time.time() - t0}
    except Exception as e:  # unexpected: keep the job going, report it
        return {"ok": False, "scene": name, "url": url, "frames": 0, "skipped": {},
                "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5),
                "seconds": time.time() - t0}
    skipped = collections.Counter(reason for _, reason in scene.skipped)
    skipped_frames = [list(x) for x in scene.skipped[:20]]
    views: list[pairs.ScanView] = []
    medians = []
    for fr in scene.frames:
        try:
            _, depth = scene.load(fr)
        except FrameError as e:
            skipped[e.reason.split(" (")[0]] += 1
            if len(skipped_frames) < 20:
                skipped_frames.append([fr.name, e.reason])
            continue
        views.append(pairs.scan_view(fr.index, fr.name, depth, fr.K, fr.cam2world, cfg.pairs.scan_side))
        valid = depth[depth > 0]
        medians.append(float(np.median(valid)))
    n_total = len(scene.frames) + len(scene.skipped)
    out: dict[str, Any] = {"ok": True, "scene": scene.name, "url": url, "dataset": scene.dataset,
                           "frames": n_total, "usable": len(views), "skipped": dict(skipped),
                           "skipped_frames": skipped_frames, "metric_depth": scene.metric_depth,
                           "median_depth": float(np.median(medians)) if medians else None,
                           "names": {v.index: v.name for v in views}, "pairs": [], "tested": 0,
                           "passed": 0, "yield": None}
    if len(views) >= 2:
        abs_tol = geometry.visibility_tolerance(scene.metric_depth, out["median_depth"], cfg.pairs.abs_tol)
        rng = np.random.default_rng(scene_seed(cfg.seed, "scan", scene.name))
        res = pairs.candidate_pairs(views, cfg.pairs, rng, abs_tol=abs_tol)
        out["pairs"] = [[c.index_a, c.index_b, c.overlap_ab, c.overlap_ba] for c in res.pairs]
        out["tested"], out["passed"] = res.tested, res.passed
        out["yield"] = res.passed / res.tested if res.tested else None
        out["by_bucket"] = res.by_bucket
    out["seconds"] = time.time() - t0
    return out


# ----------------------------------------------------------------------------- plan

def split_of(scene: str, cfg: JobConfig, all_scenes: list[str]) -> str:
    """train/val by scene (never by pair), deterministic per seed."""
    if cfg.val_fraction <= 0:
        return "train"
    ranked = sorted(all_scenes, key=lambda s: scene_seed(cfg.seed, "split", s))
    n_val = int(round(cfg.val_fraction * len(all_scenes)))
    n_val = min(max(n_val, 1 if len(all_scenes) >= 2 else 0), len(all_scenes) - 1)
    return "val" if scene in set(ranked[:n_val]) else "train"


def make_plan(scans: list[dict[str, Any]], cfg: JobConfig) -> dict[str, Any]:
    """Deterministic global plan: split by scene, shuffle all pairs, cut into shards."""
    ok = sorted((s for s in scans if s.get("ok")), key=lambda s: s["scene"])
    names = [s["scene"] for s in ok]
    shards: list[dict[str, Any]] = []
    for split in ("train", "val"):
        items = []
        for s in ok:
            if split_of(s["scene"], cfg, names) != split:
                continue
            for ia, ib, ov_ab, ov_ba in s["pairs"]:
                items.append({"url": s["url"], "scene": s["scene"], "index_a": ia, "index_b": ib,
                              "overlap_ab": ov_ab, "overlap_ba": ov_ba,
                              "median_depth": s["median_depth"]})
        rng = np.random.default_rng(scene_seed(cfg.seed, "plan", split))
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        n = cfg.samples_per_shard
        for k in range(0, len(items), n):
            shards.append({"split": split, "shard": k // n, "name": shardformat.shard_name(split, k // n),
                           "pairs": items[k:k + n]})
    return {"plan_version": PLAN_VERSION, "format_version": shardformat.FORMAT_VERSION,
            "content_hash": cfg.content_hash(), "config": cfg.content_dict(),
            "scenes": {s["scene"]: split_of(s["scene"], cfg, names) for s in ok}, "shards": shards}


# ---------------------------------------------------------------------------- write

_SCENE_CACHE: "collections.OrderedDict[str, Any]" = collections.OrderedDict()


def _scene(url: str, cfg: JobConfig):
    """Scenes opened by this worker process, most recent 16 kept (metadata only)."""
    key = f"{cfg.format}|{url}"
    if key in _SCENE_CACHE:
        _SCENE_CACHE.move_to_end(key)
        return _SCENE_CACHE[key]
    sc = open_scene(url, cfg.format, **reader_options(cfg))
    _SCENE_CACHE[key] = sc
    while len(_SCENE_CACHE) > 16:
        _SCENE_CACHE.popitem(last=False)
    return sc


def render_pair(item: dict[str, Any], cfg: JobConfig, key: str, timings: dict[str, float]) -> dict[str, Any]:
    """Load, align, resize, match, self-check and encode one planned pair -> sample dict."""
    t = time.perf_counter()
    scene = _scene(item["url"], cfg)
    by_index = {f.index: f for f in scene.frames}
    fa, fb = by_index.get(item["index_a"]), by_index.get(item["index_b"])
    if fa is None or fb is None:
        raise FrameError(scene.name, str(item["index_a"] if fa is None else item["index_b"]), "frame vanished")
    rgb_a, depth_a = scene.load(fa)
    rgb_b, depth_b = scene.load(fb)
    t1 = time.perf_counter()
    timings["read"] += t1 - t
    va = _fit(rgb_a, depth_a, fa.K, cfg.max_side)
    vb = _fit(rgb_b, depth_b, fb.K, cfg.max_side)
    t2 = time.perf_counter()
    timings["resize"] += t2 - t1
    abs_tol = geometry.visibility_tolerance(scene.metric_depth, item.get("median_depth"), cfg.pairs.abs_tol)
    rng = np.random.default_rng(scene_seed(cfg.seed, "pair", key))
    corr = pairs.correspondences(va[1], va[2], fa.cam2world, vb[1], vb[2], fb.cam2world, rng,
                                 stride=cfg.pairs.stride, max_corr=cfg.pairs.max_corr,
                                 abs_tol=abs_tol, rel_tol=cfg.pairs.rel_tol)
    t3 = time.perf_counter()
    timings["corr"] += t3 - t2
    err, err_sh = pairs.photo_check(va[0], vb[0], corr, rng)
    t4 = time.perf_counter()
    timings["check"] += t4 - t3
    max_depth = float(max(va[1].max(), vb[1].max()))
    meta = {
        "version": shardformat.FORMAT_VERSION, "dataset": scene.dataset, "scene": scene.name,
        "frame_a": fa.name, "frame_b": fb.name, "index_a": fa.index, "index_b": fb.index,
        "gap": fb.index - fa.index, "K_a": va[2].tolist(), "K_b": vb[2].tolist(),
        "T_wa": fa.cam2world.tolist(), "T_wb": fb.cam2world.tolist(),
        "size_a": [va[0].shape[1], va[0].shape[0]], "size_b": [vb[0].shape[1], vb[0].shape[0]],
        "overlap_ab": item["overlap_ab"], "overlap_ba": item["overlap_ba"], "n_corr": int(len(corr)),
        "depth_scale": shardformat.depth_scale_for(max_depth, scene.metric_depth),
        "metric_depth": bool(scene.metric_depth),
        "photo_err": None if not np.isfinite(err) else round(err, 4),
        "photo_err_shuffled": None if not np.isfinite(err_sh) else round(err_sh, 4),
        "source": _public_url(item["url"]),
    }
    sample = shardformat.make_sample(key, va[0], va[1], vb[0], vb[1], corr, meta)
    timings["encode"] += time.perf_counter() - t4
    return sample


def _fit(rgb: np.ndarray, depth: np.ndarray, K: np.ndarray, max_side: int):
    from PIL import Image

    size = (rgb.shape[1], rgb.shape[0])
    if max(size) <= max_side:
        return rgb, depth, K
    new = geometry.fit_size(size, max_side)
    return (np.asarray(Image.fromarray(rgb).resize(new, Image.BICUBIC)),
            geometry.resize_depth_nearest(depth, new), geometry.resize_intrinsics(K, size, new))


def _public_url(url: str) -> str:
    """A URL without credentials (user:password@ is dropped)."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        proto, rest = url.split("://", 1)
        return proto + "://" + rest.split("@", 1)[1]
    return url


def write_shard(entry: dict[str, Any], cfg: JobConfig) -> dict[str, Any]:
    """Write one planned shard (tar, then its stats.json). Returns a status dict.

    The tar is written to a local temporary file and moved (local) or uploaded
    (s3://) under its final name only when whole; stats.json goes last and marks the
    shard done. Pairs whose frames turn out broken are skipped and counted.
    """
    t0 = time.perf_counter()
    name = entry["name"]
    final = url_join(cfg.output, name)
    stats_url = final[: -len(".tar")] + ".stats.json"
    timings = collections.defaultdict(float)
    per_scene: dict[str, list[float]] = {}
    skipped: collections.Counter = collections.Counter()
    n = 0
    shard_idx = int(entry["shard"])
    tmp = tempfile.NamedTemporaryFile(prefix=f".{name}.", suffix=".part", delete=False)
    try:
        with tmp:
            sink = wds.TarWriter(tmp, user="", group="", mtime=0, encoder=False)
            for i, item in enumerate(entry["pairs"]):
                key = shardformat.sample_key(shard_idx, i)
                try:
                    sample = render_pair(item, cfg, key, timings)
                except FrameError as e:
                    skipped[e.reason.split(" (")[0]] += 1
                    continue
                tw = time.perf_counter()
                sink.write(sample)
                timings["write"] += time.perf_counter() - tw
                n += 1
                meta = json.loads(sample["json"])
                acc = per_scene.setdefault(meta["scene"], [0, 0.0, 0.0])
                if meta["photo_err"] is not None:
                    acc[0] += 1
                    acc[1] += meta["photo_err"]
                    acc[2] += meta["photo_err_shuffled"]
            sink.close()
        tw = time.perf_counter()
        digest, size = _sha256_file(tmp.name)
        _publish(tmp.name, final)
        timings["write"] += time.perf_counter() - tw
        stats = {"name": name, "split": entry["split"], "shard": shard_idx, "samples": n, "bytes": size,
                 "sha256": digest, "skipped_pairs": dict(skipped), "scenes": per_scene,
                 "seconds": {k: round(v, 4) for k, v in timings.items()},
                 "total_seconds": round(time.perf_counter() - t0, 4)}
        _write_text(stats_url, json.dumps(stats, indent=1, sort_keys=True))
        return {"ok": True, **stats}
    except Exception as e:
        return {"ok": False, "name": name, "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=6)}
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)


def is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _publish(local: str, final: str) -> None:
    """Make a finished local file visible under its final name, atomically."""
    fs, path = open_fs(final)
    if is_local(fs):
        part = f"{path}.{uuid.uuid4().hex[:8]}.part"
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.put_file(local, part)
        os.replace(part, path)
    else:  # object stores: a single PUT is atomic (the object appears whole or not at all)
        fs.put_file(local, path)


def _write_text(url: str, text: str) -> None:
    fs, path = open_fs(url)
    if is_local(fs):
        part = f"{path}.{uuid.uuid4().hex[:8]}.part"
        with open(part, "w") as f:
            f.write(text)
        os.replace(part, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)


def read_json(url: str) -> Any | None:
    fs, path = open_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(url: str, obj: Any) -> None:
    _write_text(url, json.dumps(obj, indent=1, sort_keys=True))
