"""The demo (`make demo`): from nothing to a trained model and its diagnostic in MLflow.

    python -m launch.demo [--small] [--fresh]

1. build a synthetic corpus (procedural rooms, exact depth and poses)   runs/demo/synthetic
2. shard it with the Ray job (pipeline/shard.py, in-process Ray)         runs/demo/shards
3. probe the untrained tiny VLM (layer-wise PCK, raw and SVD-init heads)
4. train it with `deepspeed` on 2 CPU ranks (ZeRO-3), export the result   runs/demo/train
5. probe the trained model with its trained heads
6. print the per-layer PCK table (before / after) and the `mlflow ui` line.

Everything lands in one MLflow experiment (`gasp-demo`) of the local store
`sqlite:///runs/mlflow.db` (or MLFLOW_TRACKING_URI): the shard job, the training run
and both probes. Rerunning it reuses what is done (a complete shard set, a finished
training run, probe results newer than what they probed) without adding runs to the
store; an interrupted step resumes; `--fresh` starts over.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from data.cli import opt, parse_into

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# camera speed of the demo rooms (m/frame): fast enough that frames a few indices apart move by cells
SYNTHETIC_STEP = 0.10


@dataclass
class DemoArgs:
    output: str = opt(os.path.join("runs", "demo"), "demo folder")
    experiment: str = opt("gasp-demo", "MLflow experiment holding the shard job, the training run and both probes")
    scenes: int = opt(12, "synthetic scenes (a quarter held out for validation)")
    frames: int = opt(60, "frames per scene")
    clips_per_scene: int = opt(12, "clips per scene")
    clip_frames: int = opt(4, "frames per clip (K = 4 fits two CPU cores)")
    clip_window: int = opt(24, "a clip's frames lie within this many consecutive frames")
    steps: int = opt(300, "training steps")
    batch_size: int = opt(2, "clips per micro-batch per rank")
    ranks: int = opt(2, "DeepSpeed ranks (CPU processes, or GPUs when there are)")
    max_pixels: int = opt(448 * 336, "per-view pixel budget (448x336 = 16x12 cells for Qwen)")
    preset: str = opt("tiny", "model preset")
    small: bool = opt(False, "CI-sized run: 4 scenes x 40 frames, 30 steps")
    fresh: bool = opt(False, "delete the demo folder first")

    def __post_init__(self) -> None:
        if self.small:
            self.scenes, self.frames, self.clips_per_scene, self.steps = 4, 40, 4, 30
        check_run_sizes(self)


def check_run_sizes(args) -> None:
    """The size flags the demo and the reproduction share; ValueError (one line) names the flag."""
    if args.scenes < 2:
        raise ValueError("--scenes must be >= 2 (one is held out)")
    for flag in ("frames", "clips_per_scene", "steps", "batch_size", "ranks"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.max_pixels < 56 * 56:
        raise ValueError(f"--max-pixels must be >= {56 * 56} (2x2 cells; got {args.max_pixels})")


def claim_folder(record: str, settings: dict) -> str | None:
    """Reuse of a work folder is only safe for the settings that made it: the first run writes them to
    `record`; a later run with other settings gets the differences ('steps 30 -> 40'), else None."""
    if os.path.isfile(record):
        with open(record) as f:
            before = json.load(f)
        if before != settings:
            return ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v) \
                or "settings differ"
        return None
    with open(record, "w") as f:
        json.dump(settings, f, indent=1)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stage:
    def __init__(self, n: int):
        self.n, self.i, self.t0 = n, 0, time.time()

    def __call__(self, title: str) -> None:
        self.i += 1
        print(f"\n=== [{self.i}/{self.n}] {title}  (demo time {time.time() - self.t0:.0f}s)", flush=True)


def run(cmd: list[str], env: dict | None = None, prog: str = "demo") -> None:
    """Print and run one step; a failure ends `prog` (the command the user ran) in one line naming the step."""
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"{prog}: step failed (exit {rc}): {' '.join(cmd)}")


def comparison_table(before: dict, after: dict) -> str:
    def col(res, kind, key):
        if not res or not res.get(kind):
            return {}
        return {d["layer"]: d[key] for d in res[kind]["layers"]}

    cols = [("raw PCK@2p", col(before, "raw", "pck2patch"), col(after, "raw", "pck2patch")),
            ("head PCK@2p", col(before, "head", "pck2patch"), col(after, "head", "pck2patch")),
            ("head PCK@1", col(before, "head", "pck1"), col(after, "head", "pck1"))]
    layers = sorted(cols[0][1])
    head = f"{'layer':>5}  " + "  ".join(f"{n + ' before':>19}{n + ' after':>18}" for n, _, _ in cols)
    lines = [head, "-" * len(head)]
    for l in layers:
        cells = []
        for _, b, a in cols:
            cells.append(f"{_f(b.get(l)):>19}{_f(a.get(l)):>18}")
        lines.append(f"{l:>5}  " + "  ".join(cells))
    ch = after.get("chance", {}) if after else {}
    sc = (after.get("baselines") or {}).get("same_cell", {}) if after else {}
    lines.append(f"chance: PCK@2patch {_f(ch.get('pck2patch'))}  PCK@1 {_f(ch.get('pck1'))}; same-cell baseline "
                 f"PCK@2patch {_f(sc.get('pck2patch'))}")
    for name, res in (("before", before), ("after", after)):
        best = (res.get("best") or {}).get("head") or {}
        robust = ", ".join(f"{ds} {_f(t.get('robustness'))}" for ds, t in (best.get("temporal") or {}).items())
        lines.append(f"{name}: best head layer {best.get('layer')} PCK@2patch {_f(best.get('pck2patch'))}, "
                     f"confidence-accuracy corr {_f(best.get('conf_acc_corr'))}, temporal robustness "
                     f"{robust or 'n/a'}")
    return "\n".join(lines)


def _complete_manifest(path: str) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("complete") is True
    except (OSError, ValueError):
        return False


def _newer(path: str, than: str) -> bool:
    try:
        return os.path.getmtime(path) >= os.path.getmtime(than)
    except OSError:
        return False


def _reused(folder: str, source: str) -> dict | None:
    """A probe's earlier result (its probe.json), if newer than what it probed; else None."""
    path = os.path.join(folder, "probe.json")
    if not _newer(path, source):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    print(f"[demo] reused: {path}; --fresh to redo", flush=True)
    return res


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_into(DemoArgs, argv, "python -m launch.demo", "GASP demo: corpus -> shards -> train -> probes.")
    from launch.probe_lib import ProbeError

    try:
        return _main(args)
    except ProbeError as e:
        print(f"python -m launch.demo: error: probe: {e}", file=sys.stderr)
        return 1


def _main(args: DemoArgs) -> int:
    from launch.probe_lib import ProbeArgs, format_table, run_probe

    out = os.path.abspath(args.output)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    sizes = {k: getattr(args, k) for k in ("scenes", "frames", "clips_per_scene", "clip_frames", "clip_window", "steps",
                                           "batch_size", "ranks", "max_pixels", "preset")}
    refused = claim_folder(os.path.join(out, "demo_args.json"), sizes)
    if refused:
        print(f"python -m launch.demo: error: {out} holds a demo of other settings ({refused}); pass --fresh to "
              f"start over there, or --output another folder", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONPATH", ROOT)
    py = sys.executable
    stage = Stage(6)
    corpus, shards, train_dir = (os.path.join(out, x) for x in ("synthetic", "shards", "train"))

    stage(f"synthetic corpus: {args.scenes} rooms x {args.frames} frames -> {corpus}")
    from data import synthetic

    from data.progress import Progress

    prog = Progress("synthetic", args.scenes, "scenes", every=0.0)  # a line per room (each takes seconds)
    for i in range(args.scenes):
        name = f"scene_{i:04d}"
        if not os.path.isfile(os.path.join(corpus, name, "cameras.json")):
            synthetic.write_scene(corpus, name, seed=2000 + i, n_frames=args.frames, step=SYNTHETIC_STEP)
        prog.step()

    stage(f"shard job (Ray) -> {shards}")
    manifest = os.path.join(shards, "manifest.json")
    if _complete_manifest(manifest):
        print(f"[demo] reused: {manifest} (complete); --fresh to rebuild", flush=True)
    else:
        run([py, os.path.join(ROOT, "pipeline", "shard.py"), "--input", corpus, "--format", "synthetic",
             "--output", shards, "--clip-frames", str(args.clip_frames), "--clip-window", str(args.clip_window),
             "--clips-per-scene", str(args.clips_per_scene), "--val-fraction", "0.25", "--samples-per-shard", "16",
             "--mlflow", "--experiment", args.experiment], env)

    common = dict(shards=[shards], max_pixels=args.max_pixels, experiment=args.experiment, batch_size=4)
    stage("probe before training (random-weight tiny VLM, untrained SVD-init heads)")
    before = _reused(os.path.join(out, "probe-before"), manifest) or run_probe(
        ProbeArgs(preset=args.preset, run_name="demo-probe-before", output=os.path.join(out, "probe-before"),
                  **common))
    print(format_table(before), flush=True)

    stage(f"training: deepspeed, {args.ranks} ranks, ZeRO-3, {args.steps} steps -> {train_dir}")
    export = os.path.join(train_dir, "export")
    finished = os.path.join(export, "export.json")
    if os.path.isfile(finished) and _newer(finished, manifest):
        print(f"[demo] reused: {export} (training finished); --fresh to retrain", flush=True)
    else:
        run([os.path.join(os.path.dirname(py), "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
             str(_free_port()), os.path.join(ROOT, "launch", "train.py"), "--ds_config",
             os.path.join(ROOT, "launch", "zero3.json"), "--preset", args.preset, "--shards", shards,
             "--max-pixels", str(args.max_pixels), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--warmup-steps", str(max(1, args.steps // 20)), "--val-every", str(max(10, args.steps // 3)),
             "--val-batches", "12", "--log-every", str(max(1, args.steps // 30)), "--run-name", "demo-train",
             "--output-dir", train_dir, "--experiment", args.experiment, "--no-build-shards",
             # a random-weight tiny VLM has no pretrained vision features to preserve: train its tower too
             "--no-freeze-vision"], env)

    stage("probe after training (trained model + trained heads)")
    after = _reused(os.path.join(out, "probe-after"), finished) or run_probe(
        ProbeArgs(model=os.path.join(export, "model"), heads=export, run_name="demo-probe-after",
                  output=os.path.join(out, "probe-after"), **common))
    print(format_table(after), flush=True)

    stage("summary")
    table = comparison_table(before, after)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"before": before.get("best"), "after": after.get("best"), "args": vars(args)}, f, indent=1)
    print(table)
    from data.tracking import tracking_uri

    uri = tracking_uri()
    print(f"\nMLflow experiment {args.experiment!r} holds the shard job, the training run and both probes. Open it with:")
    if uri.startswith("sqlite:///"):
        print(f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then http://127.0.0.1:5000")
    else:
        print(f"  your tracking server: {uri}")
    print(f"demo done in {time.time() - stage.t0:.0f}s; files under {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
