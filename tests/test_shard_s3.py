"""The shard job against a real S3 HTTP endpoint (moto_server on 127.0.0.1): input and output
on s3://, read back through fsspec, resumable there too, and no credential anywhere it writes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = os.path.join(ROOT, "pipeline", "shard.py")
TINY = ["--format", "synthetic", "--clips-per-scene", "3", "--clip-frames", "4", "--clip-window", "16",
        "--samples-per-shard", "3", "--max-side", "160", "--val-fraction", "0.34"]
BUCKET = "gasp-shard-test"


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, SHARD, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        _kill_session(p.pid)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _kill_session(sid: int) -> None:
    import psutil

    procs = []
    for q in psutil.process_iter():
        try:
            if os.getsid(q.pid) == sid:
                procs.append(q)
        except (OSError, psutil.Error):
            pass
    for q in procs:
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.slow
def test_s3_input_and_output_without_leaking_credentials(s3_server, tiny_corpus, tmp_path, monkeypatch,
                                                         shard_checks):
    import webdataset as wds
    from mlflow.tracking import MlflowClient

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    fs = s3_server.fs()
    fs.mkdir(BUCKET)
    fs.put(tiny_corpus.rstrip("/") + "/", f"{BUCKET}/corpus/", recursive=True)
    assert len(fs.glob(f"{BUCKET}/corpus/*/cameras.json")) == 3

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, **s3_server.env, "MLFLOW_TRACKING_URI": uri}
    argv = ["--input", f"s3://{BUCKET}/corpus", "--output", f"s3://{BUCKET}/shards", *TINY, "--num-cpus", "2"]
    p = _run(argv + ["--mlflow", "--experiment", "s3-test"], env)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])

    fs.invalidate_cache()
    names = sorted(x.rsplit("/", 1)[1] for x in fs.ls(f"{BUCKET}/shards"))
    manifest_text = fs.cat(f"{BUCKET}/shards/manifest.json").decode()
    plan_text = fs.cat(f"{BUCKET}/shards/plan.json").decode()
    manifest = json.loads(manifest_text)
    assert manifest["complete"] and manifest["counts"]["clips"] == 9
    tars = sorted(n for n in names if n.endswith(".tar"))
    assert tars == sorted(s["name"] for s in manifest["shards"]) and len(tars) == 3
    assert all(n.endswith((".tar", ".stats.json")) or n in ("plan.json", "manifest.json") for n in names), names
    stats_texts = [fs.cat(f"{BUCKET}/shards/{n}").decode() for n in names if n.endswith(".stats.json")]

    # read back through fsspec into webdataset's own tar reader
    import hashlib

    by_name = {s["name"]: s for s in manifest["shards"]}
    for t in tars:
        data = fs.cat(f"{BUCKET}/shards/{t}")
        assert hashlib.sha256(data).hexdigest() == by_name[t]["sha256"] and len(data) == by_name[t]["bytes"]
        shard_checks.tar(io.BytesIO(data))
    streams = [{"url": f"s3://{BUCKET}/shards/{t}", "stream": fs.open(f"{BUCKET}/shards/{t}", "rb")} for t in tars]
    samples = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams)))
    assert len(samples) == 9
    for raw in samples:
        s = shard_checks.sample(raw)
        assert s.meta["source"] == f"s3://{BUCKET}/corpus/{s.meta['scene']}"

    # no credential in what the job writes or prints, nor in MLflow
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("s3-test").experiment_id])
    assert run.data.params["input"] == f"s3://{BUCKET}/corpus" and run.data.metrics["clips"] == 9
    mlflow_text = json.dumps([run.data.params, run.data.tags])
    for secret in (s3_server.KEY_ID, s3_server.SECRET):
        for where, text in (("manifest.json", manifest_text), ("plan.json", plan_text),
                            ("stats.json", "".join(stats_texts)), ("stdout", p.stdout), ("stderr", p.stderr),
                            ("mlflow", mlflow_text)):
            assert secret not in text, f"credential found in {where}"

    # resumable on S3 too: a rerun lists the bucket, finds every stats.json and writes nothing
    before = {t: fs.info(f"{BUCKET}/shards/{t}")["LastModified"] for t in tars}
    p2 = _run(argv + ["--quiet"], env)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "3 of 3 shards already done; writing 0" in p2.stdout
    fs.invalidate_cache()
    assert {t: fs.info(f"{BUCKET}/shards/{t}")["LastModified"] for t in tars} == before
