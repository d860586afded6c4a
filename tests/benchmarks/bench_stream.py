"""Loader throughput: pairs per second per worker from local shards (issue [4 of 10] speed; run by hand).

    python tests/benchmarks/bench_stream.py                    # builds synthetic 640x480 shards once
    python tests/benchmarks/bench_stream.py --shards runs/shards --pairs 128 --workers 4

For each processor resolution (the tiny preset's default budget, 448x336 views, and the
7B presets' budget) it reports:
  - the cost of each step per pair, measured one step at a time in this process:
    read (open + tar parse), decode (JPEG + 16-bit PNG + npy + json), labels, encode
    (the adapter's resize + processor + tokens), collate (padding into a batch);
  - the end-to-end PairStream rate with num_workers=0 (= pairs/s of one worker) and
    with --workers DataLoader workers (aggregate).
Goal: >= 10 pairs/s per worker. Needs only this repository (no network, no weights:
the adapters come from the presets' local processors). Prints a table; `--json PATH`
writes it.
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


def build_shards(out: str, scenes: int, frames: int, width: int, height: int) -> str:
    """Synthetic scenes rendered at width x height, sharded (no Ray) with the job's defaults."""
    from data import synthetic
    from data.pairs import PairConfig
    from data.scenes import list_scenes
    from pipeline import stages

    if glob.glob(os.path.join(out, "train-*.tar")):
        return out
    corpus = tempfile.mkdtemp(prefix="bench_corpus_")
    print(f"[bench] rendering {scenes} synthetic scenes x {frames} frames at {width}x{height} ...", flush=True)
    for i in range(scenes):
        synthetic.write_scene(corpus, f"scene_{i:04d}", seed=500 + i, n_frames=frames, width=width, height=height)
    cfg = stages.JobConfig(input=corpus, format="synthetic", output=out,
                           pairs=PairConfig(pairs_per_scene=24, max_gap=20, gap_buckets=(1, 5, 15)),
                           samples_per_shard=16, max_side=max(width, height), val_fraction=0.0)
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


def step_costs(urls: list[str], adapter, n_pairs: int, batch_size: int) -> dict[str, float]:
    """Seconds per pair of each step, one step at a time (single process)."""
    from data.labels import pair_labels
    from data.stream import collate_pairs, decode_checked, prepare_pair, tar_samples

    def fail(reason, msg):
        raise RuntimeError(msg)

    t = {"read": 0.0, "decode": 0.0, "labels": 0.0, "encode": 0.0, "collate": 0.0}
    n = 0
    prepared = []
    while n < n_pairs:
        for url in urls:
            t0 = time.perf_counter()
            raws = list(tar_samples(url, fail))
            t["read"] += time.perf_counter() - t0
            for raw in raws:
                t0 = time.perf_counter()
                pair, _, msg = decode_checked(raw)
                t1 = time.perf_counter()
                assert pair is not None, msg
                ga = adapter.grid((pair.rgb_a.shape[1], pair.rgb_a.shape[0]))
                gb = adapter.grid((pair.rgb_b.shape[1], pair.rgb_b.shape[0]))
                pair_labels(pair, ga, gb)
                t2 = time.perf_counter()
                adapter.encode_pair(pair.rgb_a, pair.rgb_b)
                t3 = time.perf_counter()
                t["decode"] += t1 - t0
                t["labels"] += t2 - t1
                t["encode"] += t3 - t2
                item, _, _ = prepare_pair(pair, adapter)
                prepared.append(item)
                if len(prepared) == batch_size:
                    t4 = time.perf_counter()
                    collate_pairs(prepared, adapter)
                    t["collate"] += time.perf_counter() - t4
                    prepared = []
                n += 1
            if n >= n_pairs:
                break
    return {k: v / n for k, v in t.items()}


def stream_rate(folder: str, adapter, n_pairs: int, batch_size: int, workers: int) -> float:
    """Pairs per second of PairStream end to end (after the first batch: worker start-up excluded)."""
    from data.stream import PairStream

    n_batches = max(2, n_pairs // batch_size)
    stream = PairStream([folder], adapter, batch_size=batch_size, num_workers=workers, seed=0,
                        batches_per_epoch=n_batches + 1)
    it = iter(stream)
    next(it)
    t0 = time.perf_counter()
    got = sum(len(b["keys"]) for b in it)
    return got / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="", help="a shard folder (default: synthetic 640x480 shards, built once "
                                                 f"under {os.path.relpath(DEFAULT_CACHE, ROOT)})")
    ap.add_argument("--width", type=int, default=640, help="stored width of the synthetic shards")
    ap.add_argument("--height", type=int, default=480, help="stored height of the synthetic shards")
    ap.add_argument("--pairs", type=int, default=64, help="pairs timed per measurement")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the aggregate measurement")
    ap.add_argument("--json", default="", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker

    folder = args.shards or build_shards(f"{DEFAULT_CACHE}_{args.width}x{args.height}", 3, 30, args.width,
                                         args.height)
    urls = sorted(glob.glob(os.path.join(folder, "train-*.tar")))
    from data.shardformat import decode_sample
    from data.stream import tar_samples

    first = decode_sample(next(tar_samples(urls[0], lambda r, m: None)))
    stored = (first.rgb_a.shape[1], first.rgb_a.shape[0])
    configs = [("tiny preset default", None), ("448x336 views", 448 * 336), ("7B preset budget", 28 * 28 * 1280)]
    rows = []
    for name, max_pixels in configs:
        adapter = make_adapter(max_pixels)
        grid = adapter.grid(stored)
        costs = step_costs(urls, adapter, args.pairs, args.batch_size)
        per_pair = sum(costs.values())
        one = stream_rate(folder, adapter, args.pairs, args.batch_size, 0)
        many = stream_rate(folder, adapter, args.pairs * args.workers, args.batch_size, args.workers)
        rows.append({"config": name, "stored": f"{stored[0]}x{stored[1]}", "resized": f"{grid.size[0]}x{grid.size[1]}",
                     "cells": grid.n_cells, "ms_per_pair": {k: 1e3 * v for k, v in costs.items()},
                     "steps_pairs_per_s": 1.0 / per_pair, "stream_pairs_per_s_1_worker": one,
                     f"stream_pairs_per_s_{args.workers}_workers": many})

    print(f"\nLoader throughput ({len(urls)} local shards in {folder}; batch {args.batch_size}; "
          f"torch threads 1; {os.cpu_count()} CPUs)")
    head = (f"{'config':<22}{'stored':>9}{'resized':>9}{'cells':>6} | {'read':>10}{'decode':>12}{'labels':>12}"
            f"{'encode':>12}{'collate':>11} | {'steps/s':>8}{'1 wkr/s':>9}{f'{args.workers} wkr/s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = r["ms_per_pair"]
        total = sum(ms.values())
        cells = "".join(f"{ms[k]:>6.1f}ms{100 * ms[k] / total:>3.0f}%" for k in ("read", "decode", "labels", "encode"))
        cells += f"{ms['collate']:>6.1f}ms{100 * ms['collate'] / total:>2.0f}%"
        print(f"{r['config']:<22}{r['stored']:>9}{r['resized']:>9}{r['cells']:>6} | {cells} | "
              f"{r['steps_pairs_per_s']:>8.1f}{r['stream_pairs_per_s_1_worker']:>9.1f}"
              f"{r[f'stream_pairs_per_s_{args.workers}_workers']:>9.1f}")
    print("(ms per pair and share of each step; steps/s = 1 / sum of steps; wkr/s = PairStream end to end)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
