"""GASP training under DeepSpeed (ZeRO-3 by default): the loop and everything around it.

One optimizer step = `grad_accum` micro-batches on each of `world` ranks:

    counts  = labels' item counts of the step's micro-batches, all-reduced   (before any forward)
    for each micro-batch:
        loss = GaspVLM(batch, global_counts=counts, GAS, world)   # local_sum * GAS * world / global_count
        engine.backward(loss); engine.step()                      # DeepSpeed: / GAS, mean over ranks

so a step equals one process on the union batch (DESIGN §6). Every rank runs every
head every step, also with no anchors (the loss is then an exact zero in the graph).

Robustness: a non-finite loss or gradient on any rank makes DeepSpeed's global grad
norm non-finite, which skips the optimizer step on every rank (weights, optimizer
state and LR schedule untouched); the trainer all-reduces its own flag to count and
log it, and stops after `--max-bad-steps` in a row. SIGTERM on any rank makes all
ranks save a checkpoint at the next step boundary and exit 0. Checkpoints hold the
DeepSpeed state, each rank's loader position and RNG states, and the MLflow run id;
`--resume auto` continues the same run at the next step with the same data.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from typing import Any

import numpy as np
import torch

from data.tracking import MlflowTracker, NullTracker, git_commit
from launch import distributed as D
from launch.config import TrainConfig

log = logging.getLogger("gasp.train")
FAULT_ENV = "GASP_FAULT_NONFINITE"  # testing: "STEP:RANK" poisons that rank's loss at that step


class TrainError(Exception):
    """A failure to report in one line (config, resume, data, too many bad steps)."""


# ---------------------------------------------------------------------- DeepSpeed config

def load_ds_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise TrainError(f"--ds-config {path}: no such file (shipped: launch/zero3.json, launch/zero2.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise TrainError(f"--ds-config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TrainError(f"--ds-config {path}: expected a JSON object")
    return cfg


def fill_ds_config(ds: dict[str, Any], cfg: TrainConfig, bf16: bool, on_cuda: bool, hidden: int) -> dict[str, Any]:
    """Fill DeepSpeed's 'auto' values from the flags; explicit values must agree with them."""
    ds = copy.deepcopy(ds)
    want = {
        ("train_micro_batch_size_per_gpu",): cfg.data.batch_size,
        ("gradient_accumulation_steps",): cfg.data.grad_accum,
        ("gradient_clipping",): cfg.optim.grad_clip,
        ("bf16", "enabled"): bf16,
        ("optimizer", "params", "lr"): cfg.optim.lr,
        ("optimizer", "params", "weight_decay"): cfg.optim.weight_decay,
        ("optimizer", "params", "torch_adam"): not on_cuda,  # FusedAdam cannot build without CUDA
        ("zero_optimization", "stage3_param_persistence_threshold"): 0 if hidden < 1024 else 10 * hidden,
    }
    for path, value in want.items():
        node = ds
        for k in path[:-1]:
            node = node.setdefault(k, {})
        have = node.get(path[-1], "auto")
        if have == "auto":
            node[path[-1]] = value
        elif path[-1] in ("torch_adam", "stage3_param_persistence_threshold"):
            continue  # explicit choices the user may make freely
        elif have != value and not (isinstance(have, (int, float)) and isinstance(value, (int, float))
                                    and math.isclose(have, value)):
            flag = {"train_micro_batch_size_per_gpu": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
                    "gradient_clipping": "--grad-clip", "enabled": "--precision", "lr": "--lr",
                    "weight_decay": "--weight-decay"}[path[-1]]
            raise TrainError(f"--ds-config sets {'.'.join(path)} = {have!r} but {flag} gives {value!r}; "
                             f"set it to \"auto\" in the JSON or change the flag")
    if ds.get("fp16", {}).get("enabled") is True:
        raise TrainError("--ds-config enables fp16; use bf16 (--precision auto/bf16) or fp32")
    if "scheduler" in ds:
        raise TrainError("--ds-config has a 'scheduler'; the trainer runs its own warm-up + cosine schedule, "
                         "remove it (see --warmup-steps, --min-lr-ratio)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise TrainError(f"--ds-config zero_optimization.stage {stage} is not 0-3")
    return ds


def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ---------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.tracker: NullTracker = NullTracker()
        self.step = 0
        self.bad_steps = 0
        self.bad_in_row = 0
        self._stop = False
        self._hf_ds_config = None  # keeps transformers' ZeRO-3 context alive while models are built
        self.run_dir = cfg.run.output_dir or os.path.join("runs", "train", cfg.run.run_name)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        fault = os.environ.get(FAULT_ENV, "")
        self.fault = tuple(int(x) for x in fault.split(":")) if fault else None

    # ------------------------------------------------------------------ set-up
    def setup(self, ds_config: dict[str, Any]) -> None:
        import deepspeed

        from data.stream import PairStream
        from model.loading import build_model_and_processor
        from model.wrapper import GaspConfig, GaspVLM

        cfg = self.cfg
        self.bf16 = ds_config.get("bf16", {}).get("enabled") is True
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.resume_from = self._find_resume()
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # from here on models are created partitioned
        torch.manual_seed(cfg.optim.seed)
        source = cfg.model.model or cfg.model.preset
        attn = None if cfg.model.attn == "auto" else cfg.model.attn
        vlm, self.processor, self.adapter = build_model_and_processor(
            source, dtype=self.dtype, attn_implementation=attn, device=self.device,
            max_pixels=cfg.data.max_pixels or None)
        gcfg = GaspConfig(trainable=cfg.model.trainable, freeze_vision=cfg.model.freeze_vision,
                          gradient_checkpointing=cfg.model.gradient_checkpointing, head_dim=cfg.loss.head_dim,
                          tau=cfg.loss.tau, lambda_depth=cfg.loss.lambda_depth, lora_r=cfg.model.lora_r,
                          lora_alpha=cfg.model.lora_alpha)
        text_cfg = getattr(vlm.config, "text_config", vlm.config)
        gcfg.layer_weights = cfg.loss.layer_weights(int(text_cfg.num_hidden_layers))
        self.model = GaspVLM(vlm, gcfg)
        if self.zero_stage != 3:
            self.model.to(self.device)
        self.model.init_heads()  # SVD of each layer's q_proj (gathered under ZeRO-3, a collective)
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

        self.train_stream = PairStream(cfg.data.shards, self.adapter, batch_size=cfg.data.batch_size, rank=self.rank,
                                       world_size=self.world, num_workers=cfg.data.num_workers,
                                       seed=cfg.data.data_seed, split="train")
        self.val_sources = cfg.data.val_shards or cfg.data.shards
        client = self._load_checkpoint() if self.resume_from else None
        if self.rank == 0 and cfg.run.mlflow:
            self.tracker = MlflowTracker(run_name=cfg.run.run_name, experiment=cfg.run.experiment,
                                         run_id=(client or {}).get("mlflow_run_id"),
                                         tags={"kind": "train", "preset": cfg.model.preset,
                                               "model": cfg.model.model or "", "world_size": self.world},
                                         system_metrics=cfg.run.system_metrics)
            if client is None:
                self._log_run_start(ds_config)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        D.print0(f"[train] {self.train_stream.describe()}")

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True
        log.warning("rank %d: SIGTERM received; checkpointing at the next step boundary", self.rank)

    def _log_run_start(self, ds_config: dict[str, Any]) -> None:
        from data.cli import flat_dict

        params = flat_dict(self.cfg)
        params.update({"world_size": self.world, "zero_stage": self.zero_stage, "precision": str(self.dtype),
                       "grad_accum_steps": self.gas})
        self.tracker.log_params(params)
        tags = {"git_commit": git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) or "unknown"}
        for src in self.cfg.data.shards:
            sha = _manifest_sha(src.rsplit(":", 1)[0] if _has_weight(src) else src)
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
        """Checkpoint folder to resume from, or None; refuses a different world size in one line."""
        r = self.cfg.run.resume
        if r == "never":
            return None
        ckpt_dir = self.ckpt_dir if r == "auto" else r
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            if r != "auto":
                raise TrainError(f"--resume {r}: no checkpoint there (no 'latest' file)")
            return None
        tag = open(latest).read().strip()
        meta_path = os.path.join(ckpt_dir, tag, "trainer_meta.json")
        if not os.path.isfile(meta_path):
            raise TrainError(f"checkpoint {ckpt_dir}/{tag} is incomplete (no trainer_meta.json); "
                             f"remove it or pass --resume never")
        meta = json.load(open(meta_path))
        if meta["world_size"] != self.world:
            raise TrainError(f"checkpoint {ckpt_dir}/{tag} was written by {meta['world_size']} ranks, this run has "
                             f"{self.world}: resuming on another world size is not supported (the loader "
                             f"position is per rank); use the same number of ranks or --resume never")
        return ckpt_dir

    def _load_checkpoint(self) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(self.resume_from, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"could not load a checkpoint from {self.resume_from}")
        tag_dir = path if os.path.isdir(path) else os.path.dirname(path)
        with open(os.path.join(tag_dir, f"trainer_rank{self.rank}.json")) as f:
            state = json.load(f)
        self.train_stream.load_state_dict(state["loader"])
        self.step, self.bad_steps, self.bad_in_row = state["step"], state["bad_steps"], state["bad_in_row"]
        rng = torch.load(os.path.join(tag_dir, f"rng_rank{self.rank}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        D.print0(f"[train] resumed from {tag_dir} at step {self.step}")
        return client or {}

    def save_checkpoint(self) -> str:
        tag = f"step{self.step:08d}"
        client = {"step": self.step, "mlflow_run_id": self.tracker.run_id}
        client = D.gather_objects(client)[0]  # rank 0 knows the run id
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client)
        tag_dir = os.path.join(self.ckpt_dir, tag)
        state = {"step": self.step, "bad_steps": self.bad_steps, "bad_in_row": self.bad_in_row,
                 "loader": self.train_stream.state_dict()}
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
        D.print0(f"[train] checkpoint {tag_dir}")
        return tag_dir

    # ------------------------------------------------------------------ loop
    def _to_device(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        out = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
               for k, v in batch.items()}
        inputs = self.adapter.model_inputs(out)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return out, inputs

    def train(self) -> int:
        """Run to --steps (or until SIGTERM). Returns the process exit status."""
        from model.wrapper import batch_counts

        cfg = self.cfg
        it = self.train_stream.forever()
        self.engine.train()
        t_last = time.perf_counter()
        if self.step >= cfg.optim.steps:
            D.print0(f"[train] already at step {self.step} of {cfg.optim.steps}; nothing to train")
        while self.step < cfg.optim.steps:
            if self._should_stop():
                self.save_checkpoint()
                D.print0("[train] stopped by SIGTERM after a checkpoint; rerun the same command to resume")
                return 0
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(self.gas)]
            t_data = time.perf_counter() - t0
            counts = torch.stack([batch_counts(mb) for mb in micro]).sum(0).to(self.device)  # (3,)
            D.all_reduce(counts)
            sums = torch.zeros(6, device=self.device)  # total, nce_ab, nce_ba, depth, tokens, bad
            for mb in micro:
                mb, inputs = self._to_device(mb)
                loss, parts = self.engine(mb, inputs, global_counts=counts, grad_accum_steps=self.gas,
                                          world_size=self.world)
                if self.fault and self.fault == (self.step, self.rank):
                    loss = loss * float("nan")
                bad = not torch.isfinite(loss).item()
                self.engine.backward(loss)
                self.engine.step()
                sums += torch.tensor([parts["total"], parts["nce_ab"], parts["nce_ba"], parts["depth"],
                                      float(inputs["attention_mask"].sum()), float(bad)], device=self.device)
            D.all_reduce(sums)
            bad_step = sums[5].item() > 0 or not self.engine.was_step_applied()
            self.step += 1
            if bad_step:
                self.bad_steps += 1
                self.bad_in_row += 1
                D.print0(f"[train] step {self.step}: non-finite loss or gradient on some rank; step skipped on all "
                         f"ranks (weights unchanged; {self.bad_in_row} in a row)")
                self.tracker.log_metrics({"train/skipped_steps": self.bad_steps}, step=self.step)
                if self.bad_in_row >= cfg.optim.max_bad_steps:
                    raise TrainError(f"{self.bad_in_row} non-finite steps in a row (--max-bad-steps "
                                     f"{cfg.optim.max_bad_steps}): lower --lr, check the data (manifest flagged "
                                     f"scenes) or resume from an earlier checkpoint")
            else:
                self.bad_in_row = 0
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            if self.step % cfg.run.log_every == 0 or self.step == cfg.optim.steps:
                self._log_step(sums, dt, t_data, bad_step)
            if cfg.run.val_every and self.step % cfg.run.val_every == 0 and self.step < cfg.optim.steps:
                self.validate()
            if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < cfg.optim.steps:
                self.save_checkpoint()
        self.validate()
        self.save_checkpoint()
        return 0

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        return D.all_reduce(flag, "max").item() > 0

    def _log_step(self, sums: torch.Tensor, dt: float, t_data: float, bad: bool) -> None:
        total, ab, ba, dep, tokens = (float(x) for x in sums[:5])
        samples = self.cfg.data.batch_size * self.gas * self.world
        lr = self.scheduler.get_last_lr()
        gn = self.engine.get_global_grad_norm()
        m = {"train/loss": total, "train/nce_ab": ab, "train/nce_ba": ba, "train/nce": 0.5 * (ab + ba),
             "train/depth": dep, "train/lr": lr[-1], "train/lr_heads": lr[0],
             "train/samples_per_s": samples / max(dt, 1e-9), "train/tokens_per_s": tokens / max(dt, 1e-9),
             "train/data_wait_s": t_data, "train/data_wait_share": t_data / max(dt, 1e-9),
             "train/step_time_s": dt, "train/skipped_steps": self.bad_steps}
        if gn is not None and math.isfinite(float(gn)):
            m["train/grad_norm"] = float(gn)
        bad_data = self.train_stream.stats()
        m["train/bad_samples"] = bad_data["skipped"]
        self.tracker.log_metrics(m, step=self.step)
        D.print0(f"[train] step {self.step}/{self.cfg.optim.steps} loss {total:.4f} (nce {0.5 * (ab + ba):.4f}, "
                 f"depth {dep:.4f}) lr {lr[-1]:.2e} grad {float(gn) if gn is not None else float('nan'):.3f} "
                 f"{samples / max(dt, 1e-9):.2f} pairs/s data-wait {100 * t_data / max(dt, 1e-9):.0f}%"
                 + (" SKIPPED" if bad else ""))

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        from data.stream import PairStream
        from launch import plots
        from losses.metrics import MatchMetrics, flatten_metrics

        cfg = self.cfg
        try:
            stream = PairStream(self.val_sources, self.adapter, batch_size=cfg.data.batch_size, rank=self.rank,
                                world_size=self.world, num_workers=0, seed=0, split="val",
                                batches_per_epoch=cfg.run.val_batches)
        except ValueError as e:
            D.print0(f"[val] skipped: {e}")
            return None
        t0 = time.perf_counter()
        self.engine.eval()
        head_stats, raw_stats = [], []
        for batch in stream:
            batch, inputs = self._to_device(batch)
            h, r = self.engine.module.match(batch, inputs, raw=True)
            head_stats.append(_cpu(h))
            raw_stats.append(_cpu(r))
        self.engine.train()
        gathered = D.gather_objects((head_stats, raw_stats))
        if self.rank != 0:
            return None
        buckets = list(_gap_buckets(self.val_sources))
        results = {}
        for name, idx in (("head", 0), ("raw", 1)):
            acc = MatchMetrics(gap_buckets=buckets)
            for per_rank in gathered:
                for st in per_rank[idx]:
                    acc.update(st)
            results[name] = acc.compute()
        metrics = {}
        for name, res in results.items():
            metrics.update(flatten_metrics(res, f"val/{name}"))
        self.tracker.log_metrics(metrics, step=self.step)
        os.makedirs(self.run_dir, exist_ok=True)
        png = plots.pck_by_layer(results, os.path.join(self.run_dir, f"pck_by_layer_step{self.step:06d}.png"),
                                 title=f"validation PCK@1 by layer, step {self.step}")
        self.tracker.log_artifact(png, "plots")
        shutil.copyfile(png, os.path.join(self.run_dir, "pck_by_layer.png"))
        self.tracker.log_artifact(os.path.join(self.run_dir, "pck_by_layer.png"), "plots")
        with open(os.path.join(self.run_dir, "val_metrics.json"), "w") as f:
            json.dump({"step": self.step, **results}, f, indent=1)
        h, r = results["head"], results["raw"]
        print(f"[val] step {self.step}: {h['n_anchors']} anchors; best PCK@1 head {_fmt(h['best_pck1'])} "
              f"(layer {h['best_layer']}), raw {_fmt(r['best_pck1'])} (layer {r['best_layer']}); chance "
              f"{_fmt(h['chance1'])} ({time.perf_counter() - t0:.1f}s)", flush=True)
        return results

    # ------------------------------------------------------------------ end
    def finish(self, status: str = "FINISHED") -> None:
        self.tracker.end(status)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _cpu(stats):
    from dataclasses import fields, replace

    return replace(stats, **{f.name: getattr(stats, f.name).cpu() for f in fields(stats)})


def _has_weight(src: str) -> bool:
    head, _, tail = src.rpartition(":")
    try:
        float(tail)
        return bool(head) and not tail.startswith("//")
    except ValueError:
        return False


def _manifest_sha(src: str) -> str | None:
    import hashlib

    path = src if src.endswith(".json") else os.path.join(src, "manifest.json")
    try:
        import fsspec

        with fsspec.open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except Exception:
        return None


def _gap_buckets(sources: list[str]) -> tuple[int, ...]:
    for src in sources:
        path = src if src.endswith(".json") else os.path.join(src.rsplit(":", 1)[0] if _has_weight(src) else src,
                                                                "manifest.json")
        try:
            import fsspec

            with fsspec.open(path, "r") as f:
                return tuple(json.load(f)["gap_buckets"])
        except Exception:
            continue
    return (1, 5, 15, 40)


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
