"""Export a training checkpoint: the VLM in Hugging Face format WITHOUT the heads, and the heads apart.

    python launch/export.py --checkpoint runs/train/tiny/checkpoints [--tag step00000040] --output DIR

DIR/model/ loads with `from_pretrained` of the model's own class (with its processor) and holds
gasp_training.json (the training shard sets' manifests, for launch/evaluate.py's leakage check);
LoRA adapters are merged into the weights. DIR/heads.safetensors holds the fused heads
(L, d, D) for `launch/probe.py --heads`. Works from any DeepSpeed ZeRO stage: the
full fp32 weights are rebuilt from the checkpoint's shards (all ranks' files must be
readable from here, e.g. on shared storage).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import logging
from dataclasses import dataclass

from data.cli import opt, parse_into

log = logging.getLogger("gasp.export")


class ExportError(Exception):
    """One line: what is wrong with the checkpoint."""


def _config_from_meta(meta: dict):
    """Rebuild the TrainConfig a checkpoint was trained with (trainer_meta.json holds it flat)."""
    from data.cli import apply_overrides
    from launch.config import TrainConfig

    from data.cli import flat_dict

    known = flat_dict(TrainConfig())
    # checkpoints written before the MLP head and the relative depth loss existed trained these
    flat = {"loss.head": "linear", "loss.depth_loss": "log", **meta["config"]}
    values = {k.replace(".", "__"): v for k, v in flat.items() if k in known}  # flags since removed are dropped
    return apply_overrides(TrainConfig(), values)


def export_checkpoint(ckpt_dir: str, out_dir: str, tag: str | None = None) -> str:
    """Write out_dir/model (HF, no heads) and out_dir/heads.safetensors from a checkpoint. Returns out_dir."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.head import save_heads
    from model.loading import ModelLoadError, build_model_and_processor
    from model.wrapper import GaspConfig, GaspVLM

    latest = os.path.join(ckpt_dir, "latest")
    if tag is None:
        if not os.path.isfile(latest):
            raise ExportError(f"{ckpt_dir}: no 'latest' file; pass --tag or point --checkpoint at a run's "
                              f"checkpoints folder")
        tag = open(latest).read().strip()
    meta_path = os.path.join(ckpt_dir, tag, "trainer_meta.json")
    if not os.path.isfile(meta_path):
        raise ExportError(f"{ckpt_dir}/{tag}: not a launch/train.py checkpoint (no trainer_meta.json)")
    meta = json.load(open(meta_path))
    cfg = _config_from_meta(meta)
    source = cfg.model.model or cfg.model.preset
    try:  # first: the base model must load (cheaper than the checkpoint, and a moved path fails in one line)
        vlm, processor, _ = build_model_and_processor(source, dtype=torch.float32, device="cpu")
    except ModelLoadError as e:
        raise ExportError(f"checkpoint {ckpt_dir}/{tag} was trained from {source}, which does not load now ({e}); "
                          f"put the base model back at that path (the checkpoint holds only its trained weights)") \
            from None
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    gcfg = GaspConfig(trainable=cfg.model.trainable, head_dim=cfg.loss.head_dim, head=cfg.loss.head,
                      depth_loss=cfg.loss.depth_loss, lora_r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                      lambda_lm=cfg.loss.lambda_lm)
    gasp = GaspVLM(vlm, gcfg)
    missing, unexpected = gasp.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("layer_weights")]
    if missing or unexpected:
        raise ExportError(f"checkpoint {ckpt_dir}/{tag} does not fit {source}: {len(missing)} missing "
                          f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}) tensors")
    model = gasp.vlm
    if cfg.model.trainable == "lora":
        model = model.merge_and_unload()
    for h in gasp._hooks:
        h.remove()
    os.makedirs(out_dir, exist_ok=True)
    model_dir = os.path.join(out_dir, "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    family = getattr(model.config, "model_type", "?")
    save_heads(os.path.join(out_dir, "heads.safetensors"), gasp.head,
               meta={"model": source, "family": family, "step": meta.get("step"), "tau": cfg.loss.tau})
    # the training manifests, for the evaluator's leakage check (launch/benchmarks/leakage.py)
    from launch.trainer import MANIFESTS_RECORD, training_manifests

    recorded = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), MANIFESTS_RECORD)
    if os.path.isfile(recorded):
        manifests = json.load(open(recorded))
    else:  # a run from before the record existed: read the sets' manifests now
        manifests = training_manifests(list(cfg.data.shards))
    with open(os.path.join(model_dir, "gasp_training.json"), "w") as f:
        json.dump(manifests, f, indent=1)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(os.path.join(ckpt_dir, tag)), "step": meta.get("step"),
                   "source": source, "family": family, "trainable": cfg.model.trainable}, f, indent=1)
    return out_dir


@dataclass
class ExportArgs:
    checkpoint: str = opt("", "a run's checkpoints folder (runs/train/NAME/checkpoints)")
    tag: str = opt("", "checkpoint tag (default: the latest)")
    output: str = opt("", "output folder (default: the run folder's export/)")

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("--checkpoint is required")


def main(argv: list[str] | None = None) -> int:
    args = parse_into(ExportArgs, argv, "launch/export.py", "Export a GASP checkpoint to Hugging Face format.")
    logging.basicConfig(level=logging.INFO)
    out = args.output or os.path.join(os.path.dirname(os.path.normpath(args.checkpoint)), "export")
    try:
        if not os.path.isdir(args.checkpoint):
            raise ExportError(f"--checkpoint {args.checkpoint}: no such folder")
        export_checkpoint(args.checkpoint, out, args.tag or None)
    except ExportError as e:
        print(f"launch/export.py: error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out} (model/ without heads, heads.safetensors)")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)  # skip the interpreter's slow teardown of torch / transformers (all is written)
