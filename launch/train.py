"""GASP training: `deepspeed launch/train.py --ds_config launch/zero3.json [--preset NAME | --model PATH] ...`

Thin entry point: parse and check the config (every rank, before the process group
starts: a config error is one line and a non-zero exit on every rank), start the
process group, build the trainer, train, export, tear down in `finally`.
With no flags it trains the `tiny` preset on the embedded default shards
(runs/shards), building them with the shard job when they are missing.

SIGTERM is turned into a flag first thing (launch/distributed.py): a rank signalled
while it starts still reports its config error, and one signalled later checkpoints
with all ranks at the next step boundary and exits 0. Exit status: 0 done or stopped
by SIGTERM, 2 bad flags / config, 3 a run-time error reported in one line (resume on
another world size, too many non-finite steps, export failure).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python launch/train.py` / the deepspeed launcher: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses
import json
import logging
import subprocess
import time

PROG = "launch/train.py"
DESCRIPTION = "Train a VLM with GASP's all-layer correspondence heads under DeepSpeed."


def parse_config(argv: list[str] | None):
    """--preset picks the defaults (or, with --model, the model's width does); flags override."""
    from data.cli import apply_overrides, parse_overrides
    from launch.config import PRESETS, TrainConfig, tiny

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [("--ds-config" if a == "--ds_config" else a) for a in argv]  # DeepSpeed's spelling
    argv = [("--ds-config=" + a.split("=", 1)[1] if a.startswith("--ds_config=") else a) for a in argv]
    values, parser = parse_overrides(TrainConfig, argv, PROG, DESCRIPTION)
    preset = values.get("model__preset", "tiny")
    model_path = values.get("model__model", "")
    if model_path:
        base = _recipe_for_checkpoint(model_path, parser)
    elif preset in PRESETS:
        base = PRESETS[preset]()
    else:
        from model.presets import PRESETS as MODEL_PRESETS

        if preset not in MODEL_PRESETS:
            parser.error(f"unknown --preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        base = tiny()
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, preset=preset))
    recipe = values.get("run__recipe", "")
    if recipe:
        from launch.config import RECIPES

        base = RECIPES[recipe](base)
    try:
        cfg = apply_overrides(base, values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    cfg = _drop_contradictions(cfg, values, parser)
    if not cfg.run.run_name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_name=default_run_name(cfg)))
    return cfg, parser


def _drop_contradictions(cfg, given: dict, parser):
    """Flags that cannot act under the chosen --trainable: refused when the user gave them, dropped
    when a preset did (a preset's activation checkpointing means nothing for heads-only training)."""
    m = cfg.model
    if m.trainable == "heads" and m.gradient_checkpointing:
        if given.get("model__gradient_checkpointing"):
            parser.error("--gradient-checkpointing has nothing to recompute under --trainable heads (the VLM runs "
                         "without gradients); drop it or use --trainable lora / full")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, gradient_checkpointing=False))
    if m.trainable == "heads" and cfg.loss.lambda_lm > 0:
        parser.error(f"--lambda-lm {cfg.loss.lambda_lm:g} trains the language model, but --trainable heads runs it "
                     f"without gradients; pass --trainable lora or full, or --lambda-lm 0")
    lora_given = [f"--{k.split('__')[1].replace('_', '-')}" for k in ("model__lora_r", "model__lora_alpha")
                  if k in given]
    if lora_given and cfg.model.trainable != "lora":
        parser.error(f"{' and '.join(lora_given)} only act with --trainable lora (this run trains "
                     f"{cfg.model.trainable}); drop them or pass --trainable lora")
    return cfg


def default_run_name(cfg) -> str:
    """`<preset or model>-<hash of the defining flags>` (DESIGN §7): a requeue of the same command
    resumes its own folder; any change of what defines the training gets a new one."""
    from launch.config import current_defining, defining_hash

    base = os.path.basename(os.path.normpath(cfg.model.model)) if cfg.model.model else cfg.model.preset
    return f"{base}-{defining_hash(current_defining(cfg))}"


def recorded_defining(folder: str) -> dict | None:
    """The defining flags of the run that owns `folder`: its run_config.json, else (runs written before
    that file existed) the config of its latest checkpoint; None for a folder no run owns."""
    from launch.config import RUN_RECORD, defining_flags

    path = os.path.join(folder, RUN_RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)["defining"]
    meta = os.path.join(folder, "checkpoints", "latest")
    if os.path.isfile(meta):
        tag = open(meta).read().strip()
        tm = os.path.join(folder, "checkpoints", tag, "trainer_meta.json")
        if os.path.isfile(tm):
            with open(tm) as f:
                flat = json.load(f).get("config") or {}
            return {k: v for k, v in defining_flags(flat).items() if k != "run.ds_config"}
    return None


def check_run_folder(cfg) -> None:
    """Refuse (TrainError, one line) to continue a run folder that holds a run of other defining flags.

    Only `--resume auto` continues what a folder holds; `--resume never` starts over there, and an
    explicit `--resume CHECKPOINT` is the user's own choice of what to continue.
    """
    from launch.config import TrainError, changed_flags, current_defining
    from launch.trainer import run_dir

    if cfg.run.resume != "auto":
        return
    folder = run_dir(cfg)
    try:
        before = recorded_defining(folder)
    except (OSError, ValueError, KeyError) as e:
        raise TrainError(f"run folder {folder}: unreadable run record ({type(e).__name__}: {e}); remove it or "
                         f"pass --resume never") from None
    if before is None:
        return
    now = current_defining(cfg)
    if "run.ds_config" not in before or isinstance(before.get("run.ds_config"), str):
        now = {k: v for k, v in now.items() if k != "run.ds_config"}
        before = {k: v for k, v in before.items() if k != "run.ds_config"}
    diff = changed_flags(before, now)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise TrainError(f"run folder {folder} holds a run with other defining flags ({shown}): it would continue "
                         f"that run under these flags; pass another --run-name (or none: the default name follows "
                         f"the flags), or --resume never to start over in this folder")


def _recipe_for_checkpoint(path: str, parser):
    from launch.config import gpu_7b, tiny

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        parser.error(f"--model {path}: not a Hugging Face checkpoint folder (no config.json)")
    try:
        meta = json.load(open(cfg_file))
    except ValueError as e:
        parser.error(f"--model {path}: config.json is not valid JSON ({e})")
    hidden = (meta.get("text_config") or meta).get("hidden_size", 0)
    return gpu_7b() if hidden >= 2048 else tiny()


def check_config(cfg, parser) -> dict:
    """Everything checkable before the process group: DeepSpeed JSON, shards, model.

    The DeepSpeed JSON check comes first and needs no torch; then the shard sets are
    resolved (manifests or listings) and the model source checked, all before any model
    is built, so a bad flag or bad data fails on every rank within seconds of its start
    (the launcher then stops the others).
    """
    from launch.config import TrainError, fill_ds_config, load_ds_config

    try:
        ds = load_ds_config(cfg.run.ds_config)
    except TrainError as e:
        parser.error(str(e))
    check_sources(cfg, parser)
    from model.loading import ModelLoadError, processor_and_adapter

    try:  # the processor and cell grid only, no weights
        _, num_layers, _, adapter = processor_and_adapter(cfg.model.model or cfg.model.preset,
                                                          max_pixels=cfg.data.max_pixels or None)
    except ModelLoadError as e:
        parser.error(str(e))
    import torch

    on_cuda = torch.cuda.is_available()
    check_similarity_memory(cfg, parser, num_layers, adapter.max_cells(), on_cuda)
    prec = cfg.model.precision
    bf16 = on_cuda if prec == "auto" else prec == "bf16"  # bf16 on CPU runs (slowly): tests use it
    hidden = _hidden_size(cfg)
    try:
        ds = fill_ds_config(ds, cfg, bf16=bf16, on_cuda=on_cuda, hidden=hidden)
    except TrainError as e:
        parser.error(str(e))
    return ds


def clip_frames_of(cfg) -> int:
    """The most frames a clip of the training sets holds (their manifests / plans); 2 where none is recorded
    (a version-1 pair set) and for instruction sets."""
    from data.sources import parse_spec, recorded

    most = 2
    for src in cfg.data.shards:
        try:
            rec = recorded(parse_spec(src)[0])
        except ValueError:
            continue
        if rec.kind != "instruction" and rec.clip_frames:
            most = max(most, int(rec.clip_frames))
    return most


def check_similarity_memory(cfg, parser, num_layers: int, cells: int, on_cuda: bool) -> None:
    """Refuse at start (one line) a micro-batch whose GASP loss cannot fit (DESIGN §6).

    `losses.gasp.similarity_bytes`: one chunk of layers' similarity and head work (pairs x N_a x N_b
    float32 a layer, with its softmaxes and gradient, and the head on the chunk's cells; backward
    recomputes both per chunk), at the largest view the resize allows and the most pairs a micro-batch can hold
    (--batch-size clips of the shards' K frames, K(K-1)/2 pairs each or --pairs-per-clip); the budget
    is --sim-memory-gib, else a quarter of the device's memory.
    """
    import torch

    from losses.gasp import LOSS_CHUNK_BYTES, _layer_chunk, similarity_bytes
    from model.head import head_dim_for

    k = clip_frames_of(cfg)
    per_clip = cfg.data.pairs_per_sample(k)
    pairs = cfg.data.batch_size * per_clip
    hidden = _hidden_size(cfg) or cfg.loss.head_dim
    dim, frames = head_dim_for(hidden, cfg.loss.head_dim), cfg.data.batch_size * k
    # what training runs: the fused head inside the loss's chunks (`FusedCorrespondenceHead.forward(x, loss=)`)
    need = similarity_bytes(num_layers, pairs, cells, cells, dim=dim, frames=frames, hidden=hidden) / 2 ** 30
    chunk = _layer_chunk(num_layers, pairs, cells, cells, dim, LOSS_CHUNK_BYTES, frames=frames, hidden=hidden)
    if cfg.run.sim_memory_gib:
        budget, why = cfg.run.sim_memory_gib, "--sim-memory-gib"
    elif on_cuda:
        total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0) or 0)).total_memory
        budget, why = total / 4 / 2 ** 30, "a quarter of the GPU's memory"
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)
        budget, why = psutil.virtual_memory().available / local / 4 / 2 ** 30, "a quarter of this rank's free RAM"
    if need > budget:
        parser.error(f"the GASP loss of one micro-batch would take ~{need:.1f} GiB at its peak (L={num_layers} "
                     f"layers, {chunk} at a time, x {pairs} pairs ({cfg.data.batch_size} clips of {k} frames, "
                     f"{per_clip} pairs each) x {cells}x{cells} cells, float32, with its backward) but the budget "
                     f"is {budget:.1f} GiB ({why}); lower --max-pixels (now {cfg.data.max_pixels or 'the model default'}, "
                     f"{cells} cells a view), --pairs-per-clip, --batch-size or the shards' --clip-frames, or raise "
                     f"--sim-memory-gib")


def check_sources(cfg, parser) -> None:
    """Every shard set resolves (manifest or listing, local or s3://) before anything heavy starts.

    An empty folder, a manifest without the split, an unknown format version, an unreachable or
    empty s3:// prefix, or too few samples for one batch on every rank: one line, exit 2. A missing
    val split of the training sets only skips validation (said in one line); an explicit
    --val-shards set must have one.
    """
    from data.cli import one_line
    from data.shardformat import FormatError
    from data.stream import resolve_source

    def resolve(src: str, split: str, flag: str):
        from data.sources import parse_spec

        try:
            loc = parse_spec(src)[0]
        except ValueError as e:
            parser.error(f"{flag} {e}")
        if "://" not in loc and "{" not in loc and "::" not in loc and not os.path.exists(loc):
            parser.error(f"{flag} {src}: no such file or folder (run pipeline/shard.py first, or omit --shards "
                         f"for the embedded default)")
        try:
            return resolve_source(src, split)
        except (FileNotFoundError, FormatError, ValueError) as e:
            parser.error(f"{flag} {src}: {one_line(e)} (make shards with pipeline/shard.py, or omit --shards for "
                         f"the embedded default)")
        except Exception as e:  # unreachable endpoint, credentials, permissions
            parser.error(f"{flag} {src}: cannot be read ({type(e).__name__}: {one_line(e)}); check the path, "
                         f"AWS_ENDPOINT_URL and credentials")

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    sets = []
    for src in cfg.data.shards:
        if src == cfg.data.shards[0] and _is_default_shards(src) and cfg.run.build_shards \
                and not os.path.isfile(os.path.join(src, "manifest.json")):
            return  # rank 0 builds the embedded default before training (checked by the shard job)
        sets.append(resolve(src, "train", "--shards"))
    weighted = [s.weight is not None for s in sets]
    if any(weighted) and not all(weighted):
        parser.error("--shards: give a weight to every shard set (LOCATION:WEIGHT) or to none")
    total = sum(s.n_samples for s in sets)
    need = cfg.data.batch_size * world
    if total < need:
        parser.error(f"--shards: {total} training samples make no batch of --batch-size {cfg.data.batch_size} on "
                     f"each of {world} ranks; shard more scenes or lower --batch-size")
    for src in cfg.data.val_shards:
        resolve(src, "val", "--val-shards")
    if not cfg.data.val_shards:
        missing = []
        for src in cfg.data.shards:
            try:
                resolve_source(src, "val")
            except Exception:
                missing.append(src)
        if missing and int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"[train] note: no val split in {', '.join(missing)}: validation skips those sets "
                  f"(pass --val-shards to validate elsewhere)", flush=True)
    kinds = {s.kind for s in sets}
    if cfg.loss.lambda_lm > 0 and "instruction" not in kinds and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"[train] note: --lambda-lm {cfg.loss.lambda_lm:g} but no instruction shard set in --shards: L_LM has "
              f"no labels (mix one in, e.g. --shards CLIPS/:1 SFT/:1)", flush=True)
    if "clip" not in kinds and (cfg.loss.lambda_corr > 0 or cfg.loss.lambda_depth > 0) \
            and int(os.environ.get("RANK", "0") or 0) == 0:
        print("[train] note: no clip shard set in --shards: L_corr and L_depth have no anchors "
              "(--lambda-corr 0 --lambda-depth 0 is the SFT baseline)", flush=True)
    if cfg.run.recipe == "paper" and int(os.environ.get("RANK", "0") or 0) == 0:
        from launch.config import PAPER_CLIP_FRAMES

        k = clip_frames_of(cfg)
        if "clip" in kinds and k < PAPER_CLIP_FRAMES:
            print(f"[train] note: --recipe paper trains on clips of {PAPER_CLIP_FRAMES} frames; these shards hold "
                  f"clips of up to {k} (shard with --clip-frames {PAPER_CLIP_FRAMES})", flush=True)


def _hidden_size(cfg) -> int:
    if cfg.model.model:
        meta = json.load(open(os.path.join(cfg.model.model, "config.json")))
        return int((meta.get("text_config") or meta).get("hidden_size", 0))
    from model.presets import get_preset

    try:
        return int(get_preset(cfg.model.preset).text["hidden_size"])
    except Exception:
        return 0


def _is_default_shards(src: str) -> bool:
    from launch.config import DEFAULT_SHARDS

    return os.path.normpath(src) == os.path.normpath(DEFAULT_SHARDS)


def ensure_default_shards(cfg) -> None:
    """Rank 0 builds the embedded default shards with the shard job when they are missing."""
    src = cfg.data.shards[0]
    if not (_is_default_shards(src) and cfg.run.build_shards):
        return
    if os.path.isfile(os.path.join(src, "manifest.json")):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"[train] {src} has no shards yet: building them with pipeline/shard.py", flush=True)
    cmd = [sys.executable, os.path.join(root, "pipeline", "shard.py"), "--output", src]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        from launch.config import TrainError

        raise TrainError(f"building the default shards with pipeline/shard.py failed (exit {rc}, its error is above); "
                         f"fix that, or pass --shards")


def main(argv: list[str] | None = None) -> int:
    import warnings

    from launch import distributed as D

    # DeepSpeed 0.19 calls collectives torch 2.13 has renamed: one warning per call, every step
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)

    previous_sigterm = D.install_sigterm_flag()  # first: a signalled rank still reports / checkpoints
    try:
        return _main(argv, D)
    finally:
        D.restore_sigterm(previous_sigterm)


def _main(argv: list[str] | None, D) -> int:
    cfg, parser = parse_config(argv)
    ds_config = check_config(cfg, parser)

    from launch.config import TrainError
    from launch.trainer import Trainer, find_resume

    try:
        check_run_folder(cfg)  # a folder of another run is never continued under changed flags
        find_resume(cfg, D.env_rank()[2])  # a checkpoint of another world size is refused here, in one line
    except TrainError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 3
    rank0 = int(os.environ.get("RANK", 0)) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format=f"%(asctime)s [rank {os.environ.get('RANK', 0)}] %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    trainer = None
    status = "FAILED"
    try:
        rank, world, device = D.init_distributed()
        built = None
        if rank == 0:
            try:
                ensure_default_shards(cfg)
            except TrainError as e:
                built = str(e)
        failed = [e for e in D.gather_objects(built) if e]  # every rank stops with rank 0's one line
        if failed:
            raise TrainError(failed[0])
        trainer = Trainer(cfg, rank, world, device)
        trainer.setup(ds_config)
        t0 = time.time()
        rc = trainer.train()
        D.print0(f"[train] done: {trainer.step} steps in {time.time() - t0:.0f}s; run folder {trainer.run_dir}")
        if rc == 0 and trainer.step >= cfg.optim.steps and cfg.run.export:
            D.barrier()
            failed = None
            if rank == 0:  # the others wait at the barrier below, whatever happens here
                from launch.export import ExportError, export_checkpoint

                trainer.engine = None  # free the engine's memory before the export loads a full copy
                trainer._hf_ds_config = None  # models built from here on are plain (not partitioned)
                try:
                    out = export_checkpoint(trainer.ckpt_dir, os.path.join(trainer.run_dir, "export"))
                    trainer.tracker.set_tags({"export_dir": out})
                    print(f"[train] exported the trained VLM (no heads) and the heads to {out}", flush=True)
                except ExportError as e:
                    failed = TrainError(f"export failed: {e} (the checkpoint is kept; retry with launch/export.py)")
            D.barrier()
            if failed is not None:
                raise failed
        status = "FINISHED" if rc == 0 else "FAILED"
        return rc
    except TrainError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if trainer is not None:
            trainer.finish(status if trainer.step >= cfg.optim.steps or status == "FAILED" else "KILLED")
        D.teardown()


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown of torch / transformers / DeepSpeed (seconds per rank,
    # with every rank and the launcher waiting): everything is saved, logged and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
