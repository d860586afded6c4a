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
    from launch.config import PRESETS, TrainConfig, gpu_7b, tiny

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
    try:
        cfg = apply_overrides(base, values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if not cfg.run.run_name:
        name = os.path.basename(os.path.normpath(cfg.model.model)) if cfg.model.model else cfg.model.preset
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_name=name))
    return cfg, parser


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

    The file checks come first and need no torch, so a bad flag or a missing file fails
    on every rank within a second of its start (the launcher then stops the others).
    """
    from data.sources import parse_spec
    from launch.config import TrainError, fill_ds_config, load_ds_config

    try:
        ds = load_ds_config(cfg.run.ds_config)
    except TrainError as e:
        parser.error(str(e))
    for src in cfg.data.shards + cfg.data.val_shards:
        if src == cfg.data.shards[0] and _is_default_shards(src) and cfg.run.build_shards:
            continue
        if "://" in src:
            continue  # remote sets are checked by the loader, with one line
        try:
            loc = parse_spec(src)[0]
        except ValueError as e:
            parser.error(f"--shards {e}")
        if "{" not in loc and not os.path.exists(loc):
            parser.error(f"--shards {src}: no such file or folder (run pipeline/shard.py first, or omit --shards "
                         f"for the embedded default)")
    if cfg.model.model:
        from model.loading import ModelLoadError, checkpoint_family

        try:
            checkpoint_family(cfg.model.model)
        except ModelLoadError as e:
            parser.error(str(e))
    import torch

    on_cuda = torch.cuda.is_available()
    prec = cfg.model.precision
    if prec == "bf16" and not on_cuda:
        parser.error("--precision bf16 needs a GPU here; use --precision auto (fp32 on CPU)")
    bf16 = on_cuda if prec == "auto" else prec == "bf16"
    hidden = _hidden_size(cfg)
    try:
        ds = fill_ds_config(ds, cfg, bf16=bf16, on_cuda=on_cuda, hidden=hidden)
    except TrainError as e:
        parser.error(str(e))
    return ds


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
        raise RuntimeError(f"building the default shards failed (pipeline/shard.py exit {rc})")


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
        if rank == 0:
            ensure_default_shards(cfg)
        D.barrier()
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
