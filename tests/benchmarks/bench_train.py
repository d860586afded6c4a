"""Training throughput of the tiny preset on CPU, 1 and 2 ranks (run by hand; not a test).

    .venv/bin/python tests/benchmarks/bench_train.py [--steps 30] [--warmup 5] [--batch-size 2]
                                                    [--num-workers 1] [--ranks 1,2] [--zero 3]

Builds a small synthetic shard set (no Ray), then for each rank count runs the real
command, `deepspeed --num_gpus R launch/train.py --ds_config launch/zero3.json ...`
(no MLflow, no export, validation only at the end), and reads the trainer's own
per-step log (`train_log.jsonl`). After `--warmup` steps it reports the median
samples/s and tokens/s (all ranks together; tokens = attention-mask tokens of the
batches) and the share of step time spent waiting for data (sum of data waits / sum
of step times). OMP threads per rank = CPU cores / ranks. Prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def build_data(root: str, scenes: int) -> str:
    from conftest import build_shards, write_tiny_corpus

    corpus = write_tiny_corpus(os.path.join(root, "corpus"), n_scenes=scenes, n_frames=24)
    out = os.path.join(root, "shards")
    build_shards(corpus, out, clip_frames=4, clip_window=16, clips_per_scene=4, samples_per_shard=8, max_side=160,
                 val_fraction=0.25)
    return out


def run(ranks: int, shards: str, root: str, args) -> dict:
    from conftest import free_port

    out = os.path.join(root, f"run_{ranks}")
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--master_port", str(free_port()),
           "--num_gpus", str(ranks), os.path.join(ROOT, "launch", "train.py"),
           "--ds_config", os.path.join(ROOT, "launch", f"zero{args.zero}.json"), "--preset", "tiny",
           "--shards", shards, "--output-dir", out, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--num-workers", str(args.num_workers), "--val-every", "0", "--val-batches", "1", "--no-mlflow",
           "--no-export", "--resume", "never"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    env["PYTHONPATH"] = ROOT
    log = os.path.join(root, f"run_{ranks}.log")
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        tail = open(log).read().splitlines()[-30:]
        raise SystemExit(f"{ranks} rank(s): exit {rc}\n" + "\n".join(tail))
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    rows = [r for r in rows if r["step"] > args.warmup and not r["skipped"]]
    step_t = sum(r["step_time_s"] for r in rows)
    return {"ranks": ranks, "steps": len(rows), "samples_s": statistics.median(r["samples_per_s"] for r in rows),
            "tokens_s": statistics.median(r["tokens_per_s"] for r in rows),
            "step_ms": 1000 * statistics.median(r["step_time_s"] for r in rows),
            "wait": sum(r["data_wait_s"] for r in rows) / step_t, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per rank per step")
    ap.add_argument("--num-workers", type=int, default=1, help="loader worker processes per rank")
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    ap.add_argument("--zero", type=int, default=3, choices=[2, 3], help="launch/zero{2,3}.json")
    ap.add_argument("--scenes", type=int, default=4, help="synthetic scenes in the shard set")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (shards, logs)")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    root = tempfile.mkdtemp(prefix="bench_train_")
    shards = build_data(root, args.scenes)
    results = [run(int(r), shards, root, args) for r in args.ranks.split(",")]
    print(f"\ntiny preset, ZeRO-{args.zero}, CPU ({os.cpu_count()} cores), batch {args.batch_size} pairs/rank, "
          f"{args.num_workers} loader worker(s)/rank, median over steps {args.warmup + 1}-{args.steps}\n")
    print("| ranks | samples/s | tokens/s | step (ms) | data wait | wall (s, incl. start) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['ranks']} | {r['samples_s']:.1f} | {r['tokens_s']:.0f} | {r['step_ms']:.0f} | "
              f"{100 * r['wait']:.0f}% | {r['wall']:.0f} |")
    if args.keep:
        print(f"\nlogs and runs in {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
