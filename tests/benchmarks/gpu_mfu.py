"""GPU measurement: tokens/s and MFU of GASP training on one card (issue [7 of 10]; run by hand).

    python tests/benchmarks/gpu_mfu.py [--shape 3b|7b] [--trainable full|lora] [--pairs 8] [--side 448]

A Qwen2.5-VL-shaped random-weight model (no download), bf16, attention through
PyTorch SDPA (its flash kernel), DeepSpeed ZeRO-3 on one rank (optimizer AdamW),
GASP's fused head and losses on every layer. Default: full fine-tuning of the
language model of the ~3B shape (vision tower frozen), the largest full fine-tune
that fits one 80 GB card.

FLOP formula (printed): per step, with N_lm the language model's matmul parameters
(no embeddings), T the tokens, L layers, d_model width, S the sequence length, and
N_vis / P the vision tower's matmul parameters / patches:
    LM (trained):      6 * N_lm * T + 12 * L * d_model * S * T / 2   (causal attention)
    LM (LoRA/frozen):  4 * N_lm * T + ...                           (no weight gradients)
    vision (frozen):   2 * N_vis * P + 4 * L_vis * d_vis * P * P_win (forward only)
MFU = model FLOP/s / the card's measured bf16 matmul peak (8192^3, measured in this run).
Needs torch, transformers (5.x), peft, deepspeed (its pure-Python wheel is enough: the
optimizer runs as torch's fused AdamW, `--no-fused-adam` for the foreach one) and this
repository. Writes `--json` if given.

Vision attention: `--vision-attn packed` (default; model/vision_attention.py, one SDPA
call per window size, what training uses) or `hf` (Hugging Face's one call per window).
The frozen tower's forward is timed both ways in every run. `--top N` prints the N
costliest kernels of one profiled step and the GPU's busy fraction.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch


def matmul_peak(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def profile_table(averages, n: int, cpu: bool) -> dict | None:
    """The n costliest ops of a profiled step (self device time; CPU time in --smoke) and the busy fraction."""
    if n <= 0:
        return None
    attr = "self_cpu_time_total" if cpu else "self_device_time_total"
    rows = [(e.key, getattr(e, attr, 0.0) or 0.0) for e in averages]
    rows = [r for r in rows if r[1] > 0]
    total = sum(t for _, t in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    return {"title": f"top {n} by self {'CPU' if cpu else 'GPU'} time (one step, profiler on)",
            "rows": [(k, t / 1e3, t / total) for k, t in rows[:n]], "total_ms": total / 1e3}


def preset_for(shape: str):
    from model.presets import get_preset

    base = get_preset("qwen2.5-vl-7b")
    if shape == "7b":
        return base
    # Qwen2.5-VL-3B-Instruct's published architecture
    text = {**base.text, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_window_layers": 36, "vocab_size": 151936,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    return dataclasses.replace(base, name="qwen2.5-vl-3b", text=text,
                               vision={**base.vision, "out_hidden_size": 2048}, tie_word_embeddings=True)


def matmul_params(module: torch.nn.Module) -> int:
    """Weights of the Linear layers (full size also when ZeRO-3 has partitioned them)."""
    return sum(getattr(m.weight, "ds_numel", m.weight.numel()) for m in module.modules()
               if isinstance(m, torch.nn.Linear))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="3b", choices=["3b", "7b"])
    ap.add_argument("--trainable", default="full", choices=["full", "lora", "heads"])
    ap.add_argument("--clips", type=int, default=8, help="clips per step (one micro-batch)")
    ap.add_argument("--clip-frames", type=int, default=2, help="frames per clip (2: pairs; every pair i < j supervised)")
    ap.add_argument("--side", type=int, default=448, help="square view side in pixels (multiple of 28)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (recompute not counted)")
    ap.add_argument("--json", default="")
    ap.add_argument("--persistence", type=float, default=1e6,
                    help="ZeRO-3 stage3_param_persistence_threshold (params below it stay whole)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the code path on the tiny preset")
    ap.add_argument("--vision-attn", default="packed", choices=["packed", "hf"],
                    help="packed: one SDPA call per window size (model/vision_attention.py); hf: one per window")
    ap.add_argument("--no-fused-adam", dest="fused_adam", action="store_false",
                    help="torch AdamW foreach instead of fused (CUDA)")
    ap.add_argument("--top", type=int, default=12, help="print the N costliest kernels of a profiled step")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not torch.cuda.is_available() and not smoke:
        print("gpu_mfu.py needs a CUDA device (or --smoke for a CPU dry run)", file=sys.stderr)
        return 2
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from model.loading import build_preset_model, build_preset_processor
    from model.qwen import QwenAdapter
    from model.wrapper import GaspConfig, GaspVLM
    from tests.benchmarks.bench_head import make_batch

    if smoke:
        dev, dtype, peak = torch.device("cpu"), torch.float32, 1e12
    else:
        torch.cuda.set_device(0)
        dev, dtype = torch.device("cuda", 0), torch.bfloat16
        peak = matmul_peak()
        print(f"card: {torch.cuda.get_device_name(0)}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s",
              flush=True)
    from launch.distributed import clear_stale_build_lock, release_shm_buffer_at_exit

    if smoke:
        clear_stale_build_lock()
    deepspeed.init_distributed(dist_backend="gloo" if smoke else "nccl", verbose=False)

    release_shm_buffer_at_exit()  # DeepSpeed's CPU shm workspace (the --smoke run makes one)
    ds = {"train_micro_batch_size_per_gpu": args.clips, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "steps_per_print": 10 ** 9, "bf16": {"enabled": not smoke},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0, "torch_adam": True,
                                                    **({"fused": True} if args.fused_adam and not smoke else {})}},
          "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                                "stage3_param_persistence_threshold": args.persistence}}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  models below are created partitioned (ZeRO-3)
    preset = dataclasses.replace(preset_for(args.shape), max_pixels=args.side ** 2, min_pixels=args.side ** 2)
    if smoke:
        from model.presets import get_preset

        args.side = 56
        preset = dataclasses.replace(get_preset("tiny"), max_pixels=56 * 56, min_pixels=56 * 56)
    t0 = time.time()
    vlm = build_preset_model(preset, dtype=dtype, attn_implementation="sdpa", device=dev)
    from model.vision_attention import install_packed_vision_attention, uninstall_packed_vision_attention

    if args.vision_attn == "packed" and not install_packed_vision_attention(vlm):
        print("--vision-attn packed: no Qwen vision attention module to patch", file=sys.stderr)
        return 2
    adapter = QwenAdapter(build_preset_processor(preset), family=preset.family, max_pixels=preset.max_pixels,
                          min_pixels=preset.min_pixels)
    gasp = GaspVLM(vlm, GaspConfig(trainable=args.trainable, gradient_checkpointing=args.checkpointing, head="mlp"))
    gasp.init_heads()
    gasp.head.to(dtype)  # ZeRO-3 partitions all trainable params in one dtype; the head computes in fp32 anyway
    params = [p for p in gasp.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=gasp, model_parameters=params, config=ds)
    print(f"model built and partitioned in {time.time() - t0:.0f}s", flush=True)
    batch, inputs = make_batch(adapter, (args.side, args.side), args.clips, dev, dtype, clip_frames=args.clip_frames)
    from losses.gasp import count_items

    counts = count_items(batch).to(dev)
    n_pairs = int(batch["pair_frames"].shape[0])
    from model.qwen import rope_position_ids

    # as the trainer does: M-RoPE positions from the CPU copy of the batch (no per-image host syncs)
    cpu_inputs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    inputs["position_ids"] = rope_position_ids(vlm, cpu_inputs).to(dev)
    T = int(inputs["attention_mask"].sum())
    S = int(inputs["input_ids"].shape[1])
    P = int(inputs["pixel_values"].shape[0])

    split = {"forward": [], "backward": [], "optimizer": []}

    def step(record: bool = False):
        marks = [time.perf_counter()]
        loss, _ = engine(batch, inputs, global_counts=counts, grad_accum_steps=1, world_size=1)
        sync() if record else None
        marks.append(time.perf_counter())
        engine.backward(loss)
        sync() if record else None
        marks.append(time.perf_counter())
        engine.step()
        sync() if record else None
        marks.append(time.perf_counter())
        if record:
            for k, a, b in zip(split, marks, marks[1:]):
                split[k].append(b - a)
        return loss

    # which SDPA kernel runs (flash expected for bf16 causal attention without padding)
    from torch.profiler import ProfilerActivity, profile

    sync = (lambda: None) if smoke else torch.cuda.synchronize

    for _ in range(args.warmup):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU] if smoke else [ProfilerActivity.CUDA]) as prof:
        tp = time.perf_counter()
        step()
        sync()
        tp = time.perf_counter() - tp
    averages = prof.key_averages()
    kernels = {e.key for e in averages}
    flash = sorted(k for k in kernels if "flash" in k.lower())[:3]
    top = profile_table(averages, args.top, smoke)
    if top and not smoke:
        top["busy"] = top["total_ms"] / 1e3 / tp
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    for _ in range(3):
        step(record=True)
    # the frozen vision tower's share of the forward
    base0 = gasp._base_vlm()
    body0 = getattr(base0, "model", base0)

    def vision_time() -> float:
        with torch.no_grad():
            body0.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            sync()
            tv = time.perf_counter()
            body0.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            sync()
            return time.perf_counter() - tv

    t_vis = vision_time()
    # the other attention path, for comparison (then back to the measured one)
    if args.vision_attn == "packed":
        uninstall_packed_vision_attention(vlm)
        t_vis_other = vision_time()
        install_packed_vision_attention(vlm)
        t_vis_hf, t_vis_packed = t_vis_other, t_vis
    else:
        install_packed_vision_attention(vlm)
        t_vis_other = vision_time()
        uninstall_packed_vision_attention(vlm)
        t_vis_hf, t_vis_packed = t_vis, t_vis_other
    base = gasp._base_vlm()
    body = getattr(base, "model", base)
    tc = vlm.config.text_config
    vc = vlm.config.vision_config
    n_lm = matmul_params(body.language_model)
    n_vis = matmul_params(body.visual)
    L, dm = tc.num_hidden_layers, tc.hidden_size
    lm_factor = 6 if args.trainable == "full" else 4
    lm_flops = lm_factor * n_lm * T + (lm_factor / 2) * 2 * L * dm * S * T  # causal: half of 4*L*d*S*T per pass
    win = getattr(vc, "window_size", 112) // 14  # patches per window side
    vis_flops = 2 * n_vis * P + 4 * vc.depth * vc.hidden_size * P * min(P // (args.clip_frames * args.clips), win * win)
    head_flops = 0  # the heads and losses: < 1% here, not counted
    flops = lm_flops + vis_flops + head_flops
    mfu = flops / dt / peak
    mem = 0.0 if smoke else torch.cuda.max_memory_allocated() / 2**30
    print("\nFLOPs per step = LM %d*N_lm*T + %d*L*d*S*T/2 (causal attention) + vision 2*N_vis*P + 4*L_vis*d_vis*P*win"
          % (lm_factor, 2 * lm_factor))
    print(f"  N_lm={n_lm / 1e9:.3f}e9 T={T} L={L} d={dm} S={S} | N_vis={n_vis / 1e9:.3f}e9 P={P}")
    print(f"  = {lm_flops:.3e} (LM) + {vis_flops:.3e} (vision) = {flops:.3e}")
    print(f"\n{'shape':<8}{'trainable':<10}{'clips':>6}{'K':>3}{'pairs':>6}{'tokens':>8}{'step s':>9}{'tokens/s':>10}"
          f"{'pairs/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
    print(f"{args.shape:<8}{args.trainable:<10}{args.clips:>6}{args.clip_frames:>3}{n_pairs:>6}{T:>8}{dt:>9.3f}"
          f"{T / dt:>10.0f}{n_pairs / dt:>9.2f}{flops / dt / 1e12:>9.0f}{100 * mfu:>6.1f}%{mem:>10.1f}")
    print(f"SDPA flash kernels seen: {flash or 'NONE'}")
    med = {k: float(np.median(v)) for k, v in split.items()}
    print("step breakdown (synchronised): " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items())
          + f"; of the forward, the frozen vision tower {t_vis:.3f}s")
    print(f"frozen vision tower forward: Hugging Face per-window SDPA {t_vis_hf:.3f}s, packed {t_vis_packed:.3f}s "
          f"({t_vis_hf / max(t_vis_packed, 1e-9):.1f}x); this run used {args.vision_attn}")
    if top:
        print(f"\n{top['title']}")
        for name, ms, share in top["rows"]:
            print(f"  {ms:9.2f} ms {100 * share:5.1f}%  {name[:110]}")
        if top.get("busy") is not None:
            print(f"  GPU busy {100 * top['busy']:.0f}% of the profiled step's wall time")
    res = {"card": "cpu (smoke)" if smoke else torch.cuda.get_device_name(0), "peak_tflops": peak / 1e12, "shape": args.shape,
           "trainable": args.trainable, "clips": args.clips, "clip_frames": args.clip_frames, "pairs": n_pairs,
           "side": args.side, "tokens": T, "seq": S,
           "patches": P, "step_s": dt, "tokens_per_s": T / dt, "pairs_per_s": n_pairs / dt,
           "tflops": flops / dt / 1e12, "mfu": mfu, "peak_mem_gib": mem, "flash_kernels": flash,
           "n_lm": n_lm, "n_vis": n_vis, "breakdown_s": med, "vision_forward_s": t_vis,
           "persistence_threshold": args.persistence, "torch": torch.__version__, "checkpointing": args.checkpointing,
           "vision_attn": args.vision_attn, "vision_forward_hf_s": t_vis_hf, "vision_forward_packed_s": t_vis_packed,
           "fused_adam": bool(args.fused_adam and not smoke), "top_kernels": top,
           "transformers": __import__("transformers").__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
