"""The GPU benchmark scripts' code paths, dry-run on the CPU (their numbers come from a GPU run).

A GPU session has minutes: these make sure the scripts it carries run end to end before it starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import free_port, prebuild_deepspeed_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str], tmp_path, timeout: float = 300) -> dict:
    prebuild_deepspeed_op()
    out = tmp_path / "result.json"
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, *args, "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_gpu_mfu_smoke(tmp_path):
    res, text = run(["tests/benchmarks/gpu_mfu.py", "--smoke", "--iters", "2", "--warmup", "1", "--top", "4"],
                    tmp_path)
    assert res["vision_attn"] == "packed" and res["step_s"] > 0 and 0 < res["mfu"] < 1
    assert res["vision_forward_hf_s"] > 0 and res["vision_forward_packed_s"] > 0
    assert len(res["top_kernels"]["rows"]) == 4
    assert "FLOPs per step" in text and "frozen vision tower forward" in text


def test_bench_vision_small(tmp_path):
    res, text = run(["tests/benchmarks/bench_vision.py", "--frames", "2", "--side", "112", "--iters", "1"], tmp_path)
    assert res["patches"] == 2 * (112 // 14) ** 2
    assert res["max_rel_diff"] < 1e-5  # packed == Hugging Face's loop
    assert "(b) packed" in text


def _stdout(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_syncs_and_lens_accuracy_print_their_tables():
    import re

    out = _stdout(["tests/benchmarks/bench_syncs.py", "--pairs", "2"])
    before = int(re.search(r"computed by the model\s+(\d+)", out).group(1))
    after = int(re.search(r"computed on the CPU batch\s+(\d+)", out).group(1))
    assert after < before, out
    out = _stdout(["tests/benchmarks/lens_accuracy.py"])
    assert "RGB error vs the pinhole view" in out and "pair photo error" in out, out


def test_position_baseline_measures_each_motion(tmp_path):
    """The data measurement of [9 of 12] (how much position alone predicts correspondence per camera motion)
    runs end to end on a tiny setting: every motion measured, look-alike anchors counted."""
    out = tmp_path / "pb.json"
    text = _stdout(["tests/benchmarks/position_baseline.py", "--motions", "walk,orbit", "--scenes", "1",
                    "--frames", "12", "--width", "96", "--height", "72", "--clip-frames", "3", "--clip-window", "8",
                    "--clips-per-scene", "2", "--max-pixels", str(112 * 84), "--work", str(tmp_path / "work"),
                    "--json", str(out)])
    res = json.loads(out.read_text())["motions"]
    assert set(res) == {"walk", "orbit"} and "same-cell" in text
    for r in res.values():
        assert r["anchors"] > 0 and 0 <= r["same_cell"]["pck2patch"] <= 1 and r["lookalike_anchors"] is not None
