"""Training that survives: kill + resume, SIGTERM, bad steps, world-size refusal (2 CPU ranks, real launcher).

The resumed run reruns the reference run's exact command (conftest.TRAIN_FLAGS and
TRAIN_ENV, another run folder and run name) and is killed (SIGKILL of the whole launcher
group) after its first checkpoint, resumed, stopped by SIGTERM to rank 1 only, and
resumed again to the end: every logged step must equal the uninterrupted reference
run's. The reference run has a NaN loss injected on rank 1 at step 3 (the skip test).
"""
from __future__ import annotations

import json
import os
import re
import signal

import pytest

from conftest import TRAIN_ENV, TRAIN_FLAGS, ZERO3_JSON, Launch, free_port, read_jsonl, wait_for

pytestmark = pytest.mark.slow


def _latest_complete(run_dir: str) -> int | None:
    """Step of the newest complete checkpoint (trainer_meta.json written), or None."""
    ckpt = os.path.join(run_dir, "checkpoints")
    try:
        tag = open(os.path.join(ckpt, "latest")).read().strip()
    except OSError:
        return None
    return int(tag[4:]) if os.path.isfile(os.path.join(ckpt, tag, "trainer_meta.json")) else None


def _rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "train_log.jsonl")
    return read_jsonl(path) if os.path.isfile(path) else []


def _mlflow_run_line(launch: Launch) -> tuple[str, str]:
    m = re.search(r"\[train\] MLflow run (\w+) \((new|resumed)\)", launch.text())
    assert m, launch.tail()
    return m.group(1), m.group(2)


def _kill_sigterm_resume(args, env, run_dir, tmp_path, launches):
    # 1. killed (SIGKILL of launcher, ranks and loader workers) right after its first checkpoint
    first = Launch(args, str(tmp_path / "1.log"), cwd=str(tmp_path), env=env)
    launches.append(first)
    k1 = wait_for(lambda: _latest_complete(run_dir), 400, "the first checkpoint", first)
    first.kill()
    run_id, how = _mlflow_run_line(first)
    assert how == "new" and k1 in (4, 8), k1

    # 2. the same command resumes at step k1 + 1 with the same MLflow run; SIGTERM to rank 1 alone
    second = Launch(args, str(tmp_path / "2.log"), cwd=str(tmp_path), env=env)
    launches.append(second)
    wait_for(lambda: f"resumed from {run_dir}/checkpoints/step{k1:08d} at step {k1}" in second.text()
             and max((r["step"] for r in _rows(run_dir)), default=0) >= k1 + 1, 400, "a step after resuming", second)
    pids = second.rank_pids()
    os.kill(pids[1], signal.SIGTERM)
    assert second.wait(timeout=300) == 0, second.tail()
    text = second.text()
    m = re.search(r"stopped by SIGTERM after a checkpoint at step (\d+)", text)
    assert m, second.tail()
    k2 = int(m.group(1))
    assert k1 + 1 <= k2 <= 24 - 5 and _latest_complete(run_dir) == k2, (k1, k2)
    tag_dir = os.path.join(run_dir, "checkpoints", f"step{k2:08d}")
    for rank in (0, 1):  # both ranks saved their part
        assert json.load(open(os.path.join(tag_dir, f"trainer_rank{rank}.json")))["step"] == k2
        assert os.path.isfile(os.path.join(tag_dir, f"rng_rank{rank}.pt"))
    for pid in pids.values():  # and both exited 0
        assert re.search(rf"Process {pid} exits successfully", text), second.tail()
    assert _mlflow_run_line(second) == (run_id, "resumed")

    # 3. resumed again, to the end
    third = Launch(args, str(tmp_path / "3.log"), cwd=str(tmp_path), env=env)
    launches.append(third)
    assert third.wait(timeout=400) == 0, third.tail()
    assert f"resumed from {tag_dir} at step {k2}" in third.text(), third.tail()
    assert _mlflow_run_line(third) == (run_id, "resumed")
    return k1, k2, run_id, tag_dir


def test_kill_sigterm_and_resume_equal_the_uninterrupted_run(reference_run, tiny_shards, mlflow_server, tmp_path):
    assert reference_run.rc == 0, reference_run.launch.tail()
    run_dir = str(tmp_path / "run")
    args = ["--ds_config", ZERO3_JSON, *TRAIN_FLAGS, "--shards", tiny_shards, "--output-dir", run_dir,
            "--run-name", "resumed"]
    env = {**TRAIN_ENV, "MLFLOW_TRACKING_URI": mlflow_server.uri}

    launches: list[Launch] = []
    try:
        k1, k2, run_id, tag_dir = _kill_sigterm_resume(args, env, run_dir, tmp_path, launches)
    finally:
        for launch in launches:  # nothing outlives the test, whatever failed
            if launch.proc.poll() is None:
                launch.kill()

    # every step equals the uninterrupted run's: loss (rel 1e-5) and each rank's weight checksum
    ref = _rows(reference_run.dir)
    got = _rows(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 25))
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9), a["step"]
        assert sum(a["checksums"], []) == pytest.approx(sum(b["checksums"], []), rel=1e-7), a["step"]
    for k in (k1, k2):  # the 5 steps after each resume are covered above; show them on failure
        assert all(got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5) for s in range(k, k + 5))

    # one MLflow run across the three launches, finished, with every step's loss
    runs = mlflow_server.runs("gasp-tests", "resumed")
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    hist = mlflow_server.client().get_metric_history(run_id, "train/loss")
    assert {m.step for m in hist} == set(range(1, 25))
    assert json.load(open(os.path.join(run_dir, "checkpoints", "step00000024", "trainer_meta.json")))[
        "mlflow_run_id"] == run_id
    assert os.path.isfile(os.path.join(run_dir, "export", "model", "config.json"))


def test_nonfinite_loss_skips_the_step_on_all_ranks(reference_run):
    """The reference run's NaN loss on rank 1 at step 3: skipped on both ranks, weights and LR schedule untouched.

    (Counted in MLflow: test_train.py checks `train/skipped_steps` of the same run.)
    """
    from launch.config import tiny
    from launch.trainer import lr_lambda

    assert reference_run.rc == 0, reference_run.launch.tail()
    assert "[train] step 3: non-finite loss or gradient on some rank; step skipped on all ranks" in \
        reference_run.launch.text()
    rows = {r["step"]: r for r in _rows(reference_run.dir)}
    assert [s for s, r in rows.items() if r["skipped"]] == [3]
    # each rank checksums its own partition: neither changed at step 3, both changed at steps 2 and 4
    for rank in (0, 1):
        assert rows[3]["checksums"][rank] == rows[2]["checksums"][rank]
        assert rows[2]["checksums"][rank] != rows[1]["checksums"][rank] != rows[4]["checksums"][rank]
        assert rows[4]["checksums"][rank] != rows[3]["checksums"][rank]
    assert rows[3].get("grad_norm") is None and rows[4]["grad_norm"] > 0
    assert [rows[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    # the LR schedule advanced on applied steps only
    cfg = tiny()
    cfg.optim.steps, cfg.optim.warmup_steps = 24, 3
    f = lr_lambda(cfg)
    applied = 0
    for s in range(1, 25):
        applied += not rows[s]["skipped"]
        assert rows[s]["lr"] == pytest.approx(3e-3 * f(applied), rel=1e-9), s


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tiny_shards, tmp_path):
    run_dir = str(tmp_path / "run")
    launch = Launch(["--ds_config", ZERO3_JSON, "--preset", "tiny", "--steps", "8", "--batch-size", "1",
                     "--num-workers", "0", "--val-every", "0", "--max-bad-steps", "3", "--no-mlflow", "--no-export",
                     "--shards", tiny_shards, "--output-dir", run_dir], str(tmp_path / "train.log"),
                    cwd=str(tmp_path), launcher=False,
                    env={"GASP_FAULT_NONFINITE": "2-4:0", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert launch.wait(timeout=400) == 3, launch.tail()
    errors = [line for line in launch.text().splitlines() if "launch/train.py: error:" in line]
    assert len(errors) == 1 and "3 non-finite steps in a row at step 4 (--max-bad-steps 3)" in errors[0], errors
    assert "Traceback" not in launch.text(), launch.tail()
    rows = {r["step"]: r for r in _rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4] and [s for s, r in rows.items() if r["skipped"]] == [2, 3, 4]
    assert rows[1]["checksums"] == rows[2]["checksums"] == rows[3]["checksums"] == rows[4]["checksums"]
    assert not os.path.isdir(os.path.join(run_dir, "checkpoints"))  # nothing saved after the bad steps


def test_resume_on_another_world_size_is_refused(reference_run, tiny_shards, monkeypatch, capsys):
    from launch.train import main

    assert reference_run.rc == 0, reference_run.launch.tail()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    ckpt = os.path.join(reference_run.dir, "checkpoints")
    for extra in ([], ["--resume", ckpt]):
        rc = main(["--ds_config", ZERO3_JSON, *TRAIN_FLAGS, "--shards", tiny_shards, "--output-dir",
                   reference_run.dir, "--run-name", "reference", "--no-mlflow", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1, err
        assert "was written by 2 ranks, this run has 1" in err[0] and err[0].startswith("launch/train.py: error:")


def test_elastic_resume_on_another_world_size(reference_run, tiny_shards, tmp_path):
    """--elastic-resume: the 2-rank run's last checkpoint resumes on 1 rank through DeepSpeed's universal
    checkpoint with exactly the saved weights, and trains on."""
    import shutil

    import numpy as np

    assert reference_run.rc == 0, reference_run.launch.tail()
    run_dir = str(tmp_path / "run")
    # the run as preempted after its step-20 checkpoint (the same --steps: extending it is not resume-safe)
    k, last = 20, 24
    shutil.copytree(os.path.join(reference_run.dir, "checkpoints"), os.path.join(run_dir, "checkpoints"),
                    ignore=shutil.ignore_patterns(f"step{last:08d}"))
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(f"step{k:08d}")
    for name in ("train_log.jsonl", "run_config.json"):
        shutil.copy(os.path.join(reference_run.dir, name), run_dir)
    saved = {r["step"]: r for r in _rows(run_dir)}
    args = ["--ds_config", ZERO3_JSON, *TRAIN_FLAGS, "--shards", tiny_shards,
            "--output-dir", run_dir, "--run-name", "elastic", "--no-mlflow", "--elastic-resume"]
    one = Launch(args, str(tmp_path / "elastic.log"), cwd=str(tmp_path), env=TRAIN_ENV, ranks=1)
    assert one.wait(timeout=400) == 0, one.tail()
    m = re.search(rf"resumed from \S+step{k:08d} at step {k} on 1 ranks \(written by 2; universal checkpoint\); "
                  r"data restarts at epoch (\d+); trainable weights sum (\S+) sum of squares (\S+)", one.text())
    assert m, one.tail()
    want = np.array(saved[k]["checksums"]).sum(axis=0)  # the 2 ranks' shares after step k
    np.testing.assert_allclose([float(m.group(2)), float(m.group(3))], want, rtol=1e-12)
    rows = {r["step"]: r for r in _rows(run_dir)}
    assert sorted(rows)[-5:] == list(range(k, last + 1))
    assert all(len(rows[s]["checksums"]) == 1 for s in range(k + 1, last + 1))
    assert not rows[k + 1]["skipped"] and np.isfinite(rows[last]["loss"])
    assert rows[k + 1]["checksums"][0] != list(want)  # it trained on
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "universal", f"step{k:08d}", "zero",
                                       "optimizer_state.pt"))
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read().strip() == f"step{last:08d}"


def test_fault_spec():
    from launch.config import TrainError
    from launch.trainer import parse_fault_spec

    assert parse_fault_spec("") == set()
    assert parse_fault_spec("3:1,6-8:0") == {(3, 1), (6, 0), (7, 0), (8, 0)}
    with pytest.raises(TrainError, match="STEP:RANK"):
        parse_fault_spec("3")
