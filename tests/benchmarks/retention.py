"""LM retention of joint training against geometry-only training (issue [6 of 12]; run by hand, prints a table).

    python tests/benchmarks/retention.py [--sft-steps 200] [--steps 120] [--root DIR]

1. Data: clip shards of the synthetic rooms and instruction shards of the generated instruction set
   (data/synthetic_instruct.py; a plumbing and retention check, never 3D-VQA training data).
2. SFT: the tiny preset trained with L_LM alone (`--lambda-corr 0 --lambda-depth 0`) on the
   instruction shards, exported: the starting checkpoint of both runs below.
3. From that export, the same number of steps each:
   - geometry-only: `--lambda-lm 0`, clips only;
   - joint: `--lambda-lm 1`, clips and conversations mixed 1:1.
   Both validate on the clips' val split and the instruction set's held-out split (LM retention).
Reports, per run, the held-out LM loss at the start (the SFT export's) and after, and L_corr
(train/nce) over the first and last steps and the best-layer head PCK@2patch at the end.
Every run is `deepspeed --num_gpus 1 launch/train.py ...` (the command lines are printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]

from conftest import read_jsonl, run_logged  # noqa: E402


def train(name: str, root: str, args: list[str]) -> str:
    run = os.path.join(root, "runs", name)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1",
           os.path.join(ROOT, "launch", "train.py"), "--ds_config", os.path.join(ROOT, "launch", "zero3.json"),
           "--output-dir", run, "--run-name", name, "--no-mlflow", "--num-workers", "0", "--resume", "never",
           "--batch-size", "2", *args]
    run_logged(name, cmd, run + ".log", root)
    return run


def summary(run: str) -> dict:
    lm = read_jsonl(os.path.join(run, "val_lm.jsonl"))
    log = read_jsonl(os.path.join(run, "train_log.jsonl"))
    nce = [r["nce"] for r in log if r.get("nce") is not None]
    k = max(1, len(nce) // 10)
    val = json.load(open(os.path.join(run, "val_metrics.json")))
    return {"lm": [(r["step"], r["loss"]) for r in lm], "nce_first": sum(nce[:k]) / k if nce else None,
            "nce_last": sum(nce[-k:]) / k if nce else None, "pck2patch": val["head"].get("best_pck2patch"),
            "chance": val["head"].get("chance2"), "same_cell": val["head"]["same_cell"].get("pck2patch")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="")
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rooms", type=int, default=8, help="rooms of the instruction set")
    ap.add_argument("--scenes", type=int, default=6, help="synthetic scenes of the clip shards")
    ap.add_argument("--lr", default="1e-3")
    a = ap.parse_args()
    from conftest import build_instruct_shards, build_shards, write_tiny_corpus

    root = os.path.abspath(a.root or tempfile.mkdtemp(prefix="retention-"))
    os.makedirs(root, exist_ok=True)
    clips, sft = os.path.join(root, "clips"), os.path.join(root, "sft")
    if not os.path.isfile(os.path.join(clips, "plan.json")):
        corpus = write_tiny_corpus(os.path.join(root, "corpus"), n_scenes=a.scenes, n_frames=24)
        build_shards(corpus, clips, clip_frames=4, clip_window=16, clips_per_scene=6, samples_per_shard=4,
                     max_side=160, val_fraction=0.34)
    if not os.path.isfile(os.path.join(sft, "manifest.json")):
        build_instruct_shards(sft, rooms=a.rooms, samples_per_shard=4, val_fraction=0.3)
    common = ["--preset", "tiny", "--trainable", "full", "--lr", a.lr, "--val-batches", "8",
              "--val-shards", clips, sft]
    start = train("sft", root, [*common, "--steps", str(a.sft_steps), "--val-every", str(a.sft_steps),
                                "--lambda-lm", "1", "--lambda-corr", "0", "--lambda-depth", "0", "--shards", sft])
    model = os.path.join(start, "export", "model")
    every = str(max(1, a.steps // 4))
    base = ["--model", model, "--trainable", "full", "--lr", a.lr, "--val-batches", "8", "--val-shards", clips, sft,
            "--steps", str(a.steps), "--val-every", every]
    geo = train("geometry_only", root, [*base, "--lambda-lm", "0", "--shards", clips])
    joint = train("joint", root, [*base, "--lambda-lm", "1", "--shards", f"{clips}:1", f"{sft}:1"])

    s0 = summary(start)
    lm0 = s0["lm"][-1][1]
    print(f"\nstart: the SFT export (L_LM only, {a.sft_steps} steps): held-out LM loss {lm0:.4f}")
    rows = [("geometry-only (--lambda-lm 0)", summary(geo)), ("joint (--lambda-lm 1, clips:sft 1:1)", summary(joint))]
    print(f"\n| run ({a.steps} steps from the SFT export) | held-out LM loss: start -> end (change) | LM loss by step "
          f"| L_corr first -> last steps | best head PCK@2patch (chance, same-cell) |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in rows:
        end = s["lm"][-1][1]
        curve = ", ".join(f"{st}: {v:.3f}" for st, v in s["lm"])
        print(f"| {name} | {lm0:.4f} -> {end:.4f} ({100 * (end - lm0) / lm0:+.1f}%) | {curve} | "
              f"{s['nce_first']:.3f} -> {s['nce_last']:.3f} | {s['pck2patch']:.3f} ({s['chance']:.3f}, "
              f"{s['same_cell']:.3f}) |")
    with open(os.path.join(root, "retention.json"), "w") as f:
        json.dump({"start_lm": lm0, "runs": dict(rows), "args": vars(a)}, f, indent=1)
    print(f"\nruns and retention.json in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
