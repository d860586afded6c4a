"""The second family end to end: a 2-rank ZeRO-3 run of a few steps and a probe on tiny-llava-ov."""
import json
import os

import pytest

from conftest import ZERO3_JSON, Launch

pytestmark = pytest.mark.slow


def test_llava_onevision_trains_on_two_ranks_and_probes(tiny_shards, tmp_path):
    out = tmp_path / "run"
    run = Launch(["--ds_config", ZERO3_JSON, "--preset", "tiny-llava-ov", "--shards", tiny_shards, "--steps", "3",
                  "--batch-size", "1", "--val-every", "0", "--val-batches", "1", "--num-workers", "0", "--no-mlflow",
                  "--output-dir", str(out)], str(tmp_path / "train.log"), cwd=str(tmp_path))
    assert run.wait(timeout=900) == 0, run.tail()
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    export = out / "export"
    assert json.load(open(export / "export.json"))["family"] == "llava_onevision"

    from launch.probe import main as probe_main

    rc = probe_main(["--model", str(export / "model"), "--heads", str(export), "--shards", tiny_shards,
                     "--no-mlflow", "--output", str(tmp_path / "probe"), "--num-workers", "0"])
    assert rc == 0
    res = json.load(open(tmp_path / "probe" / "probe.json"))
    assert res["model"]["family"] == "llava_onevision" and res["heads"]["kind"] == "trained"
    assert len(res["head"]["layers"]) == 4 and len(res["raw"]["layers"]) == 4
    assert all(0.0 <= d["pck1"] <= 1.0 for d in res["head"]["layers"])
    assert res["data"]["anchors"] > 0


def test_projector_warmup_survives_text_only_steps_in_a_row(tiny_instruct_shards, tmp_path):
    """`--trainable projector` (LLaVA's stage 1) on 2 ZeRO-3 ranks over text-only conversations (every
    step runs the tower and projector on a dummy input, so each step repeats the last one's module order
    and ZeRO-3 replays its trace), then mixed with media: it trains, and the projector moves. Before the
    fix the second text-only step failed in backward on image_newline, a bare parameter ZeRO-3 had
    released ("The size of tensor a (0) must match the size of tensor b (64)")."""
    from conftest import shard_llava_json

    media = tmp_path / "text"
    media.mkdir()
    with open(media / "annotations.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"Count to {i + 2}."},
                {"from": "gpt", "value": " ".join(str(k) for k in range(1, i + 3))}]}) + "\n")
    text = shard_llava_json(str(media / "annotations.jsonl"), str(media), str(tmp_path / "text_shards"),
                            samples_per_shard=2, val_fraction=0.25)
    out = tmp_path / "run"
    run = Launch(["--ds_config", ZERO3_JSON, "--preset", "tiny-llava-ov", "--trainable", "projector",
                  "--lambda-lm", "1", "--lambda-corr", "0", "--lambda-depth", "0", "--lr", "1e-2",
                  "--shards", text + ":3", tiny_instruct_shards + ":1", "--steps", "6", "--batch-size", "1",
                  "--video-frames", "4", "--val-every", "0", "--val-batches", "1", "--num-workers", "0",
                  "--no-mlflow", "--output-dir", str(out)], str(tmp_path / "train.log"), cwd=str(tmp_path))
    assert run.wait(timeout=900) == 0, run.tail()
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7)) and not any(r["skipped"] for r in log)
    text_only = [all(v == 0 for k, v in r.items() if k.startswith("samples/") and "text_shards" not in k) for r in log]
    assert any(a and b for a, b in zip(text_only, text_only[1:])), log  # two text-only steps in a row
    assert any((r.get("grad_norm") or 0) > 0 for r in log), log  # the projector got gradients

    import torch

    from model.loading import build_model_and_processor

    trained = build_model_and_processor(str(out / "export" / "model"))[0].state_dict()
    fresh = build_model_and_processor("tiny-llava-ov")[0].state_dict()
    proj = [k for k in trained if "multi_modal_projector" in k]
    lm = [k for k in trained if "language_model.layers" in k]
    assert proj and lm and all(k in fresh for k in proj + lm)
    assert any(not torch.equal(trained[k], fresh[k]) for k in proj), "the projector did not change"
    changed = [k for k in lm if not torch.equal(trained[k], fresh[k])]
    assert not changed, changed[:3]  # the LM stays frozen
