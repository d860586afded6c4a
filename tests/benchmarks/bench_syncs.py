"""Host reads of tensor values (GPU syncs on a GPU) per GASP training step (run by hand).

    python tests/benchmarks/bench_syncs.py [--pairs 4] [--preset tiny-qwen2.5]

Counts calls of Tensor.item / tolist / __bool__ / __int__ / __float__ / __index__ during
one forward + backward of the wrapped tiny model, with the model computing its own M-RoPE
positions (before) and with positions computed on the CPU batch as the trainer does
(`model.qwen.rope_position_ids`). On the CPU these reads are free; on a GPU each one waits
for the queue to drain. Prints the table and the call sites of the remaining reads.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def count_reads(fn) -> collections.Counter:
    """{(method, file, line): calls} of host reads while fn() runs."""
    counts: collections.Counter = collections.Counter()
    orig = {n: getattr(torch.Tensor, n) for n in READS}

    def wrap(name):
        real = orig[name]

        def w(self, *a, **k):
            frame = traceback.extract_stack(limit=3)[0]
            where = frame.filename.split("site-packages/")[-1].replace(os.getcwd() + "/", "")
            counts[(name, where, frame.lineno)] += 1
            return real(self, *a, **k)
        return w

    for n in READS:
        setattr(torch.Tensor, n, wrap(n))
    try:
        fn()
    finally:
        for n, f in orig.items():
            setattr(torch.Tensor, n, f)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-qwen2.5", choices=["tiny", "tiny-qwen2.5"])
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    from model.loading import build_preset_model, build_preset_processor
    from model.presets import get_preset
    from model.qwen import QwenAdapter, rope_position_ids
    from model.vision_attention import install_packed_vision_attention
    from losses.gasp import count_items
    from model.wrapper import GaspConfig, GaspVLM
    from tests.benchmarks.bench_head import make_batch

    preset = dataclasses.replace(get_preset(args.preset), max_pixels=112 * 112, min_pixels=112 * 112)
    vlm = build_preset_model(preset)
    install_packed_vision_attention(vlm)
    adapter = QwenAdapter(build_preset_processor(preset), family=preset.family, max_pixels=preset.max_pixels,
                          min_pixels=preset.min_pixels)
    gasp = GaspVLM(vlm, GaspConfig(trainable="full"))
    gasp.init_heads()
    batch, inputs = make_batch(adapter, (112, 112), args.pairs, torch.device("cpu"), torch.float32)
    counts = count_items(batch)

    def step(model_inputs):
        def run():
            loss, _ = gasp(batch, model_inputs, global_counts=counts, grad_accum_steps=1, world_size=1)
            loss.backward()
        return run

    step(inputs)()  # warm-up (first-call caches)
    before = count_reads(step(inputs))
    after = count_reads(step({**inputs, "position_ids": rope_position_ids(vlm, inputs)}))
    print(f"{args.preset}, {args.pairs} clips of 2 views of 112x112 (one pair each), forward + backward")
    print(f"{'M-RoPE positions':<34}{'host reads per step':>20}")
    print(f"{'computed by the model':<34}{sum(before.values()):>20}")
    print(f"{'computed on the CPU batch':<34}{sum(after.values()):>20}")
    print("\nremaining reads (calls, method, where):")
    for (name, where, line), n in after.most_common():
        print(f"  {n:4d}  {name:<9} {where}:{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
