"""One rank of the ZeRO-3 normalisation test (started by the `deepspeed` launcher).

    deepspeed --num_gpus 2 tests/train_worker_norm.py --shards DIR --out DIR

Builds the trainer of `launch/trainer.py` (tiny preset, LM + heads trained, ZeRO-3 from
launch/zero3.json, gradient accumulation 2) with plain SGD and no clipping, so that one
step's update is exactly -lr * gradient and a normalisation error cannot hide (Adam's
first step is sign-like). It then runs two steps through the trainer's own
`step_counts` / `train_step` on fixed micro-batches:

- step 1: rank 0 keeps every anchor, rank 1 only a few (unequal anchor counts per rank);
- step 2: rank 1 has NO anchor at all (it must still run every head: no hang).

At each accumulation boundary it records the full gradient (`safe_get_full_grad`,
a collective) and after each step the gathered parameters. Rank 0 writes everything,
with the micro-batches each rank used, to OUT/result.pt; the test compares it with
one process on the union batch.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LR = 0.5
KEEP_RANK1_STEP1 = (3, 5)  # anchors rank 1 keeps in its two micro-batches of step 1


def fixed_batches(shards: str, adapter, n: int) -> list[dict]:
    """The first n batches of one clip each, the same on every rank."""
    from data.stream import SampleStream

    stream = SampleStream([shards], adapter, batch_size=1, rank=0, world_size=1, num_workers=0, seed=0)
    it = stream.forever()
    return [next(it) for _ in range(n)]


def keep_anchors(batch: dict, k: int) -> dict:
    """A copy of `batch` whose anchor_mask keeps only its first k set anchors."""
    out = dict(batch)
    mask = batch["anchor_mask"].clone()
    keep = mask.flatten().cumsum(0).reshape(mask.shape) <= k
    out["anchor_mask"] = mask & keep
    return out


def plan(batches: list[dict], rank: int) -> list[list[dict]]:
    """Micro-batches of `rank` for steps 1 and 2 (GAS 2, world 2)."""
    s1 = [batches[2 * rank], batches[2 * rank + 1]]
    s2 = [batches[4 + 2 * rank], batches[4 + 2 * rank + 1]]
    if rank == 1:
        s1 = [keep_anchors(b, k) for b, k in zip(s1, KEEP_RANK1_STEP1)]
        s2 = [keep_anchors(b, 0) for b in s2]
    return [s1, s2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0, help="added by the deepspeed launcher")
    args = ap.parse_args(argv)

    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    from launch import distributed as D
    from launch.config import (DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, fill_ds_config,
                               load_ds_config)
    from launch.trainer import Trainer

    rank, world, device = D.init_distributed()
    assert world == 2, "run with --num_gpus 2"
    cfg = TrainConfig(data=DataConfig(shards=[args.shards], batch_size=1, grad_accum=2, num_workers=0),
                      model=ModelConfig(preset="tiny", trainable="full"),
                      optim=OptimConfig(steps=2, lr=LR, warmup_steps=0, grad_clip=0.0),
                      run=RunConfig(output_dir=os.path.join(args.out, "run"), run_name="norm", mlflow=False,
                                    resume="never"))
    ds = fill_ds_config(load_ds_config(os.path.join(ROOT, "launch", "zero3.json")), cfg, bf16=False,
                        on_cuda=False, hidden=64)
    ds["optimizer"] = {"type": "SGD", "params": {"lr": LR}}  # update = -lr * grad, exactly
    ds["zero_allow_untested_optimizer"] = True  # torch.optim.SGD under ZeRO-3
    trainer = Trainer(cfg, rank, world, device)
    trainer.setup(ds)
    model, engine = trainer.model, trainer.engine
    assert trainer.gas == 2 and trainer.zero_stage == 3

    def full_params() -> dict[str, torch.Tensor]:
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone().float() for n, p in model.named_parameters()}

    captured: dict[str, torch.Tensor] = {}
    step_fn = engine.step

    def step_with_capture(*a, **kw):
        if engine.is_gradient_accumulation_boundary():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    g = safe_get_full_grad(p)  # a collective: every rank, same order
                    captured[n] = g.detach().clone().float().reshape(p.ds_shape)
        return step_fn(*a, **kw)

    engine.step = step_with_capture

    batches = fixed_batches(args.shards, trainer.adapter, 8)
    mine = plan(batches, rank)
    result = {"init": full_params(), "lr": [], "steps": [], "trainable": [n for n, p in model.named_parameters()
                                                                         if p.requires_grad]}
    for s in range(2):
        lr = trainer.scheduler.get_last_lr()
        counts, stop, calls = trainer.step_counts(mine[s])
        assert not stop
        sums, skipped = trainer.train_step(mine[s], counts, calls)
        trainer.step += 1
        assert not skipped and engine.was_step_applied()
        per_rank = D.gather_objects([int(mb["anchor_mask"].sum()) for mb in mine[s]])
        result["steps"].append({"lr": lr, "counts": counts.tolist(), "loss": float(sums[0]),
                                "grads": dict(captured), "after": full_params(),
                                "micro": [plan(batches, r)[s] for r in range(world)],
                                "anchors_per_rank": per_rank})
        captured.clear()
        print(f"[worker rank {rank}] step {s + 1} done: counts {counts.tolist()} anchors/rank {per_rank}", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(result, os.path.join(args.out, "result.pt.tmp"))
        os.replace(os.path.join(args.out, "result.pt.tmp"), os.path.join(args.out, "result.pt"))
    D.barrier()
    trainer.finish()
    D.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
