"""Score a model on VSI-Bench, All-Angles Bench or BLINK multi-view, as their reference code scores
(DESIGN §7), and put two models side by side.

    python launch/evaluate.py --benchmark vsi-bench       --data ROOT --model PATH
    python launch/evaluate.py --benchmark all-angles      --data ROOT --preset tiny --limit 20
    python launch/evaluate.py --benchmark blink-multiview --data ROOT --model PATH [--reference lmms-eval-main]
    python launch/evaluate.py --compare RESULTS_A RESULTS_B

Reads the user's benchmark files (never downloads; docs/evaluate.md gives the
layouts), answers every question greedily with the model's chat template, appends each
answer to OUT/predictions.jsonl as it comes (a rerun resumes), and writes
OUT/results.json (OUT/results-<version>.json under a non-default `--reference`) and one
MLflow run; warns in one line when the benchmark's scenes are in the model's training
manifests. The benchmarks live in `launch/benchmarks/`.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python launch/evaluate.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from data.cli import flat_dict, one_line, opt, parse_into
from data.progress import Progress
from data.storage import sha256_file
from launch.benchmarks import BENCHMARKS, BenchmarkError, Question
from launch.benchmarks import references

PROG = "launch/evaluate.py"
DEFAULT_ROOT = os.path.join("runs", "eval")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision")
"""Model families evaluate.py runs, each with its own chat template and image path (launch/benchmarks/generation.py)."""
REFUSED = {"llava_next_video": "its images go through any-resolution crops (~2,900 tokens per 336 px frame: two frames "
                               "pass its 4k context) and its video path needs torchvision"}
"""Why a supported training family is not evaluated."""
PROMPT_VERSION = 1
"""Bumped when prompts or decoding change, so old predictions are not resumed into new ones (a benchmark
module's own PROMPT_VERSION, where it has one, takes its place)."""
FRAMES_AS = ("auto", "video", "clip", "images")
"""--frames-as values; `images` is the old name of `clip`."""
log = logging.getLogger("evaluate")


@dataclass
class EvalArgs:
    """Flags of launch/evaluate.py."""

    benchmark: str = opt("", "which benchmark (required unless --compare)", choices=sorted(BENCHMARKS))
    data: str = opt("", "the benchmark folder you downloaded (required unless --compare; layouts in "
                        "docs/evaluate.md)")
    annotations: str = opt("", "annotation file; empty: found in --data (VSI-Bench test-00000-of-00001.parquet, "
                               "test.parquet, test.jsonl or test.json; All-Angles data.json; BLINK "
                               "Multi-view_Reasoning/val-00000-of-00001.parquet)")
    reference: str = opt("default", "the version of the reference scoring to reproduce (docs/evaluate.md); default: "
                                    "lmms-eval-v0.5 for VSI-Bench, lmms-eval-v0.6 for BLINK, vlmevalkit-18fc37a "
                                    "for All-Angles", choices=["default", *references.REFERENCES])
    check_training_manifest: list[str] = opt(default_factory=list, help=(
        "a training shard set's manifest.json (or the folder holding it; local or s3://) whose train scenes are "
        "checked against the benchmark's scenes; repeatable (an export's gasp_training.json is read too)"),
        metavar="MANIFEST")
    compare: list[str] = opt(default_factory=list, help=(
        "RESULTS_A RESULTS_B: the paper-style table of two models (results.json files, output folders or folders "
        "of them); no model is run"), metavar="RESULTS")
    allow_mixed_references: bool = opt(False, "--compare: compare a benchmark scored under different reference "
                                              "versions on the two sides (refused otherwise)")
    preset: str = opt("", "random-weight model preset (tiny, tiny-qwen2.5, tiny-qwen3-vl, qwen2.5-vl-7b, "
                          "qwen3-vl-8b, ...)")
    model: str = opt("", "a Hugging Face checkpoint directory (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision)")
    output: str = opt("", "output folder; empty: runs/eval/<benchmark>-<model name> (--compare: the JSON file; "
                          "empty: runs/eval/compare/<A>-vs-<B>.json)")
    num_frames: int = opt(32, "VSI-Bench: frames sampled uniformly from each video (lmms-eval's default 32)")
    frames_as: str = opt("auto", "frames of a multi-frame question: auto (the benchmark's reference protocol: "
                                 "VSI-Bench as one video input for Qwen, as lmms-eval; images otherwise), video, "
                                 "clip (images in one sequence, the way GASP trains; `images` is the same)",
                         choices=list(FRAMES_AS))
    batch_size: int = opt(1, "questions per generate() call (left-padded)")
    max_new_tokens: int = opt(0, "longest answer in tokens (0: the benchmark's default, VSI-Bench 16 as "
                                 "lmms-eval, All-Angles 32)")
    max_pixels: int = opt(0, "pixel budget of each image or frame after resizing (0: the processor's own)")
    limit: int = opt(0, "evaluate only the first N questions of the file (0: all)")
    skip_missing: bool = opt(False, "evaluate only the questions whose videos / images exist (results are "
                                    "marked incomplete) instead of failing")
    overwrite: bool = opt(False, "discard predictions in --output that were made with other settings")
    device: str = opt("auto", "cpu, cuda or cuda:N (auto: cuda when available)")
    precision: str = opt("auto", "weights' dtype (auto: bf16 on GPU, fp32 on CPU)",
                         choices=["auto", "bf16", "fp16", "fp32"])
    attn: str = opt("auto", "attention implementation", choices=["auto", "sdpa", "eager", "flash_attention_2"])
    mlflow: bool = opt(True, "log params, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, else "
                             "sqlite:///runs/mlflow.db); --no-mlflow to skip")
    experiment: str = opt("gasp", "MLflow experiment")
    run_name: str = opt("", "MLflow run name; empty: eval-<benchmark>-<model name>")
    quiet: bool = opt(False, "no progress lines")

    def __post_init__(self) -> None:
        if self.compare:
            if len(self.compare) != 2:
                raise ValueError(f"--compare takes two results (A and B), got {len(self.compare)}")
            if self.benchmark or self.data or self.preset or self.model:
                raise ValueError("--compare reads two results files; give no --benchmark, --data, --preset or "
                                 "--model with it")
            return
        if not self.benchmark:
            raise ValueError(f"--benchmark is required: {' or '.join(sorted(BENCHMARKS))}")
        if not self.data:
            raise ValueError("--data is required: the folder holding the benchmark files (see docs/evaluate.md)")
        if self.preset and self.model:
            raise ValueError("give --preset NAME or --model PATH, not both")
        if not self.preset and not self.model:
            raise ValueError("give the model to evaluate: --model PATH (a Hugging Face checkpoint directory) or "
                             "--preset NAME")
        if self.preset:
            from model.presets import PRESETS, get_preset

            if self.preset not in PRESETS:
                raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
            family = get_preset(self.preset).family
            if family not in FAMILIES:
                raise ValueError(f"--preset {self.preset} is a {family} model; evaluate.py runs "
                                 f"{' / '.join(FAMILIES)} models{_why_not(family)}")
        if self.model:
            family = checkpoint_model_type(self.model)
            if family not in FAMILIES:
                raise ValueError(f"--model {self.model}: model_type {family!r}; evaluate.py runs "
                                 f"{' / '.join(FAMILIES)} checkpoints{_why_not(family)}")
        if self.frames_as == "video" and self.benchmark != "vsi-bench":
            raise ValueError(f"--frames-as video: {self.benchmark} questions are images, not a video (its reference "
                             "feeds them as images); use --frames-as auto or clip")
        if self.frames_as == "video" and family_of(self) == "llava_onevision":
            raise ValueError("--frames-as video: LLaVA-OneVision takes the frames as images here (its video path "
                             "needs torchvision); use --frames-as clip or auto")
        references.resolve(self.benchmark, self.reference)  # ValueError (one line) when it does not score it
        for flag, value, low in (("--num-frames", self.num_frames, 1), ("--batch-size", self.batch_size, 1),
                                 ("--max-new-tokens", self.max_new_tokens, 0), ("--max-pixels", self.max_pixels, 0),
                                 ("--limit", self.limit, 0)):
            if value < low:
                raise ValueError(f"{flag} must be >= {low} (got {value})")
        if 0 < self.max_pixels < 56 * 56:
            raise ValueError(f"--max-pixels must be 0 (the processor's) or at least 3136, Qwen's smallest image "
                             f"(got {self.max_pixels})")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N (got {self.device!r})")

    @property
    def model_name(self) -> str:
        """The preset name, or the checkpoint folder's name (its parent's too when that is generic)."""
        if self.preset:
            return self.preset
        path = os.path.normpath(os.path.abspath(self.model))
        name = os.path.basename(path)
        if re.fullmatch(r"(checkpoint|ckpt|step|final|hf|model|best|last)[-_\d]*", name, re.I):
            name = f"{os.path.basename(os.path.dirname(path))}-{name}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _why_not(family: str | None) -> str:
    return f" ({family}: {REFUSED[family]})" if family in REFUSED else ""


def checkpoint_model_type(path: str) -> str | None:
    """`model_type` of a checkpoint's config.json; ValueError (one line) when there is none."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"--model {path}: not a checkpoint directory (no config.json there)")
    try:
        with open(cfg, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {path}: cannot read config.json ({e})") from None


class ArgError(Exception):
    """A flag that is wrong for this machine (device); one line."""


def resolve_device(spec: str):
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgError(f"--device {spec}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ArgError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(precision: str, device):
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def model_fingerprint(args: EvalArgs) -> Any:
    """What identifies the weights: the preset name, or the checkpoint's path and weight files."""
    if args.preset:
        return {"preset": args.preset}
    path = os.path.abspath(args.model)
    files = []
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt")):
            st = os.stat(os.path.join(path, name))
            files.append([name, st.st_size, st.st_mtime_ns])
    return {"path": path, "files": files}


def signature(args: EvalArgs, annotations: str, max_new_tokens: int, dtype, bench=None) -> dict[str, Any]:
    """The settings predictions depend on (run.json); a rerun must match them to resume. The reference
    version is not one of them: predictions are saved raw and scored afterwards."""
    sig = {"benchmark": args.benchmark, "annotations_sha256": sha256_file(annotations),
           "model": model_fingerprint(args), "max_new_tokens": max_new_tokens, "max_pixels": args.max_pixels,
           "dtype": str(dtype).replace("torch.", ""),
           "prompt_version": getattr(bench, "PROMPT_VERSION", PROMPT_VERSION)}
    if args.benchmark == "vsi-bench":
        sig["num_frames"] = args.num_frames
        sig["frames_as"] = frames_as(args)
    return sig


VIDEO_MAX_TOKENS = 768
"""qwen_vl_utils' cap on a video frame's tokens (VIDEO_MAX_TOKEN_NUM), the default frame budget of a video input:
768 cells of the family's cell (VIDEO_MAX_PIXELS = 768 * 28 * 28 for Qwen2-VL / 2.5-VL, 768 * 32 * 32 for Qwen3-VL)."""
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * 28 * 28


def family_of(args: EvalArgs) -> str | None:
    if args.preset:
        from model.presets import get_preset

        return get_preset(args.preset).family
    return checkpoint_model_type(args.model)


def frames_as(args: EvalArgs) -> str:
    """'video' or 'clip' for this benchmark and model: auto is the benchmark's reference protocol (VSI-Bench:
    video for the Qwen families, as lmms-eval; images otherwise); `images` is `clip`."""
    if args.frames_as == "images":
        return "clip"
    if args.frames_as != "auto":
        return args.frames_as
    if args.benchmark == "vsi-bench" and family_of(args) in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return "video"
    return "clip"


def merge_repeats(argv: list[str], flag: str) -> list[str]:
    """argv with every occurrence of a repeatable list flag (`flag A --x flag B`, `flag=A`) merged into one
    (`flag A B`), so that repeating it adds values instead of the last one winning."""
    values, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            continue
        if a.startswith(flag + "="):
            values.append(a[len(flag) + 1:])
        else:
            rest.append(a)
        i += 1
    return rest + [flag] + values if values or flag in argv else rest


def select(bench, questions: list[Question], args: EvalArgs, root: str) -> tuple[list[Question], int]:
    """The questions to score (--limit, then --skip-missing) and how many were skipped for missing media."""
    selected = questions[:args.limit] if args.limit else list(questions)
    missing = bench.missing_media(selected)
    if not missing:
        return selected, 0
    if not args.skip_missing:
        raise BenchmarkError(bench.missing_message(root, missing, bench.media_count(selected)))
    gone = set(missing)
    kept = [q for q in selected if not any(m in gone for m in q.media)]
    if not kept:
        raise BenchmarkError(f"{args.benchmark}: none of the {len(selected)} questions has its media under {root}; "
                             f"get them from {bench.WHERE}")
    return kept, len(selected) - len(kept)


def print_summary(results: dict[str, Any]) -> None:
    scores = results["scores"]
    w = max([len(k) for k in scores] + [10])
    print("=" * (w + 22))
    print(f"{results['benchmark']}  model {results['model']}  {results['n_answered']}/{results['n_questions']} "
          f"questions  scored as {results['reference_version']}"
          f"{'' if results['complete'] else '  (INCOMPLETE: ' + results['incomplete_reason'] + ')'}")
    counts = results["counts"]
    for k, v in scores.items():
        n = counts.get(re.sub(r"_(accuracy|MRA:.*)$", "", k), results["n_answered"] if k == "blink_acc" else "")
        print(f"  {k:<{w}}  {100 * v:7.2f}  {n}")
    pairs = results.get("pairs")
    if pairs and pairs.get("n_pairs"):
        print(f"  {'pair_consistency (CC)':<{w}}  {100 * pairs['pair_consistency']:7.2f}  {pairs['n_pairs']} pairs "
              f"(WW {100 * pairs['WW_rate']:.1f}, IC {100 * pairs['IC_rate']:.1f})")
    print("=" * (w + 22), flush=True)


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def leakage_report(args: EvalArgs, bench, questions: list[Question]) -> dict[str, Any]:
    """The training-leakage check of the selected questions (leakage.py); prints its one line."""
    from launch.benchmarks import leakage

    manifests = [leakage.read_manifest(m) for m in args.check_training_manifest]
    exported = leakage.read_export(args.model) if args.model else None
    manifests += exported or []
    if not manifests:
        return {"checked": False, "reason": "no training manifests: none named by --check-training-manifest and no "
                                            f"{leakage.EXPORT_FILE} in the model folder"}
    scenes = bench.scenes(questions)
    if scenes is None:
        print(f"[eval] note: {args.benchmark} questions name no scenes of the corpora this pipeline reads; the "
              f"training-manifest check does not apply", file=sys.stderr, flush=True)
        return {"checked": False, "reason": f"{args.benchmark} questions name no corpus scenes"}
    report = leakage.check(scenes, manifests)
    hit = set(report["train_scenes"]) | set(report["rescan_scenes"])
    scene_of = (lambda q: f"{q.record.get('dataset')}/{q.record.get('scene_name')}")
    report["n_questions_on_training_scenes"] = sum(1 for q in questions if scene_of(q) in hit)
    line = leakage.warning(args.benchmark, report, report["n_questions_on_training_scenes"])
    if line:
        print(f"[eval] {line}", file=sys.stderr, flush=True)
    return report


def run_compare(args: EvalArgs) -> int:
    """--compare A B: the table on the terminal, the JSON file, one MLflow run."""
    from launch.benchmarks import compare, runner

    try:
        a = compare.load_side(args.compare[0], "A")
        b = compare.load_side(args.compare[1], "B")
        cmp = compare.compare(a, b, allow_mixed_references=args.allow_mixed_references)
    except compare.CompareError as e:
        return _error(str(e))
    cmp["inputs"] = {"A": args.compare[0], "B": args.compare[1]}
    name = lambda side: re.sub(r"[^A-Za-z0-9_.-]+", "_", "+".join(cmp[side]["models"]))  # noqa: E731
    path = args.output or os.path.join(DEFAULT_ROOT, "compare", f"{name('a')}-vs-{name('b')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    runner._write_atomic(path, json.dumps(cmp, indent=1) + "\n")
    if not args.quiet:
        print(compare.render(cmp))
        print(f"[eval] wrote {path}", flush=True)
    if args.mlflow:
        return _log_mlflow(
            args, lambda: runner.log_mlflow(
                {"A": args.compare[0], "B": args.compare[1], "models_A": ", ".join(cmp["a"]["models"]),
                 "models_B": ", ".join(cmp["b"]["models"]), "allow_mixed_references": args.allow_mixed_references,
                 **{f"reference/{bn}": f"{v['a']} / {v['b']}" for bn, v in cmp["references"].items()}},
                compare.metrics(cmp), [path], run_name=args.run_name or f"compare-{name('a')}-vs-{name('b')}",
                experiment=args.experiment, tags={"kind": "eval-compare", "A": name("a"), "B": name("b")}),
            f"the comparison is in {path}")
    return 0


def _log_mlflow(args: EvalArgs, log: Callable[[], str], kept: str) -> int:
    """Run `log()` (a `runner.log_mlflow` call, returning the run id): 0, or 1 and one line saying
    where the results are kept when MLflow fails."""
    try:
        run_id = log()
    except Exception as e:
        print(f"{PROG}: error: MLflow logging failed ({type(e).__name__}: {one_line(e)}); {kept}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"[mlflow] run {run_id} in experiment {args.experiment!r}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = merge_repeats(list(sys.argv[1:] if argv is None else argv), "--check-training-manifest")
    args = parse_into(EvalArgs, argv, PROG, "Score a checkpoint on VSI-Bench, All-Angles Bench or BLINK "
                      "multi-view (reference scoring), or compare two results.",
                      epilog="Expected data layouts, scoring and reference versions: docs/evaluate.md")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.compare:
        return run_compare(args)
    from launch import benchmarks
    from launch.benchmarks import leakage, runner

    t0 = time.time()
    family = family_of(args)
    reference = references.resolve(args.benchmark, args.reference)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.precision, device)
        bench = benchmarks.get(args.benchmark)
        max_new_tokens = args.max_new_tokens or bench.DEFAULT_MAX_NEW_TOKENS
        root, annotations, questions = bench.load(args.data, args.annotations, family=family)
        selected, n_skipped = select(bench, questions, args, root)
        training_leakage = leakage_report(args, bench, selected)
        out = args.output or os.path.join(DEFAULT_ROOT, f"{args.benchmark}-{args.model_name}")
        sig = signature(args, annotations, max_new_tokens, dtype, bench)
        runner.prepare_output(out, sig, args.overwrite)
        store = runner.PredictionStore(out)
        done = store.load()
        pending = [q for q in selected if q.key not in done]
    except (BenchmarkError, ArgError, leakage.ManifestError, OSError) as e:
        return _error(str(e))

    protocol = frames_as(args)
    if not args.quiet:
        print(f"[eval] {args.benchmark}: {len(selected)} questions ({len(selected) - len(pending)} answered before, "
              f"{len(pending)} to go{f', {n_skipped} skipped for missing media' if n_skipped else ''}); "
              f"model {args.model_name}; scored as {reference.name}; output {out}", flush=True)
    if pending:
        from model.loading import ModelLoadError, build_model_and_processor

        try:
            model, processor, adapter = build_model_and_processor(
                args.model or args.preset, dtype=dtype, device=device, max_pixels=args.max_pixels or None,
                attn_implementation=None if args.attn == "auto" else args.attn)
        except (ModelLoadError, ValueError) as e:
            return _error(one_line(e))
        resize = getattr(adapter, "resize", None)
        as_video = protocol == "video"
        frame_resize = None
        if as_video and resize is not None:  # frames of a video input: qwen_vl_utils' per-frame cap
            from model.loading import make_adapter

            ip_max = int(processor.image_processor.size["longest_edge"])
            frame_cap = VIDEO_MAX_TOKENS * int(adapter.cell_px) ** 2
            frame_resize = make_adapter(family, processor, model.config,
                                        max_pixels=min(args.max_pixels or ip_max, frame_cap)).resize
        loader = runner.MediaLoader(resize or _to_pil, num_frames=args.num_frames, frame_resize=frame_resize)
        progress = Progress("eval", len(pending), "questions", quiet=args.quiet, every=5.0)
        try:
            runner.run(pending, bench, model, processor, loader, store, batch_size=args.batch_size,
                       max_new_tokens=max_new_tokens, device=device, resized=resize is not None, progress=progress,
                       as_video=as_video, family=family)
        except runner.MediaError as e:
            print(f"{PROG}: error: {e} (answered questions are kept in {store.path}; rerun to resume)",
                  file=sys.stderr)
            return 1
        done = store.load()

    rows = [done[q.key] for q in selected]
    agg = bench.aggregate(rows, reference, family)
    reasons = []
    if args.limit and args.limit < len(questions):
        reasons.append(f"--limit {args.limit} of {len(questions)}")
    if n_skipped:
        reasons.append(f"{n_skipped} questions skipped for missing media")
    if agg.get("complete_levels") is False:
        reasons.append("not all object_rel_direction levels present")
    results = {
        "benchmark": args.benchmark, "model": args.model_name, "model_source": args.model or f"preset {args.preset}",
        "family": family, "scores": agg["scores"], "counts": agg["counts"],
        **{k: v for k, v in agg.items() if k not in ("scores", "counts", "complete_levels")},
        "headline": {bench.HEADLINE: agg["scores"].get(bench.HEADLINE)},
        "n_questions": len(selected), "n_answered": len(rows), "n_in_file": len(questions),
        "n_skipped_missing_media": n_skipped, "complete": not reasons, "incomplete_reason": "; ".join(reasons),
        "scale": "fractions in [0, 1] (the reference's; papers print x100)",
        "reference_version": reference.name, "reference_code": reference.code, "reference": bench.REFERENCE,
        "frames_as": protocol,
        "training_leakage": training_leakage,
        "config": flat_dict(args), "annotations": os.path.abspath(annotations),
        "annotations_sha256": sig["annotations_sha256"], "seconds": round(time.time() - t0, 1),
    }
    default_ref = references.DEFAULTS[args.benchmark]
    results_path = runner.write_results(out, results, runner.results_name(reference.name, default_ref))
    if not args.quiet:
        print_summary(results)
        print(f"[eval] wrote {results_path} and {store.path}", flush=True)
    if args.mlflow:
        suffix = "" if reference.name == default_ref else f"-{reference.name}"
        params = {**flat_dict(args), "model_name": args.model_name, "n_questions": len(selected),
                  "max_new_tokens_used": max_new_tokens, "output": os.path.abspath(out),
                  "reference_version": reference.name, "frames_as_used": protocol}
        return _log_mlflow(
            args, lambda: runner.log_mlflow(
                params, bench.metrics(agg), [store.path, results_path],
                run_name=args.run_name or f"eval-{args.benchmark}-{args.model_name}{suffix}",
                experiment=args.experiment,
                tags={"kind": "eval", "benchmark": args.benchmark, "model": args.model_name,
                      "complete": results["complete"], "reference_version": reference.name}),
            f"results are in {results_path}")
    return 0


def _to_pil(rgb):
    from PIL import Image

    return Image.fromarray(rgb)


if __name__ == "__main__":
    sys.exit(main())
