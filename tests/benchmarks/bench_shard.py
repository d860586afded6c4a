"""Speed of the shard job's write path, per clip (issues 4 and 26): run by hand, prints a table. Not a test.

    python tests/benchmarks/bench_shard.py                    # scannet layout, 8-frame clips, 640x480 output
    python tests/benchmarks/bench_shard.py --align pil        # with the proposed PIL colour alignment
    python tests/benchmarks/bench_shard.py --clip-frames 2    # pairs (what the pair pipeline measured)

Corpus: ScanNet SensReader layout from tests/corpus_writers.write_scannet_scene (colour
1296x968, depth 640x480, different K), rendered once and cached under --corpus.
Output: 640x480 views (--max-side 640: the depth grid, no resize). Clips: --clip-frames K
(default 8) in a --clip-window (default 48) as the shard job samples them; only clips of the
full K frames are timed (short clips are counted and left out), so "per clip" means K frames
and K (K - 1) / 2 supervised pairs.

Table, seconds per clip (CPU time of this thread, so other load on the machine does not
inflate it; best of --repeat passes, in this process, no Ray; BLAS/OpenMP pinned to 1 thread):
  read+decode   read colour JPEG + depth PNG bytes, decode both (x K frames): the JPEG into the
                decoder's PIL image (what the ScanNet reader warps), the PNG into an array
  align+resize  colour onto the depth grid (data.geometry.align_color_to_depth), fit to --max-side (x K)
  corr          quantise depth as stored (x K), correspondences of every pair i < j (data.pairs.correspondences)
  self-check    photo_err / photo_err_shuffled of every pair (data.pairs.photo_check)
  encode        K JPEG + K 16-bit PNG + corr.npy + json (shardformat.make_clip_sample)
  write         webdataset TarWriter into a local file
  codec floor   read+decode plus the JPEG and PNG encodes alone, of the same K frames
  end to end    pipeline.stages.write_shard (the real write task) on shards in which no frame
                repeats (the case at scale: a shard mixes many scenes, each frame loaded once per
                clip), and on the plan as made (clips of a scene share frames within a shard)
Then correspondence time per supervised pair (the corr stage over the clip's pairs, and the real
write task's own corr timer), and clips/s (wall clock) of the write stage through Ray with 1 and 2
workers (warm workers, same shards): this one needs idle cores, so the load average is printed
beside it.
Goals: end to end <= 1.3x codec floor per 8-frame clip (pairs were 1.5x, measured 1.36x); 2 workers >= 1.8x one.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # what Ray gives its workers; numpy imports below
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

clock = time.thread_time


# ----------------------------------------------------------------------- proposal

def align_color_to_depth_pil(rgb, K_color, K_depth, depth_size, depth=None, depth_to_color=None):
    """Proposed fast path of data.geometry.align_color_to_depth (shared camera centre).

    The homography warp in C (PIL's PERSPECTIVE transform, bilinear). PIL puts pixel i on
    [i, i + 1), our convention (DESIGN §3) on [i - 0.5, i + 0.5): conjugate by a half-pixel
    shift. Agrees with the numpy reference within 1 grey level. Differing extrinsics keep
    the numpy path (alignment through depth).
    """
    from PIL import Image

    if depth_to_color is not None:
        return _ORIGINAL_ALIGN(rgb, K_color, K_depth, depth_size, depth=depth, depth_to_color=depth_to_color)
    Hinv = K_color @ np.linalg.inv(K_depth)  # depth pixel -> colour pixel (our centres)
    S = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])  # ours -> PIL's coordinates
    M = S @ Hinv @ np.linalg.inv(S)
    M = M / M[2, 2]
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    return np.asarray(img.transform(tuple(depth_size), Image.Transform.PERSPECTIVE,
                                    tuple(M.ravel()[:8]), Image.Resampling.BILINEAR))


_ORIGINAL_ALIGN = None


def install_align(kind: str) -> None:
    """Use the proposed alignment in this process (also run in each Ray worker)."""
    global _ORIGINAL_ALIGN
    from data import geometry

    if kind == "pil":
        if _ORIGINAL_ALIGN is None:
            _ORIGINAL_ALIGN = geometry.align_color_to_depth
        geometry.align_color_to_depth = align_color_to_depth_pil


def _install_pil_in_worker() -> None:
    install_align("pil")


# ----------------------------------------------------------------------- corpus

def ensure_corpus(root: str, n_scenes: int, n_frames: int) -> None:
    from corpus_writers import write_scannet_scene

    os.makedirs(root, exist_ok=True)
    for i in range(n_scenes):
        name = f"scene{i:04d}_00"
        done = os.path.join(root, name, ".complete")
        if os.path.exists(done):
            continue
        t0 = time.time()
        print(f"[corpus] rendering {name}: {n_frames} frames, colour 1296x968, depth 640x480 ...", flush=True)
        write_scannet_scene(root, name, seed=100 + i, n_frames=n_frames, step=0.05)
        open(done, "w").close()
        print(f"[corpus] {name} in {time.time() - t0:.0f}s", flush=True)


def clip_frames_of(it: dict) -> set[tuple[str, int]]:
    return {(it["scene"], int(i)) for i in it["indices"]}


def distinct_frame_shards(items: list[dict], per_shard: int) -> list[dict]:
    """Cut planned clips into shards in which no frame appears twice (each frame loaded once per clip)."""
    shards: list[dict] = []
    open_: list[tuple[dict, set]] = []
    for it in items:
        fr = clip_frames_of(it)
        for e, used in open_:
            if len(e["clips"]) < per_shard and not fr & used:
                e["clips"].append(it)
                used.update(fr)
                break
        else:
            e = {"split": "train", "shard": len(shards), "name": f"train-{len(shards):06d}.tar", "clips": [it]}
            shards.append(e)
            open_.append((e, set(fr)))
    return shards


# ----------------------------------------------------------------------- stages

def stage_times(items: list[dict], cfg, repeat: int) -> dict[str, float]:
    """Seconds per clip of each write stage, each frame processed afresh (no reuse); best of `repeat`."""
    import webdataset as wds

    from data import geometry, pairs, shardformat
    from data.scenes import open_scene
    from data.scenes.base import decode_depth, decode_rgb_image, read_bytes, url_join
    from pipeline import stages

    scenes = {}
    for it in items:
        if it["scene"] not in scenes:
            sc = open_scene(cfg.scene_url(it["scene"]), "scannet")
            scenes[it["scene"]] = (sc, {f.index: f for f in sc.frames})
    best: dict[str, float] = {}
    for _ in range(repeat):
        t = collections.defaultdict(float)
        with tempfile.TemporaryDirectory() as d, open(os.path.join(d, "x.tar"), "wb") as f:
            sink = wds.TarWriter(f, user="", group="", mtime=0, encoder=False)
            for k, it in enumerate(items):
                sc, frames = scenes[it["scene"]]
                views = []
                for idx in it["indices"]:
                    fr = frames[idx]
                    t0 = clock()
                    rgb = decode_rgb_image(read_bytes(url_join(sc.url, fr.extra["rgb"])))  # as the reader
                    depth = decode_depth(read_bytes(url_join(sc.url, fr.extra["depth"])), fr.extra["depth"],
                                         sc.depth_scale)
                    t1 = clock()
                    rgb = geometry.align_color_to_depth(rgb, sc.K_color, sc.K_depth, fr.size)
                    rgb, depth, K = stages.fit_view(rgb, depth, fr.K, cfg.max_side)
                    t2 = clock()
                    t["read+decode"] += t1 - t0
                    t["align+resize"] += t2 - t1
                    views.append((rgb, depth, K, fr))
                t0 = clock()
                q = [stages.quantize_depth(v[1], 1000.0) for v in views]  # depth exactly as stored
                t["corr"] += clock() - t0
                cap = cfg.clips.corr_per_pair(len(views))
                rows, errs = [], []
                for i, j in shardformat.clip_pairs(len(views)):
                    ta = clock()
                    rng = np.random.default_rng([k, i, j])
                    corr = pairs.correspondences(q[i], views[i][2], views[i][3].cam2world, q[j], views[j][2],
                                                 views[j][3].cam2world, rng, stride=cfg.clips.stride, max_corr=cap)
                    tb = clock()
                    errs.append(pairs.photo_check(views[i][0], views[j][0], corr, rng))
                    tc = clock()
                    t["corr"] += tb - ta
                    t["(corr of the pairs)"] += tb - ta
                    t["self-check"] += tc - tb
                    rows.append(np.concatenate([np.tile(np.array([[i, j]], np.float32), (len(corr), 1)), corr], 1))
                t2 = clock()
                jpg = [shardformat.encode_jpeg(v[0]) for v in views]
                png = [shardformat.encode_depth_png(qq, 1000.0) for qq in q]
                t3 = clock()
                meta = {key: None for key in shardformat.META_KEYS_V2}
                meta.update(version=shardformat.FORMAT_VERSION, kind="clip", depth_scale=1000.0, photo_err=errs)
                sample = shardformat.make_clip_sample(shardformat.sample_key(0, k), [v[0] for v in views], q,
                                                      np.concatenate(rows, 0), meta, jpgs=jpg, pngs=png)
                t4 = clock()
                sink.write(sample)
                t5 = clock()
                t["encode"] += t4 - t2
                t["(jpeg+png encode)"] += t3 - t2
                t["write"] += t5 - t4
            t0 = clock()
            sink.close()
            t["write"] += clock() - t0
        for key, v in t.items():
            best[key] = min(best.get(key, float("inf")), v / len(items))
    best["codec floor"] = best["read+decode"] + best["(jpeg+png encode)"]
    return best


def end_to_end(shards: list[dict], cfg, repeat: int) -> dict[str, float]:
    """stages.write_shard in this process, best of `repeat`: seconds per clip, frame loads per clip, and the
    task's own corr timer per supervised pair."""
    from pipeline import stages

    best, corr = float("inf"), float("inf")
    n = sum(len(e["clips"]) for e in shards)
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as d:
            c = stages.JobConfig(**{**cfg.__dict__, "output": d})
            t0 = clock()
            stats = []
            for e in shards:
                st = stages.write_shard(e, c)
                assert st["ok"] and st["samples"] == len(e["clips"]), st
                stats.append(st)
            best = min(best, (clock() - t0) / n)
            corr = min(corr, sum(st["seconds"].get("corr", 0.0) for st in stats) / sum(st["pairs"] for st in stats))
    loads = sum(len(set().union(*(clip_frames_of(it) for it in e["clips"]))) for e in shards)
    return {"clip": best, "loads": loads / n, "corr_pair": corr}


def ray_throughput(shards: list[dict], cfg, workers: int, align: str) -> tuple[float, float, float]:
    """(clips/s, worker CPU s per clip, busy fraction) of the write stage through Ray with `workers`
    CPUs (workers warmed up first). Busy fraction: task wall time over workers x wall time."""
    import ray

    from data.progress import Progress
    from pipeline import ray_tasks, stages

    kw = {}
    if align == "pil":
        kw["runtime_env"] = {"worker_process_setup_hook": _install_pil_in_worker}
    ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False, **kw)
    try:
        @ray.remote(num_cpus=1)
        def warm(i):
            import webdataset  # noqa: F401

            from pipeline import stages as _s  # noqa: F401
            time.sleep(0.5)
            return os.getpid()

        ray.get([warm.remote(i) for i in range(workers)])
        with tempfile.TemporaryDirectory() as d:
            c = stages.JobConfig(**{**cfg.__dict__, "output": d})
            ref = ray.put(c)
            prog = Progress("write", len(shards), "shards", quiet=True)
            t0 = time.perf_counter()
            out = ray_tasks.run_tasks(ray_tasks.write_task, shards, lambda e: (e, ref, None), prog, 0,
                                      label=lambda e: e["name"], name="write_shard")
            dt = time.perf_counter() - t0
        assert all(r.get("ok") for _, r, _ in out), [r for _, r, _ in out if not r.get("ok")][:1]
        n = sum(r["samples"] for _, r, _ in out)
        busy = sum(r["total_seconds"] for _, r, _ in out) / (workers * dt)  # workers kept busy?
        return n / dt, sum(r["cpu_seconds"] for _, r, _ in out) / n, busy
    finally:
        ray.shutdown()


def scan_reads(cfg, url: str) -> tuple[float, float]:
    """Seconds per frame of the scan's read (`load_depth`) and of a full `load`, on one scene."""
    from data.scenes import open_scene

    scene = open_scene(url, "scannet")
    frames = scene.frames
    for fr in frames[:2]:  # warm the page cache
        scene.load(fr)
    t0 = clock()
    for fr in frames:
        scene.load_depth(fr)
    t1 = clock()
    for fr in frames:
        scene.load(fr)
    t2 = clock()
    return (t1 - t0) / len(frames), (t2 - t1) / len(frames)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Shard job write-path benchmark, per clip (prints a table).")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "runs", "bench", "scannet_1296x968"))
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--clip-window", type=int, default=48)
    ap.add_argument("--clips-per-scene", type=int, default=4)
    ap.add_argument("--max-overlap", type=float, default=0.98, help="the shard job's --max-overlap (near-duplicates)")
    ap.add_argument("--samples-per-shard", type=int, default=2)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray clips/s part")
    ap.add_argument("--scan-only", action="store_true", help="only the scan's read per frame (depth-only vs full)")
    ap.add_argument("--align", choices=["current", "pil"], default="current",
                    help="colour alignment: data.geometry as is, or the proposed PIL warp")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from data.pairs import ClipConfig
    from data.scenes import list_scenes
    from pipeline import stages

    ensure_corpus(a.corpus, a.scenes, a.frames)
    install_align(a.align)
    K = a.clip_frames
    cfg = stages.JobConfig(input=a.corpus, format="scannet", output="", max_side=a.max_side,
                           samples_per_shard=a.samples_per_shard, val_fraction=0.0,
                           clips=ClipConfig(clip_frames=K, clip_window=a.clip_window,
                                            clips_per_scene=a.clips_per_scene, max_overlap=a.max_overlap))
    t0 = clock()
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(a.corpus, "scannet")[: a.scenes]]
    for s in scans:
        s.pop("shell", None)
    plan = stages.make_plan(scans, cfg)
    t_scan = clock() - t0
    planned = [it for e in plan["shards"] for it in e["clips"]]
    items = [it for it in planned if len(it["indices"]) == K]  # full clips only: "per clip" is K frames
    if not items:
        print(f"[bench] no clip of {K} frames was planned ({len(planned)} shorter ones): more --frames?",
              file=sys.stderr)
        return 1
    n_pairs = K * (K - 1) // 2
    planned_full = [dict(e, clips=[it for it in e["clips"] if len(it["indices"]) == K]) for e in plan["shards"]]
    planned_full = [e for e in planned_full if e["clips"]]
    distinct = distinct_frame_shards(items, a.samples_per_shard)
    n_frames = sum(s["frames"] for s in scans)
    dts = sorted({it["indices"][j] - it["indices"][i] for it in items for i in range(K) for j in range(i + 1, K)})
    print(f"[bench] {len(scans)} scenes, {n_frames} frames scanned in {t_scan:.1f}s; {len(planned)} clips planned, "
          f"{len(items)} of {K} frames timed ({n_pairs} pairs each, dt {dts[0]}..{dts[-1]}), "
          f"{len(planned) - len(items)} short left out; {len(distinct)} shards without repeated frames; "
          f"align={a.align}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    for url in list_scenes(a.corpus, "scannet")[: 2 if a.scan_only else 1]:
        t_depth, t_full = scan_reads(cfg, url)
        print(f"[bench] scan read per frame ({url.rsplit('/', 1)[-1]}): {t_depth * 1e3:.1f} ms depth-only "
              f"(load_depth: depth + colour decode check) vs {t_full * 1e3:.1f} ms full load (decode + align "
              f"colour), {t_full / t_depth:.1f}x", flush=True)
    if a.scan_only:
        return 0

    workers = [int(w) for w in a.workers.split(",")]
    # Ray: full shards only, a multiple of the largest worker count (no idle worker at the end)
    full = [e for e in distinct if len(e["clips"]) == a.samples_per_shard]
    ray_shards = full[: len(full) - len(full) % max(workers)]
    print(f"[bench] Ray runs use {len(ray_shards)} shards of {a.samples_per_shard} clips", flush=True)
    nan = float("nan")
    if a.ray_only:
        st = {"codec floor": nan}
        e2e = e2e_plan = {"clip": nan, "loads": 0.0, "corr_pair": nan}
    else:
        st = stage_times(items, cfg, a.repeat)
        e2e = end_to_end(distinct, cfg, a.repeat)
        e2e_plan = end_to_end(planned_full, cfg, a.repeat)
    rates = {w: ray_throughput(ray_shards, cfg, w, a.align) for w in workers} if ray_shards else {}

    rows = [(k, st.get(k, nan)) for k in ("read+decode", "align+resize", "corr", "self-check", "encode", "write")]
    floor = st["codec floor"]
    print(f"\n== shard write path per {K}-frame clip ({n_pairs} pairs i < j; {len(items)} clips, max-overlap "
          f"{a.max_overlap:g}), scannet 1296x968 colour + 640x480 depth -> {a.max_side} px (align={a.align}) ==")
    print(f"{'stage':<46}{'s/clip':>10}{'x floor':>10}")
    for k, v in rows:
        print(f"{k:<46}{v:>10.4f}{v / floor:>10.2f}")
    total = sum(v for _, v in rows)
    print(f"{'sum of stages':<46}{total:>10.4f}{total / floor:>10.2f}")
    print(f"{'codec floor (decode + JPEG/PNG encode)':<46}{floor:>10.4f}{1.0:>10.2f}")
    print(f"{'end to end, no frame repeated in a shard':<46}{e2e['clip']:>10.4f}{e2e['clip'] / floor:>10.2f}   "
          f"({e2e['loads']:.2f} frame loads/clip)")
    print(f"{'end to end, shards as planned':<46}{e2e_plan['clip']:>10.4f}{e2e_plan['clip'] / floor:>10.2f}   "
          f"({e2e_plan['loads']:.2f} frame loads/clip)")
    corr_pair = st.get("(corr of the pairs)", nan) / n_pairs
    print(f"{'correspondences per supervised pair':<46}{corr_pair * 1e3:>8.2f}ms   (write task's own timer, wall: "
          f"{e2e['corr_pair'] * 1e3:.2f} ms/pair; cap {cfg.clips.corr_per_pair(K)} rows a pair)")
    for w, (r, cpu, busy) in rates.items():
        print(f"{f'Ray write stage, {w} worker(s): clips/s':<46}{r:>10.2f}   (worker CPU {cpu:.4f} s/clip, "
              f"workers busy {busy:.0%})")
    speedup = nan
    if len(rates) >= 2:
        ws = sorted(rates)
        speedup = rates[ws[-1]][0] / rates[ws[0]][0]
        print(f"{f'speed-up {ws[-1]} vs {ws[0]} worker(s)':<46}{speedup:>10.2f}")
    ok1 = "not measured" if a.ray_only else "met" if e2e["clip"] <= 1.3 * floor else "NOT met"
    ok2 = "not measured" if len(rates) < 2 else "met" if speedup >= 1.8 else "NOT met"
    print(f"goals: end to end <= 1.3x floor: {ok1}; 2 workers >= 1.8x: {ok2} "
          f"(load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
