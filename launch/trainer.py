"""GASP training under DeepSpeed (ZeRO-3 by default): the loop and everything around it.

One optimizer step = `grad_accum` micro-batches on each of `world` ranks (`Trainer.train_step`):

    counts  = labels' item counts of the step's micro-batches, all-reduced   (before any forward;
              the same all-reduce carries the SIGTERM stop flag)
    for each micro-batch:
        loss = GaspVLM(batch, global_counts=counts, GAS, world)   # local_sum * GAS * world / global_count
        engine.backward(loss); engine.step()                      # DeepSpeed: / GAS, mean over ranks

so a step equals one process on the union batch (DESIGN §6). Every rank runs every
head every step, also with no anchors (the loss is then an exact zero in the graph).

Bad steps: before the last backward of a step the ranks all-reduce "some loss of this
step is not finite"; when set, every rank back-propagates a NaN, so DeepSpeed's global
gradient norm is not finite and DeepSpeed skips the optimizer step on every rank
(weights, optimizer state and LR schedule untouched; its own check also catches a
non-finite gradient under a finite loss). The step is counted (`train/skipped_steps`)
and logged; `--max-bad-steps` in a row stop the run with one line. Testing hook:
`GASP_FAULT_NONFINITE=STEP:RANK[,STEP:RANK...]` (STEP 1-based as logged, or a range
`A-B`) poisons that rank's loss at that step.

Preemption: SIGTERM on any rank makes all ranks save a checkpoint at the next step
boundary and exit 0. Checkpoints hold the DeepSpeed state (weights, optimizer, LR
schedule), each rank's loader position and RNG states, and the MLflow run id;
`--resume auto` continues the same run at the next step with the same data. On another
number of ranks, `--elastic-resume` loads a universal copy of the checkpoint (same
weights, optimizer state and schedule; the data order restarts at the next epoch).

Run folder: `train_log.jsonl` (rank 0; one line per logged step: losses, lr, grad norm,
throughput, skipped flag, and each rank's checksum of its share of the trainable
weights), `checkpoints/`, `export/`, validation plots. `GASP_DEBUG_PARTITION=1` makes
each rank write `partition_rank{r}.json` (local / full size of every parameter) after
the engine is built.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from typing import Any, Iterator

import numpy as np
import torch

from data.sources import parse_spec, recorded
from data.tracking import MlflowTracker, NullTracker, git_commit
from launch import distributed as D
from launch.config import TrainConfig, TrainError

log = logging.getLogger("gasp.train")
FAULT_ENV = "GASP_FAULT_NONFINITE"  # testing: "STEP:RANK[,STEP:RANK]" poisons that rank's loss at that step
PARTITION_ENV = "GASP_DEBUG_PARTITION"  # testing: "1" writes partition_rank{r}.json after the engine is built
HEAD_MASTER_ENV = "GASP_DEBUG_HEAD_MASTER"  # testing: "1" saves the heads' fp32 masters (bf16 runs) at start
TRAIN_LOG = "train_log.jsonl"


def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def parse_fault_spec(spec: str) -> set[tuple[int, int]]:
    """`GASP_FAULT_NONFINITE` -> {(step, rank)}: "3:1", "3:1,6-8:0" (steps 1-based, as logged)."""
    out: set[tuple[int, int]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            steps, rank = item.split(":")
            lo, _, hi = steps.partition("-")
            out.update((s, int(rank)) for s in range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise TrainError(f"{FAULT_ENV}={spec!r}: expected STEP:RANK[,STEP:RANK...] with STEP a number or "
                             f"a range A-B") from None
    return out


def run_dir(cfg: TrainConfig) -> str:
    """The run folder: --output-dir, else runs/train/<run name>."""
    return cfg.run.output_dir or os.path.join("runs", "train", cfg.run.run_name)


def find_resume(cfg: TrainConfig, world: int) -> str | None:
    """Checkpoint folder to resume from, or None; TrainError (one line) for a checkpoint of another world size.

    Needs no process group: `launch/train.py` calls it before starting one.
    """
    r = cfg.run.resume
    if r == "never":
        return None
    ckpt_dir = os.path.join(run_dir(cfg), "checkpoints") if r == "auto" else r
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        if r != "auto":
            raise TrainError(f"--resume {r}: no checkpoint there (no 'latest' file)")
        return None
    try:
        tag, meta = checkpoint_meta(ckpt_dir)
    except FileNotFoundError:
        tag = open(latest).read().strip()
        raise TrainError(f"checkpoint {ckpt_dir}/{tag} is incomplete (no trainer_meta.json); "
                         f"remove it or pass --resume never") from None
    if meta["world_size"] != world and not cfg.run.elastic_resume:
        raise TrainError(f"checkpoint {ckpt_dir}/{tag} was written by {meta['world_size']} ranks, this run has "
                         f"{world}: an exact resume needs the same number of ranks (the loader position is per "
                         f"rank); use the same number, --elastic-resume (same weights, optimizer and schedule; the "
                         f"data order restarts at the next epoch) or --resume never")
    return ckpt_dir


def checkpoint_meta(ckpt_dir: str) -> tuple[str, dict[str, Any]]:
    """(tag, trainer_meta.json) of the checkpoint `latest` points to; FileNotFoundError if either is missing."""
    tag = open(os.path.join(ckpt_dir, "latest")).read().strip()
    with open(os.path.join(ckpt_dir, tag, "trainer_meta.json")) as f:
        return tag, json.load(f)


def to_universal(ckpt_dir: str, tag: str) -> str:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once; rank 0 only); returns its load_dir.

    Written as <ckpt_dir>/universal/<tag>, through a temporary folder renamed when complete,
    so an interrupted conversion is redone, never half-read.
    """
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    load_dir = os.path.join(ckpt_dir, "universal")
    final = os.path.join(load_dir, tag)
    if os.path.isdir(final):
        return load_dir
    tmp = os.path.join(load_dir, f".{tag}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(load_dir, exist_ok=True)
    ds_to_universal.main(argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp,
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=False))
    os.replace(tmp, final)
    with open(os.path.join(load_dir, "latest_universal"), "w") as f:  # the converter named the temporary folder
        f.write(tag)
    return load_dir


# ---------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.tracker: NullTracker = NullTracker()
        self.step = 0
        self.bad_steps = 0
        self.bad_in_row = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._saved_step = -1  # step of the last checkpoint written by this process
        self._hf_ds_config = None  # keeps transformers' ZeRO-3 context alive while models are built
        self.run_dir = run_dir(cfg)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.faults = parse_fault_spec(os.environ.get(FAULT_ENV, ""))
        if not D._sigterm["installed"]:  # launch/train.py installs it first thing; other callers here
            D.install_sigterm_flag()

    @property
    def _stop(self) -> bool:
        return D.sigterm_received()

    # ------------------------------------------------------------------ set-up
    def setup(self, ds_config: dict[str, Any]) -> None:
        import deepspeed

        from data.stream import SampleStream
        from model.loading import build_model_and_processor
        from model.wrapper import GaspConfig, GaspVLM

        cfg = self.cfg
        self.bf16 = ds_config.get("bf16", {}).get("enabled") is True
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.resume_from = self._find_resume()
        self.resume_universal: str | None = None  # load_dir of the universal copy (elastic resume)
        if self.resume_from:
            tag, meta = checkpoint_meta(self.resume_from)
            if meta["world_size"] != self.world:
                ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
                error = None
                if self.rank == 0:
                    D.print0(f"[train] checkpoint {tag} was written by {meta['world_size']} ranks, this run has "
                             f"{self.world}: converting it to a universal checkpoint")
                    try:
                        to_universal(self.resume_from, tag)
                    except Exception as e:  # DeepSpeed's converter: report it in one line on every rank
                        error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                bad = [e for e in D.gather_objects(error) if e]
                if bad:
                    raise TrainError(f"checkpoint {self.resume_from}/{tag}: conversion to a universal checkpoint "
                                     f"failed ({bad[0]}); resume on {meta['world_size']} ranks or --resume never")
                self.resume_universal = os.path.join(self.resume_from, "universal")
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # from here on models are created partitioned
        torch.manual_seed(cfg.optim.seed)
        source = cfg.model.model or cfg.model.preset
        attn = None if cfg.model.attn == "auto" else cfg.model.attn
        vlm, self.processor, self.adapter = build_model_and_processor(
            source, dtype=self.dtype, attn_implementation=attn, device=self.device,
            max_pixels=cfg.data.max_pixels or None)
        # ZeRO-3: every weight must already be a partition here (no full copy per rank)
        self._created_partitioned = (all(hasattr(p, "ds_id") for p in vlm.parameters())
                                     if self.zero_stage == 3 else None)
        gcfg = GaspConfig(trainable=cfg.model.trainable, freeze_vision=cfg.model.freeze_vision,
                          train_projector=cfg.model.train_projector, gradient_checkpointing=cfg.model.gradient_checkpointing, head_dim=cfg.loss.head_dim,
                          tau=cfg.loss.tau, lambda_depth=cfg.loss.lambda_depth, lambda_corr=cfg.loss.lambda_corr,
                          lambda_lm=cfg.loss.lambda_lm, head=cfg.loss.head,
                          depth_loss=cfg.loss.depth_loss, lora_r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha)
        text_cfg = getattr(vlm.config, "text_config", vlm.config)
        try:
            gcfg.layer_weights = cfg.loss.layer_weights(int(text_cfg.num_hidden_layers))
        except ValueError as e:
            raise TrainError(str(e)) from None
        self.model = GaspVLM(vlm, gcfg)
        if self.zero_stage != 3:
            self.model.to(self.device)
        self.model.init_heads()  # SVD of each layer's q_proj (gathered under ZeRO-3, a collective)
        # the exact float32 initial values: DeepSpeed makes its fp32 master weights from the bf16
        # working copy, so they are written back into the masters once the engine exists
        exact_heads = {n: p.detach().float().clone() for n, p in self.model.head.named_parameters()}
        if self.bf16:  # DeepSpeed partitions all trainable params in one dtype (fp32 masters are kept);
            self.model.head.to(torch.bfloat16)  # the head still computes in float32 (measured on an H200)
        head_params = list(self.model.head.parameters())
        head_ids = {id(p) for p in head_params}
        other = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": head_params, "lr": cfg.optim.head_lr or cfg.optim.lr, "name": "heads"}]
        if other:
            groups.append({"params": other, "lr": cfg.optim.lr, "name": "model"})
        # warm-up + cosine as a multiplier of each group's own peak lr; DeepSpeed steps it after
        # every applied optimizer step (not after a skipped one) and checkpoints it
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self.gas = self.engine.gradient_accumulation_steps()
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.bf16:
            self._set_head_masters(exact_heads)
        if os.environ.get(PARTITION_ENV) == "1":
            self._dump_partition()

        self.train_stream = SampleStream(cfg.data.shards, self.adapter, batch_size=cfg.data.batch_size,
                                         rank=self.rank, world_size=self.world, num_workers=cfg.data.num_workers,
                                         seed=cfg.data.data_seed, split="train",
                                         pixel_dtype=None if self.dtype == torch.float32 else self.dtype,
                                         pairs_per_clip=cfg.data.pairs_per_clip,
                                         max_tokens=cfg.data.max_tokens_per_batch, max_seq_len=cfg.data.max_seq_len,
                                         video_frames=cfg.data.video_frames)
        self.source_names = [_set_label(s.name) for s in self.train_stream.sets]
        self.val_sources = cfg.data.val_shards or cfg.data.shards
        client = self._load_checkpoint() if self.resume_from else None
        if client is None and self.rank == 0:
            self._claim_run_folder()
        if self.rank == 0 and cfg.run.mlflow:
            self.tracker = MlflowTracker(run_name=cfg.run.run_name, experiment=cfg.run.experiment,
                                         run_id=(client or {}).get("mlflow_run_id"),
                                         tags={"kind": "train", "preset": cfg.model.preset,
                                               "model": cfg.model.model or "", "world_size": self.world},
                                         system_metrics=cfg.run.system_metrics)
            if client is None:
                self._log_run_start(ds_config)
            print(f"[train] MLflow run {self.tracker.run_id} ({'resumed' if client is not None else 'new'}) "
                  f"in experiment {cfg.run.experiment!r}", flush=True)
        D.print0(f"[train] {self.train_stream.describe()}")

    def _set_head_masters(self, exact: dict[str, torch.Tensor]) -> None:
        """Write the exact SVD initialisation into the heads' fp32 master weights (DESIGN §6).

        Every rank sets its own partition (`deepspeed.utils.safe_set_full_fp32_param`). Testing hook:
        GASP_DEBUG_HEAD_MASTER=1 makes rank 0 save the full masters as heads_master.pt in the run folder.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        params = dict(self.engine.module.head.named_parameters())
        for name, value in exact.items():
            safe_set_full_fp32_param(params[name], value.to(self.device))
        if os.environ.get(HEAD_MASTER_ENV) == "1":
            full = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in params.items()}  # collective
            if self.rank == 0:
                os.makedirs(self.run_dir, exist_ok=True)
                torch.save(full, os.path.join(self.run_dir, "heads_master.pt"))

    def _claim_run_folder(self) -> None:
        """A fresh start: record this run's defining flags in its folder (what a later `--resume auto` is
        checked against) and restart the step log (steps of an earlier run there must not mix in)."""
        from launch.config import RUN_RECORD, current_defining, defining_hash

        os.makedirs(self.run_dir, exist_ok=True)
        defining = current_defining(self.cfg)
        _atomic_json(os.path.join(self.run_dir, RUN_RECORD),
                     {"run_name": self.cfg.run.run_name, "hash": defining_hash(defining), "defining": defining})
        _atomic_json(os.path.join(self.run_dir, MANIFESTS_RECORD), training_manifests(self.cfg.data.shards))
        self._truncate_train_log(0)

    def _dump_partition(self) -> None:
        """partition_rank{r}.json: {name: [local elements, full elements, elements held outside the partition]}."""
        params = {n: [int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel()),
                      int(getattr(p, "ds_numel", p.numel())), int(p.data.numel())]
                  for n, p in self.model.named_parameters()}
        os.makedirs(self.run_dir, exist_ok=True)
        _atomic_json(os.path.join(self.run_dir, f"partition_rank{self.rank}.json"),
                     {"rank": self.rank, "world_size": self.world, "zero_stage": self.zero_stage,
                      "created_partitioned": self._created_partitioned, "params": params})

    def _log_run_start(self, ds_config: dict[str, Any]) -> None:
        from data.cli import flat_dict

        params = flat_dict(self.cfg)
        params.update({"world_size": self.world, "zero_stage": self.zero_stage, "precision": str(self.dtype),
                       "grad_accum_steps": self.gas})
        self.tracker.log_params(params)
        tags = {"git_commit": git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) or "unknown"}
        for src in self.cfg.data.shards:
            sha = recorded(parse_spec(src)[0]).manifest_sha256
            if sha:
                tags[f"manifest_sha256_{len(tags) - 1}"] = sha
        self.tracker.set_tags(tags)
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, "ds_config.resolved.json")
        with open(path, "w") as f:
            json.dump(ds_config, f, indent=1, sort_keys=True)
        self.tracker.log_artifact(path, "config")
        if os.path.isfile(self.cfg.run.ds_config):
            self.tracker.log_artifact(self.cfg.run.ds_config, "config")

    # ------------------------------------------------------------------ resume
    def _find_resume(self) -> str | None:
        return find_resume(self.cfg, self.world)

    def _load_checkpoint(self) -> dict[str, Any]:
        if self.resume_universal:
            return self._load_universal()
        path, client = self.engine.load_checkpoint(self.resume_from, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"could not load a checkpoint from {self.resume_from}")
        tag_dir = path if os.path.isdir(path) else os.path.dirname(path)
        with open(os.path.join(tag_dir, f"trainer_rank{self.rank}.json")) as f:
            state = json.load(f)
        try:
            self.train_stream.load_state_dict(state["loader"])
        except ValueError as e:
            raise TrainError(f"checkpoint {tag_dir}: {e}") from None
        self.step, self.bad_steps, self.bad_in_row = state["step"], state["bad_steps"], state["bad_in_row"]
        rng = torch.load(os.path.join(tag_dir, f"rng_rank{self.rank}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        if self.rank == 0:
            self._truncate_train_log(self.step)
        D.print0(f"[train] resumed from {tag_dir} at step {self.step}")
        return client or {}

    def _load_universal(self) -> dict[str, Any]:
        """Elastic resume: weights, optimizer state and LR schedule from the universal copy; step and
        bad-step counts from rank 0's record; the data order restarts at the next epoch; RNG reseeded."""
        tag, meta = checkpoint_meta(self.resume_from)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        path, client = self.engine.load_checkpoint(self.resume_universal, tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"could not load the universal checkpoint {self.resume_universal}/{tag}")
        # DeepSpeed gives every group the first group's settings: put back each group's own (name,
        # weight decay, ...) and its scheduled learning rate
        for g, own, lr in zip(self.optimizer.param_groups, groups, self.scheduler.get_last_lr()):
            g.update({k: v for k, v in own.items() if k != "lr"}, lr=lr)
        tag_dir = os.path.join(self.resume_from, tag)
        with open(os.path.join(tag_dir, "trainer_rank0.json")) as f:
            state = json.load(f)
        self.step, self.bad_steps, self.bad_in_row = state["step"], state["bad_steps"], state["bad_in_row"]
        loader = state["loader"]
        self.train_stream.set_epoch(int(loader["epoch"]) + (1 if int(loader["batches"]) > 0 else 0))
        seed = int(np.random.SeedSequence([self.cfg.optim.seed, self.step, self.rank]).generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        if self.rank == 0:
            self._truncate_train_log(self.step)
        total = np.array(self.param_checksums()).sum(axis=0)
        D.print0(f"[train] resumed from {tag_dir} at step {self.step} on {self.world} ranks (written by "
                 f"{meta['world_size']}; universal checkpoint); data restarts at epoch {self.train_stream.epoch}; "
                 f"trainable weights sum {total[0]:.17g} sum of squares {total[1]:.17g}")
        return client or {}

    def save_checkpoint(self, loader_state: dict[str, Any] | None = None) -> str:
        """All ranks: DeepSpeed state + each rank's loader position / RNG + (rank 0) trainer_meta.json.

        loader_state: the position to record (default: the stream's now).
        `trainer_meta.json`, written last, marks the checkpoint complete.
        """
        tag = f"step{self.step:08d}"
        client = {"step": self.step, "mlflow_run_id": self.tracker.run_id}
        client = D.gather_objects(client)[0]  # rank 0 knows the run id
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client)
        tag_dir = os.path.join(self.ckpt_dir, tag)
        state = {"step": self.step, "bad_steps": self.bad_steps, "bad_in_row": self.bad_in_row,
                 "loader": loader_state if loader_state is not None else self.train_stream.state_dict()}
        _atomic_json(os.path.join(tag_dir, f"trainer_rank{self.rank}.json"), state)
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   os.path.join(tag_dir, f"rng_rank{self.rank}.pt"))
        D.barrier()
        if self.rank == 0:
            from data.cli import flat_dict

            _atomic_json(os.path.join(tag_dir, "trainer_meta.json"),
                         {"world_size": self.world, "step": self.step, "mlflow_run_id": self.tracker.run_id,
                          "config": flat_dict(self.cfg)})
        D.barrier()
        self._saved_step = self.step
        D.print0(f"[train] checkpoint {tag_dir}")
        return tag_dir

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.model.batch_to_device(batch, self.adapter, self.device, self.dtype)

    def step_counts(self, micro: list[dict[str, Any]] | None) -> tuple[torch.Tensor, bool, list[int]]:
        """All-reduce the step's item counts (4,) [n_ab, n_ba, n_depth, n_lm] and the stop flag in ONE
        collective, and (a second, max) the vision-tower calls of each micro-batch, before any forward.

        Returns (counts, stop, vision calls each micro-batch index must make on every rank).
        """
        from losses.gasp import count_items

        local = torch.zeros(5, device=self.device)  # n_ab, n_ba, n_depth, n_lm, stop
        calls = torch.zeros(self.gas, device=self.device)
        if micro is not None:
            local[:4] = torch.stack([count_items(mb) for mb in micro]).sum(0).to(self.device)
            calls[:len(micro)] = torch.tensor([float(self.adapter.vision_calls(mb)) for mb in micro])
        local[4] = 1.0 if (self._stop or micro is None) else 0.0
        D.all_reduce(local)
        D.all_reduce(calls, "max")
        # at least one vision call per micro-batch: every rank runs the tower on every micro-batch
        return local[:4], bool(local[4].item() > 0), [max(1, int(c)) for c in calls.tolist()]

    def train_step(self, micro: list[dict[str, Any]], counts: torch.Tensor,
                   vision_calls: list[int] | None = None) -> tuple[torch.Tensor, bool]:
        """One optimizer step over this rank's `micro` batches with the step's global `counts`.

        Returns (sums, skipped): sums all-reduced over ranks = [total, nce_ab, nce_ba, depth,
        tokens, bad micro-batches, applied ranks, lm, lm tokens, lm correct, samples of each source
        ...]; skipped: the step left the weights unchanged (the same on every rank).
        """
        n_src = len(self.source_names)
        sums = torch.zeros(SUM_FIELDS + n_src, device=self.device)
        bad_local = False
        dummy = self.adapter.dummy_vision_inputs()
        for i, mb in enumerate(micro):
            need = vision_calls[i] if vision_calls else 0
            dummies = [dummy] * max(0, need - self.adapter.vision_calls(mb))
            sources = mb.get("sources") or []
            mb, inputs = self._to_device(mb)
            loss, parts = self.engine(mb, inputs, global_counts=counts, grad_accum_steps=self.gas,
                                      world_size=self.world, vision_dummies=dummies)
            if (self.step + 1, self.rank) in self.faults:
                loss = loss * float("nan")
            finite = bool(torch.isfinite(loss).item())
            bad_local |= not finite
            if i == len(micro) - 1:
                # the skip decision is all-reduced: if any rank saw a non-finite loss in this step,
                # every rank back-propagates NaN, so DeepSpeed's global grad norm is non-finite and
                # it skips the optimizer step (and the LR schedule) on every rank
                flag = D.all_reduce(torch.tensor([1.0 if bad_local else 0.0], device=self.device), "max")
                if flag.item() > 0:
                    loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            row = [parts["total"], parts["nce_ab"], parts["nce_ba"], parts["depth"],
                   float(inputs["attention_mask"].sum()), float(not finite), 0.0,
                   parts["lm"], parts["n_lm"], parts["lm_correct"]]
            per_src = [0.0] * n_src
            for s_ in sources:
                per_src[int(s_)] += 1.0
            sums += torch.tensor(row + per_src, device=self.device)
        sums[6] = 1.0 if self.engine.was_step_applied() else 0.0
        D.all_reduce(sums)
        applied = int(sums[6].item())
        if sums[5].item() > 0 and applied:
            raise TrainError("DeepSpeed applied a step with a non-finite loss; the bad-step skip needs DeepSpeed's "
                             "non-finite gradient-norm check (keep gradient norms on, bf16.check_grad_overflow true)")
        if applied not in (0, self.world):
            raise TrainError(f"the optimizer step was applied on {applied} of {self.world} ranks")
        return sums, applied == 0

    def train(self) -> int:
        """Run to --steps (or until SIGTERM). Returns the process exit status."""
        cfg = self.cfg
        self._it = it = self.train_stream.forever()
        self.engine.train()
        if self.step >= cfg.optim.steps:
            D.print0(f"[train] already at step {self.step} of {cfg.optim.steps}; nothing to train")
        while self.step < cfg.optim.steps:
            loader_state = self.train_stream.state_dict()  # the position before this step's batches
            t0 = time.perf_counter()
            try:
                micro: list[dict[str, Any]] | None = [next(it) for _ in range(self.gas)]
            except Exception:
                if not self._stop:
                    raise
                micro = None  # preempted while reading (e.g. a loader worker got the signal first)
            t_data = time.perf_counter() - t0
            counts, stop, vision_calls = self.step_counts(micro)
            if stop:
                if self._saved_step != self.step:  # (a --save-every checkpoint of this step is already there)
                    self.save_checkpoint(loader_state)
                D.print0(f"[train] stopped by SIGTERM after a checkpoint at step {self.step}; rerun the same "
                         f"command to resume")
                return 0
            sums, skipped = self.train_step(micro, counts, vision_calls)
            self.step += 1
            dt = time.perf_counter() - t0
            if skipped:
                self.bad_steps += 1
                self.bad_in_row += 1
                D.print0(f"[train] step {self.step}: non-finite loss or gradient on some rank; step skipped on all "
                         f"ranks (weights unchanged; {self.bad_in_row} in a row)")
            else:
                self.bad_in_row = 0
            if skipped or self.step % cfg.run.log_every == 0 or self.step == cfg.optim.steps:
                self._log_step(sums, counts, dt, t_data, skipped)
            if skipped and self.bad_in_row >= cfg.optim.max_bad_steps:
                raise TrainError(f"{self.bad_in_row} non-finite steps in a row at step {self.step} (--max-bad-steps "
                                 f"{cfg.optim.max_bad_steps}): lower --lr, check the data (manifest flagged "
                                 f"scenes) or resume from an earlier checkpoint")
            if cfg.run.val_every and self.step % cfg.run.val_every == 0 and self.step < cfg.optim.steps:
                self.validate()
            if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < cfg.optim.steps:
                self.save_checkpoint()
        self.validate()
        self.save_checkpoint()
        return 0

    def param_checksums(self) -> list[list[float]]:
        """Per rank [sum, sum of squares] of its share of the trainable weights (float64; a collective)."""
        local = torch.zeros(self.world, 2, dtype=torch.float64, device=self.device)
        for p in self._trainable:
            t = (p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().double()
            local[self.rank, 0] += t.sum()
            local[self.rank, 1] += (t * t).sum()
        return D.all_reduce(local).tolist()

    def _log_step(self, sums: torch.Tensor, counts: torch.Tensor, dt: float, t_data: float, skipped: bool) -> None:
        total, ab, ba, dep, tokens = (float(x) for x in sums[:5])
        lm, n_lm, lm_correct = (float(x) for x in sums[7:10])
        per_source = [float(x) for x in sums[SUM_FIELDS:]]
        checksums = self.param_checksums()  # every rank takes part
        samples = sum(per_source) or self.cfg.data.batch_size * self.gas * self.world
        lr = self.scheduler.get_last_lr()
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None and math.isfinite(float(gn)) and not skipped else None
        m = {"train/loss": total, "train/nce_ab": ab, "train/nce_ba": ba, "train/nce": 0.5 * (ab + ba),
             "train/depth": dep, "train/lr": lr[-1], "train/lr_heads": lr[0],
             "train/samples_per_s": samples / max(dt, 1e-9), "train/tokens_per_s": tokens / max(dt, 1e-9),
             "train/data_wait_s": t_data, "train/data_wait_share": t_data / max(dt, 1e-9),
             "train/step_time_s": dt, "train/skipped_steps": self.bad_steps,
             "train/anchors": float(counts[0]), "train/tokens": tokens}
        if self.cfg.loss.lambda_lm > 0:
            m.update({"train/lm": lm, "train/lm_tokens": n_lm,
                      "train/lm_accuracy": lm_correct / n_lm if n_lm else float("nan")})
        for name, n in zip(self.source_names, per_source):
            m[f"train/samples/{name}"] = n
        if gn is not None:
            m["train/grad_norm"] = gn
        m["train/bad_samples"] = self.train_stream.stats()["skipped"]
        self.tracker.log_metrics({k: v for k, v in m.items() if math.isfinite(v)}, step=self.step)
        if self.rank == 0:
            row = {"step": self.step, "skipped": skipped, **{k.split("/", 1)[1]: (v if math.isfinite(v) else None)
                                                             for k, v in m.items()},
                   "checksums": checksums, "time": time.time()}
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, TRAIN_LOG), "a") as f:
                f.write(json.dumps(row) + "\n")
        lm_text = f", lm {lm:.4f} over {int(n_lm)} tokens" if self.cfg.loss.lambda_lm > 0 else ""
        D.print0(f"[train] step {self.step}/{self.cfg.optim.steps} loss {total:.4f} (nce {0.5 * (ab + ba):.4f}, "
                 f"depth {dep:.4f}{lm_text}) lr {lr[-1]:.2e} grad {gn if gn is not None else float('nan'):.3f} "
                 f"{samples / max(dt, 1e-9):.2f} samples/s data-wait {100 * t_data / max(dt, 1e-9):.0f}%"
                 + (" SKIPPED" if skipped else ""))

    def _truncate_train_log(self, step: int) -> None:
        """On resume: drop the log lines (train log, LM retention log) of steps after the checkpoint (they
        are redone); on a fresh start (step 0) all of them."""
        for name in (TRAIN_LOG, VAL_LM_LOG):
            path = os.path.join(self.run_dir, name)
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Per-layer PCK@0 / PCK@1 / PCK@2patch raw and through the heads, chance, the same-cell baseline,
        the confidence-accuracy correlation and the per-dataset temporal curve on the val split (DESIGN §6);
        MLflow metrics, the three-panel figure and val_metrics.json (rank 0)."""
        from data.stream import SampleStream
        from launch import plots
        from losses.metrics import MatchMetrics, flatten_metrics, temporal_series

        cfg = self.cfg
        clip_sources, lm_sources = self._val_sources()
        # LM retention on the held-out instruction split, whatever trains (geometry-only training shows its drift)
        retention = self.lm_retention(lm_sources) if lm_sources else None
        if retention is not None and retention["tokens"] and self.rank == 0:
            self.tracker.log_metrics({"val/lm/loss": retention["loss"], "val/lm/accuracy": retention["accuracy"],
                                      "val/lm/tokens": float(retention["tokens"])}, step=self.step)
            print(f"[val] step {self.step}: LM retention: loss {retention['loss']:.4f}, token accuracy "
                  f"{retention['accuracy']:.3f} over {retention['tokens']} held-out tokens", flush=True)
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, VAL_LM_LOG), "a") as f:
                f.write(json.dumps({"step": self.step, **retention}) + "\n")
        if not clip_sources:
            D.print0("[val] no clip val split: correspondence metrics skipped")
            return None
        try:
            stream = SampleStream(clip_sources, self.adapter, batch_size=cfg.data.batch_size, rank=self.rank,
                                  world_size=self.world, num_workers=0, seed=0, split="val",
                                  batches_per_epoch=cfg.run.val_batches,
                                  pixel_dtype=None if self.dtype == torch.float32 else self.dtype,
                                  pairs_per_clip=cfg.data.pairs_per_clip)
        except (ValueError, FileNotFoundError) as e:
            D.print0(f"[val] skipped: {e}")
            return None
        t0 = time.perf_counter()
        self.engine.eval()
        head_stats, raw_stats = [], []
        for batch in stream:
            batch, inputs = self._to_device(batch)
            h, r = self.engine.module.match(batch, inputs, raw=True)
            head_stats.append(h.cpu())
            raw_stats.append(r.cpu())
        self.engine.train()
        gathered = D.gather_objects((head_stats, raw_stats))
        if self.rank != 0:
            return None
        results = {}
        for name, idx in (("head", 0), ("raw", 1)):
            acc = MatchMetrics()
            for per_rank in gathered:
                for st in per_rank[idx]:
                    acc.update(st)
            results[name] = acc.compute()
        if retention is not None:
            results["lm"] = retention
        metrics = {}
        for name, res in results.items():
            if name != "lm":
                metrics.update(flatten_metrics(res, f"val/{name}"))
        self.tracker.log_metrics(metrics, step=self.step)
        if self.step >= cfg.optim.steps:  # the final curve, as series over the frame distance
            for name, res in results.items():
                for key, pts in temporal_series(res, f"val/{name}").items():
                    for dt, v in pts:
                        self.tracker.log_metrics({key: v}, step=dt)
        os.makedirs(self.run_dir, exist_ok=True)
        png = plots.three_panels({"trained": results}, os.path.join(self.run_dir, f"panels_step{self.step:06d}.png"),
                                 title=f"validation, step {self.step}")
        self.tracker.log_artifact(png, "plots")
        shutil.copyfile(png, os.path.join(self.run_dir, "panels.png"))
        self.tracker.log_artifact(os.path.join(self.run_dir, "panels.png"), "plots")
        with open(os.path.join(self.run_dir, "val_metrics.json"), "w") as f:
            json.dump({"step": self.step, **results}, f, indent=1)
        h, r = results["head"], results["raw"]
        print(f"[val] step {self.step}: {h['n_anchors']} anchors; best PCK@2patch head {_fmt(h['best_pck2patch'])} "
              f"(layer {h['best_layer']}), raw {_fmt(r['best_pck2patch'])} (layer {r['best_layer']}); chance "
              f"{_fmt(h['chance2'])}, same-cell {_fmt(h['same_cell']['pck2patch'])} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        return results

    def _val_sources(self) -> tuple[list[str], list[str]]:
        """The validation sources with a val split, by kind: (clip sets, instruction sets); their records are
        read at the first validation only."""
        from data.stream import resolve_source

        cached = self.__dict__.get("_val_kinds")
        if cached is not None:
            return cached
        clips, lm = [], []
        for src in self.val_sources:
            try:
                kind = resolve_source(src, "val").kind
            except Exception:
                continue  # no val split there (said once at start)
            (lm if kind == "instruction" else clips).append(src)
        self.__dict__["_val_kinds"] = (clips, lm)
        return clips, lm

    @torch.no_grad()
    def lm_retention(self, sources: list[str]) -> dict[str, Any] | None:
        """Mean LM loss and next-token accuracy on the held-out instruction split (DESIGN §6), over all
        ranks (a collective: every rank calls it)."""
        from data.stream import SampleStream

        cfg = self.cfg
        try:
            stream = SampleStream(sources, self.adapter, batch_size=cfg.data.batch_size, rank=self.rank,
                                  world_size=self.world, num_workers=0, seed=0, split="val",
                                  batches_per_epoch=cfg.run.val_batches,
                                  pixel_dtype=None if self.dtype == torch.float32 else self.dtype,
                                  max_seq_len=cfg.data.max_seq_len, video_frames=cfg.data.video_frames)
        except (ValueError, FileNotFoundError) as e:
            D.print0(f"[val] LM retention skipped: {e}")
            return None
        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        dummy = self.adapter.dummy_vision_inputs()
        for batch in stream:
            batch, inputs = self._to_device(batch)
            # every rank runs the tower equally often: one call per media kind, padded with dummies to 2
            dummies = [dummy] * (2 - self.adapter.vision_calls(batch))
            _, hidden, zero = self.engine.module.capture(batch, inputs, dummies, keep_hidden=True)
            total, n, correct = self.engine.module.lm_terms(hidden, batch.get("labels"))
            sums += torch.tensor([float(total), float(n), float(correct)], dtype=torch.float64, device=self.device)
        self.engine.train()
        D.all_reduce(sums)
        total, n, correct = sums.tolist()
        return {"loss": total / n if n else None, "accuracy": correct / n if n else None, "tokens": int(n)}

    # ------------------------------------------------------------------ end
    def finish(self, status: str = "FINISHED") -> None:
        if self._it is not None:
            self._it.close()  # stops the loader's worker processes now
            self._it = None
        self.tracker.end(status)


VAL_LM_LOG = "val_lm.jsonl"
"""One line per validation: the LM retention (mean loss, token accuracy, tokens) on the held-out instruction split."""
SUM_FIELDS = 10
"""Fixed fields of a step's sums (see `Trainer.train_step`); the per-source sample counts follow."""
MANIFESTS_RECORD = "training_manifests.json"
"""Written in the run folder at start: the manifests of the training sets (the export copies them into
gasp_training.json, what the evaluator's leakage check reads)."""


def training_manifests(shards: list[str]) -> dict[str, Any]:
    """{"training_manifests": [{url, sha256, format, kind, splits}]} of the training shard sets."""
    from data.sources import parse_spec, recorded

    out = []
    for src in shards:
        loc = parse_spec(src)[0]
        rec = recorded(loc)
        splits = {k: list(v) for k, v in (rec.splits or {}).items() if isinstance(v, list)}
        splits.setdefault("train", [])
        splits.setdefault("val", [])
        out.append({"url": rec.manifest or loc, "sha256": rec.manifest_sha256, "format": rec.format,
                    "kind": rec.kind, "splits": splits})
    return {"training_manifests": out}


def _set_label(name: str) -> str:
    """A shard set's spec as a short metric-safe label: its last path part, without the weight."""
    from data.sources import parse_spec

    try:
        loc = parse_spec(name)[0]
    except ValueError:
        loc = name
    last = [p for p in loc.replace("\\", "/").split("/") if p and p != "manifest.json"]
    label = last[-1] if last else loc
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:60] or "set"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
