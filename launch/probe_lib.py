"""The layer-wise correspondence probe (DESIGN §6): the scoring half behind `launch/probe.py`.

    from launch.probe_lib import ProbeArgs, run_probe
    from launch.probe_report import format_table
    result = run_probe(ProbeArgs(preset="tiny", shards=["runs/shards"], mlflow=False))
    print(format_table(result))          # result is exactly what probe.json holds

What it measures, per language-model layer l, on the held-out clips of some shards: for every
supervised pair (A, B) of a clip (every i < j, or `--pairs-per-clip` of them) and every anchor
of A, PCK@0 / PCK@1 / PCK@2patch of the argmax cell of B, "raw" (cosine of the captured
query-projection input, tau 0.07) and "head" (through f_l); chance and the same-cell baseline
beside each; the Pearson correlation of the max softmax probability with PCK@2patch
correctness; per dataset the temporal curve PCK@2patch(dt) / PCK@2patch(dt_min) for every
frame distance present, and temporal robustness at dt = 24. The numbers (and every null with
its reason) come from `losses.metrics`, the same code as the trainer's validation.

Layer choice: DESIGN §6 asks for a best layer chosen on a split other than the one its
numbers are reported on. `--layer-from PROBE.json` (a probe of the val split) picks the
layers that this probe (of the test split) reports; without it, the best layer of this split
is reported and labelled "chosen on this split".

The heads (`ProbeArgs.heads`): a `heads.safetensors` from `launch/export.py` (or the export
folder holding one; its kind, linear or mlp, is recorded in it); without it the heads are the
UNTRAINED SVD initialisation of each layer's query projection (`--head-kind`), a baseline, not
a result: the table, the plots and the JSON say so. `--no-head` scores the raw features only.

Clips: each shard set is read by its own stream on the requested split, once; the stream
wraps around at the end of its shards, so repeated clips are masked by key. `--max-clips N`
scores the first N clips, set after set. Samples the stream drops as bad are counted in the
JSON (`data.skipped`).

Order of work: arguments -> model source (family, L, D from the config alone) -> heads file
(shape and kind against L, D) -> shard sets (manifest / listing) -> --compare / --layer-from
files -> only then the model is built. Each fails with `ProbeError`, one line.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from data.cli import one_line, opt
from data.progress import Progress
from data.storage import public_url, sha256_file
from launch.probe_report import SCHEMA, SVD_NOTE, ReportError, choose_layers, format_table, make_plots, read_probe, \
    summary, track  # noqa: F401  (format_table: part of this module's API)
from losses.metrics import RAW_TAU

log = logging.getLogger("gasp.probe")
GENERIC_DIRS = {"model", "export", "hf", "checkpoint", "final", "merged"}
LLAVA_FAMILIES = ("llava_onevision", "llava_next_video")
"""Where `--projector-row auto` scores the projector output (a module of its own, LLaVA's stage-1 warm-up)."""
PROJECTOR_WHAT = ("the language model's input at the vision tokens (inputs_embeds: the projector's output as the "
                  "LM receives it, before any layer or norm); raw cosine, tau 0.07, no head")


class ProbeError(Exception):
    """A problem the user can fix (arguments, model, heads, shards); the message is one line."""


# ============================================================================ config

@dataclass
class ProbeArgs:
    """Everything `launch/probe.py` needs (every field is a flag, `--field-name`)."""

    preset: str = opt("tiny", "random-weight model preset (tiny, tiny-qwen2.5, qwen2.5-vl-7b, tiny-llava-ov, ...)")
    model: str = opt("", "a Hugging Face checkpoint directory (overrides --preset)")
    heads: str = opt("", "trained heads: heads.safetensors from launch/export.py, or the export folder "
                         "(without it: the untrained SVD initialisation, reported as such)")
    head: bool = opt(True, "score through the heads as well as raw (--no-head: the raw features only)")
    head_kind: str = opt("mlp", "kind of the untrained SVD-initialised heads when no --heads is given",
                         choices=["mlp", "linear"])
    projector_row: str = opt("auto", "also score the LM's input at the vision tokens (the projector's output, "
                                     "before any LM layer; raw, no head) as row 'proj': on, off, or auto (on for "
                                     "LLaVA-family models, whose projector is a module of its own)",
                             choices=["auto", "on", "off"])
    shards: list[str] = opt(default_factory=list, help="shard sets: shard job folders, manifest.json, .tar, "
                                                        "brace patterns, s3:// (required)", metavar="URL")
    split: str = opt("val", "which split of folders / manifests to read", choices=["val", "test", "train"])
    lm_shards: list[str] = opt(default_factory=list, help="instruction shard sets (pipeline/shard.py --format "
                                                           "llava-json) whose --split measures LM retention: mean "
                                                           "LM loss and next-token accuracy on the answer tokens, "
                                                           "as training validation's val/lm", metavar="URL")
    lm_batches: int = opt(0, "LM retention: at most N batches of --batch-size conversations (0: the whole split)")
    video_frames: int = opt(16, "LM retention: frames of a conversation's video given to the model (as training's "
                                "--video-frames)")
    max_clips: int = opt(0, "score at most N clips (0: every clip of the split)")
    pairs_per_clip: int = opt(0, "score at most this many pairs i < j per clip (a seeded subset; 0: every pair)")
    batch_size: int = opt(4, "clips per forward")
    num_workers: int = opt(1, "data loader processes (1 overlaps decoding with the model; more may skip clips "
                              "of uneven shards, which the JSON's data.coverage shows)")
    layer_from: str = opt("", "probe.json of another split (e.g. val) whose best layers this probe reports "
                              "(DESIGN §6: choose the layer on one split, report it on another)")
    compare: list[str] = opt(default_factory=list, help="probe.json files (or their folders) of other runs to "
                                                         "overlay in the three-panel figure", metavar="PROBE")
    device: str = opt("auto", "auto = cuda when available, else cpu", choices=["auto", "cpu", "cuda"])
    dtype: str = opt("auto", "model weights: auto = bf16 on GPU, fp32 on CPU", choices=["auto", "bf16", "fp32"])
    attn: str = opt("auto", "attention implementation", choices=["auto", "sdpa", "eager", "flash_attention_2"])
    max_pixels: int = opt(0, "per-view pixel budget of the processor resize (0: the model's default; use the "
                             "training run's value)")
    head_dim: int = opt(256, "d of the SVD-initialised heads when no --heads is given (min(d, D) is used)")
    tau: float | None = opt(None, "softmax temperature of the head confidences (unset: the heads file's tau, else "
                                  "0.07); raw scores always use 0.07, as training validation does")
    output: str = opt("", "output folder (default runs/probe/<run name>)")
    run_name: str = opt("", "run name (default <model>-<heads|svdinit|raw>-<split>)")
    mlflow: bool = opt(True, "track the probe in MLflow (MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    experiment: str = opt("gasp", "MLflow experiment name")
    progress_every: float = opt(10.0, "seconds between progress lines on stderr")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("--shards is required (a shard job's output folder, a manifest.json, .tar files or "
                             "s3://...; make some with pipeline/shard.py)")
        if self.heads and not self.head:
            raise ValueError("--heads and --no-head contradict each other; drop one")
        for flag in ("batch_size", "video_frames"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(self, flag)})")
        if self.lm_batches < 0:
            raise ValueError(f"--lm-batches must be >= 0 (0: the whole split; got {self.lm_batches})")
        for flag in ("max_clips", "num_workers", "pairs_per_clip"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(self, flag)})")
        if self.head_dim < 1:
            raise ValueError(f"--head-dim must be >= 1 (got {self.head_dim})")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"--tau must be > 0 (got {self.tau})")
        if self.progress_every <= 0:
            raise ValueError(f"--progress-every must be > 0 (got {self.progress_every})")


# ============================================================================ checks (cheap)

@dataclass
class SourceInfo:
    spec: str
    location: str
    n_shards: int
    n_clips: int
    manifest: str | None
    manifest_sha256: str | None


@dataclass
class Plan:
    """What the cheap checks resolved, before anything heavy."""

    args: ProbeArgs
    name: str
    output: str
    source: str
    """--model path or preset name, as used by build_model_and_processor."""
    source_kind: str
    """'preset' or 'checkpoint'."""
    family: str | None
    num_layers: int | None
    hidden_size: int | None
    device: str
    dtype: str
    heads_kind: str
    """'trained' (a heads file), 'svd_init' or 'none'."""
    head: str | None
    """The head architecture: 'mlp' or 'linear' (None without heads)."""
    heads_file: str | None
    heads_meta: dict[str, Any] | None
    heads_sha256: str | None
    sources: list[SourceInfo]
    layer_from: dict[str, Any] | None
    compare: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lm_sources: list[str] = field(default_factory=list)
    """--lm-shards locations, checked to hold instruction samples in --split."""
    projector_row: bool = False
    """Score the LM's input at the vision tokens too (`--projector-row`, resolved)."""


def _model_dims(plan_source: str, kind: str) -> tuple[str | None, int | None, int | None]:
    """(family, L, D) from the preset or the checkpoint's config.json, without building the model."""
    try:
        if kind == "preset":
            from model.presets import get_preset

            p = get_preset(plan_source)
            text = dict(p.text)
            if "num_hidden_layers" in text and "hidden_size" in text:
                return p.family, int(text["num_hidden_layers"]), int(text["hidden_size"])
            cfg = p.config()
            tc = getattr(cfg, "text_config", None) or cfg
            return p.family, int(tc.num_hidden_layers), int(tc.hidden_size)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(plan_source, local_files_only=True)
        tc = getattr(cfg, "text_config", None) or cfg
        return getattr(cfg, "model_type", None), int(tc.num_hidden_layers), int(tc.hidden_size)
    except Exception as e:  # checked again when the model is built; this is only the early check
        log.debug("could not read the model's L and D early: %s", e)
        return None, None, None


def _resolve_heads_path(path: str) -> str:
    if os.path.isdir(path):
        cand = os.path.join(path, "heads.safetensors")
        if not os.path.isfile(cand):
            raise ProbeError(f"--heads {path}: a folder without heads.safetensors (point it at launch/export.py's "
                             f"output folder or the file)")
        return cand
    if not os.path.isfile(path):
        raise ProbeError(f"--heads {path}: no such file (launch/export.py writes EXPORT/heads.safetensors)")
    return path


def _resolve(flag: str, spec: str, split: str, what: str):
    """One shard set of a probe flag, resolved cheaply (manifest or listing); ProbeError (one line) when it cannot
    be read or carries a mixing weight (`what`: the flag's unit of scoring, for the message)."""
    from data.shardformat import FormatError
    from data.sources import parse_spec
    from data.stream import resolve_source

    try:
        location, weight = parse_spec(spec)
        if weight is not None:
            raise ProbeError(f"{flag} {spec}: mixing weights make no sense for a probe (every {what} is scored "
                             f"once); drop ':{weight:g}'")
        shard_set = resolve_source(location, split)
    except ProbeError:
        raise
    except (FileNotFoundError, FormatError, ValueError, OSError) as e:
        raise ProbeError(f"{flag} {spec}: {one_line(e)}") from None
    return location, shard_set


def _check_sources(args: ProbeArgs) -> list[SourceInfo]:
    from data.sources import recorded

    out = []
    for spec in args.shards:
        location, shard_set = _resolve("--shards", spec, args.split, "clip")
        if shard_set.n_samples == 0:
            raise ProbeError(f"--shards {spec}: no {args.split} clips in it")
        if shard_set.kind != "clip":
            raise ProbeError(f"--shards {spec}: holds {shard_set.kind} samples, not scene clips (the probe scores "
                             f"correspondences between frames)")
        rec = recorded(location)
        out.append(SourceInfo(spec, location, len(shard_set.urls), shard_set.n_samples, rec.manifest,
                              rec.manifest_sha256))
    return out


def _check_lm_sources(args: ProbeArgs) -> list[str]:
    out = []
    for spec in args.lm_shards:
        location, shard_set = _resolve("--lm-shards", spec, args.split, "conversation")
        if shard_set.kind != "instruction":
            raise ProbeError(f"--lm-shards {spec}: holds {shard_set.kind} samples, not conversations (LM retention "
                             f"reads instruction shards: pipeline/shard.py --format llava-json)")
        if shard_set.n_samples == 0:
            raise ProbeError(f"--lm-shards {spec}: no {args.split} conversations in it")
        out.append(location)
    return out


def _default_name(args: ProbeArgs) -> str:
    if args.model:
        parts = os.path.normpath(os.path.abspath(args.model)).split(os.sep)
        model = parts[-1]
        if model.lower() in GENERIC_DIRS and len(parts) > 1:
            model = parts[-2] + "-" + model
    else:
        model = args.preset
    tag = "raw" if not args.head else ("heads" if args.heads else "svdinit")
    return f"{model}-{tag}-{args.split}".replace(" ", "_").replace("/", "_")


def check_inputs(args: ProbeArgs) -> Plan:
    """Everything checkable before the model is built; ProbeError (one line) on the first problem."""
    import torch

    from model.head import HeadShapeError, load_heads
    from model.loading import ModelLoadError, checkpoint_family
    from model.presets import PRESETS

    warnings: list[str] = []
    # ---- device and dtype
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: CUDA is not available here; use --device cpu or auto")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    if args.attn == "flash_attention_2" and (device != "cuda" or dtype != "bf16"):
        raise ProbeError("--attn flash_attention_2 needs --device cuda and bf16; use --attn auto")
    # ---- model source
    if args.model:
        try:
            family = checkpoint_family(args.model)
        except ModelLoadError as e:
            raise ProbeError(f"--model {one_line(e)}") from None
        source, kind = args.model, "checkpoint"
    else:
        if args.preset not in PRESETS:
            raise ProbeError(f"unknown --preset {args.preset!r}; presets: {', '.join(PRESETS)} (or --model PATH)")
        source, kind, family = args.preset, "preset", None
    fam, L, D = _model_dims(source, kind)
    family = family or fam
    # ---- heads
    heads_file = heads_meta = heads_sha = None
    heads_kind = "none" if not args.head else ("trained" if args.heads else "svd_init")
    head = None if not args.head else args.head_kind
    if args.heads:
        heads_file = os.path.abspath(_resolve_heads_path(args.heads))
        try:
            _, heads_meta = load_heads(heads_file, L, D)
        except HeadShapeError as e:
            raise ProbeError(f"--heads {args.heads}: {one_line(e)}") from None
        except Exception as e:  # not a safetensors file, no gasp metadata, newer format
            raise ProbeError(f"--heads {args.heads}: not a usable GASP heads file ({one_line(e)})") from None
        head = heads_meta["kind"]
        heads_sha = sha256_file(heads_file)
        trained_on = heads_meta.get("model")
        # an export folder's own model is the trained `trained_on` model: no warning for it
        same_export = os.path.abspath(os.path.dirname(heads_file)) == os.path.abspath(os.path.dirname(source.rstrip("/")))
        if (trained_on and not same_export and str(trained_on) != source
                and os.path.abspath(str(trained_on)) != os.path.abspath(source)):
            warnings.append(f"the heads were trained on {trained_on!r}, this probe runs {source!r} (shapes fit; "
                            f"check that this is the model they belong to)")
    # ---- shards, then the other runs' files
    sources = _check_sources(args)
    lm_sources = _check_lm_sources(args)
    try:
        layer_from = read_probe(args.layer_from, "--layer-from") if args.layer_from else None
        compare = [read_probe(p, "--compare") for p in args.compare]
    except ReportError as e:
        raise ProbeError(str(e)) from None
    if layer_from is not None:
        if (layer_from.get("shards") or {}).get("split") == args.split:
            warnings.append(f"--layer-from {args.layer_from} probed the {args.split} split too: the reported layer "
                            f"is then chosen on the split it is reported on")
        if layer_from.get("model", {}).get("num_layers") not in (None, L):
            raise ProbeError(f"--layer-from {args.layer_from}: a model of {layer_from['model']['num_layers']} layers, "
                             f"this one has {L}")
    name = args.run_name or _default_name(args)
    output = args.output or os.path.join("runs", "probe", name)
    projector_row = args.projector_row == "on" or (args.projector_row == "auto" and family in LLAVA_FAMILIES)
    return Plan(args, name, output, source, kind, family, L, D, device, dtype, heads_kind, head, heads_file,
                heads_meta, heads_sha, sources, layer_from, compare, warnings, lm_sources, projector_row)


# ============================================================================ model

@dataclass
class Loaded:
    gasp: Any
    adapter: Any
    torch_dtype: Any
    device: Any
    family: str
    num_layers: int
    hidden_size: int
    head_dim: int | None
    attn: str | None


def load_model(plan: Plan) -> Loaded:
    """Build the VLM, wrap it (heads-only, nothing trains) and attach the heads."""
    import torch

    from model.head import HeadShapeError, head_from_file
    from model.loading import ModelLoadError, build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM, WrapperError

    args = plan.args
    torch_dtype = torch.bfloat16 if plan.dtype == "bf16" else torch.float32
    device = torch.device(plan.device)
    try:
        vlm, _, adapter = build_model_and_processor(plan.source, dtype=torch_dtype,
                                                    attn_implementation=None if args.attn == "auto" else args.attn,
                                                    device=device, max_pixels=args.max_pixels or None)
    except ModelLoadError as e:
        raise ProbeError(one_line(e)) from None
    text_cfg = getattr(vlm.config, "text_config", vlm.config)
    L_cfg, D = int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size)
    head = None
    if plan.heads_file:
        try:
            head, _ = head_from_file(plan.heads_file, L_cfg, D)
        except HeadShapeError as e:
            raise ProbeError(f"--heads {args.heads}: {one_line(e)}") from None
    gcfg = GaspConfig(trainable="heads", head_dim=args.head_dim, tau=RAW_TAU, head=plan.head or "linear")
    try:
        gasp = GaspVLM(vlm, gcfg, head=head)
    except HeadShapeError as e:
        raise ProbeError(f"--heads {args.heads}: {one_line(e)}") from None
    except WrapperError as e:
        raise ProbeError(f"{plan.source}: {one_line(e)}") from None
    gasp.head.to(device)
    if plan.heads_kind == "svd_init":
        gasp.init_heads()
    gasp.eval()
    return Loaded(gasp, adapter, torch_dtype, device, getattr(vlm.config, "model_type", plan.family or "?"),
                  gasp.num_layers, gasp.hidden_size, None if plan.heads_kind == "none" else gasp.head.head_dim,
                  getattr(vlm.config, "_attn_implementation", None))


# ============================================================================ scoring

@dataclass
class Scored:
    raw: Any
    """MatchMetrics of the raw features."""
    head: Any
    """MatchMetrics through the heads (None without heads)."""
    projector: Any
    """MatchMetrics (one layer) of the LM's input at the vision tokens (None without --projector-row)."""
    clips: int
    pairs: int
    pairs_without_anchors: int
    duplicates: int
    per_source: list[dict[str, Any]]
    skipped: dict[str, int]
    seconds: float
    wanted: int
    """Clips asked for: every clip of the split, or --max-clips."""


def score_sources(plan: Plan, loaded: Loaded, tau_head: float, emit: Callable[[str], None]) -> Scored:
    """Run every clip of every shard set (up to --max-clips) through the model once."""
    import torch

    from data.stream import SampleStream
    from losses.metrics import MatchMetrics

    args = plan.args
    limit = args.max_clips or None
    total = sum(s.n_clips for s in plan.sources)
    total = min(total, limit) if limit else total
    progress = Progress("probe", total, "clips", every=args.progress_every, emit=emit)
    raw_acc, head_acc = MatchMetrics(), (MatchMetrics() if plan.heads_kind != "none" else None)
    proj_acc = MatchMetrics() if plan.projector_row else None
    done = pairs = no_anchor = dupes = 0
    per_source: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    t0 = time.monotonic()
    for src in plan.sources:
        want = min(src.n_clips, total - done)
        if want <= 0:
            per_source.append({"spec": src.spec, "clips": 0})
            continue
        n_batches = math.ceil(want / args.batch_size)
        try:
            stream = SampleStream([src.location], loaded.adapter, batch_size=args.batch_size, rank=0, world_size=1,
                                  num_workers=args.num_workers, seed=0, split=args.split, batches_per_epoch=n_batches,
                                  pairs_per_clip=args.pairs_per_clip)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ProbeError(f"--shards {src.spec}: {one_line(e)}") from None
        seen: set[str] = set()
        it = iter(stream)
        while len(seen) < want:
            try:
                batch = next(it)
            except StopIteration:
                break
            except RuntimeError as e:  # the stream gave up on this set's data (e.g. nothing readable)
                raise ProbeError(f"--shards {src.spec}: {one_line(e)}") from None
            keep = []
            for key in batch["keys"]:
                fresh = key not in seen and len(seen) < want
                if fresh:
                    seen.add(key)
                else:
                    dupes += key in seen
                keep.append(fresh)
            if not any(keep):
                continue
            keep_pair = torch.tensor(keep, dtype=torch.bool)[batch["pair_clip"]]  # (P,)
            batch["anchor_mask"] = batch["anchor_mask"] & keep_pair[:, None]  # a repeated clip scores nothing
            pairs += int(keep_pair.sum())
            no_anchor += int(((batch["anchor_mask"].sum(1) == 0) & keep_pair).sum())
            batch, inputs = loaded.gasp.batch_to_device(batch, loaded.adapter, loaded.device, loaded.torch_dtype)
            head, raw, *proj = loaded.gasp.match(batch, inputs, raw=True, head=head_acc is not None,
                                                 tau_head=tau_head, lm_input=proj_acc is not None)
            if proj_acc is not None:
                proj_acc.update(proj[0])
            raw_acc.update(raw)
            if head_acc is not None:
                head_acc.update(head)
            progress.update(done + len(seen))
        if len(seen) < want:
            emit(f"[probe] warning: {src.spec}: scored {len(seen)} of {want} clips (the rest were skipped as bad "
                 f"data or not reached{'; try --num-workers 1' if args.num_workers > 1 else ''})")
        done += len(seen)
        for k, v in stream.stats().items():
            if k != "samples":
                skipped[k] = skipped.get(k, 0) + int(v)
        per_source.append({"spec": src.spec, "clips": len(seen), "clips_available": src.n_clips})
        del it, stream
    progress.update(done, final=True)
    return Scored(raw_acc, head_acc, proj_acc, done, pairs, no_anchor, dupes, per_source, skipped,
                  time.monotonic() - t0, total)


def lm_retention(plan: Plan, loaded: Loaded, emit: Callable[[str], None]) -> dict[str, Any] | None:
    """Mean LM loss and next-token accuracy over the answer tokens of --lm-shards' --split (DESIGN §6 LM
    retention, as the trainer's validation computes it); None without --lm-shards."""
    import torch

    from data.stream import SampleStream

    args = plan.args
    if not plan.lm_sources:
        return None
    from data.stream import resolve_source

    # a held-out set smaller than one batch is still scored, in one smaller batch
    held_out = sum(resolve_source(s, args.split).n_samples for s in plan.lm_sources)
    stream = SampleStream(plan.lm_sources, loaded.adapter, batch_size=max(1, min(args.batch_size, held_out)),
                          rank=0, world_size=1,
                          num_workers=0, seed=0, split=args.split, batches_per_epoch=args.lm_batches or None,
                          video_frames=args.video_frames)
    total = n = correct = 0.0
    samples = 0
    t0 = time.monotonic()
    with torch.no_grad():
        for batch in stream:
            samples += len(batch["keys"])
            batch, inputs = loaded.gasp.batch_to_device(batch, loaded.adapter, loaded.device, loaded.torch_dtype)
            t, k, c = loaded.gasp.lm_eval(batch, inputs)
            total, n, correct = total + t, n + k, correct + c
    emit(f"[probe] LM retention: {samples} {args.split} conversations, {int(n)} answer tokens, "
         f"{time.monotonic() - t0:.1f} s")
    return {"loss": total / n if n else None, "accuracy": correct / n if n else None, "tokens": int(n),
            "samples": samples, "sources": list(args.lm_shards), "split": args.split}


# ============================================================================ the run

def run_probe(args: ProbeArgs, emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe a model on shards: check, load, score, write probe.json + plots, track. Returns probe.json's content.

    `emit` receives progress and warning lines (default: stderr). Raises ProbeError (one line) for
    problems the user can fix.
    """
    from data.cli import flat_dict

    emit = emit or (lambda s: print(s, file=sys.stderr, flush=True))
    plan = check_inputs(args)
    for w in plan.warnings:
        emit(f"[probe] warning: {w}")
    t_start = time.monotonic()
    loaded = load_model(plan)
    tau_head = args.tau if args.tau is not None else float((plan.heads_meta or {}).get("tau", RAW_TAU))
    emit(f"[probe] {plan.source} ({loaded.family}, L={loaded.num_layers}, D={loaded.hidden_size}) on "
         f"{loaded.device} {plan.dtype}; heads: {plan.heads_kind}"
         + (f" ({plan.heads_file})" if plan.heads_file else "")
         + f"; {sum(s.n_clips for s in plan.sources)} {args.split} clips in {len(plan.sources)} shard set(s)"
         + ("; + the projector row (the LM's input)" if plan.projector_row else ""))
    if plan.heads_kind == "svd_init":
        emit(f"[probe] note: {SVD_NOTE}")

    tracker = None
    status = "FAILED"
    try:
        if args.mlflow:
            from data.tracking import MlflowTracker

            tracker = MlflowTracker(run_name=plan.name, experiment=args.experiment,
                                    tags={"kind": "probe", "heads": plan.heads_kind, "model": plan.source,
                                          "family": loaded.family, "split": args.split})
        scored = score_sources(plan, loaded, tau_head, emit)
        retention = lm_retention(plan, loaded, emit)
        raw = scored.raw.compute()
        head = scored.head.compute() if scored.head is not None else None
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "name": plan.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": flat_dict(args),
            "model": {"source": plan.source, "kind": plan.source_kind,
                      "path": os.path.abspath(plan.source) if plan.source_kind == "checkpoint" else None,
                      "family": loaded.family, "num_layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
                      "device": str(loaded.device), "dtype": plan.dtype, "attn": loaded.attn},
            "heads": {"kind": plan.heads_kind, "head": plan.head, "file": plan.heads_file,
                      "sha256": plan.heads_sha256, "meta": plan.heads_meta, "head_dim": loaded.head_dim,
                      "note": SVD_NOTE if plan.heads_kind == "svd_init" else None},
            "tau": {"raw": RAW_TAU, "head": None if plan.heads_kind == "none" else tau_head},
            "shards": {"split": args.split,
                       "sources": [{"spec": s.spec, "shards": s.n_shards, "clips_available": s.n_clips,
                                    "clips_scored": ps.get("clips", 0), "manifest": s.manifest,
                                    "manifest_sha256": s.manifest_sha256}
                                   for s, ps in zip(plan.sources, scored.per_source)]},
            "data": {"clips": scored.clips, "pairs": scored.pairs, "pairs_without_anchors": scored.pairs_without_anchors,
                     "anchors": raw["n_anchors"], "anchors_by_dataset": raw["anchors_by_dataset"],
                     "max_clips": args.max_clips or None,
                     "coverage": scored.clips / scored.wanted if scored.wanted else None,
                     "repeats_masked": scored.duplicates, "skipped": scored.skipped},
            "chance": {"pck0": raw["chance0"], "pck1": raw["chance1"], "pck2patch": raw["chance2"]},
            "baselines": {"same_cell": {
                **raw["same_cell"],
                "note": "the anchor's own grid position in B as the guess (no camera motion): what a purely "
                        "positional feature would score"}},
            "raw": raw,
            "head": head,
            "lm_retention": retention,
            "projector": projector_result(scored.projector),
            "compare": [c["name"] for c in plan.compare],
            "timing": {"seconds_scoring": round(scored.seconds, 3),
                       "seconds_total": round(time.monotonic() - t_start, 3),
                       "clips_per_s": scored.clips / scored.seconds if scored.seconds > 0 else None},
            "warnings": plan.warnings,
            "plots": {},
            "mlflow": None,
            "output": os.path.abspath(plan.output),
        }
        result["selected"] = choose_layers(result, plan.layer_from, args.layer_from or None)
        result["best"] = {k: summary(result[k], (result["selected"][k] or {}).get("layer")) for k in ("raw", "head")}
        if not raw["n_anchors"]:
            emit("[probe] warning: no anchors were scored (no clips, or clips without anchors); every metric is null")
        os.makedirs(plan.output, exist_ok=True)
        paths = make_plots(result, scored.head.raw() if scored.head is not None and head["n_anchors"] else None,
                           scored.raw.raw() if raw["n_anchors"] else None, plan.compare, plan.output)
        result["plots"] = {k: os.path.basename(v) for k, v in paths.items()}
        if tracker is not None:
            from data.tracking import tracking_uri

            result["mlflow"] = {"run_id": tracker.run_id, "experiment": args.experiment,
                                "tracking_uri": public_url(tracking_uri())}
        json_path = os.path.join(plan.output, "probe.json")
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=_json_default)
        table = format_table(result)
        with open(os.path.join(plan.output, "probe_table.txt"), "w") as f:
            f.write(table + "\n")
        if tracker is not None:
            track(tracker, result, paths, json_path, table)
        status = "FINISHED"
        return result
    finally:
        if tracker is not None:
            tracker.end(status)


def projector_result(acc: Any) -> dict[str, Any] | None:
    """probe.json's `projector`: the one layer of the LM-input metrics (pck0, pck1, pck2patch,
    conf_acc_corr + its null reason, temporal) with `n_anchors` and what was measured; None when off."""
    if acc is None:
        return None
    res = acc.compute()
    from launch.probe_report import summary

    row = summary(res, 0)
    row.pop("layer")
    return {"what": PROJECTOR_WHAT, "n_anchors": res["n_anchors"], **row}


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
