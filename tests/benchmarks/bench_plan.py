"""Cost of the shard job and of the trainer's bookkeeping at corpus scale (issue [2 of 12]). Run by
hand; prints tables. Not a test.

    python tests/benchmarks/bench_plan.py                       # every section (about 4 minutes on 2 cores)
    python tests/benchmarks/bench_plan.py --only plan,driver    # some of them

Sections:
  scan      the scan's read of one frame against a full load, nerfstudio layout at DL3DV's 960x540
            with an OPENCV lens (images ray-cast through it); then the whole scan_scene per frame and
            the write stage per clip on those frames, split into its per-frame part (read, resize,
            encode, tar) and its per-pair part (correspondences, self-check) by the write task's own
            timings (CPU seconds of this thread, best of --repeat)
  requests  HTTP requests a rerun's write task sends per shard (plan.json reused, no scan shells),
            counted at a moto S3 server on 127.0.0.1 (posed layout, 40 scenes: a shard of 32 mixes ~22); and
            the requests of one scene open per layout (posed, nerfstudio, scannet export)
  plan      make_plan on 1,000 and 10,000 synthetic scans (8 clips of 8 frames in windows of 48, 300
            frames a scene: the default flags; DL3DV-like scene keys; no rendering) and writing
            plan.json: CPU seconds (each size in a fresh process, median of --repeat), plan.json size,
            peak Python memory (tracemalloc)
  driver    pipeline.ray_tasks.run_tasks over 1,000 and 10,000 no-op Ray tasks, in-process Ray of 2
            CPUs: wall seconds, driver CPU seconds (median of --repeat), peak Python memory of the driver
  val       what reading a shard set's records costs per call, for 1,000 and 10,000 scenes:
            data.sources.recorded() (manifest.json and plan.json; the trainer used to call it at every
            validation, now never there) and data.stream.resolve_source (the manifest read: once a run
            to sort the val sets by kind, then once per validation by the val loader)
"""
from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # in-process Ray on loopback
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

SIZES = (1000, 10000)
DEFAULT_SIZES = ",".join(map(str, SIZES))
LENS = (-0.12, 0.02, 0.0, 0.0, 0.001, -0.0015)  # k1 k2 k3 k4 p1 p2, DL3DV-like barrel + tangential
clock = time.thread_time


def table(title: str, head: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def ratio(rows: dict[int, float], a: int | None = None, b: int | None = None) -> str:
    a, b = a or SIZES[0], b or SIZES[1]
    return f"{rows[b] / rows[a]:.1f}x" if rows[a] else "-"


# ------------------------------------------------------------------------------ scan

def bench_scan(a) -> None:
    import corpus_writers as cw
    from data.pairs import ClipConfig
    from data.scenes.base import Scene
    from data.scenes.nerfstudio import NerfstudioScene
    from pipeline import stages

    root = os.path.join(a.corpus, "nerfstudio960")
    if not os.path.exists(os.path.join(root, "dl3dv_960", "transforms.json")):
        print(f"[scan] rendering 6 frames of 960x540 through a lens into {root} (once)", flush=True)
        cw.write_nerfstudio_scene(root, "dl3dv_960", seed=11, n_frames=6, size=(960, 540), dist=LENS, step=0.05)
    url = os.path.join(root, "dl3dv_960")
    scene = NerfstudioScene(url)

    def best(fn) -> float:
        out = []
        for _ in range(a.repeat):
            t = clock()
            for fr in scene.frames:
                fn(fr)
            out.append((clock() - t) / len(scene.frames))
        return min(out)

    scene.load(scene.frames[0])  # the lens map is computed once per camera
    full = best(scene.load)
    before = best(lambda fr: scene._check_depth(fr, Scene._rgb_shape(scene, fr), scene._read_depth(fr)))
    now = best(scene.load_depth)
    # up to 3 clips of up to 3 frames (windows of 4 of the 6 frames; the co-visibility test decides how many):
    # frames shared by clips, loaded once a shard
    cfg = stages.JobConfig(input=root, format="nerfstudio", output=tempfile.mkdtemp(prefix="gasp-bench-"),
                           clips=ClipConfig(clip_frames=3, clip_window=4, clips_per_scene=3), samples_per_shard=64,
                           val_fraction=0.0)
    t = clock()
    res = stages.scan_scene(url, cfg)
    scan_s = (clock() - t) / len(scene.frames)
    shell = res.pop("shell")
    plan = stages.make_plan([res], cfg)
    entry = plan["shards"][0]
    writes = []
    for _ in range(a.repeat):
        t = clock()
        st = stages.write_shard(entry, cfg, {res["scene"]: shell})
        writes.append(clock() - t)
        assert st["ok"], st
    write_cpu = min(writes)
    # the task's CPU split by its own timings: per stored frame (read, resize, encode, tar) and per pair
    sec = st["seconds"]
    per_frame_s = sum(sec.get(k, 0.0) for k in ("read", "resize", "encode", "write"))
    per_pair_s = sum(sec.get(k, 0.0) for k in ("corr", "check"))
    share = per_frame_s / (per_frame_s + per_pair_s)
    n_frames = len({i for it in entry["clips"] for i in it["indices"]})
    sizes = "/".join(str(len(it["indices"])) for it in entry["clips"])
    frame_s, pair_s = write_cpu * share / n_frames, write_cpu * (1 - share) / max(st["pairs"], 1)
    table("scan read per frame, nerfstudio 960x540 with an OPENCV lens (CPU s/frame, best of "
          f"{a.repeat}; `python tests/benchmarks/bench_plan.py --only scan`)",
          ["read", "s / frame"],
          [["full load (RGB decoded and undistorted, depth): what the write stage reads", f"{full:.4f}"],
           ["scan read before: the same RGB read to learn its shape, then depth", f"{before:.4f}"],
           ["scan read now: PNG header + chunk CRCs, then depth", f"{now:.4f}"],
           ["whole scan_scene per frame (open, reads, overlap tests)", f"{scan_s:.4f}"],
           [f"write stage per clip (--max-side 640; {st['samples']} clips of {sizes} frames, {n_frames} frames stored "
            f"once each, {st['pairs']} pairs; {st['bytes'] / st['samples'] / 1e6:.2f} MB of shard a clip)",
            f"{write_cpu / st['samples']:.4f}"],
           [f"  of it per frame stored (read, resize, encode, tar: {share:.0%}; "
            f"{st['bytes'] / st['frames'] / 1e6:.3f} MB a frame in the tar)", f"{frame_s:.4f}"],
           ["  of it per pair (correspondences and self-check, --max-corr 4096)", f"{pair_s:.4f}"]])
    print(f"scan read now / before: {now / before:.3f} ({before / now:.1f}x less CPU)")


# -------------------------------------------------------------------------- requests

def bench_requests(a) -> None:
    import dataclasses

    import s3fs

    import corpus_writers as cw
    from conftest import write_tiny_corpus
    from data.pairs import ClipConfig
    from data.scenes import list_scenes, open_scene
    from pipeline import stages
    from test_scale import CountingS3

    work = tempfile.mkdtemp(prefix="gasp-bench-s3-")
    server = CountingS3(os.path.join(work, "moto.log"))
    try:
        os.environ.update(server.env)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = server.fs()
        fs.mkdir("gasp-bench")
        root = write_tiny_corpus(os.path.join(a.corpus, "posed40"), n_scenes=40, n_frames=10, width=80, height=60)
        fs.put(root + "/", "gasp-bench/posed/", recursive=True)
        cfg = stages.JobConfig(input="s3://gasp-bench/posed", format="posed", output="s3://gasp-bench/out",
                               clips=ClipConfig(clip_frames=4, clip_window=6, clips_per_scene=3),
                               samples_per_shard=32, max_side=80, val_fraction=0.0)
        scans = [stages.scan_scene(u, dataclasses.replace(cfg, input=root)) for u in list_scenes(root, "posed")]
        for s in scans:
            s.pop("shell", None)
        plan = stages.make_plan(scans, cfg)
        rows = []
        for e in plan["shards"]:
            stages.clear_scene_cache()  # each shard on a fresh worker (the worst case)
            s3fs.S3FileSystem.clear_instance_cache()
            server.mark()
            st = stages.write_shard(e, cfg, None)
            assert st["ok"], st
            reqs = server.requests()
            kinds = collections.Counter(
                "put" if m == "PUT" else "listing" if "list-type" in p else
                "metadata" if p.endswith(("/cameras.json", "/transforms.json")) else
                "head" if m == "HEAD" else "media" for m, p in reqs)
            frames = {(it["scene"], i) for it in e["clips"] for i in it["indices"]}
            rows.append([e["name"], len(e["clips"]), len({it["scene"] for it in e["clips"]}), kinds["metadata"],
                         sum(len(it["indices"]) for it in e["clips"]), len(frames), len(reqs), kinds["listing"],
                         kinds["head"], kinds["media"], kinds["put"]])
        table("HTTP requests per shard of a rerun (plan.json reused, no scan shells; posed layout, 40 scenes "
              "x 10 frames, 3 clips of 4 frames a scene, 32 a shard; moto_server request log; "
              "`python tests/benchmarks/bench_plan.py --only requests`)",
              ["shard", "clips", "scenes", "scene opens (cameras.json GETs)", "frames in clips", "frames read",
               "requests", "listings", "HEAD", "media GETs", "PUTs"], rows)

        opens = []  # what one scene open costs, per layout and frame count
        for fmt, n in (("posed", 10), ("nerfstudio", 4), ("nerfstudio", 8), ("scannet", 4), ("scannet", 8)):
            local = os.path.join(a.corpus, f"open-{fmt}-{n}")
            name = f"scene_{fmt}_{n}"
            if not os.path.exists(os.path.join(local, name)):
                if fmt == "nerfstudio":
                    cw.write_nerfstudio_scene(local, name, seed=3, n_frames=n, size=(64, 48))
                elif fmt == "scannet":
                    cw.write_scannet_scene(local, name, seed=3, n_frames=n, color_size=(64, 48),
                                           depth_size=(64, 48))
                else:
                    write_tiny_corpus(local, n_scenes=1, n_frames=n, width=64, height=48)
                    os.rename(os.path.join(local, "scene_0000"), os.path.join(local, name))
            fs.put(local + "/", f"gasp-bench/open-{fmt}-{n}/", recursive=True)
            s3fs.S3FileSystem.clear_instance_cache()
            server.mark()
            sc = open_scene(f"s3://gasp-bench/open-{fmt}-{n}/{name}", fmt)
            reqs = [r for r in server.requests() if name in r[1].replace("%2F", "/")]
            opens.append([fmt, len(sc.frames), len(reqs), collections.Counter(m for m, _ in reqs).most_common()])
        table("requests of one scene open on s3://, by layout", ["layout", "frames", "requests", "by method"], opens)
    finally:
        server.stop()


# ------------------------------------------------------------------------------ plan

CLIPS, K, WINDOW = 8, 8, 48  # the default flags: --clips-per-scene, --clip-frames, --clip-window


def synthetic_scans(n: int, frames: int = 300, seed: int = 0) -> list[dict]:
    """Scan results as scan_scene returns them, shell removed (no rendering): DL3DV-like keys; per scene
    CLIPS clips of K frames, each inside a window of WINDOW indices starting in its stratum of the scene,
    with a K x K overlap matrix rounded as the scan rounds it."""
    rng = np.random.default_rng(seed)
    strata = np.array_split(np.arange(frames - WINDOW + 1), CLIPS)
    out = []
    for i in range(n):
        key = f"{i // 1000 + 1}K/" + hashlib.sha256(str(i).encode()).hexdigest()
        clips = []
        for stratum in strata:
            start = int(rng.choice(stratum))
            rest = np.sort(rng.choice(np.arange(start + 1, start + WINDOW), K - 1, replace=False))
            ov = np.round(rng.uniform(0.3, 0.98, (K, K)), 4)
            np.fill_diagonal(ov, 1.0)
            clips.append({"indices": [start] + [int(x) for x in rest], "overlap": ov.tolist()})
        out.append({"ok": True, "scene": key, "name": key.rsplit("/", 1)[1], "dataset": "nerfstudio",
                    "frames": frames, "usable": frames - 2, "skipped": {"almost no valid depth": 2},
                    "skipped_frames": [["frame_00007", "almost no valid depth"],
                                       ["frame_00100", "almost no valid depth"]],
                    "clips": clips, "tested": 96, "passed": 56, "yield": 0.5833, "reference_yield": 0.85,
                    "short_clips": 0, "metric_depth": False, "median_depth": float(rng.uniform(1, 5)),
                    "frame_seconds": None, "seconds": 12.3})
    return out


def plan_child(n: int, memory: bool) -> dict:
    """One size in this (fresh) process: make_plan and write_json timed; with `memory`, again under
    tracemalloc for the peaks."""
    from data.pairs import ClipConfig
    from pipeline import stages

    scans = synthetic_scans(n)
    out = tempfile.mkdtemp(prefix="gasp-bench-plan-")
    path = os.path.join(out, "plan.json")
    cfg = stages.JobConfig(input="s3://bucket/dl3dv", format="nerfstudio", output=out,
                           clips=ClipConfig(clip_frames=K, clip_window=WINDOW, clips_per_scene=CLIPS))
    gc.collect()
    c0 = time.process_time()
    plan = stages.make_plan(scans, cfg)
    c1 = time.process_time()
    stages.write_json(path, plan)
    c2 = time.process_time()
    res = {"make_cpu": c1 - c0, "write_cpu": c2 - c1, "bytes": os.path.getsize(path),
           "clips": sum(len(e["clips"]) for e in plan["shards"]), "pairs": n * CLIPS * K * (K - 1) // 2}
    if memory:
        del plan
        gc.collect()
        tracemalloc.start()
        plan = stages.make_plan(scans, cfg)
        res["peak_make"] = tracemalloc.get_traced_memory()[1]
        stages.write_json(path, plan)
        res["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    os.unlink(path)
    os.rmdir(out)
    return res


def bench_plan(a) -> None:
    sizes = [int(x) for x in a.sizes.split(",")]
    runs: dict[int, list[dict]] = collections.defaultdict(list)
    for rep in range(a.repeat):
        for n in sizes:
            p = subprocess.run([sys.executable, __file__, "--child-plan", str(n)] + (["--memory"] if rep == 0 else []),
                               capture_output=True, text=True, check=True)
            runs[n].append(json.loads(p.stdout.strip().splitlines()[-1]))
    res = {}
    for n, rs in runs.items():  # medians: a best-of favours the short runs on a busy machine
        res[n] = {**rs[0], **{k: float(np.median([r[k] for r in rs])) for k in ("make_cpu", "write_cpu")}}
        res[n]["plan_cpu"] = float(np.median([r["make_cpu"] + r["write_cpu"] for r in rs]))
    rows = []
    for n in sizes:
        r = res[n]
        rows.append([f"{n:,}", f"{r['clips']:,}", f"{r['pairs']:,}", f"{r['make_cpu']:.3f}", f"{r['write_cpu']:.3f}",
                     f"{r['plan_cpu']:.3f}", f"{r['bytes'] / 1e6:.1f}", f"{r['peak_make'] / 1e6:.0f}",
                     f"{r['peak'] / 1e6:.0f}"])
    keys = ("make_cpu", "write_cpu", "plan_cpu", "bytes", "peak_make", "peak")
    for lo, hi in zip(sizes, sizes[1:]):
        rows.append([f"ratio {hi:,} / {lo:,}", f"{hi / lo:g}x", f"{hi / lo:g}x"]
                    + [ratio({n: res[n][k] for n in sizes}, lo, hi) for k in keys])
    flags = "" if a.sizes == DEFAULT_SIZES else " --sizes " + a.sizes
    table(f"plan: make_plan + plan.json (CPU s, each size in a fresh process, median of {a.repeat}; "
          f"`python tests/benchmarks/bench_plan.py --only plan{flags}`)",
          ["scenes", "clips", "pairs", "make_plan s", "write plan.json s", "plan stage s", "plan.json MB",
           "peak MB (make_plan)", "peak MB (+ write)"], rows)


# ---------------------------------------------------------------------------- driver

def _noop(i: int) -> dict:
    return {"ok": True, "name": str(i)}


def bench_driver(a) -> None:
    import ray

    from data.progress import Progress
    from pipeline import ray_tasks

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)
    try:
        ray_tasks.run_tasks(_noop, list(range(200)), lambda i: (i,), Progress("warm", 200, "t", True),
                            0, label=str, name="noop")  # workers started
        walls: dict[int, list[float]] = collections.defaultdict(list)
        cpus: dict[int, list[float]] = collections.defaultdict(list)
        peak: dict[int, float] = {}
        for _ in range(a.repeat):
            for n in SIZES:
                gc.collect()
                t, c = time.perf_counter(), time.process_time()
                out = ray_tasks.run_tasks(_noop, list(range(n)), lambda i: (i,),
                                          Progress("noop", n, "tasks", True), 0, label=str, name="noop")
                walls[n].append(time.perf_counter() - t)
                cpus[n].append(time.process_time() - c)
                assert len(out) == n and all(r["ok"] for _, r, _ in out)
        # medians: Ray's own threads make single runs noisy, and a best-of favours the short runs
        wall = {n: float(np.median(v)) for n, v in walls.items()}
        cpu = {n: float(np.median(v)) for n, v in cpus.items()}
        for n in SIZES:
            gc.collect()
            tracemalloc.start()
            ray_tasks.run_tasks(_noop, list(range(n)), lambda i: (i,), Progress("noop", n, "tasks", True),
                                0, label=str, name="noop")
            peak[n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        ray.shutdown()
    rows = [[f"{n:,}", f"{wall[n]:.2f}", f"{cpu[n]:.2f}", f"{peak[n] / 1e6:.1f}"] for n in SIZES]
    rows.append(["ratio", ratio(wall), ratio(cpu), ratio(peak)])
    table(f"driver: run_tasks over no-op tasks, in-process Ray of 2 CPUs (median of {a.repeat}; "
          "`python tests/benchmarks/bench_plan.py --only driver`)",
          ["tasks", "wall s", "driver CPU s", "driver peak MB (Python)"], rows)


# ------------------------------------------------------------------------------- val

def bench_val(a) -> None:
    from data.pairs import ClipConfig
    from data.sources import recorded
    from data.stream import resolve_source
    from pipeline import shard, stages

    rows = []
    for n in SIZES:
        out = tempfile.mkdtemp(prefix="gasp-bench-val-")
        cfg = stages.JobConfig(input="s3://bucket/dl3dv", format="nerfstudio", output=out,
                               clips=ClipConfig(clip_frames=K, clip_window=WINDOW, clips_per_scene=CLIPS))
        plan = stages.make_plan(synthetic_scans(n), cfg)
        stats = {}
        npair = K * (K - 1) // 2
        for e in plan["shards"]:  # what write_shard's stats.json holds (the self-check ratios of every pair)
            per_scene = collections.Counter(it["scene"] for it in e["clips"])
            dts = collections.Counter(str(it["indices"][j] - it["indices"][i]) for it in e["clips"]
                                      for i in range(K) for j in range(i + 1, K))
            stats[e["name"]] = {"name": e["name"], "split": e["split"], "samples": len(e["clips"]),
                                "pairs": npair * len(e["clips"]), "frames": K * len(e["clips"]), "bytes": 10 ** 7,
                                "sha256": hashlib.sha256(e["name"].encode()).hexdigest(), "skipped_clips": {},
                                "dt_histogram": {"nerfstudio": dict(dts)},
                                "scenes": {k: {"clips": v, "pairs": npair * v, "checked": npair * v,
                                               "photo_err": 5.0 * npair * v, "photo_err_shuffled": 40.0 * npair * v,
                                               "ratios": [0.125] * (npair * v)}
                                           for k, v in per_scene.items()}}
        stages.write_json(os.path.join(out, "plan.json"), plan)
        stages.write_json(os.path.join(out, "manifest.json"), shard.build_manifest(plan, stats, cfg, None))
        del plan, stats
        t_rec, t_src = [], []
        for _ in range(a.repeat):
            t = time.perf_counter()
            assert recorded(out).clip_frames == K
            t_rec.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert resolve_source(out, "val").urls
            t_src.append(time.perf_counter() - t)
        rows.append([f"{n:,}", f"{os.path.getsize(os.path.join(out, 'plan.json')) / 1e6:.1f}",
                     f"{os.path.getsize(os.path.join(out, 'manifest.json')) / 1e6:.1f}", f"{min(t_rec):.3f}",
                     f"{min(t_src):.3f}"])
        for f in ("plan.json", "manifest.json"):
            os.unlink(os.path.join(out, f))
        os.rmdir(out)
    table(f"validation: reading the val set's records per call (wall s, best of {a.repeat}; "
          "`python tests/benchmarks/bench_plan.py --only val`)",
          ["scenes", "plan.json MB", "manifest.json MB", "recorded() (was: every validation; now: never there)",
           "resolve_source (the kinds: once a run; the val loader: every validation)"], rows)


SECTIONS = {"scan": bench_scan, "requests": bench_requests, "plan": bench_plan, "driver": bench_driver,
            "val": bench_val}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="plan section only: scene counts, comma-separated")
    ap.add_argument("--corpus", default=os.path.join(tempfile.gettempdir(), "gasp-bench-plan"),
                    help="where the rendered scenes are cached")
    ap.add_argument("--child-plan", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_plan:
        print(json.dumps(plan_child(a.child_plan, a.memory)))
        return 0
    unknown = set(a.only.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    for name in a.only.split(","):
        t = time.time()
        SECTIONS[name](a)
        print(f"[{name}] {time.time() - t:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
