"""The layer-wise correspondence probe (DESIGN §6): importable logic behind `launch/probe.py`.

    from launch.probe_lib import ProbeArgs, run_probe, format_table
    result = run_probe(ProbeArgs(preset="tiny", shards=["runs/shards"], mlflow=False))
    print(format_table(result))          # result is exactly what probe.json holds

What it measures, per language-model layer l, on the held-out pairs of some shards:
PCK@0 / PCK@1 of the argmax cell of B for every anchor of A, "raw" (cosine of the
captured query-projection input) and "head" (through f_l), chance beside them, the
Pearson correlation of the max softmax probability with PCK@1 correctness, PCK@1 per
frame-gap bucket and temporal robustness (largest-gap / smallest-gap PCK@1). Values
that DESIGN §6 declares null are null, with the reason next to them
(`*_null_reason`). The numbers come from `losses.metrics` (the same code as the
trainer's validation), so a probe and a validation of the same heads agree.

The heads (`ProbeArgs.heads`): a `heads.safetensors` from `launch/export.py` (or the
export folder holding one); without it the heads are the UNTRAINED SVD initialisation
of each layer's query projection (DESIGN §6), which is a baseline, not a result: the
table, the plots and the JSON say so (`heads.kind = "svd_init"`). `head=False`
(`--no-head`) scores the raw features only (`head` is null).

Pairs: each shard set is read by its own `PairStream` on the requested split, once.
The stream hands out full batches of a fixed count and wraps around at the end of its
shards, so the probe asks for ceil(pairs / batch) batches and masks the anchors of any
pair it has already scored (by sample key; keys are unique within one shard job's
split). With `max_pairs` the first N pairs are scored, set after set. Samples the
stream drops as bad are counted in the JSON (`data.skipped`).

Order of work: arguments -> model source (family, L, D read from the config alone) ->
heads file (shape against L, D) -> shard sets (manifest / stats) -> only then the
model is built. Each of the first four fails with `ProbeError`, one line.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from data.cli import opt
from data.pairs import DEFAULT_GAP_BUCKETS
from data.storage import sha256_file
from losses.metrics import RAW_TAU

log = logging.getLogger("gasp.probe")

SCHEMA = "gasp-probe/1"
SVD_NOTE = ("untrained heads: the SVD initialisation of each layer's query projection (no --heads); "
            "head columns are a baseline, not a trained result")
GENERIC_DIRS = {"model", "export", "hf", "checkpoint", "final", "merged"}


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
    shards: list[str] = opt(default_factory=list, help="shard sets: shard job folders, manifest.json, .tar, "
                                                        "brace patterns, s3:// (required)", metavar="URL")
    split: str = opt("val", "which split of folders / manifests to read", choices=["val", "train"])
    max_pairs: int = opt(0, "score at most N pairs (0: every pair of the split)")
    batch_size: int = opt(4, "pairs per forward")
    num_workers: int = opt(1, "data loader processes (1 overlaps decoding with the model; more may skip pairs "
                              "of uneven shards, which the JSON's data.coverage shows)")
    gap_buckets: tuple[int, ...] = opt((), "gap bucket edges in frames, e.g. 1,5,15,40 (default: the shard "
                                           "manifest's, else 1,5,15,40)")
    device: str = opt("auto", "auto = cuda when available, else cpu", choices=["auto", "cpu", "cuda"])
    dtype: str = opt("auto", "model weights: auto = bf16 on GPU, fp32 on CPU", choices=["auto", "bf16", "fp32"])
    attn: str = opt("auto", "attention implementation", choices=["auto", "sdpa", "eager", "flash_attention_2"])
    max_pixels: int = opt(0, "per-view pixel budget of the processor resize (0: the model's default; use the "
                             "training run's value)")
    head_dim: int = opt(256, "d of the SVD-initialised heads when no --heads is given (min(d, D) is used)")
    tau: float | None = opt(None, "softmax temperature of the head confidences (unset: the heads file's tau, else "
                                  "0.07); raw scores always use 0.07, as training validation does")
    output: str = opt("", "output folder (default runs/probe/<run name>)")
    run_name: str = opt("", "run name (default <model>-<heads|svdinit|raw>)")
    mlflow: bool = opt(True, "track the probe in MLflow (MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    experiment: str = opt("gasp", "MLflow experiment name")
    progress_every: float = opt(10.0, "seconds between progress lines on stderr")

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("--shards is required (a shard job's output folder, a manifest.json, .tar files or "
                             "s3://...; make some with pipeline/shard.py)")
        if self.heads and not self.head:
            raise ValueError("--heads and --no-head contradict each other; drop one")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.max_pairs < 0:
            raise ValueError(f"--max-pairs must be >= 0 (got {self.max_pairs})")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.head_dim < 1:
            raise ValueError(f"--head-dim must be >= 1 (got {self.head_dim})")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"--tau must be > 0 (got {self.tau})")
        if self.progress_every <= 0:
            raise ValueError(f"--progress-every must be > 0 (got {self.progress_every})")
        edges = tuple(int(e) for e in self.gap_buckets)
        if edges and (edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:]))):
            raise ValueError(f"--gap-buckets must be increasing non-negative integers (got {self.gap_buckets})")
        self.gap_buckets = edges


# ============================================================================ checks (cheap)

@dataclass
class SourceInfo:
    spec: str
    location: str
    n_shards: int
    n_pairs: int
    manifest: str | None
    manifest_sha256: str | None
    gap_buckets: tuple[int, ...] | None
    gap_buckets_from: str | None


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
    heads_file: str | None
    heads_meta: dict[str, Any] | None
    heads_sha256: str | None
    sources: list[SourceInfo]
    gap_buckets: tuple[int, ...]
    gap_buckets_from: str
    warnings: list[str]


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip()
    if not text and isinstance(e, BaseException):
        text = type(e).__name__
    return " ".join(text.split())


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


def _check_sources(args: ProbeArgs) -> list[SourceInfo]:
    from data.shardformat import FormatError
    from data.sources import parse_spec, recorded
    from data.stream import resolve_source

    out = []
    for spec in args.shards:
        try:
            location, weight = parse_spec(spec)
            if weight is not None:
                raise ProbeError(f"--shards {spec}: mixing weights make no sense for a probe (every pair is scored "
                                 f"once); drop ':{parse_spec(spec)[1]:g}'")
            shard_set = resolve_source(location, args.split)
        except ProbeError:
            raise
        except (FileNotFoundError, FormatError, ValueError, OSError) as e:
            raise ProbeError(f"--shards {spec}: {_one_line(e)}") from None
        if shard_set.n_samples == 0:
            raise ProbeError(f"--shards {spec}: no {args.split} pairs in it")
        rec = recorded(location)
        out.append(SourceInfo(spec, location, len(shard_set.urls), shard_set.n_samples, rec.manifest,
                              rec.manifest_sha256, rec.gap_buckets, rec.gap_buckets_from))
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
    return f"{model}-{tag}".replace(" ", "_").replace("/", "_")


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
            raise ProbeError(f"--model {_one_line(e)}") from None
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
    if args.heads:
        heads_file = os.path.abspath(_resolve_heads_path(args.heads))
        try:
            _, heads_meta = load_heads(heads_file, L, D)
        except HeadShapeError as e:
            raise ProbeError(f"--heads {args.heads}: {_one_line(e)}") from None
        except Exception as e:  # not a safetensors file, no gasp metadata, newer format
            raise ProbeError(f"--heads {args.heads}: not a usable GASP heads file ({_one_line(e)})") from None
        heads_sha = sha256_file(heads_file)
        trained_on = heads_meta.get("model")
        # an export folder's own model is the trained `trained_on` model: no warning for it
        same_export = os.path.abspath(os.path.dirname(heads_file)) == os.path.abspath(os.path.dirname(source.rstrip("/")))
        if (trained_on and not same_export and str(trained_on) != source
                and os.path.abspath(str(trained_on)) != os.path.abspath(source)):
            warnings.append(f"the heads were trained on {trained_on!r}, this probe runs {source!r} (shapes fit; "
                            f"check that this is the model they belong to)")
    # ---- shards and gap buckets
    sources = _check_sources(args)
    if args.gap_buckets:
        buckets, where = args.gap_buckets, "--gap-buckets"
    else:
        found = [(s.gap_buckets, s.gap_buckets_from) for s in sources if s.gap_buckets]
        buckets, where = found[0] if found else (DEFAULT_GAP_BUCKETS, "default")
        if len({f[0] for f in found}) > 1:
            warnings.append(f"the shard sets record different gap buckets ({sorted({f[0] for f in found})}); "
                            f"using {list(buckets)}; pass --gap-buckets to choose")
    name = args.run_name or _default_name(args)
    output = args.output or os.path.join("runs", "probe", name)
    return Plan(args, name, output, source, kind, family, L, D, device, dtype, heads_kind, heads_file, heads_meta,
                heads_sha, sources, tuple(buckets), where, warnings)


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
        raise ProbeError(_one_line(e)) from None
    text_cfg = getattr(vlm.config, "text_config", vlm.config)
    L_cfg, D = int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size)
    head = None
    if plan.heads_file:
        try:
            head, _ = head_from_file(plan.heads_file, L_cfg, D)
        except HeadShapeError as e:
            raise ProbeError(f"--heads {args.heads}: {_one_line(e)}") from None
    gcfg = GaspConfig(trainable="heads", head_dim=args.head_dim, tau=RAW_TAU)
    try:
        gasp = GaspVLM(vlm, gcfg, head=head)
    except HeadShapeError as e:
        raise ProbeError(f"--heads {args.heads}: {_one_line(e)}") from None
    except WrapperError as e:
        raise ProbeError(f"{plan.source}: {_one_line(e)}") from None
    gasp.head.to(device)
    if plan.heads_kind == "svd_init":
        gasp.init_heads()
    gasp.eval()
    return Loaded(gasp, adapter, torch_dtype, device, getattr(vlm.config, "model_type", plan.family or "?"),
                  gasp.num_layers, gasp.hidden_size, None if plan.heads_kind == "none" else gasp.head.head_dim,
                  getattr(vlm.config, "_attn_implementation", None))


# ============================================================================ scoring

class Progress:
    """Pairs done / total, rate and ETA on stderr, at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, every: float, emit: Callable[[str], None]):
        self.total, self.every, self.emit = total, every, emit
        self.t0 = self.last = time.monotonic()
        self.done = 0

    def update(self, done: int, final: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not final and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        rate = done / dt
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = "done" if final else (f"ETA {_hms(left)}" if math.isfinite(left) else "ETA ?")
        pct = 100.0 * done / self.total if self.total else 100.0
        self.emit(f"[probe] {done}/{self.total} pairs ({pct:.0f}%) | {rate:.2f} pairs/s | {_hms(dt)} elapsed | {eta}")


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def match_batch(gasp, batch: dict[str, Any], inputs: dict[str, Any], tau_raw: float, tau_head: float,
                use_head: bool):
    """(raw MatchStats, head MatchStats | None) of one batch: one capture, both scorings (float32)."""
    import torch

    from losses.gasp import similarities
    from losses.metrics import match_stats, raw_similarities

    with torch.no_grad():
        feat_a, feat_b = gasp.capture(batch, inputs)  # (L, B, Na, D), (L, B, Nb, D)
        raw = match_stats(raw_similarities(feat_a, feat_b, tau_raw), batch)  # s: (L, B, Na, Nb)
        head = None
        if use_head:
            head = match_stats(similarities(gasp.head(feat_a), gasp.head(feat_b), tau_head), batch)
    return _cpu(raw), (_cpu(head) if head is not None else None)


def _cpu(stats):
    return dataclasses.replace(stats, **{f.name: getattr(stats, f.name).cpu() for f in dataclasses.fields(stats)})


def _to_device(batch: dict[str, Any], loaded: Loaded) -> tuple[dict[str, Any], dict[str, Any]]:
    return loaded.gasp.batch_to_device(batch, loaded.adapter, loaded.device, loaded.torch_dtype)


@dataclass
class Scored:
    raw: list
    head: list
    pairs: int
    pairs_without_anchors: int
    duplicates: int
    per_source: list[dict[str, Any]]
    skipped: dict[str, int]
    seconds: float
    wanted: int
    """Pairs asked for: every pair of the split, or --max-pairs."""
    same_cell_dist: Any
    """(K,) Chebyshev distance of each anchor's target from the anchor's own grid position in B."""


def same_cell_distance(batch: dict[str, Any]):
    """(K,) per scored anchor: Chebyshev distance in cells between its target and the cell of B at the
    anchor's own grid position (scaled when the grids differ). PCK of that "no motion" guess is the
    baseline a purely positional feature reaches: high when the camera barely moves at cell scale."""
    import torch

    from losses.gasp import item_masks

    m = item_masks(batch)
    rows_a, cols_a = batch["grid_a"][:, 0:1].clamp_min(1), batch["grid_a"][:, 1:2].clamp_min(1)  # (B, 1)
    rows_b, cols_b = batch["grid_b"][:, 0:1].clamp_min(1), batch["grid_b"][:, 1:2].clamp_min(1)
    r_a, c_a = m.a_idx // cols_a, m.a_idx % cols_a  # (B, M)
    r = torch.minimum(((r_a + 0.5) * rows_b / rows_a).floor().long(), rows_b - 1)  # (B, M)
    c = torch.minimum(((c_a + 0.5) * cols_b / cols_a).floor().long(), cols_b - 1)
    dist = torch.maximum((r - m.t_idx // cols_b).abs(), (c - m.t_idx % cols_b).abs())  # (B, M)
    return dist[m.anchor]  # (K,), the (b, m) order of match_stats


def score_sources(plan: Plan, loaded: Loaded, tau_raw: float, tau_head: float,
                  emit: Callable[[str], None]) -> Scored:
    """Run every pair of every shard set (up to --max-pairs) through the model once."""
    import torch

    from data.stream import PairStream

    args = plan.args
    limit = args.max_pairs or None
    total = sum(s.n_pairs for s in plan.sources)
    total = min(total, limit) if limit else total
    progress = Progress(total, args.progress_every, emit)
    raw_stats, head_stats, same_cell = [], [], []
    done = no_anchor = dupes = 0
    per_source: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    use_head = plan.heads_kind != "none"
    t0 = time.monotonic()
    for src in plan.sources:
        want = min(src.n_pairs, total - done)
        if want <= 0:
            per_source.append({"spec": src.spec, "pairs": 0})
            continue
        n_batches = math.ceil(want / args.batch_size)
        try:
            stream = PairStream([src.location], loaded.adapter, batch_size=args.batch_size, rank=0, world_size=1,
                                num_workers=args.num_workers, seed=0, split=args.split, batches_per_epoch=n_batches)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ProbeError(f"--shards {src.spec}: {_one_line(e)}") from None
        seen: set[str] = set()
        it = iter(stream)
        while len(seen) < want:
            try:
                batch = next(it)
            except StopIteration:
                break
            except RuntimeError as e:  # the stream gave up on this set's data (e.g. nothing readable)
                raise ProbeError(f"--shards {src.spec}: {_one_line(e)}") from None
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
            keep_t = torch.tensor(keep, dtype=torch.bool)
            batch["anchor_mask"] = batch["anchor_mask"] & keep_t[:, None]  # a repeated pair scores nothing
            no_anchor += int(((batch["anchor_mask"].sum(1) == 0) & keep_t).sum())
            same_cell.append(same_cell_distance(batch))
            batch, inputs = _to_device(batch, loaded)
            raw, head = match_batch(loaded.gasp, batch, inputs, tau_raw, tau_head, use_head)
            raw_stats.append(raw)
            if head is not None:
                head_stats.append(head)
            progress.update(done + len(seen))
        if len(seen) < want:
            emit(f"[probe] warning: {src.spec}: scored {len(seen)} of {want} pairs (the rest were skipped as bad "
                 f"data or not reached{'; try --num-workers 1' if args.num_workers > 1 else ''})")
        done += len(seen)
        st = stream.stats()
        for k, v in st.items():
            if k != "samples":
                skipped[k] = skipped.get(k, 0) + int(v)
        per_source.append({"spec": src.spec, "pairs": len(seen), "pairs_available": src.n_pairs})
        del it, stream
    progress.update(done, final=True)
    same = torch.cat(same_cell) if same_cell else torch.zeros(0, dtype=torch.long)
    return Scored(raw_stats, head_stats, done, no_anchor, dupes, per_source, skipped, time.monotonic() - t0, total,
                  same)


# ============================================================================ results

def _concat(stats: list, field: str):
    import torch

    return torch.cat([getattr(s, field) for s in stats], -1) if stats else None


def _annotate(result: dict[str, Any], stats: list) -> dict[str, Any]:
    """Add `*_null_reason` beside every null correlation / temporal robustness (DESIGN §6 null rules)."""
    from losses.metrics import MIN_BUCKET_ANCHORS, MIN_CHANCE_RATIO

    gb = result["gap_buckets"]
    counts, labels, chance = gb["counts"], gb["labels"], gb["chance1"]
    dist, max_prob = _concat(stats, "dist"), _concat(stats, "max_prob")  # (L, K) each
    for d in result["layers"]:
        l = d["layer"]
        reason = None
        if d["conf_acc_corr"] is None:
            ok = (dist[l] <= 1) if dist is not None else None
            if ok is None or ok.numel() < 2:
                reason = "fewer than 2 anchors"
            elif bool(ok.all()) or not bool(ok.any()):
                reason = f"PCK@1 correctness is constant (every anchor {'right' if bool(ok.all()) else 'wrong'})"
            else:
                reason = "the max softmax probability is constant"
        d["conf_acc_corr_null_reason"] = reason
        reason = None
        if d["temporal_robustness"] is None:
            small = d["pck1_by_gap"][0] if d["pck1_by_gap"] else None
            if counts[0] < MIN_BUCKET_ANCHORS:
                reason = f"smallest-gap bucket {labels[0]} has {counts[0]} anchors (< {MIN_BUCKET_ANCHORS})"
            elif counts[-1] < MIN_BUCKET_ANCHORS:
                reason = f"largest-gap bucket {labels[-1]} has {counts[-1]} anchors (< {MIN_BUCKET_ANCHORS})"
            elif small is None or chance[0] is None or small < MIN_CHANCE_RATIO * chance[0] or small <= 0:
                reason = (f"smallest-gap PCK@1 {_f(small)} is below {MIN_CHANCE_RATIO:g}x chance "
                          f"({_f(None if chance[0] is None else MIN_CHANCE_RATIO * chance[0])})")
            else:
                reason = "not computable"
        d["temporal_robustness_null_reason"] = reason
    return result


def _summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The best layer (by PCK@1) and its temporal robustness, for the table and the top of the JSON."""
    if result is None:
        return None
    l = result["best_layer"]
    if l is None:
        return {"layer": None, "pck0": None, "pck1": None, "conf_acc_corr": None, "temporal_robustness": None,
                "temporal_robustness_null_reason": "no anchors scored"}
    d = result["layers"][l]
    return {"layer": l, "pck0": d["pck0"], "pck1": d["pck1"], "conf_acc_corr": d["conf_acc_corr"],
            "temporal_robustness": d["temporal_robustness"],
            "temporal_robustness_null_reason": d["temporal_robustness_null_reason"],
            "pck1_by_gap": d["pck1_by_gap"]}


def _public_uri(uri: str) -> str:
    """A tracking URI without credentials (user:password@host)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            host = parts.hostname or ""
            if parts.port:
                host += f":{parts.port}"
            return urlunsplit(parts._replace(netloc=host))
    except ValueError:
        pass
    return uri


def make_plots(result: dict[str, Any], scored: Scored, out_dir: str) -> dict[str, str]:
    """PCK by layer (raw and head), PCK by gap (primary result) and confidence vs accuracy (best layers)."""
    from launch import plots

    paths: dict[str, str] = {}
    head, raw = result["head"], result["raw"]
    kind = result["heads"]["kind"]
    label = {"trained": "trained heads", "svd_init": "heads: untrained SVD init", "none": "raw only"}[kind]
    if not raw["n_anchors"]:
        return paths
    curves = {"raw": raw} if head is None else {"raw": raw, "head": head}
    paths["pck_by_layer"] = plots.pck_by_layer(curves, os.path.join(out_dir, "pck_by_layer.png"),
                                               title=f"PCK by layer: {result['name']} ({label})")
    primary, pname, pstats = (raw, "raw", scored.raw) if head is None else (head, "head", scored.head)
    paths["pck_by_gap"] = plots.pck_by_gap(primary, os.path.join(out_dir, "pck_by_gap.png"),
                                           title=f"PCK@1 by frame gap ({pname}; {label})")
    for name, res, stats in (("head", head, scored.head), ("raw", raw, scored.raw)):
        if res is None or res["best_layer"] is None:
            continue
        l = res["best_layer"]
        mp, dist = _concat(stats, "max_prob")[l], _concat(stats, "dist")[l]
        fname = "conf_vs_acc.png" if name == pname else f"conf_vs_acc_{name}.png"
        key = "conf_vs_acc" if name == pname else f"conf_vs_acc_{name}"
        paths[key] = plots.confidence_vs_accuracy(mp.numpy(), (dist <= 1).numpy(), os.path.join(out_dir, fname),
                                                  layer=l)
    return paths


def run_probe(args: ProbeArgs, emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Probe a model on shards: check, load, score, write probe.json + plots, track. Returns probe.json's content.

    `emit` receives progress and warning lines (default: stderr). Raises ProbeError (one line) for
    problems the user can fix.
    """
    from data.cli import flat_dict
    from losses.metrics import MatchMetrics

    emit = emit or (lambda s: print(s, file=sys.stderr, flush=True))
    plan = check_inputs(args)
    for w in plan.warnings:
        emit(f"[probe] warning: {w}")
    t_start = time.monotonic()
    loaded = load_model(plan)
    tau_raw = RAW_TAU  # DESIGN §6: raw confidences at 0.07 whatever --tau (the trainer's validation agrees)
    tau_head = args.tau if args.tau is not None else float((plan.heads_meta or {}).get("tau", RAW_TAU))
    emit(f"[probe] {plan.source} ({loaded.family}, L={loaded.num_layers}, D={loaded.hidden_size}) on "
         f"{loaded.device} {plan.dtype}; heads: {plan.heads_kind}"
         + (f" ({plan.heads_file})" if plan.heads_file else "")
         + f"; {sum(s.n_pairs for s in plan.sources)} {args.split} pairs in {len(plan.sources)} shard set(s)")
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
        scored = score_sources(plan, loaded, tau_raw, tau_head, emit)
        results: dict[str, Any] = {}
        for name, stats in (("raw", scored.raw), ("head", scored.head)):
            if name == "head" and plan.heads_kind == "none":
                results[name] = None
                continue
            acc = MatchMetrics(gap_buckets=plan.gap_buckets)
            for st in stats:
                acc.update(st)
            results[name] = _annotate(acc.compute(), stats)
        raw = results["raw"]
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "name": plan.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": flat_dict(args),
            "model": {"source": plan.source, "kind": plan.source_kind,
                      "path": os.path.abspath(plan.source) if plan.source_kind == "checkpoint" else None,
                      "family": loaded.family, "num_layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
                      "device": str(loaded.device), "dtype": plan.dtype, "attn": loaded.attn},
            "heads": {"kind": plan.heads_kind, "file": plan.heads_file, "sha256": plan.heads_sha256,
                      "meta": plan.heads_meta, "head_dim": loaded.head_dim,
                      "note": SVD_NOTE if plan.heads_kind == "svd_init" else None},
            "tau": {"raw": tau_raw, "head": None if plan.heads_kind == "none" else tau_head},
            "shards": {"split": args.split, "gap_buckets": list(plan.gap_buckets),
                       "gap_buckets_from": plan.gap_buckets_from,
                       "sources": [{"spec": s.spec, "shards": s.n_shards, "pairs_available": s.n_pairs,
                                    "pairs_scored": ps.get("pairs", 0), "manifest": s.manifest,
                                    "manifest_sha256": s.manifest_sha256}
                                   for s, ps in zip(plan.sources, scored.per_source)]},
            "data": {"pairs": scored.pairs, "pairs_without_anchors": scored.pairs_without_anchors,
                     "anchors": raw["n_anchors"], "max_pairs": args.max_pairs or None,
                     "coverage": scored.pairs / scored.wanted if scored.wanted else None,
                     "repeats_masked": scored.duplicates, "skipped": scored.skipped},
            "chance": {"pck0": raw["chance0"], "pck1": raw["chance1"]},
            "baselines": {"same_cell": {
                "pck0": float((scored.same_cell_dist == 0).double().mean()) if len(scored.same_cell_dist) else None,
                "pck1": float((scored.same_cell_dist <= 1).double().mean()) if len(scored.same_cell_dist) else None,
                "note": "the anchor's own grid position in B as the guess (no camera motion): what a purely "
                        "positional feature would score"}},
            "best": {"raw": _summary(raw), "head": _summary(results["head"])},
            "raw": raw,
            "head": results["head"],
            "timing": {"seconds_scoring": round(scored.seconds, 3),
                       "seconds_total": round(time.monotonic() - t_start, 3),
                       "pairs_per_s": scored.pairs / scored.seconds if scored.seconds > 0 else None},
            "warnings": plan.warnings,
            "plots": {},
            "mlflow": None,
            "output": os.path.abspath(plan.output),
        }
        if not raw["n_anchors"]:
            emit("[probe] warning: no anchors were scored (no pairs, or pairs without anchors); every metric is null")
        os.makedirs(plan.output, exist_ok=True)
        paths = make_plots(result, scored, plan.output)
        result["plots"] = {k: os.path.basename(v) for k, v in paths.items()}
        if tracker is not None:
            from data.tracking import tracking_uri

            result["mlflow"] = {"run_id": tracker.run_id, "experiment": args.experiment,
                                "tracking_uri": _public_uri(tracking_uri())}
        json_path = os.path.join(plan.output, "probe.json")
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=_json_default)
        table = format_table(result)
        with open(os.path.join(plan.output, "probe_table.txt"), "w") as f:
            f.write(table + "\n")
        if tracker is not None:
            _track(tracker, result, paths, json_path, table)
        status = "FINISHED"
        return result
    finally:
        if tracker is not None:
            tracker.end(status)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts: the open last gap bucket '40+' becomes '40plus' (MLflow refuses '+')."""
    return name.replace("+", "plus")


def _track(tracker, result: dict[str, Any], paths: dict[str, str], json_path: str, table: str) -> None:
    from losses.metrics import flatten_metrics

    params = dict(result["config"])
    params.update({"model.source": result["model"]["source"], "model.family": result["model"]["family"],
                   "model.num_layers": result["model"]["num_layers"],
                   "model.hidden_size": result["model"]["hidden_size"], "model.device": result["model"]["device"],
                   "model.dtype": result["model"]["dtype"], "heads.kind": result["heads"]["kind"],
                   "heads.file": result["heads"]["file"] or "", "heads.sha256": result["heads"]["sha256"] or "",
                   "heads.meta": json.dumps(result["heads"]["meta"], sort_keys=True) if result["heads"]["meta"] else "",
                   "tau.raw": result["tau"]["raw"], "tau.head": result["tau"]["head"],
                   "gap_buckets": ",".join(map(str, result["shards"]["gap_buckets"])),
                   "gap_buckets_from": result["shards"]["gap_buckets_from"]})
    tracker.log_params(params)
    tags = {}
    for i, s in enumerate(result["shards"]["sources"]):
        if s["manifest_sha256"]:
            tags[f"manifest_sha256_{i}"] = s["manifest_sha256"]
    if tags:
        tracker.set_tags(tags)
    metrics = {"probe/pairs": float(result["data"]["pairs"]), "probe/anchors": float(result["data"]["anchors"])}
    for k in ("pck0", "pck1"):
        if result["baselines"]["same_cell"][k] is not None:
            metrics[f"probe/same_cell/{k}"] = result["baselines"]["same_cell"][k]
    if result["timing"]["pairs_per_s"] is not None:
        metrics["probe/pairs_per_s"] = float(result["timing"]["pairs_per_s"])
    for name in ("raw", "head"):
        if result[name] is not None:
            metrics.update(flatten_metrics(result[name], f"probe/{name}"))
    tracker.log_metrics({mlflow_name(k): v for k, v in metrics.items()}, step=0)
    # the same per-layer values as series over the layer index: MLflow then draws PCK against depth
    for name in ("raw", "head"):
        for d in (result[name] or {}).get("layers", []):
            series = {f"probe/{name}/{k}_by_layer": d[k] for k in ("pck0", "pck1", "conf_acc_corr")
                      if d[k] is not None and math.isfinite(d[k])}
            tracker.log_metrics(series, step=d["layer"])
    for p in paths.values():
        tracker.log_artifact(p, "plots")
    tracker.log_artifact(json_path)
    tracker.log_text(table + "\n", "probe_table.txt")


# ============================================================================ the table

def _f(x: float | None, w: int = 0) -> str:
    s = "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"
    return s.rjust(w) if w else s


def _fs(x: float | None, w: int = 0) -> str:
    s = "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.3f}"
    return s.rjust(w) if w else s


def format_table(result: dict[str, Any]) -> str:
    """The terminal report: one row per layer, then chance, best layer, temporal robustness, gap buckets."""
    raw, head = result["raw"], result["head"]
    m, h, sh = result["model"], result["heads"], result["shards"]
    lines = []
    src = f"preset {m['source']}" if m["kind"] == "preset" else m["source"]
    lines.append(f"GASP probe {result['name']}: {src} ({m['family']}, L={m['num_layers']}, D={m['hidden_size']}, "
                 f"{m['dtype']} on {m['device']})")
    if h["kind"] == "trained":
        meta = h["meta"] or {}
        extra = ", ".join(f"{k} {meta[k]}" for k in ("model", "step") if meta.get(k) is not None)
        lines.append(f"heads: {h['file']} (d={h['head_dim']}{', ' + extra if extra else ''})")
    elif h["kind"] == "svd_init":
        lines.append(f"heads: UNTRAINED, {SVD_NOTE.split(': ', 1)[1]}")
    else:
        lines.append("heads: none (--no-head): raw features only")
    d = result["data"]
    lines.append(f"shards ({sh['split']}): {', '.join(s['spec'] for s in sh['sources'])}: {d['pairs']} pairs, "
                 f"{d['anchors']} anchors" + (f" (--max-pairs {d['max_pairs']})" if d["max_pairs"] else ""))
    lines.append("")
    cols = ["layer", "raw PCK@0", "raw PCK@1", "raw corr"] + (["head PCK@0", "head PCK@1", "head corr"]
                                                              if head is not None else [])
    widths = [max(len(c), 6) for c in cols]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    best = {n: (result["best"][n] or {}).get("layer") for n in ("raw", "head")}
    for l, r in enumerate(raw["layers"]):
        cells = [f"{l:d}", _f(r["pck0"]), _f(r["pck1"]), _fs(r["conf_acc_corr"])]
        if head is not None:
            hh = head["layers"][l]
            cells += [_f(hh["pck0"]), _f(hh["pck1"]), _fs(hh["conf_acc_corr"])]
        row = "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        marks = [n for n in ("raw", "head") if best[n] == l]
        lines.append(row + (f"   <- best {' & '.join(marks)}" if marks else ""))
    if not raw["layers"]:
        lines.append("(no anchors scored)")
    lines.append("")
    lines.append(f"chance:  PCK@0 {_f(result['chance']['pck0'])}   PCK@1 {_f(result['chance']['pck1'])}")
    sc = result.get("baselines", {}).get("same_cell")
    if sc:
        lines.append(f"same-cell baseline (anchor's own position, no motion):  PCK@0 {_f(sc['pck0'])}   "
                     f"PCK@1 {_f(sc['pck1'])}")
    for n in ("head", "raw"):
        b = result["best"][n]
        if b is None:
            continue
        lines.append(f"best layer ({n}): {b['layer'] if b['layer'] is not None else 'n/a'}   PCK@1 {_f(b['pck1'])}   "
                     f"PCK@0 {_f(b['pck0'])}   corr {_fs(b['conf_acc_corr'])}")
    for n in ("head", "raw"):
        b = result["best"][n]
        if b is None:
            continue
        tr = b["temporal_robustness"]
        why = "" if tr is not None else f" ({b['temporal_robustness_null_reason']})"
        lines.append(f"temporal robustness ({n}, best layer; PCK@1 largest / smallest gap): "
                     f"{'null' if tr is None else f'{tr:.3f}'}{why}")
    gb = (head or raw)["gap_buckets"]
    lines.append("anchors per gap bucket: " + "   ".join(f"{lab}: {n}" for lab, n in zip(gb["labels"], gb["counts"]))
                 + (f"   (below {gb['edges'][0]}: {gb['unbucketed']})" if gb["unbucketed"] else "")
                 + f"   [edges from {sh['gap_buckets_from']}]")
    primary = "head" if head is not None else "raw"
    b = result["best"][primary]
    if b and b["layer"] is not None:
        lines.append(f"PCK@1 by gap ({primary}, layer {b['layer']}): "
                     + "   ".join(f"{lab}: {_f(v)}" for lab, v in zip(gb["labels"], b["pck1_by_gap"]))
                     + "   chance: " + " ".join(_f(c) for c in gb["chance1"]))
    return "\n".join(lines)
