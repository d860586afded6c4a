"""The assembled pretrained model on CPU: seconds per training step, and which DINOv2 block matches patches best.

    make pretrained
    .venv/bin/python tests/benchmarks/bench_assembled.py [--model DIR | --lm-layers N --image-size S
        --vision-layer K] [--steps 12] [--warmup 2] [--ranks 1,2] [--trainable lora] [--tower-layers] [--keep]

Without --model it assembles the model first (`launch/assemble.py`, default size: all 30
SmolLM2 layers, 224 px, DINOv2 block 6) into a temporary folder. Then, per rank count R,
the real training command on CPU with 2 cores in all (OMP threads per rank = 2 / R):

    deepspeed --num_gpus R launch/train.py --ds_config launch/zero3.json --model DIR --trainable T
              --batch-size 1 --steps N --val-every 0 --no-mlflow --no-export --resume never

one 2-frame clip per micro-batch per rank, on a small synthetic shard
set (no Ray). It reports the median step time after --warmup steps (the trainer's own
`train_log.jsonl`), seconds per clip, and the steps and clips that fit in an hour.

--tower-layers adds a table: raw PCK@0 / PCK@1 (cosine argmax over B's cells, DESIGN §6) of
the patch features of every DINOv2 block (the full 12-block tower at the model's input
size) on the pairs of the shard set's val clips, with chance and the same-cell baseline: how
`--vision-layer`'s default was chosen. Run by hand; not a test.
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
CORES = 2


def build_data(root: str, scenes: int) -> str:
    from conftest import build_shards, write_tiny_corpus

    corpus = write_tiny_corpus(os.path.join(root, "corpus"), n_scenes=scenes, n_frames=24)
    out = os.path.join(root, "shards")
    # correspondences every 2 px: at 224 px a 14 px cell is 10 stored pixels, so every cell can be an anchor
    build_shards(corpus, out, clip_frames=2, clip_window=20, clips_per_scene=12, samples_per_shard=8,
                 max_side=160, val_fraction=0.25, stride=2)
    return out


def assemble(root: str, args) -> str:
    from launch.assemble import main as assemble_main

    out = os.path.join(root, "model")
    rc = assemble_main(["--out", out, "--lm-layers", str(args.lm_layers), "--image-size", str(args.image_size),
                        "--vision-layer", str(args.vision_layer)])
    if rc:
        raise SystemExit(f"assembly failed (exit {rc})")
    return out


def train(ranks: int, model: str, shards: str, root: str, args) -> dict:
    from conftest import free_port

    out = os.path.join(root, f"run_{ranks}")
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--master_port", str(free_port()),
           "--num_gpus", str(ranks), os.path.join(ROOT, "launch", "train.py"),
           "--ds_config", os.path.join(ROOT, "launch", "zero3.json"), "--model", model, "--trainable", args.trainable,
           "--shards", shards, "--output-dir", out, "--steps", str(args.steps), "--batch-size", "1",
           "--num-workers", "1", "--val-every", "0", "--val-batches", "1", "--no-mlflow", "--no-export",
           "--resume", "never"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(max(1, CORES // ranks)), PYTHONPATH=ROOT, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
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
    step = statistics.median(r["step_time_s"] for r in rows)
    return {"ranks": ranks, "steps": len(rows), "step_s": step, "clip_s": step / ranks,
            "tokens_s": statistics.median(r["tokens_per_s"] for r in rows),
            "wait": sum(r["data_wait_s"] for r in rows) / sum(r["step_time_s"] for r in rows), "wall": wall}


def tower_layers(model: str, shards: str, max_pairs: int) -> tuple[list[dict], dict]:
    """PCK of each DINOv2 block's patch features (raw cosine) on the val clips' pairs."""
    import torch

    from data.stream import SampleStream
    from losses.gasp import pair_view
    from losses.metrics import match_stats, raw_similarities
    from model.loading import build_model_and_processor
    from model.pretrained import build_dinov2, require

    _, _, adapter = build_model_and_processor(model)
    onnx_file, _ = require()
    tower = build_dinov2(onnx_file.path, image_size=adapter.image_size)  # all 12 blocks
    B = 2
    stream = SampleStream([shards], adapter, batch_size=B, rank=0, world_size=1, num_workers=0, split="val",
                          batches_per_epoch=max(1, max_pairs // B))
    dists, chance0, chance1, same = [], [], [], []
    seen, n_pairs = set(), 0
    with torch.no_grad():
        for batch in stream:
            fresh = torch.tensor([k not in seen for k in batch["keys"]])
            seen.update(batch["keys"])
            pairs = pair_view(batch)
            pairs["anchor_mask"] = pairs["anchor_mask"] & fresh[batch["pair_clip"]][:, None]
            n_pairs += int(fresh[batch["pair_clip"]].sum())
            S = adapter.image_size
            pv = batch["pixel_values"].reshape(-1, 3, S, S)  # (F, 3, S, S): the batch's frames in order
            if pv.shape[0] != batch["frame_clip"].numel():
                raise SystemExit(f"--tower-layers: {pv.shape[0]} images for {batch['frame_clip'].numel()} frames")
            hidden = tower(pixel_values=pv, output_hidden_states=True).hidden_states  # 13 x (F, 1 + N, D)
            feats = torch.stack(hidden[1:])[:, :, 1:]  # (12, F, N, D), class token dropped
            pf = batch["pair_frames"]
            st = match_stats(raw_similarities(feats[:, pf[:, 0]], feats[:, pf[:, 1]]), pairs)  # per anchor (12, K)
            dists.append(st.dist)
            chance0.append(st.chance0)
            chance1.append(st.chance1)
            same.append(st.same_dist)
            if n_pairs >= max_pairs:
                break
    d = torch.cat(dists, dim=1)  # (12, K)
    rows = [{"block": l + 1, "pck0": float((d[l] == 0).double().mean()), "pck1": float((d[l] <= 1).double().mean())}
            for l in range(d.shape[0])]
    s = torch.cat(same)
    base = {"pairs": n_pairs, "clips": len(seen), "anchors": int(d.shape[1]),
            "chance0": float(torch.cat(chance0).mean()), "chance1": float(torch.cat(chance1).mean()),
            "same0": float((s == 0).double().mean()), "same1": float((s <= 1).double().mean()),
            "size": adapter.image_size, "cells": adapter.side}
    return rows, base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="an assembled checkpoint (default: assemble one)")
    ap.add_argument("--lm-layers", type=int, default=0, help="assembly: SmolLM2 layers kept (0: all 30)")
    ap.add_argument("--image-size", type=int, default=224, help="assembly: tower input side")
    ap.add_argument("--vision-layer", type=int, default=6, help="assembly: DINOv2 block fed to the projector")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (2 cores shared among them)")
    ap.add_argument("--trainable", default="lora", choices=["heads", "lora", "full"])
    ap.add_argument("--scenes", type=int, default=4, help="synthetic scenes in the shard set")
    ap.add_argument("--tower-layers", action="store_true", help="also the per-block PCK table")
    ap.add_argument("--tower-pairs", type=int, default=64, help="val pairs for --tower-layers")
    ap.add_argument("--no-train", action="store_true", help="skip the training table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (model, shards, logs)")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    from model.pretrained import PretrainedError, require

    try:
        require()
    except PretrainedError as e:
        raise SystemExit(f"bench_assembled.py: {e}")
    root = tempfile.mkdtemp(prefix="bench_assembled_")
    shards = build_data(root, args.scenes)
    model = args.model or assemble(root, args)
    rec = json.load(open(os.path.join(model, "assembly.json")))["spec"]
    what = (f"assembled model: SmolLM2 {rec['lm_layers']} layers, DINOv2 blocks 1-{rec['vision_layer']} at "
            f"{rec['image_size']} px ({rec['image_size'] // 14}^2 cells a frame)")
    if args.tower_layers:
        rows, base = tower_layers(model, shards, args.tower_pairs)
        print(f"\nDINOv2 blocks, raw patch features at {base['size']} px ({base['cells']}x{base['cells']} cells), "
              f"{base['pairs']} pairs of {base['clips']} val clips, {base['anchors']} anchors (synthetic rooms)\n")
        print("| block | PCK@0 | PCK@1 |")
        print("|---:|---:|---:|")
        for r in rows:
            print(f"| {r['block']} | {r['pck0']:.3f} | {r['pck1']:.3f} |")
        print(f"| chance | {base['chance0']:.3f} | {base['chance1']:.3f} |")
        print(f"| same cell | {base['same0']:.3f} | {base['same1']:.3f} |")
    if not args.no_train:
        results = [train(int(r), model, shards, root, args) for r in args.ranks.split(",")]
        print(f"\n{what}; --trainable {args.trainable}, ZeRO-3, CPU: {CORES} cores shared by the ranks, 1 clip "
              f"(2 frames) per rank per step, median over steps {args.warmup + 1}-{args.steps}\n")
        print("| ranks x threads | s/step | s/clip | steps/hour | clips/hour | tokens/s | data wait | wall (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['ranks']} x {max(1, CORES // r['ranks'])} | {r['step_s']:.2f} | {r['clip_s']:.2f} | "
                  f"{3600 / r['step_s']:.0f} | {3600 / r['clip_s']:.0f} | {r['tokens_s']:.0f} | "
                  f"{100 * r['wait']:.0f}% | {r['wall']:.0f} |")
    if args.keep:
        print(f"\nmodel, shards and logs in {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
