"""Qwen3-VL end to end: a 2-rank ZeRO-3 run of a few steps on clips (dense and MoE), the export (from_pretrained
loads it, the trained weights without heads), and a probe with the trained heads."""
import json
import os

import pytest
import torch

from conftest import ZERO3_JSON, Launch, read_jsonl

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset,cls_name", [("tiny-qwen3-vl", "Qwen3VLForConditionalGeneration"),
                                             ("tiny-qwen3-vl-moe", "Qwen3VLMoeForConditionalGeneration")])
def test_qwen3_vl_trains_on_two_ranks_exports_and_probes(tiny_shards, tmp_path, preset, cls_name):
    import transformers
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "run"
    run = Launch(["--ds_config", ZERO3_JSON, "--preset", preset, "--shards", tiny_shards, "--steps", "3",
                  "--batch-size", "1", "--val-every", "0", "--val-batches", "1", "--num-workers", "0", "--no-mlflow",
                  "--output-dir", str(out)], str(tmp_path / "train.log"), cwd=str(tmp_path))
    assert run.wait(timeout=900) == 0, run.tail()
    log = read_jsonl(str(out / "train_log.jsonl"))
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 and not r["skipped"] for r in log)
    assert all(r["anchors"] > 0 and r["grad_norm"] > 0 for r in log)

    # export: the model's own class loads it, with every trained weight and no heads
    export = out / "export"
    meta = json.load(open(export / "export.json"))
    assert meta["family"] == get_family(preset) and meta["step"] == 3 and meta["trainable"] == "full"
    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(str(export / "model"), output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    exported = model.state_dict()
    assert not [k for k in exported if k.startswith("head.") or "lora_" in k]
    trained = {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}
    assert set(trained) == set(exported), set(trained) ^ set(exported)
    for k, v in trained.items():
        assert torch.equal(exported[k], v.to(exported[k].dtype)), k
    from model.loading import build_preset_model
    from model.presets import get_preset

    base = dict(build_preset_model(get_preset(preset)).named_parameters())
    changed = [k for k, v in exported.items() if k in base and not torch.equal(v, base[k])]
    assert any(".layers.0.self_attn.q_proj" in k for k in changed), changed  # it trained (full: LM layers)
    assert not any(".visual." in k for k in changed)  # the frozen tower did not move

    from launch.probe import main as probe_main

    rc = probe_main(["--model", str(export / "model"), "--heads", str(export), "--shards", tiny_shards,
                     "--no-mlflow", "--output", str(tmp_path / "probe"), "--num-workers", "0"])
    assert rc == 0
    res = json.load(open(tmp_path / "probe" / "probe.json"))
    assert res["model"]["family"] == get_family(preset) and res["heads"]["kind"] == "trained"
    assert len(res["head"]["layers"]) == 4 and len(res["raw"]["layers"]) == 4
    assert all(0.0 <= d["pck1"] <= 1.0 for d in res["head"]["layers"])
    assert res["data"]["anchors"] > 0


def get_family(preset: str) -> str:
    from model.presets import get_preset

    return get_preset(preset).family
