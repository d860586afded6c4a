"""Readers of corpora as users download them (issue 22): run by hand, prints a table. Not a test.

    python tests/benchmarks/bench_readers.py                 # defaults below; corpora cached under --corpus
    python tests/benchmarks/bench_readers.py --frames 12 --repeat 1   # quicker

One run, the same shard-job stages (pipeline/stages.py, in this process, no Ray; BLAS/OpenMP
pinned to 1 thread as in Ray's workers) on the same rendered frames stored five ways:

  scannet .sens          SCENE/SCENE.sens (colour 1296x968 JPEG, depth 640x480 zlib), read directly
  scannet export         the same bytes as SensReader's export (color/*.jpg, depth/*.png, pose/*.txt)
  scannet++ video, lz4   iphone/rgb.mkv (H.264 1920x1440, 60 fps, keyframe every --gop frames, B-frames)
                         + depth.bin per-frame lz4 + pose_intrinsic_imu.json
  scannet++ video, deflate stream   the same, depth.bin one raw-deflate stream of float32
  scannet++ JPEGs, lz4   the same frames extracted once to iphone/rgb/frame_%06d.jpg (what the
                         toolkit's prepare_iphone_data.py extract_rgb leaves; q 95), read instead of
                         the video (a reader subclass defined here)

Columns (CPU seconds of this process, best of --repeat; wall clock beside the write):
  open ms       opening the scene: the index pass (.sens frame headers; video demux; depth.bin sizes)
  scan ms/frame scan_scene (open + every frame's depth and checks + candidate clips) and pickling its
                shell, as the scan task returns it, per frame of the scene
  write ms/frame write_shard of the whole plan with the pickled shells, per distinct frame read
  write ms/clip  the same per clip written (--clip-frames frames, every pair i < j matched)
  write ms/pair  the same per supervised pair (i < j) written
  decode cost   video frames decoded per RGB frame the write tasks used (1 = no wasted decode; scattered
                frames cost about half a group of pictures each)
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import sys
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import av  # noqa: E402,F401  (imported here so that no row pays the first import)
import lz4.block  # noqa: E402,F401
import numpy as np  # noqa: E402
import webdataset  # noqa: E402,F401
from PIL import Image  # noqa: E402

from data.scenes import FORMATS  # noqa: E402
from data.scenes import scannetpp as spp  # noqa: E402
from data.scenes.base import read_bytes, url_join  # noqa: E402

list_scannetpp_scenes = spp.list_scannetpp_scenes  # the lister of the JPEG variant's format entry


class ExtractedJpegScene(spp.ScanNetPPScene):
    """ScanNet++ with RGB from extracted `iphone/rgb/frame_%06d.jpg` instead of the video (comparison)."""

    def _read_rgb(self, frame):
        return self._to_view(np.asarray(Image.open(io.BytesIO(read_bytes(
            url_join(self.iphone, "rgb", f"{frame.name}.jpg")))).convert("RGB")))


FORMATS["scannetpp-jpeg"] = ("__main__", "ExtractedJpegScene", "list_scannetpp_scenes")


def ensure_corpora(root: str, frames: int, gop: int) -> dict[str, tuple[str, str]]:
    """{row label: (corpus root, format)}; rendered once and cached under root."""
    import corpus_writers as cw

    from data.scenes.scannetpp import DepthBin

    out = {}
    for layout in ("sens", "export"):
        r = os.path.join(root, f"scannet_{layout}_{frames}")
        if not os.path.exists(os.path.join(r, ".done")):
            t0 = time.time()
            print(f"[corpus] scannet {layout}: {frames} frames, colour 1296x968, depth 640x480 ...", flush=True)
            cw.write_scannet_sens_scene(r, "scene0000_00", seed=3, layout=layout, n_frames=frames,
                                        color_size=(1296, 968), depth_size=(640, 480), step=0.05)
            open(os.path.join(r, ".done"), "w").close()
            print(f"[corpus] done in {time.time() - t0:.0f}s", flush=True)
        out[f"scannet {layout if layout == 'export' else '.sens'}"] = (r, "scannet")
    v = os.path.join(root, f"scannetpp_lz4_{frames}_gop{gop}")
    if not os.path.exists(os.path.join(v, ".done")):
        t0 = time.time()
        print(f"[corpus] scannet++: {frames} frames, rgb.mkv 1920x1440 gop {gop}, depth 256x192 ...", flush=True)
        cw.write_scannetpp_scene(v, "0a5c013435", seed=3, n_frames=frames, rgb_size=(1920, 1440), encoding="lz4",
                                 gop=gop, step=0.03, view_renders=False)
        open(os.path.join(v, ".done"), "w").close()
        print(f"[corpus] done in {time.time() - t0:.0f}s", flush=True)
    s = os.path.join(root, f"scannetpp_stream_{frames}_gop{gop}")
    j = os.path.join(root, f"scannetpp_jpeg_{frames}_gop{gop}")
    for dst in (s, j):
        if not os.path.exists(os.path.join(dst, ".done")):
            shutil.copytree(v, dst, dirs_exist_ok=True)
            os.unlink(os.path.join(dst, ".done"))
    iphone_s = os.path.join(s, "0a5c013435", "iphone")
    if not os.path.exists(os.path.join(s, ".done")):
        db = DepthBin(os.path.join(iphone_s, "depth.bin"), "x")
        depths = [db.frame(k) for k in range(len(db.records))]
        with open(os.path.join(iphone_s, "depth.bin"), "wb") as f:
            f.write(cw.depth_bin_bytes(depths, "stream"))
        open(os.path.join(s, ".done"), "w").close()
    if not os.path.exists(os.path.join(j, ".done")):
        import av

        rgb_dir = os.path.join(j, "0a5c013435", "iphone", "rgb")
        os.makedirs(rgb_dir, exist_ok=True)
        with av.open(os.path.join(j, "0a5c013435", "iphone", "rgb.mkv")) as c:
            for k, fr in enumerate(c.decode(c.streams.video[0])):
                Image.fromarray(fr.to_ndarray(format="rgb24")).save(os.path.join(rgb_dir, f"frame_{k:06d}.jpg"),
                                                                    quality=95)
        open(os.path.join(j, ".done"), "w").close()
    out["scannet++ video, lz4"] = (v, "scannetpp")
    out["scannet++ video, deflate stream"] = (s, "scannetpp")
    out["scannet++ JPEGs, lz4"] = (j, "scannetpp-jpeg")
    return out


def measure(root: str, fmt: str, out: str, args, repeat: int) -> dict[str, float]:
    from data.pairs import ClipConfig
    from data.scenes import list_scenes, open_scene
    from pipeline import stages

    url = list_scenes(root, fmt)[0]
    clips = ClipConfig(clip_frames=args.clip_frames, clip_window=args.clip_window, clips_per_scene=args.clips_per_scene)
    cfg = stages.JobConfig(input=root, format=fmt, output=out, max_side=args.max_side, samples_per_shard=8,
                           val_fraction=0.0, clips=clips)
    best: dict[str, float] = {}

    def keep(k: str, v: float) -> None:
        best[k] = min(best.get(k, float("inf")), v)

    for _ in range(repeat):
        c0 = time.process_time()
        scene = open_scene(url, fmt)
        keep("open", time.process_time() - c0)
        n_frames = len(scene.frames) + len(scene.skipped)
        c0 = time.process_time()
        scan = stages.scan_scene(url, cfg)
        blob = pickle.dumps(scan.pop("shell"))
        keep("scan", (time.process_time() - c0) / n_frames)
        plan = stages.make_plan([scan], cfg)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        shells = {scan["scene"]: pickle.loads(blob)}
        frames = {(it["scene"], i) for e in plan["shards"] for it in e["clips"] for i in it["indices"]}
        clips = sum(len(e["clips"]) for e in plan["shards"])
        pairs = 0
        c0, w0 = time.process_time(), time.perf_counter()
        decoded = returned = 0
        for e in plan["shards"]:  # one write task per shard, each with its own copy of the shell (Ray's store)
            task_shells = {k: pickle.loads(blob) for k in shells}
            st = stages.write_shard(e, cfg, task_shells)
            assert st["ok"] and st["scenes_opened"] == 0 and st["samples"] == len(e["clips"]), st
            pairs += st["pairs"]
            for sh in task_shells.values():
                reader = getattr(sh, "_frames_reader", None)
                if reader is not None:
                    decoded += reader.stats["decoded"]
                    returned += reader.stats["returned"]
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        cost = decoded / returned if returned else None
        keep("write_frame", cpu / len(frames))
        keep("write_clip", cpu / clips)
        keep("write_pair", cpu / pairs)
        keep("write_wall_frame", wall / len(frames))
        best["decode_cost"] = cost if cost is not None else float("nan")
        best["frames"], best["clips"], best["pairs"], best["used"] = n_frames, clips, pairs, len(frames)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Reader costs: .sens vs export, video vs extracted JPEGs (table).")
    ap.add_argument("--corpus", default=os.path.join(ROOT, "runs", "bench", "readers"))
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--gop", type=int, default=8, help="keyframe interval of the ScanNet++ video written")
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--clip-window", type=int, default=48)
    ap.add_argument("--clips-per-scene", type=int, default=3)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    corpora = ensure_corpora(a.corpus, a.frames, a.gop)
    out = os.path.join(a.corpus, "out")
    rows = {label: measure(root, fmt, out, a, a.repeat) for label, (root, fmt) in corpora.items()}
    print(f"\n== readers: one scene, {a.frames} frames, --max-side {a.max_side}, {a.clips_per_scene} clips of "
          f"{a.clip_frames} frames (window {a.clip_window}) planned, CPU ms (best of {a.repeat}); scannet++ video "
          f"H.264 1920x1440 gop {a.gop}")
    print(f"{'input':<34}{'open ms':>9}{'scan ms/frame':>15}{'write ms/frame':>16}{'(wall)':>9}"
          f"{'write ms/clip':>15}{'write ms/pair':>15}{'decode cost':>13}{'frames':>8}{'clips':>7}{'pairs':>7}")
    for label, r in rows.items():
        dc = "-" if np.isnan(r["decode_cost"]) else f"{r['decode_cost']:.2f}"
        print(f"{label:<34}{r['open'] * 1e3:>9.1f}{r['scan'] * 1e3:>15.1f}{r['write_frame'] * 1e3:>16.1f}"
              f"{r['write_wall_frame'] * 1e3:>9.1f}{r['write_clip'] * 1e3:>15.1f}{r['write_pair'] * 1e3:>15.1f}"
              f"{dc:>13}{r['used']:>8}{r['clips']:>7}{r['pairs']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
