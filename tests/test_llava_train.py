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
