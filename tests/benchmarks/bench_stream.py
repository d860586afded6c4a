"""Loader cost per frame of K-frame clips against the floor of the same frames (issue [3 of 12] speed; by hand).

    python tests/benchmarks/bench_stream.py                    # builds synthetic 640x480 clip shards (K = 8) once
    python tests/benchmarks/bench_stream.py --shards runs/shards --clips 16 --workers 4

For each processor resolution (the tiny preset's default budget, 448x336 views, and the 7B
presets' budget) it reports, per frame of the clips:
  - the cost of each step, measured one step at a time in this process: read (open + tar
    parse), decode (JPEG + 16-bit PNG + npy + json), labels (D_b once per frame, anchors of
    every pair), encode (the adapter's resize + processor + tokens), collate (padding);
  - the floor: JPEG decode plus one resize to the processor's size of the same frames, in the
    same run (what any loader must pay), and the loader's ratio to it (goal: at most 1.5x);
  - the end-to-end SampleStream rate with num_workers=0 (= clips/s of one worker) and with
    --workers DataLoader workers (aggregate);
  - with --mix (issue [6 of 12]): SampleStream samples/s of one worker reading a 1:1 mixture of
    these clips and the conversations of the synthetic instruction set (data/synthetic_instruct.py
    rendered at --width x --height: images, 16-frame videos, text-only records), with the share of
    each kind drawn and the per-sample rate of each set read alone in the same run.
Needs only this repository (no network, no weights: the adapters come from the presets' local
processors). Prints a table; `--json PATH` writes it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_CACHE = os.path.join(ROOT, "runs", "bench_stream_shards")


def build_shards(out: str, scenes: int, frames: int, width: int, height: int, clip_frames: int = 8) -> str:
    """Synthetic scenes rendered at width x height, sharded (no Ray) into K-frame clips."""
    from data import synthetic
    from data.pairs import ClipConfig
    from data.scenes import list_scenes
    from pipeline import stages

    if glob.glob(os.path.join(out, "train-*.tar")):
        return out
    corpus = tempfile.mkdtemp(prefix="bench_corpus_")
    print(f"[bench] rendering {scenes} synthetic scenes x {frames} frames at {width}x{height} ...", flush=True)
    for i in range(scenes):
        synthetic.write_scene(corpus, f"scene_{i:04d}", seed=500 + i, n_frames=frames, width=width, height=height,
                              step=0.1)
    cfg = stages.JobConfig(input=corpus, format="synthetic", output=out,
                           clips=ClipConfig(clip_frames=clip_frames, clip_window=24, clips_per_scene=6, max_overlap=1.0),
                           samples_per_shard=4, max_side=max(width, height), val_fraction=0.0)
    os.makedirs(out, exist_ok=True)
    scans = [stages.scan_scene(u, cfg) for u in list_scenes(corpus, "synthetic")]
    plan = stages.make_plan(scans, cfg)
    for entry in plan["shards"]:
        st = stages.write_shard(entry, cfg)
        assert st["ok"], st
    stages.write_json(os.path.join(out, "plan.json"), plan)
    return out


def make_adapter(max_pixels: int | None):
    from model.loading import build_preset_processor
    from model.presets import get_preset
    from model.qwen import QwenAdapter

    preset = get_preset("tiny")
    return QwenAdapter(build_preset_processor(preset), family=preset.family, max_pixels=max_pixels)


def step_costs(urls: list[str], adapter, n_clips: int, batch_size: int) -> tuple[dict[str, float], int]:
    """(seconds per frame of each step, one step at a time in a single process; frames timed)."""
    import numpy as np
    from PIL import Image

    from data.labels import clip_labels
    from data.shardformat import frame_members
    from data.stream import collate_clips, decode_checked, prepare_clip, tar_samples
    from data.scenes.base import decode_rgb

    def fail(reason, msg):
        raise RuntimeError(msg)

    t = {"read": 0.0, "decode": 0.0, "labels": 0.0, "encode": 0.0, "collate": 0.0, "floor": 0.0}
    n = frames = 0
    prepared = []
    while n < n_clips:
        for url in urls:
            t0 = time.perf_counter()
            raws = list(tar_samples(url, fail))
            t["read"] += time.perf_counter() - t0
            for raw in raws:
                t0 = time.perf_counter()
                clip, _, msg = decode_checked(raw)
                t1 = time.perf_counter()
                assert clip is not None, msg
                grids = [adapter.grid(clip.size(k)) for k in range(clip.n_frames)]
                clip_labels(clip, grids)
                t2 = time.perf_counter()
                adapter.encode_clip(clip.rgb)
                t3 = time.perf_counter()
                t["decode"] += t1 - t0
                t["labels"] += t2 - t1
                t["encode"] += t3 - t2
                # the floor of the same frames: JPEG decode + one resize to the processor's size
                t4 = time.perf_counter()
                for k in range(clip.n_frames):
                    rgb = decode_rgb(bytes(raw[frame_members(k)[0]]))
                    Image.fromarray(rgb).resize(grids[k].size, Image.BICUBIC)
                t["floor"] += time.perf_counter() - t4
                item, _, _ = prepare_clip(clip, adapter)
                prepared.append(item)
                if len(prepared) == batch_size:
                    t5 = time.perf_counter()
                    collate_clips(prepared, adapter)
                    t["collate"] += time.perf_counter() - t5
                    prepared = []
                n += 1
                frames += clip.n_frames
                if n >= n_clips:
                    break
            if n >= n_clips:
                break
    return {k: v / frames for k, v in t.items()}, frames


def stream_rate(folder: str, adapter, n_clips: int, batch_size: int, workers: int) -> float:
    """Clips per second of SampleStream end to end (after the first batch: worker start-up excluded)."""
    from data.stream import SampleStream

    n_batches = max(2, n_clips // batch_size)
    stream = SampleStream([folder], adapter, batch_size=batch_size, num_workers=workers, seed=0,
                          batches_per_epoch=n_batches + 1)
    it = iter(stream)
    next(it)
    t0 = time.perf_counter()
    got = sum(len(b["keys"]) for b in it)
    return got / (time.perf_counter() - t0)


def build_sft(out: str, rooms: int, width: int, height: int) -> str:
    """The synthetic instruction set rendered at width x height, sharded in this process (no Ray); cached."""
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import build_instruct_shards

    return build_instruct_shards(out, rooms=rooms, frames=16, samples_per_shard=4, val_fraction=0.0, seed=0,
                                 width=width, height=height)


def mix_rate(sources: list[str], adapter, n_samples: int, batch_size: int) -> tuple[float, dict[str, int]]:
    """Samples per second of one worker (num_workers=0) over `sources`, after the first batch; kinds drawn."""
    import collections

    from data.stream import SampleStream

    n_batches = max(2, n_samples // batch_size)
    stream = SampleStream(sources, adapter, batch_size=batch_size, num_workers=0, seed=0,
                          batches_per_epoch=n_batches + 1, video_frames=16)
    it = iter(stream)
    next(it)
    kinds: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for b in it:
        kinds.update(b["kinds"])
    return sum(kinds.values()) / (time.perf_counter() - t0), dict(kinds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="", help="a clip shard folder (default: synthetic 640x480 clips of K = 8, "
                                                 f"built once under {os.path.relpath(DEFAULT_CACHE, ROOT)})")
    ap.add_argument("--width", type=int, default=640, help="stored width of the synthetic shards")
    ap.add_argument("--height", type=int, default=480, help="stored height of the synthetic shards")
    ap.add_argument("--clips", type=int, default=12, help="clips timed per measurement")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the aggregate measurement")
    ap.add_argument("--configs", default="tiny,448,7b", help="which processor budgets to measure")
    ap.add_argument("--mix", action="store_true", help="also time a 1:1 mixture of the clips and instruction "
                                                        "shards (synthetic instruction set) per budget")
    ap.add_argument("--mix-rooms", type=int, default=4, help="rooms of the synthetic instruction set (--mix)")
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker

    folder = args.shards or build_shards(f"{DEFAULT_CACHE}_k8_{args.width}x{args.height}", 3, 40, args.width,
                                         args.height)
    urls = sorted(glob.glob(os.path.join(folder, "train-*.tar")))
    from data.shardformat import decode_sample
    from data.stream import tar_samples

    first = decode_sample(next(tar_samples(urls[0], lambda r, m: None)))
    stored = first.size(0)
    configs = {"tiny": ("tiny preset default", None), "448": ("448x336 views", 448 * 336),
               "7b": ("7B preset budget", 28 * 28 * 1280)}
    rows = []
    for key in args.configs.split(","):
        name, max_pixels = configs[key]
        adapter = make_adapter(max_pixels)
        grid = adapter.grid(stored)
        costs, frames = step_costs(urls, adapter, args.clips, args.batch_size)
        floor = costs.pop("floor")
        per_frame = sum(costs.values())
        one = stream_rate(folder, adapter, args.clips, args.batch_size, 0)
        many = stream_rate(folder, adapter, args.clips * args.workers, args.batch_size, args.workers)
        rows.append({"config": name, "stored": f"{stored[0]}x{stored[1]}", "resized": f"{grid.size[0]}x{grid.size[1]}",
                     "cells": grid.n_cells, "frames_per_clip": frames / args.clips,
                     "ms_per_frame": {k: 1e3 * v for k, v in costs.items()}, "floor_ms_per_frame": 1e3 * floor,
                     "ratio_to_floor": per_frame / floor, "stream_clips_per_s_1_worker": one,
                     f"stream_clips_per_s_{args.workers}_workers": many})
        if args.mix:
            sft = build_sft(f"{DEFAULT_CACHE}_sft_{args.width}x{args.height}", args.mix_rooms, args.width, args.height)
            n = 2 * args.clips
            conv, _ = mix_rate([sft], adapter, n, args.batch_size)
            clips_alone, _ = mix_rate([folder], adapter, n, args.batch_size)
            both, kinds = mix_rate([f"{folder}:1", f"{sft}:1"], adapter, n, args.batch_size)
            rows[-1]["mix"] = {"samples_per_s": both, "kinds": kinds, "conversations_alone_per_s": conv,
                               "clips_alone_per_s": clips_alone}

    print(f"\nLoader cost per frame ({len(urls)} local shards in {folder}; {rows[0]['frames_per_clip']:.1f} frames a "
          f"clip; batch {args.batch_size}; torch threads 1; {os.cpu_count()} CPUs)")
    head = (f"{'config':<20}{'resized':>9}{'cells':>6} | {'read':>10}{'decode':>12}{'labels':>12}"
            f"{'encode':>12}{'collate':>11} | {'total':>7}{'floor':>7}{'ratio':>6} | {'1 wkr':>7}"
            f"{f'{args.workers} wkr':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = r["ms_per_frame"]
        total = sum(ms.values())
        cells = "".join(f"{ms[k]:>6.1f}ms{100 * ms[k] / total:>3.0f}%" for k in ("read", "decode", "labels", "encode"))
        cells += f"{ms['collate']:>6.1f}ms{100 * ms['collate'] / total:>2.0f}%"
        print(f"{r['config']:<20}{r['resized']:>9}{r['cells']:>6} | {cells} | {total:>6.1f}m{r['floor_ms_per_frame']:>6.1f}m"
              f"{r['ratio_to_floor']:>6.2f} | {r['stream_clips_per_s_1_worker']:>7.2f}"
              f"{r[f'stream_clips_per_s_{args.workers}_workers']:>7.2f}")
    print("(ms per frame and share of each step; floor = JPEG decode + one resize of the same frames; ratio = "
          "total / floor, goal <= 1.5; wkr = SampleStream clips/s end to end)")
    if args.mix:
        print(f"\n1:1 mixture, one worker (SampleStream samples/s; the instruction set at {args.width}x{args.height}, "
              f"16-frame videos)")
        print(f"{'config':<20} | {'clips alone':>11} | {'conversations alone':>19} | {'1:1 mixture':>11} | kinds drawn")
        for r in rows:
            m = r["mix"]
            print(f"{r['config']:<20} | {m['clips_alone_per_s']:>11.2f} | {m['conversations_alone_per_s']:>19.2f} | "
                  f"{m['samples_per_s']:>11.2f} | {m['kinds']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
