"""One rank of the ZeRO-3 joint-training test (started by the `deepspeed` launcher).

    deepspeed --num_gpus 2 tests/train_worker_joint.py --clips DIR --sft DIR --out DIR [--preset NAME]

Builds the trainer of `launch/trainer.py` (the tiny preset unless --preset names another, the
whole LM + heads trained, L_LM + L_corr + L_depth, ZeRO-3 from launch/zero3.json, gradient
accumulation 2) with plain SGD and no clipping, so one step's update is exactly -lr * gradient.
Two steps run through the trainer's own `step_counts` / `train_step` on fixed micro-batches
(`PLAN`) where

- step 1: rank 0's micro-batches hold no clip (a conversation with images, one with a video),
  rank 1's no conversation (clips only);
- step 2: rank 0 has a text-only conversation (no media at all: the vision tower runs on a
  dummy) and a clip beside a text-only conversation; rank 1 a clip, and a video conversation
  beside an image one (two tower calls, so rank 0 adds a dummy there too).

At each accumulation boundary it records the full gradient (a collective) and after each step
the gathered parameters; rank 0 writes them, with the items of each micro-batch, to
OUT/result.pt. The test compares them with one process on each step's union batch.
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
PLAN = [  # step -> rank -> micro-batch -> items ("clip", i) / ("image" | "video" | "none", i)
    [[[("image", 0)], [("video", 0)]],
     [[("clip", 0)], [("clip", 1)]]],
    [[[("none", 0)], [("clip", 2), ("none", 1)]],
     [[("clip", 3)], [("video", 1), ("image", 1)]]],
]


def prepared_items(clips: str, sft: str, adapter) -> dict[str, list]:
    """Prepared clips and conversations of the train splits, by kind, in shard order (deterministic)."""
    import glob

    import numpy as np

    from data.stream import decode_checked, prepare_clip, prepare_conversation, tar_samples

    def log(reason, message):
        raise RuntimeError(message)

    out: dict[str, list] = {"clip": [], "image": [], "video": [], "none": []}
    for url in sorted(glob.glob(os.path.join(clips, "train-*.tar"))):
        for raw in tar_samples(url, log):
            clip, _, msg = decode_checked(raw)
            item, _, msg = prepare_clip(clip, adapter)
            assert item is not None, msg
            out["clip"].append(item)
    for url in sorted(glob.glob(os.path.join(sft, "train-*.tar"))):
        for raw in tar_samples(url, log):
            sample, _, msg = decode_checked(raw)
            item, _, msg = prepare_conversation(sample, adapter, np.random.default_rng(0), video_frames=4)
            assert item is not None, msg
            item.source = 1
            out[sample.media].append(item)
    return out


def micro_batches(items: dict[str, list], plan) -> list[list]:
    """The item lists of each micro-batch of one rank's step."""
    return [[items[kind][i] for kind, i in mb] for mb in plan]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny", help="the model preset (tiny, tiny-qwen3-vl, ...)")
    ap.add_argument("--local_rank", type=int, default=0, help="added by the deepspeed launcher")
    args = ap.parse_args(argv)

    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    from data.stream import collate_clips
    from launch import distributed as D
    from launch.config import (DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig,
                               fill_ds_config, load_ds_config)
    from launch.trainer import Trainer

    rank, world, device = D.init_distributed()
    assert world == 2, "run with --num_gpus 2"
    cfg = TrainConfig(data=DataConfig(shards=[args.clips + ":1", args.sft + ":1"], batch_size=2, grad_accum=2,
                                      num_workers=0, video_frames=4),
                      model=ModelConfig(preset=args.preset, trainable="full"),
                      loss=LossConfig(lambda_lm=0.7, lambda_corr=1.0, lambda_depth=0.5),
                      optim=OptimConfig(steps=2, lr=LR, warmup_steps=0, grad_clip=0.0),
                      run=RunConfig(output_dir=os.path.join(args.out, "run"), run_name="joint", mlflow=False,
                                    resume="never"))
    from model.presets import get_preset

    ds = fill_ds_config(load_ds_config(os.path.join(ROOT, "launch", "zero3.json")), cfg, bf16=False,
                        on_cuda=False, hidden=int(get_preset(args.preset).text["hidden_size"]))
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

    items = prepared_items(args.clips, args.sft, trainer.adapter)
    result = {"init": full_params(), "steps": [], "trainable": [n for n, p in model.named_parameters()
                                                               if p.requires_grad]}
    for s, step_plan in enumerate(PLAN):
        lr = trainer.scheduler.get_last_lr()
        mine = [collate_clips(mb, trainer.adapter) for mb in micro_batches(items, step_plan[rank])]
        counts, stop, calls = trainer.step_counts(mine)
        assert not stop
        sums, skipped = trainer.train_step(mine, counts, calls)
        trainer.step += 1
        assert not skipped and engine.was_step_applied()
        result["steps"].append({"lr": lr, "counts": counts.tolist(), "vision_calls": calls,
                                "loss": float(sums[0]), "lm": float(sums[7]), "grads": dict(captured),
                                "after": full_params()})
        captured.clear()
        print(f"[worker rank {rank}] step {s + 1} done: counts {counts.tolist()} vision calls {calls}", flush=True)
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
