"""Reproduction v2: GASP's three panels at small scale, on clips where position alone fails (REPRODUCTION.md).

    python -m launch.reproduce2                    # the tiny-model part (~1 h on 2 CPU cores) -> runs/repro2/results.json
    python -m launch.reproduce2 --report FILE      # REPRODUCTION.md's v2 tables from a results file
    python -m launch.reproduce2 --figure FOLDER    # the three-panel figure from the probe files in FOLDER

The pretrained part (the assembled DINOv2 + SmolLM2 VLM before and after GASP, on these same clips) is
launch/reproduce2_pretrained.py; it shares Repro2Data, build_data, train_cmd and probe_splits with this file.

Data: the shard job's embedded synthetic corpus with `--synthetic-motion scan,orbit` (lateral scans
past look-alike furniture alternating with orbits around the room), a 50 degree field of view,
per-pixel object ids (`--synthetic-objects`, so the probe reports the look-alike subset) and
`--max-overlap 0.45`, so that the anchor's own grid cell in the other view (the same-cell baseline)
is rarely right. Clips of 4 frames within 48; three splits by scene: train, val (chooses each run's
layer), test (reports it). Instruction data: the generated instruction set (data/synthetic_instruct.py)
sharded by the instruction job (train / val by media).

Runs (each `deepspeed`, ZeRO-3, one rank by default, the tiny preset, every weight trainable):
  start      L_LM only on the instruction shards: the common starting checkpoint of every run below
             (a VLM that answers, before any geometry); probed as "untrained"
  corr-only  L_corr only (--lambda-depth 0 --lambda-lm 0), clips
  full-s0/1/2  L_corr + L_depth (--lambda-lm 0), clips, seeds 0, 1, 2
  last-layer full, the loss on the last layer's head only
  linear     full with linear heads (the others: the paper's MLP)
  sft-only   L_LM only (--lambda-corr 0 --lambda-depth 0), instruction shards
  joint      L_LM + L_corr + L_depth, clips:conversations 1:1 (smooth weighted round robin)
Budget: every geometry run sees the same clips (--steps x batch x ranks); joint runs twice the steps,
so it sees those clips and as many conversations as sft-only.
Each model is probed (launch/probe.py) on val (layer choice; LM retention on the instruction set's val
split) and on test at the val layer. Every step is resumable: a rerun under the same settings skips
what exists; other settings are refused (--fresh or another --output).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

from data.cli import opt, parse_into
from launch.demo import ROOT, _free_port, check_run_sizes, claim_folder, run

PROG = "python -m launch.reproduce2"
GEOMETRY = ("corr-only", "full-s0", "full-s1", "full-s2", "last-layer", "linear")
RUNS = {
    "corr-only": dict(seed=0, lambda_depth=0.0, lambda_lm=0.0, data="clips"),
    "full-s0": dict(seed=0, lambda_lm=0.0, data="clips"),
    "full-s1": dict(seed=1, lambda_lm=0.0, data="clips"),
    "full-s2": dict(seed=2, lambda_lm=0.0, data="clips"),
    "last-layer": dict(seed=0, lambda_lm=0.0, head_layers="last", data="clips"),
    "linear": dict(seed=0, lambda_lm=0.0, head="linear", data="clips"),
    "sft-only": dict(seed=0, lambda_corr=0.0, lambda_depth=0.0, lambda_lm=1.0, data="sft"),
    "joint": dict(seed=0, lambda_lm=1.0, data="mix"),
}
FULL = ("full-s0", "full-s1", "full-s2")
LM_RUNS = ("start", "sft-only", "joint")


@dataclass
class Repro2Data:
    """The data settings both parts share (the pretrained part, launch/reproduce2_pretrained.py, reads the same
    clips by default)."""
    scenes: int = opt(32, "synthetic scenes (split by scene into train / val / test)")
    frames: int = opt(60, "frames per scene")
    motion: str = opt("scan,orbit", "camera motions, cycled over the scenes (data/synthetic.py MOTIONS)")
    hfov: float = opt(50.0, "horizontal field of view of the synthetic camera (degrees)")
    max_overlap: float = opt(0.45, "most co-visible fraction of a clip's consecutive frames")
    clips_per_scene: int = opt(16, "clips per scene")
    clip_frames: int = opt(4, "frames per clip")
    clip_window: int = opt(48, "a clip's frames lie within this many consecutive frames")
    val_fraction: float = opt(0.125, "fraction of the scenes in val (chooses the layer)")
    test_fraction: float = opt(0.375, "fraction of the scenes in test (reports)")
    rooms: int = opt(60, "rooms of the generated instruction set")

    def check_data(self) -> None:
        """ValueError (one line) naming the data flag that is out of range."""
        if self.scenes < 2:
            raise ValueError("--scenes must be >= 2 (one is held out)")
        for flag in ("frames", "clips_per_scene", "clip_window", "rooms"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(self, flag)})")
        if self.clip_frames < 2:
            raise ValueError(f"--clip-frames must be >= 2 (got {self.clip_frames})")
        if round(self.scenes * self.val_fraction) < 1 or round(self.scenes * self.test_fraction) < 1 or \
                self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"--scenes {self.scenes} with --val-fraction {self.val_fraction} and --test-fraction "
                             f"{self.test_fraction} leaves a split without scenes; raise --scenes or the fractions")


@dataclass
class Repro2Args(Repro2Data):
    output: str = opt(os.path.join("runs", "repro2"), "work folder")
    report: str = opt("", "only print the markdown tables of this results.json")
    figure: str = opt("", "only draw the three-panel figure from the probe-*.json files in this folder")
    start_steps: int = opt(150, "L_LM-only steps of the starting checkpoint")
    steps: int = opt(450, "training steps of every geometry run (joint: twice as many)")
    batch_size: int = opt(4, "samples per micro-batch per rank")
    ranks: int = opt(1, "DeepSpeed ranks (on 2 CPU cores one rank of 4 trains 1.5x faster than two of 2)")
    lr: float = opt(2e-3, "peak learning rate")
    max_pixels: int = opt(448 * 336, "per-view pixel budget (448x336 = 16x12 cells)")
    runs: str = opt(",".join(RUNS), "comma-separated subset of: " + ", ".join(RUNS))
    experiment: str = opt("gasp-repro2", "MLflow experiment")
    fresh: bool = opt(False, "delete the work folder first (a folder made with other settings is refused)")

    def __post_init__(self) -> None:
        if check_paths(self):
            return
        unknown = [r for r in self.runs.split(",") if r and r not in RUNS]
        if unknown:
            raise ValueError(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
        check_run_sizes(self)  # the size flags the demo and v1 share
        if self.start_steps < 1:
            raise ValueError(f"--start-steps must be >= 1 (got {self.start_steps})")
        self.check_data()
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0 (got {self.lr})")


def check_paths(args) -> bool:
    """--report / --figure must name something that exists; True when one is given (nothing else runs)."""
    for flag in ("report", "figure"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise ValueError(f"--{flag} {path}: no such file or folder")
    return bool(args.report or args.figure)


# ----------------------------------------------------------------------------- summaries of probe.json


def _layer_summary(d: dict) -> dict:
    t = next(iter((d.get("temporal") or {}).values()), {}) or {}
    pts = [(dt, v, n) for dt, v, n in zip(t.get("dt") or [], t.get("normalised") or [], t.get("n") or [])
           if v is not None]
    return {"pck2patch": d.get("pck2patch"), "pck1": d.get("pck1"), "pck0": d.get("pck0"),
            "corr": d.get("conf_acc_corr"), "corr_null": d.get("conf_acc_corr_null_reason"),
            "robustness": t.get("robustness"), "robustness_dt": t.get("robustness_dt"),
            "robustness_null": t.get("robustness_null_reason"),
            "largest_dt": pts[-1][0] if pts else None, "largest_dt_normalised": pts[-1][1] if pts else None,
            "largest_dt_n": pts[-1][2] if pts else None, "lookalike": d.get("lookalike")}


def summarise(res: dict) -> dict:
    """The numbers REPRODUCTION.md reports from one probe.json (test split, layer chosen on val)."""
    out = {"split": res["config"].get("split"), "clips": res["data"]["clips"], "pairs": res["data"]["pairs"],
           "anchors": res["data"]["anchors"], "chance2": res["chance"]["pck2patch"],
           "same_cell2": res["baselines"]["same_cell"]["pck2patch"]}
    for kind in ("raw", "head"):
        if not res.get(kind):
            continue
        out[f"{kind}_pck2patch"] = [d["pck2patch"] for d in res[kind]["layers"]]
        out[f"{kind}_corr"] = [d["conf_acc_corr"] for d in res[kind]["layers"]]
        best = (res.get("best") or {}).get(kind) or {}
        out[f"{kind}_layer"] = best.get("layer")
        out[f"{kind}_best"] = _layer_summary(best) if best else None
    look = (res.get("head") or {}).get("lookalike") or {}
    out["lookalike_anchors"] = look.get("n_anchors")
    out["lookalike_of"] = look.get("of_anchors")
    out["lookalike_chance2"] = look.get("chance2")
    out["lookalike_same_cell2"] = look.get("same_cell_pck2patch")
    return out


def summarise_pair(val: dict, test: dict) -> dict:
    """One run's entry of results.json: the test probe's numbers (at the layer val chose), val's per-layer
    head PCK@2patch and chosen layers, and the held-out LM loss (measured in the val probe)."""
    s = summarise(test)
    s["val_layer"] = {k: ((val.get("best") or {}).get(k) or {}).get("layer") for k in ("raw", "head")}
    s["val_head_pck2patch"] = [d["pck2patch"] for d in (val.get("head") or {}).get("layers") or []]
    lm = val.get("lm_retention") or {}
    s["lm_loss"], s["lm_tokens"] = lm.get("loss"), lm.get("tokens")
    return s


# ----------------------------------------------------------------------------- the runs


class WorkFolder:
    """A reproduction's work folder (args.output): emptied first with args.fresh, claimed for the settings of
    `args` less `ignore` (another command's settings are refused in one line, exit 2, before any work), and
    its results.json, started from `empty` or the earlier run's, saved atomically with each step's seconds."""

    def __init__(self, args, record: str, ignore: tuple[str, ...], empty: dict, prog: str) -> None:
        self.prog = prog
        self.out = os.path.abspath(args.output)
        if args.fresh and os.path.isdir(self.out):
            shutil.rmtree(self.out)
        os.makedirs(self.out, exist_ok=True)
        settings = {k: v for k, v in asdict(args).items() if k not in ignore}
        refused = claim_folder(os.path.join(self.out, record), settings)
        if refused:
            print(f"{prog}: error: {self.out} holds results of other settings ({refused}); pass --fresh to start "
                  f"over there, or --output another folder", file=sys.stderr)
            raise SystemExit(2)
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
        self.path = os.path.join(self.out, "results.json")
        self.results = json.load(open(self.path)) if os.path.isfile(self.path) else empty
        self.results["config"] = asdict(args)

    def save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(self.path + ".tmp", self.path)

    def timed(self, key: str, t0: float) -> None:
        self.results["timing_s"][key] = round(time.time() - t0, 1)
        self.save()

    def train(self, name: str, **kw) -> str:
        """Run `train_cmd(**kw)` into out/train/<name> unless its export exists (timed as train_<name>);
        returns the export folder."""
        d = os.path.join(self.out, "train", name)
        if not os.path.isfile(os.path.join(d, "export", "model", "config.json")):
            t0 = time.time()
            run(train_cmd(out_dir=d, **kw), self.env, self.prog)
            self.timed(f"train_{name}", t0)
        return os.path.join(d, "export")

    def finish(self) -> None:
        """The total of the step times, saved."""
        self.results["timing_s"].pop("total", None)
        self.results["timing_s"]["total"] = round(sum(self.results["timing_s"].values()), 1)
        self.save()


def build_data(args: Repro2Data, work: WorkFolder) -> tuple[str, str]:
    """The clip shards (the shard job's embedded corpus under the --synthetic-* settings of `args`) and the
    instruction shards (the generated instruction set), in out/shards and out/sft; kept when they exist,
    each step timed. Returns (clips, sft)."""
    from data import synthetic_instruct

    out, env, timed, prog = work.out, work.env, work.timed, work.prog

    py = sys.executable
    # 1. clip shards: the shard job's embedded corpus under other --synthetic-* settings, rendered in `out`
    clips, sft = os.path.join(out, "shards"), os.path.join(out, "sft")
    if not os.path.isfile(os.path.join(clips, "manifest.json")):
        t0 = time.time()
        cmd = [py, os.path.join(ROOT, "pipeline", "shard.py"), "--output", clips, "--synthetic-scenes",
               str(args.scenes), "--synthetic-frames", str(args.frames), "--synthetic-motion", args.motion,
               "--synthetic-hfov", str(args.hfov), "--synthetic-objects", "--max-overlap", str(args.max_overlap),
               "--clip-frames", str(args.clip_frames), "--clip-window", str(args.clip_window), "--clips-per-scene",
               str(args.clips_per_scene), "--val-fraction", str(args.val_fraction), "--test-fraction",
               str(args.test_fraction), "--samples-per-shard", "16", "--no-mlflow", "--quiet"]
        print("$ (cd " + out + ") " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, env=env, cwd=out).returncode
        if rc != 0:
            raise SystemExit(f"{prog}: error: the clip shard job failed (exit {rc})")
        timed("clip_shards", t0)
    # 2. instruction shards of the generated instruction set
    if not os.path.isfile(os.path.join(sft, "manifest.json")):
        t0 = time.time()
        data = os.path.join(out, "instruct_data")
        info = synthetic_instruct.write_dataset(data, rooms=args.rooms, seed=1, width=320, height=240,
                                                video_frames=16)
        run([py, os.path.join(ROOT, "pipeline", "shard.py"), "--format", "llava-json", "--input", info["annotations"],
             "--media-root", data, "--output", sft, "--frames", "8", "--val-fraction", "0.25", "--samples-per-shard",
             "16", "--no-mlflow", "--quiet"], env, prog)
        timed("instruct_shards", t0)

    return clips, sft


def probe_splits(work: WorkFolder, name: str, model: str, clips: str, lm_shards: list[str], run_prefix: str,
                 **kw) -> tuple[dict, dict]:
    """`launch/probe.py` of one model on val (chooses the layer; LM retention on `lm_shards` when given) and then
    on test at the layer val chose, into out/probe/<name>_<split>; a probe whose probe.json exists is kept.
    Timed as probe_<name> only when a probe ran (a rerun that keeps both keeps their earlier time).
    `kw`: further ProbeArgs. Returns the two probe.json dicts."""
    from launch.probe_lib import ProbeArgs, ProbeError, run_probe

    paths, t0, ran = {}, time.time(), False
    for split in ("val", "test"):
        folder = os.path.join(work.out, "probe", f"{name}_{split}")
        paths[split] = os.path.join(folder, "probe.json")
        if os.path.isfile(paths[split]):
            continue
        args = dict(model=model, shards=[clips], split=split, batch_size=4, output=folder,
                    run_name=f"{run_prefix}-{name}-{split}", **kw)
        if split == "test":
            args["layer_from"] = paths["val"]
        elif lm_shards:
            args["lm_shards"] = lm_shards
        try:
            run_probe(ProbeArgs(**args))
        except ProbeError as e:
            raise SystemExit(f"{work.prog}: error: probe {name} ({split}): {e}") from None
        ran = True
    if ran:
        work.timed(f"probe_{name}", t0)
    return json.load(open(paths["val"])), json.load(open(paths["test"]))


def report_or_figure(args, report, figure, key: str, prog: str) -> bool:
    """--report FILE prints `report(results)`, --figure FOLDER draws `figure(FOLDER, FOLDER/three_panels.png)`;
    True when one of them was asked (nothing else runs). A --report file that is not a results.json of this
    command (no `key`) ends in one line."""
    if args.report:
        try:
            with open(args.report) as f:
                results = json.load(f)
            bad = None if isinstance(results, dict) and key in results else f"not a results.json of {prog} (no " \
                f"'{key}'); pass the results.json its run wrote"
        except (OSError, ValueError) as e:
            bad = f"not readable as JSON ({e})"
        if bad:
            print(f"{prog}: error: --report {args.report}: {bad}", file=sys.stderr)
            raise SystemExit(2)
        print(report(results))
    elif args.figure:
        print(figure(args.figure, os.path.join(args.figure, "three_panels.png")))
    return bool(args.report or args.figure)


def wall_time_lines(results: dict) -> list[str]:
    """The report's closing line: every step's seconds, as results.json recorded them."""
    t = results.get("timing_s", {})
    return ["\nWall time (s): " + ", ".join(f"{k} {v}" for k, v in t.items())] if t else []


def train_cmd(*, ranks: int, run_name: str, out_dir: str, shards: list[str], steps: int, batch_size: int,
              lr: float, seed: int, experiment: str, extra: list[str]) -> list[str]:
    """`deepspeed launch/train.py` (ZeRO-3) of one reproduction run: no validation during training, a
    checkpoint halfway, the export at the end."""
    return [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks), "--master_port",
            str(_free_port()), os.path.join(ROOT, "launch", "train.py"), "--ds_config",
            os.path.join(ROOT, "launch", "zero3.json"), "--shards", *shards, "--steps", str(steps), "--batch-size",
            str(batch_size), "--lr", str(lr), "--warmup-steps", str(max(1, steps // 20)), "--val-every", "0",
            "--val-batches", "8", "--log-every", "50", "--save-every", str(max(50, steps // 2)), "--run-name",
            run_name, "--output-dir", out_dir, "--experiment", experiment, "--no-build-shards", "--seed", str(seed),
            "--data-seed", str(seed), *extra]


def main(argv: list[str] | None = None) -> int:
    args = parse_into(Repro2Args, argv, PROG,
                      "GASP reproduction v2: clips with real motion, look-alikes, joint training (synthetic).")
    if report_or_figure(args, report, figure, "untrained", PROG):
        return 0
    work = WorkFolder(args, "repro2_args.json", ("report", "figure", "runs", "experiment", "fresh"),
                      {"runs": {}, "timing_s": {}}, PROG)
    results = work.results
    clips, sft = build_data(args, work)

    def probe(name: str, model: str, heads: str | None, lm: bool) -> dict:
        """Val probe (layer choice, LM retention) then test probe at the val layer; returns the test summary."""
        val, test = probe_splits(work, name, model, clips, [sft] if lm else [], "repro2-probe",
                                 max_pixels=args.max_pixels, experiment=args.experiment,
                                 **({"heads": heads} if heads else {}))
        return summarise_pair(val, test)

    def train(name: str, shards: list[str], steps: int, seed: int, extra: list[str], model: str | None) -> str:
        src = ["--model", model] if model else ["--preset", "tiny"]
        return work.train(name, ranks=args.ranks, run_name=f"repro2-{name}", shards=shards, steps=steps,
                          batch_size=args.batch_size, lr=args.lr, seed=seed, experiment=args.experiment,
                          extra=["--max-pixels", str(args.max_pixels), "--trainable", "full", "--no-freeze-vision",
                                 *src, *extra])

    # 3. the starting checkpoint: L_LM only
    start = train("start", [sft], args.start_steps, 0,
                  ["--lambda-lm", "1", "--lambda-corr", "0", "--lambda-depth", "0"], None)
    start_model = os.path.join(start, "model")
    results["untrained"] = probe("start", start_model, None, lm=True)
    for name in [r for r in args.runs.split(",") if r]:
        spec = RUNS[name]
        extra = ["--lambda-lm", str(spec["lambda_lm"])]
        for k in ("lambda_depth", "lambda_corr", "head_layers", "head"):
            if k in spec:
                extra += [f"--{k.replace('_', '-')}", str(spec[k])]
        shards = {"clips": [clips], "sft": [sft], "mix": [f"{clips}:1", f"{sft}:1"]}[spec["data"]]
        steps = args.steps * (2 if spec["data"] == "mix" else 1)
        export = train(name, shards, steps, spec["seed"], extra, start_model)
        results["runs"][name] = probe(name, os.path.join(export, "model"), export, lm=name in LM_RUNS)
        work.save()
    work.finish()
    out = work.out
    missing = [name for _, name in FIGURE_RUNS if name != "start" and name not in results["runs"]]
    if missing:
        print(f"no three-panel figure: it draws untrained vs L_corr only vs full (seed 0), and --runs left out "
              f"{', '.join(missing)}")
    else:
        print(figure(os.path.join(out, "probe"), os.path.join(out, "three_panels.png")))
    print(report(results))
    print(f"\nresults: {work.path}")
    return 0


# ----------------------------------------------------------------------------- figure and report

FIGURE_RUNS = (("untrained", "start"), ("L_corr only", "corr-only"), ("full (seed 0)", "full-s0"))


def _probe_file(folder: str, name: str) -> str:
    """The test probe of run `name` in a work folder's probe/ (name_test/probe.json) or a docs folder
    (probe-name-test.json)."""
    for p in (os.path.join(folder, f"{name}_test", "probe.json"), os.path.join(folder, f"probe-{name}-test.json")):
        if os.path.isfile(p):
            return p
    raise SystemExit(f"{PROG}: error: no test probe of run {name} in {folder}")


def figure(folder: str, path: str) -> str:
    """The paper's three panels on the test split for untrained vs L_corr only vs full, each at its val layer."""
    from launch.plots import three_panels

    runs, layer = {}, {}
    for label, name in FIGURE_RUNS:
        res = json.load(open(_probe_file(folder, name)))
        runs[label] = {"head": res.get("head"), "raw": res.get("raw")}
        layer[label] = ((res.get("best") or {}).get("head") or {}).get("layer")
    return three_panels(runs, path, title="GASP reproduction v2, test split (heads; layer chosen on val)",
                        layer=layer)


def _f(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ms(xs) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _best(r: dict, key: str, kind: str = "head"):
    return (r.get(f"{kind}_best") or {}).get(key)


def _rob(r: dict, kind: str = "head") -> str:
    b = r.get(f"{kind}_best") or {}
    if b.get("robustness") is not None:
        return f"{b['robustness']:.3f} (dt {b.get('robustness_dt')})"
    tail = (f"; at dt {b['largest_dt']}, the largest measured: {b['largest_dt_normalised']:.3f} "
            f"over {b['largest_dt_n']} anchors") if b.get("largest_dt") is not None else ""
    return f"null: {b.get('robustness_null')}{tail}"


def _look(r: dict, kind: str = "head") -> str:
    look = _best(r, "lookalike", kind) or {}
    if not look.get("n_anchors"):
        return "none"
    return f"{_f(look.get('pck2patch'))} ({look['n_anchors']})"


def _verdict(gain: float | None, sd: float | None) -> str:
    if gain is None or sd is None:
        return "n/a"
    if sd == 0:
        return "sd 0"
    return f"{gain / (3 * sd):.1f} ({'claimed' if gain > 3 * sd else 'not claimed'})"


def report(results: dict) -> str:
    u, runs = results["untrained"], results["runs"]
    cfg = results.get("config", {})
    full = [runs[k] for k in FULL if k in runs]
    L = len(u["head_pck2patch"])
    lines = [f"Test split: {u['clips']} clips, {u['pairs']} pairs, {u['anchors']} anchors; chance PCK@2patch "
             f"{_f(u['chance2'])}, same-cell baseline PCK@2patch {_f(u['same_cell2'])}. Look-alike subset: "
             f"{u.get('lookalike_anchors')} of the {u.get('lookalike_of')} anchors with object ids (chance "
             f"{_f(u.get('lookalike_chance2'))}, same-cell {_f(u.get('lookalike_same_cell2'))}).\n"]
    # per-layer table
    names = ["untrained"] + [k for k in RUNS if k in runs]
    lines.append("Head PCK@2patch by language-model layer, test split (chance " + _f(u["chance2"]) +
                 ", same-cell " + _f(u["same_cell2"]) + "):\n")
    lines.append("| layer | " + " | ".join(names) + (" | full, mean ± sd |" if full else " |"))
    lines.append("| --- " * (len(names) + 1 + bool(full)) + "|")
    for l in range(L):
        cells = [_f(u["head_pck2patch"][l])] + [_f(runs[k]["head_pck2patch"][l]) for k in names[1:]]
        if full:
            m, s = _ms([r["head_pck2patch"][l] for r in full])
            cells.append(f"{_f(m)} ± {_f(s)}")
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines.append("\n(the untrained model is scored through SVD-initialised heads, DESIGN §6)\n")
    # best-layer table
    lines.append("| run | layer (chosen on val) | PCK@2patch | PCK@1 | conf.-acc. corr | look-alike PCK@2patch "
                 "(anchors) | normalised PCK at dt 24 | held-out LM loss |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r.get('head_layer')} | {_f(_best(r, 'pck2patch'))} | {_f(_best(r, 'pck1'))} | "
                f"{_f(_best(r, 'corr'))} | {_look(r)} | {_rob(r)} | {_f(r.get('lm_loss'), 4)} |")

    lines.append(row("untrained (start)", u))
    for k in names[1:]:
        lines.append(row(k, runs[k]))
    if full:
        stats = {k: _ms([_best(r, k) for r in full]) for k in ("pck2patch", "pck1", "corr")}
        lines.append(f"| full, mean ± sd | | {_f(stats['pck2patch'][0])} ± {_f(stats['pck2patch'][1])} | "
                     f"{_f(stats['pck1'][0])} ± {_f(stats['pck1'][1])} | {_f(stats['corr'][0])} ± "
                     f"{_f(stats['corr'][1])} | | | |")
    # claims
    lines.append("\nClaims (a gain is claimed only beyond three standard deviations of the full run over seeds):\n")
    if full:
        m, s = _ms([_best(r, "pck2patch") for r in full])
        g = m - _best(u, "pck2patch")
        lines.append(f"- full vs untrained, best-layer PCK@2patch: {m:.3f} vs {_best(u, 'pck2patch'):.3f}, gain "
                     f"{g:+.3f}, gain / 3 sd {_verdict(g, s)}; vs the same-cell baseline {u['same_cell2']:.3f}: "
                     f"{m - u['same_cell2']:+.3f}.")
        for other, label in (("corr-only", "L_corr only"), ("last-layer", "last layer only"), ("linear", "linear heads")):
            if other in runs:
                g = m - _best(runs[other], "pck2patch")
                lines.append(f"- full vs {label}: {m:.3f} vs {_best(runs[other], 'pck2patch'):.3f}, difference "
                             f"{g:+.3f} ({'full' if g > 0 else label} higher), |difference| / 3 sd "
                             f"{_verdict(abs(g), s)}.")
        looks = [(_best(r, "lookalike") or {}).get("pck2patch") for r in full]
        lm_, ls_ = _ms(looks)
        co = (_best(runs.get("corr-only", {}), "lookalike") or {}).get("pck2patch") if "corr-only" in runs else None
        if lm_ is not None and co is not None:
            lines.append(f"- look-alike subset: full {lm_:.3f} ± {ls_:.3f} vs L_corr only {co:.3f}, difference "
                         f"{lm_ - co:+.3f} ({'full' if lm_ > co else 'L_corr only'} higher), |difference| / 3 sd "
                         f"{_verdict(abs(lm_ - co), ls_)}.")
        else:
            lines.append("- look-alike subset: no look-alike anchors on the test split; no statement possible.")
    if "joint" in runs and "sft-only" in runs:
        j, s_ = runs["joint"], runs["sft-only"]
        if j.get("lm_loss") and s_.get("lm_loss"):
            rel = (j["lm_loss"] - s_["lm_loss"]) / s_["lm_loss"]
            lines.append(f"- LM retention: held-out LM loss joint {j['lm_loss']:.4f} vs SFT only {s_['lm_loss']:.4f} "
                         f"({100 * rel:+.1f}%; start {_f(u.get('lm_loss'), 4)}).")
        if full:
            m, _ = _ms([_best(r, "pck2patch") for r in full])
            lines.append(f"- joint vs geometry only (full, mean of seeds), best-layer PCK@2patch: "
                         f"{_best(j, 'pck2patch'):.3f} vs {m:.3f} ({_best(j, 'pck2patch') - m:+.3f}).")
    budget = cfg.get("steps"), cfg.get("batch_size"), cfg.get("ranks")
    if all(budget):
        lines.append(f"\nBudget: every geometry run {budget[0]} steps x {budget[1]} clips x {budget[2]} ranks = "
                     f"{budget[0] * budget[1] * budget[2]} clip samples; joint {2 * budget[0]} steps (the same "
                     f"clips and as many conversations as sft-only's {budget[0] * budget[1] * budget[2]}); start "
                     f"{cfg.get('start_steps')} steps of L_LM.")
    return "\n".join(lines + wall_time_lines(results))


if __name__ == "__main__":
    sys.exit(main())
