"""Vision-tower forward: Hugging Face's per-window SDPA loop vs packed attention (run by hand).

    python tests/benchmarks/bench_vision.py                       # CPU: narrow tower, 8 frames 448x448
    python tests/benchmarks/bench_vision.py --device cuda --shape 3b --frames 32   # GPU: the real tower, bf16

A Qwen2.5-VL vision tower with random weights (no download): windowed layers (8x8-patch
windows) plus full-attention layers. (a) Hugging Face's `sdpa` path, one SDPA call per
window; (b) model/vision_attention.py, one SDPA call per window size. Both under
torch.no_grad (the tower is frozen in GASP training). Prints the table; `--json PATH`
writes it. On CPU the shape is narrowed (width 256) so the run takes seconds; the
call overhead it removes is what dominates on a GPU.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="narrow", choices=["narrow", "3b"],
                    help="narrow: width 256, 8 layers; 3b: Qwen2.5-VL's tower (width 1280, 32 layers)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    from model.loading import build_preset_model, build_preset_processor
    from model.presets import get_preset
    from model.vision_attention import install_packed_vision_attention, uninstall_packed_vision_attention

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base = get_preset("qwen2.5-vl-7b")
    vision = dict(base.vision)
    if args.shape == "narrow":
        vision.update(depth=8, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[3, 7])
    text = {**base.text, "num_hidden_layers": 1, "max_window_layers": 1, "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 152064,
            "rope_parameters": {**base.text["rope_parameters"], "mrope_section": [8, 12, 12]}}
    vision["out_hidden_size"] = text["hidden_size"]
    preset = dataclasses.replace(base, name="bench-vision", text=text, vision=vision,
                                 max_pixels=args.side ** 2, min_pixels=args.side ** 2)
    vlm = build_preset_model(preset, dtype=dtype, attn_implementation="sdpa", device=dev).eval()
    visual = vlm.model.visual
    from PIL import Image

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (args.side, args.side, 3), dtype=np.uint8)) for _ in range(args.frames)]
    out = build_preset_processor(preset).image_processor(images=ims, return_tensors="pt")
    pix, grid = out["pixel_values"].to(dev, dtype), out["image_grid_thw"].to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            r = visual(pix, grid_thw=grid)
        return getattr(r, "pooler_output", r)

    def timed():
        run()
        sync()
        ts = []
        for _ in range(args.iters):
            t = time.perf_counter()
            r = run()
            sync()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)), r

    t_hf, r_hf = timed()
    n = install_packed_vision_attention(vlm)
    t_packed, r_packed = timed()
    uninstall_packed_vision_attention(vlm)
    err = float((r_hf.float() - r_packed.float()).abs().max() / r_hf.float().abs().max())
    patches = int(pix.shape[0])
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), {dtype}; "
          f"tower width {vision['hidden_size']}, {vision['depth']} layers ({n} patched), {args.frames} frames "
          f"{args.side}x{args.side} = {patches} patches")
    print(f"\n{'attention':<34}{'forward s':>10}{'patches/s':>12}{'speed-up':>10}")
    print(f"{'(a) Hugging Face sdpa, per window':<34}{t_hf:>10.3f}{patches / t_hf:>12.0f}{1.0:>9.2f}x")
    print(f"{'(b) packed (one call per size)':<34}{t_packed:>10.3f}{patches / t_packed:>12.0f}{t_hf / t_packed:>9.2f}x")
    print(f"max relative difference (b) vs (a): {err:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(dev), "dtype": str(dtype), "shape": args.shape, "frames": args.frames,
                       "side": args.side, "patches": patches, "hf_s": t_hf, "packed_s": t_packed,
                       "speedup": t_hf / t_packed, "max_rel_diff": err}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
