"""Small-scale reproduction of GASP's diagnostic on held-out synthetic scenes (REPRODUCTION.md).

    python -m launch.reproduce                    # everything (~1 h on 2 CPU cores), -> runs/repro/results.json
    python -m launch.reproduce --report FILE      # the markdown tables of REPRODUCTION.md from a results file

Runs (each a `deepspeed` training of the tiny preset on 2 CPU ranks, ZeRO-3, same budget):
  main       GASP (all-layer heads, InfoNCE both ways + depth), seeds 0, 1, 2
  no-depth   lambda_depth = 0 (the rooms contain look-alike objects: same texture and shape
             at another depth), seed 0
  last-layer the loss on the last layer's head only, seed 0
Each trained model is probed (launch/probe.py, trained heads) on the held-out scenes; the
untrained model is probed once ("before"). Every step is resumable: a rerun skips what
exists. Results land in one JSON file; `--report` turns it into the tables.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import statistics
import time
from dataclasses import asdict, dataclass

from data.cli import opt, parse_into
from launch.demo import ROOT, SYNTHETIC_STEP, _free_port, check_run_sizes, claim_folder, run

PROG = "python -m launch.reproduce"
RUNS = {"main-s0": dict(seed=0), "main-s1": dict(seed=1), "main-s2": dict(seed=2),
        "no-depth": dict(seed=0, lambda_depth=0.0), "last-layer": dict(seed=0, head_layers="last")}


@dataclass
class ReproArgs:
    output: str = opt(os.path.join("runs", "repro"), "work folder")
    report: str = opt("", "only print the markdown tables of this results.json")
    scenes: int = opt(32, "synthetic scenes (8 held out for the probe)")
    frames: int = opt(60, "frames per scene")
    clips_per_scene: int = opt(12, "clips per scene")
    clip_frames: int = opt(4, "frames per clip")
    clip_window: int = opt(24, "a clip's frames lie within this many consecutive frames")
    steps: int = opt(1200, "training steps per run")
    batch_size: int = opt(2, "clips per micro-batch per rank")
    ranks: int = opt(2, "DeepSpeed ranks")
    lr: float = opt(2e-3, "peak learning rate")
    max_pixels: int = opt(448 * 336, "per-view pixel budget (448x336 = 16x12 cells)")
    runs: str = opt(",".join(RUNS), "comma-separated subset of: " + ", ".join(RUNS))
    experiment: str = opt("gasp-repro", "MLflow experiment")
    fresh: bool = opt(False, "delete the work folder first (a folder made with other settings is refused)")

    def __post_init__(self) -> None:
        if self.report:
            if not os.path.isfile(self.report):
                raise ValueError(f"--report {self.report}: no such file (a results.json of this command)")
            return
        unknown = [r for r in self.runs.split(",") if r and r not in RUNS]
        if unknown:
            raise ValueError(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
        check_run_sizes(self)
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0 (got {self.lr})")


def _best(res: dict, kind: str) -> dict:
    return (res.get("best") or {}).get(kind) or {}


def summarise(res: dict) -> dict:
    """The numbers REPRODUCTION.md reports, from one probe.json."""
    out = {"chance_pck1": res["chance"]["pck1"], "same_cell_pck1": res["baselines"]["same_cell"]["pck1"],
           "anchors": res["data"]["anchors"], "pairs": res["data"]["pairs"]}
    for kind in ("raw", "head"):
        if not res.get(kind):
            continue
        out[f"{kind}_pck1"] = [d["pck1"] for d in res[kind]["layers"]]
        out[f"{kind}_pck0"] = [d["pck0"] for d in res[kind]["layers"]]
        out[f"{kind}_corr"] = [d["conf_acc_corr"] for d in res[kind]["layers"]]
        b = _best(res, kind)
        out[f"{kind}_best_layer"] = b.get("layer")
        out[f"{kind}_best_pck1"] = b.get("pck1")
        out[f"{kind}_best_corr"] = b.get("conf_acc_corr")
        # probe.json of the pair era had a robustness and PCK@1 by frame-gap bucket; clips have a temporal
        # curve per dataset (gasp-probe/2): its robustness at dt 24 of the first dataset stands in
        temporal = b.get("temporal") or {}
        first = next(iter(temporal.values()), {})
        out[f"{kind}_best_robustness"] = b.get("temporal_robustness", first.get("robustness"))
        out[f"{kind}_best_pck1_by_gap"] = b.get("pck1_by_gap")
    buckets = (res.get("head") or {}).get("gap_buckets") or {}
    out["gap_labels"] = buckets.get("labels")
    out["gap_counts"] = buckets.get("counts")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_into(ReproArgs, argv, PROG, "GASP diagnostic reproduction (synthetic).")
    if args.report:
        print(report(json.load(open(args.report))))
        return 0
    from data import synthetic
    from launch.probe_lib import ProbeArgs, ProbeError, run_probe

    out = os.path.abspath(args.output)
    if args.fresh and os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    # finished trainings and probe results are reused: only under the settings that made them
    settings = {k: v for k, v in asdict(args).items() if k not in ("report", "runs", "experiment", "fresh")}
    refused = claim_folder(os.path.join(out, "repro_args.json"), settings)
    if refused:
        print(f"{PROG}: error: {out} holds results of other settings ({refused}); pass --fresh "
              f"to start over there, or --output another folder", file=sys.stderr)
        return 2
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    py = sys.executable
    t_start = time.time()
    corpus, shards = os.path.join(out, "synthetic"), os.path.join(out, "shards")
    for i in range(args.scenes):
        if not os.path.isfile(os.path.join(corpus, f"scene_{i:04d}", "cameras.json")):
            synthetic.write_scene(corpus, f"scene_{i:04d}", seed=9000 + i, n_frames=args.frames, step=SYNTHETIC_STEP)
        print(f"[repro] corpus {i + 1}/{args.scenes} scenes ({time.time() - t_start:.0f}s)", flush=True)
    run([py, os.path.join(ROOT, "pipeline", "shard.py"), "--input", corpus, "--format", "synthetic", "--output",
         shards, "--clip-frames", str(args.clip_frames), "--clip-window", str(args.clip_window), "--clips-per-scene",
         str(args.clips_per_scene), "--val-fraction", "0.25", "--samples-per-shard", "16", "--quiet"], env, PROG)
    common = dict(shards=[shards], max_pixels=args.max_pixels, experiment=args.experiment, batch_size=4)
    results: dict = {"config": asdict(args), "runs": {}, "timing_s": {}}
    res_path = os.path.join(out, "results.json")
    if os.path.isfile(res_path):
        results = json.load(open(res_path))
        results["config"] = asdict(args)

    def probe(name: str, **kw) -> dict:
        path = os.path.join(out, "probe", name, "probe.json")
        if os.path.isfile(path):
            return json.load(open(path))
        try:
            return run_probe(ProbeArgs(run_name=f"repro-probe-{name}", output=os.path.dirname(path), **common, **kw))
        except ProbeError as e:
            raise SystemExit(f"{PROG}: error: probe {name}: {e}") from None

    t0 = time.time()
    results["before"] = summarise(probe("before", preset="tiny"))
    results["timing_s"].setdefault("probe_before", round(time.time() - t0, 1))
    for name in [r for r in args.runs.split(",") if r]:
        spec = RUNS[name]
        train_dir = os.path.join(out, "train", name)
        cmd = [os.path.join(os.path.dirname(py), "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
               str(_free_port()), os.path.join(ROOT, "launch", "train.py"), "--ds_config",
               os.path.join(ROOT, "launch", "zero3.json"), "--preset", "tiny", "--shards", shards,
               "--max-pixels", str(args.max_pixels), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--warmup-steps", str(max(1, args.steps // 20)), "--val-every", "0",
               "--val-batches", "8", "--log-every", "25", "--save-every", "250", "--run-name", f"repro-{name}",
               "--output-dir", train_dir, "--experiment", args.experiment, "--no-build-shards",
               "--seed", str(spec["seed"]), "--data-seed", str(spec["seed"]),
               # a from-scratch tiny VLM has no pretrained vision features to preserve: train its tower too
               "--no-freeze-vision"]
        if "lambda_depth" in spec:
            cmd += ["--lambda-depth", str(spec["lambda_depth"])]
        if "head_layers" in spec:
            cmd += ["--head-layers", spec["head_layers"]]
        t0 = time.time()
        if not os.path.isdir(os.path.join(train_dir, "export", "model")):
            run(cmd, env, PROG)
            results["timing_s"][f"train_{name}"] = round(time.time() - t0, 1)
        export = os.path.join(train_dir, "export")
        t0 = time.time()
        results["runs"][name] = summarise(probe(name, model=os.path.join(export, "model"), heads=export))
        results["timing_s"].setdefault(f"probe_{name}", round(time.time() - t0, 1))
        with open(res_path, "w") as f:
            json.dump(results, f, indent=1)
    results["timing_s"]["total"] = round(time.time() - t_start, 1)
    with open(res_path, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))
    print(f"\nresults: {res_path}")
    return 0


# ----------------------------------------------------------------------------- report

def _f(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ms(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(results: dict) -> str:
    before = results["before"]
    runs = results["runs"]
    main = [runs[k] for k in ("main-s0", "main-s1", "main-s2") if k in runs]
    L = len(before["head_pck1"])
    lines = []
    lines.append(f"Held-out: {before['pairs']} pairs, {before['anchors']} anchors; chance PCK@1 "
                 f"{_f(before['chance_pck1'])}, same-cell baseline PCK@1 {_f(before['same_cell_pck1'])}.\n")
    lines.append("| layer | raw PCK@1 before | head PCK@1 before (SVD init) | raw PCK@1 after | head PCK@1 after | "
                 "gain (head) | gain / 3 sd |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for l in range(L):
        raw_m, raw_s = _ms([r["raw_pck1"][l] for r in main])
        head_m, head_s = _ms([r["head_pck1"][l] for r in main])
        gain = head_m - before["head_pck1"][l]
        verdict = "n/a" if not main or head_s == 0 and len(main) < 2 else (
            f"{gain / (3 * head_s):.1f} ({'claimed' if gain > 3 * head_s else 'not claimed'})" if head_s > 0
            else "sd 0")
        lines.append(f"| {l} | {_f(before['raw_pck1'][l])} | {_f(before['head_pck1'][l])} | {_f(raw_m)} ± {_f(raw_s)} | "
                     f"{_f(head_m)} ± {_f(head_s)} | {gain:+.3f} | {verdict} |")
    lines.append("\n(after: mean ± sample standard deviation over seeds 0, 1, 2; a gain is claimed only when it "
                 "exceeds three standard deviations)\n")
    lines.append("| | best head layer | PCK@1 | PCK@0 | conf.-acc. corr | temporal robustness | PCK@1 by gap |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    gl = before.get("gap_labels") or []

    def row(name, r):
        gaps = " / ".join(_f(x) for x in (r.get("head_best_pck1_by_gap") or []))
        lyr = r.get("head_best_layer")
        pck0 = r["head_pck0"][lyr] if lyr is not None else None
        return (f"| {name} | {lyr} | {_f(r.get('head_best_pck1'))} | {_f(pck0)} | {_f(r.get('head_best_corr'))} | "
                f"{_f(r.get('head_best_robustness'))} | {gaps} |")

    lines.append(row("before (SVD-init heads)", before))
    for k in ("main-s0", "main-s1", "main-s2", "no-depth", "last-layer"):
        if k in runs:
            lines.append(row(k, runs[k]))
    if main:
        keys = ("head_best_pck1", "head_best_corr", "head_best_robustness")
        stats = {k: _ms([r.get(k) for r in main]) for k in keys}
        lines.append(f"| main, mean ± sd | | {_f(stats['head_best_pck1'][0])} ± {_f(stats['head_best_pck1'][1])} | | "
                     f"{_f(stats['head_best_corr'][0])} ± {_f(stats['head_best_corr'][1])} | "
                     f"{_f(stats['head_best_robustness'][0])} ± {_f(stats['head_best_robustness'][1])} | |")
    lines.append(f"\n(gap buckets {', '.join(gl)} frames; anchors per bucket {before.get('gap_counts')})")
    if "no-depth" in runs or "last-layer" in runs:
        lines.append("\nAblations (seed 0, same budget), per-layer head PCK@1:\n")
        lines.append("| layer | main (seed 0) | no depth loss | loss on last layer only |")
        lines.append("| --- | --- | --- | --- |")
        for l in range(L):
            cells = [_f(runs[k]["head_pck1"][l]) if k in runs else "n/a" for k in ("main-s0", "no-depth", "last-layer")]
            lines.append(f"| {l} | " + " | ".join(cells) + " |")
    t = results.get("timing_s", {})
    if t:
        lines.append("\nWall time (s): " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
