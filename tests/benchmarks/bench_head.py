"""Cost of the GASP head and losses on top of the VLM, for clips of K = 2, 4, 8 frames (run by hand).

    python tests/benchmarks/bench_head.py                      # CPU: 8 layers x 512, clips of 224x224 frames
    python tests/benchmarks/bench_head.py --device cuda --shape 7b   # GPU: 7B layer shape, bf16, LoRA + heads

Every pair i < j of a clip is supervised (K(K-1)/2 pairs from K frames' features, all in one
batched product). Forward + backward time, peak memory and supervised pairs per second of
  (a) the VLM alone (its LM forward; backward of a plain loss on the vision-token states),
  (b) the VLM with the fused all-layer head and both GASP losses (what trains),
  (c) the same with the per-layer `nn.Linear` loop (the reference).
and, with --joint (issue [6 of 12]),
  (d) (b) plus L_LM (`--lambda-lm 1`) on every text position of the same sequences: the joint step
      against the geometry-only step (b) at the same token count (the LM head runs on the labelled
      positions; with `--trainable full` the last layer, final norm and LM head then train too).
Goal: (b) <= 1.10 x (a) in time and memory, (b) no slower than (c).
Self-contained: needs only torch, transformers and peft plus this repository (no network,
random weights built from config classes). Prints a table; `--json PATH` writes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest

import numpy as np
import torch


def build(shape: str, device: torch.device, dtype: torch.dtype, trainable: str):
    from model.head import PerLayerHeads
    from model.loading import build_preset_model, build_preset_processor
    from model.presets import get_preset
    from model.qwen import QwenAdapter
    from model.wrapper import GaspConfig, GaspVLM

    if shape == "small":  # issue 5: 8 layers, hidden 512, two 224x224 frames
        base = get_preset("tiny")
        preset = dataclasses.replace(
            base, name="bench-small",
            text={**base.text, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                  "num_attention_heads": 8, "num_key_value_heads": 4,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}},
            vision={**base.vision, "depth": 4, "embed_dim": 128, "hidden_size": 512, "num_heads": 4},
            max_pixels=224 * 224, min_pixels=224 * 224)
        size = (224, 224)
    else:  # 7B layer shape (Qwen2.5-VL-7B), 8 of its 28 layers so one card holds it quickly
        base = get_preset("qwen2.5-vl-7b")
        preset = dataclasses.replace(base, name="bench-7b-layers",
                                     text={**base.text, "num_hidden_layers": 8, "max_window_layers": 8},
                                     vision={**base.vision, "depth": 8, "fullatt_block_indexes": [3, 7]},
                                     max_pixels=448 * 336, min_pixels=448 * 336)
        size = (448, 336)
    attn = "sdpa"
    vlm = build_preset_model(preset, dtype=dtype, attn_implementation=attn, device=device)
    proc = build_preset_processor(preset)
    adapter = QwenAdapter(proc, family=preset.family, max_pixels=preset.max_pixels, min_pixels=preset.min_pixels)
    gasp = GaspVLM(vlm, GaspConfig(trainable=trainable, head="mlp")).to(device)
    gasp.init_heads()
    loop = PerLayerHeads.from_fused(gasp.head).to(device)
    return gasp, adapter, loop, size


def make_batch(adapter, size, n_clips: int, device, dtype, clip_frames: int = 2, seed=0, anchors: int = 150):
    """A clip batch (data/stream.py layout) of n_clips random-image clips of `clip_frames` frames with random
    labels: every pair i < j supervised, `anchors` anchors a pair (at most the cells of a frame)."""
    from data.labels import ClipLabels, ClipPairLabels
    from data.shardformat import clip_pairs
    from data.stream import PreparedClip, collate_clips

    rng = np.random.default_rng(seed)
    W, H = size
    g = adapter.grid(size)
    N = g.n_cells
    M = min(N, anchors)
    items = []
    for c in range(n_clips):
        frames = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(clip_frames)]
        pairs = [ClipPairLabels(i, j, np.sort(rng.permutation(N)[:M]).astype(np.int64), rng.integers(0, N, M),
                                (rng.random(M) * 3 + 1).astype(np.float32), j - i) for i, j in clip_pairs(clip_frames)]
        labels = ClipLabels([(g.rows, g.cols)] * clip_frames, [(rng.random(N) * 3 + 1).astype(np.float32)] * clip_frames,
                            [np.ones(N, bool)] * clip_frames, pairs)
        items.append(PreparedClip(f"clip{c}", "bench", adapter.encode_clip(frames), labels))
    batch = collate_clips(items, adapter)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    inputs = adapter.model_inputs(batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return batch, inputs


def variant_fn(name: str, gasp, loop, batch, inputs, media_ids: tuple[int, ...] = ()):
    fused = gasp.head

    def vlm_alone():
        base = gasp._base_vlm()
        body = getattr(base, "model", base)
        gasp.release()
        out = body(**inputs, use_cache=False).last_hidden_state  # (B, S, D)
        return out[batch["frame_clip"][:, None], batch["cell_pos"]].float().square().mean()  # (F, N, D)

    def with_head(head):
        def f():
            gasp.head = head
            try:
                loss, _ = gasp(batch, inputs)
            finally:
                gasp.head = fused
            return loss
        return f

    def joint():
        cfg = gasp.cfg
        media = torch.tensor(sorted(media_ids), device=batch["input_ids"].device)
        labels = batch["input_ids"].masked_fill(torch.isin(batch["input_ids"], media) | ~batch["attention_mask"].bool(),
                                                -100)
        gasp.cfg = dataclasses.replace(cfg, lambda_lm=1.0)
        gasp._set_trainable()
        try:
            loss, _ = gasp({**batch, "labels": labels}, inputs)
        finally:
            gasp.cfg = cfg
            gasp._set_trainable()
        return loss

    return {"a_vlm": vlm_alone, "b_fused": with_head(fused), "c_loop": with_head(loop), "d_joint": joint}[name]


def time_variant(fn, device, warmup: int, iters: int, params) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn().backward()
        for p in params:
            p.grad = None
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn().backward()
        sync()
        times.append(time.perf_counter() - t)
        for p in params:
            p.grad = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
    else:
        peak = _cpu_peak_gib(fn, params)
    return float(np.median(times)), peak


def _cpu_peak_gib(fn, params) -> float:
    """Peak extra memory of one step on CPU (`conftest.cpu_peak_bytes`: the profiler's raw allocation
    records in time order)."""
    from conftest import cpu_peak_bytes

    def step():
        fn().backward()

    peak = cpu_peak_bytes(step)
    for p in params:
        p.grad = None
    return peak / 2 ** 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, choices=["small", "7b"], help="default: small on CPU, 7b on CUDA")
    ap.add_argument("--clips", type=int, default=1, help="clips per step (one micro-batch)")
    ap.add_argument("--clip-frames", default="2,4,8", help="K of the clips, one table row group each")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the three variants")
    ap.add_argument("--trainable", default=None, help="default: full on CPU small, lora on 7b")
    ap.add_argument("--joint", action="store_true", help="add (d): the joint step, L_LM on the text positions too")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("7b" if device.type == "cuda" else "small")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trainable = args.trainable or ("lora" if shape == "7b" else "full")
    torch.manual_seed(0)
    gasp, adapter, loop, size = build(shape, device, dtype, trainable)
    gasp.train()
    L = gasp.num_layers
    labels = {"a_vlm": "(a) VLM alone", "b_fused": "(b) + fused head + losses", "c_loop": "(c) + per-layer loop",
              "d_joint": "(d) (b) + L_LM, same tokens"}
    print(f"\nGASP head cost: {shape} shape ({L} layers, D={gasp.hidden_size}, d={gasp.head.head_dim}, "
          f"{gasp.head.kind} head), {args.clips} clip(s) of K frames of {size[0]}x{size[1]}, {dtype}, "
          f"trainable={trainable}, {device}")
    print(f"{'K':>3}{'pairs':>6}{'seq':>6}  {'variant':<30}{'fwd+bwd ms':>11}{'x (a)':>7}{'peak GiB':>9}{'x (a)':>7}"
          f"{'pairs/s':>9}")
    out = {}
    for K in [int(k) for k in args.clip_frames.split(",") if k]:
        batch, inputs = make_batch(adapter, size, args.clips, device, dtype, clip_frames=K)
        params = list(gasp.parameters()) + list(loop.parameters())  # (d) trains the LM head too
        names = ("a_vlm", "b_fused", "c_loop") + (("d_joint",) if args.joint else ())
        fns = {n: variant_fn(n, gasp, loop, batch, inputs, adapter.media_token_ids) for n in names}
        # interleaved rounds (a, b, c, a, b, c, ...) so drift in machine load hits every variant alike
        rounds = {n: [] for n in names}
        peaks = {}
        for r in range(args.rounds):
            for n in names:
                t, m = time_variant(fns[n], device, args.warmup if r == 0 else 0, args.iters, params)
                rounds[n].append(t)
                peaks[n] = max(peaks.get(n, 0.0), m)
        rows = {n: (float(np.median(rounds[n])), peaks[n]) for n in names}
        a_t, a_m = rows["a_vlm"]
        P = int(batch["pair_frames"].shape[0])
        seq = int(inputs["input_ids"].shape[1])
        for k, (t, m) in rows.items():
            print(f"{K:>3}{P:>6}{seq:>6}  {labels[k]:<30}{1e3 * t:>11.1f}{t / a_t:>7.3f}{m:>9.3f}"
                  f"{(m / a_m if a_m > 0 else float('nan')):>7.3f}{(P / t if k != 'a_vlm' else float('nan')):>9.1f}")
        b_t, c_t = rows["b_fused"][0], rows["c_loop"][0]
        print(f"     goal: (b) <= 1.10 x (a) time [{'met' if b_t <= 1.10 * a_t else 'NOT met'}] and memory "
              f"[{'met' if rows['b_fused'][1] <= 1.10 * a_m else 'NOT met'}]; (b) no slower than (c) "
              f"[{'met' if b_t <= c_t * 1.02 else 'NOT met'}]")
        if args.joint:
            print(f"     joint (d) / geometry-only (b): {rows['d_joint'][0] / b_t:.3f} x time, "
                  f"{rows['d_joint'][1] / max(rows['b_fused'][1], 1e-9):.3f} x memory")
        out[K] = {"pairs": P, "seq": seq, "rows": {k: {"ms": 1e3 * t, "peak_gib": m} for k, (t, m) in rows.items()},
                  "pairs_per_s": P / b_t}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "device": str(device), "dtype": str(dtype), "clips": args.clips, "layers": L,
                       "by_clip_frames": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
