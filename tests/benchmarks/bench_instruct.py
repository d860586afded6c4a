"""Instruction shard job, video cost: videos per second per worker (issue 17; run by hand).

    python tests/benchmarks/bench_instruct.py                  # 60 s 1280x720 30 fps H.264, 16 frames
    python tests/benchmarks/bench_instruct.py --frames 32 --repeats 5 --json runs/bench_instruct.json

Makes the video once with PyAV (libx264, a slow pan over a photograph shipped in scikit-image,
cached under runs/bench_instruct/), then times in this one process, interleaved, `--repeats` times:
  - decode: `data.video.sample_video` alone (demux + decode every frame up to the last sampled
    one, RGB conversion of the sampled ones): the floor of any sampler that decodes in order;
  - decode + encode: `pipeline.instruct.render_sample`, what a write task does per video
    (read, sample, JPEG-encode the frames), with its own split of the time (read / decode / encode:
    the encode share is measured there, not as a difference of two noisy totals);
  - shard task: `pipeline.instruct.write_shard` on a shard of --shard-videos copies of the video
    record (the above + json + tar + sha256 + publish + stats.json), per video.
Wall seconds and CPU seconds (PyAV decodes with FFmpeg's frame threads, so one worker may use
more than one core) are medians over the repeats. Prints a table; `--json PATH` writes it.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

CACHE = os.path.join(ROOT, "runs", "bench_instruct")


def make_video(path: str, seconds: float, width: int, height: int, fps: int) -> str:
    """A pan over a photograph (real texture, real motion), H.264 yuv420p; cached by name."""
    from PIL import Image

    from data.synthetic import load_photo
    from data.video import write_video

    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    n = int(round(seconds * fps))
    photo = Image.fromarray(load_photo("astronaut"))
    big = np.asarray(photo.resize((int(width * 1.6), int(height * 1.6)), Image.Resampling.BICUBIC))
    H, W = big.shape[:2]
    print(f"[bench] writing {path}: {n} frames {width}x{height} at {fps} fps (libx264) ...", flush=True)
    t0 = time.perf_counter()

    def frames():
        for i in range(n):
            a = i / max(n - 1, 1)
            x = int(round(a * (W - width)))
            y = int(round((0.5 - 0.5 * np.cos(2 * np.pi * a)) * (H - height)))
            yield big[y:y + height, x:x + width]

    tmp = path + ".part.mp4"
    write_video(tmp, frames(), fps=fps, codec="libx264", preset="veryfast", crf=23)
    os.replace(tmp, path)
    print(f"[bench] wrote {os.path.getsize(path) / 1e6:.1f} MB in {time.perf_counter() - t0:.0f}s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--frames", type=int, default=16, help="frames sampled per video (--frames of the job)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-videos", type=int, default=2, help="videos in the timed shard task")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)

    from data.video import sample_video
    from pipeline import instruct

    name = f"pan_{a.width}x{a.height}_{a.fps}fps_{a.seconds:g}s.mp4"
    path = make_video(os.path.join(CACHE, name), a.seconds, a.width, a.height, a.fps)
    out = tempfile.mkdtemp(prefix="bench_instruct_out_")
    cfg = instruct.InstructConfig(input="", media_root=CACHE, output=out, frames=a.frames)
    item = {"media": "video", "files": [name], "ids": ["bench"], "source": ["bench.json"],
            "conversations": [[{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]]}
    entry = {"split": "train", "shard": 0, "name": "train-000000.tar", "samples": [item] * a.shard_videos}

    def decode():
        sv = sample_video(path, a.frames)
        assert len(sv.frames) == a.frames

    parts: list[dict[str, float]] = []  # render_sample's own split: read, decode, encode (wall)

    def decode_encode():
        t = collections.defaultdict(float)
        jpgs, stamps = instruct.render_sample(item, cfg, t)
        assert len(jpgs) == a.frames == len(stamps)
        parts.append(dict(t))

    def shard_task():
        st = instruct.write_shard(entry, cfg)
        assert st["ok"] and st["samples"] == a.shard_videos, st

    cases = [("decode (sample_video)", decode, 1), ("decode + encode (render_sample)", decode_encode, 1),
             (f"shard task (write_shard, {a.shard_videos} videos)", shard_task, a.shard_videos)]
    decode()  # warm-up: page cache, codec init
    wall: dict[str, list[float]] = {c[0]: [] for c in cases}
    cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
    for _ in range(a.repeats):
        for label, fn, per in cases:
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[label].append((time.perf_counter() - t) / per)
            cpu[label].append((time.process_time() - c) / per)
    rows = []
    for label, _, _ in cases:
        w, c = statistics.median(wall[label]), statistics.median(cpu[label])
        rows.append({"case": label, "seconds_per_video": round(w, 4), "cpu_seconds_per_video": round(c, 4),
                     "videos_per_s": round(1.0 / w, 3)})
    base = rows[0]["seconds_per_video"]
    print(f"\n{a.seconds:g} s {a.width}x{a.height} {a.fps} fps H.264 ({os.path.getsize(path) / 1e6:.1f} MB), "
          f"{a.frames} frames sampled, median of {a.repeats}; {os.cpu_count()} cores, PyAV frame threads")
    print(f"{'case':<40} {'s/video':>9} {'CPU s/video':>12} {'videos/s':>9} {'vs decode':>10}")
    for r in rows:
        print(f"{r['case']:<40} {r['seconds_per_video']:>9.3f} {r['cpu_seconds_per_video']:>12.3f} "
              f"{r['videos_per_s']:>9.3f} {r['seconds_per_video'] / base:>9.2f}x")
    split = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in ("read", "decode", "encode")}
    print(f"inside decode + encode (wall s/video): read {split['read']:.3f}, sample (decode) {split['decode']:.3f}, "
          f"JPEG encode {split['encode']:.3f} ({split['encode'] / a.frames * 1e3:.1f} ms a frame)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"video": {"seconds": a.seconds, "width": a.width, "height": a.height, "fps": a.fps},
                       "frames": a.frames, "repeats": a.repeats, "rows": rows, "render_sample_split": split},
                      f, indent=1)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
