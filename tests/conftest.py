"""Shared factories: tiny synthetic scenes, tiny shards (no Ray), process-group teardown.

Tiny VLMs come from `model.presets` (random weights from real config classes).
"""
from __future__ import annotations

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep in-process Ray on loopback
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

GOLDEN_SHARD = os.path.join(ROOT, "tests", "golden", "train-000000.tar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _teardown_process_group():
    yield
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def write_tiny_corpus(root: str, n_scenes: int = 3, n_frames: int = 24, width: int = 160, height: int = 120,
                      seed: int = 0) -> str:
    """A small synthetic corpus in the posed layout (deterministic)."""
    from data import synthetic

    os.makedirs(root, exist_ok=True)
    for i in range(n_scenes):
        name = f"scene_{i:04d}"
        if not os.path.exists(os.path.join(root, name, "cameras.json")):
            synthetic.write_scene(root, name, seed=seed * 100 + i, n_frames=n_frames, width=width, height=height)
    return root


def build_shards(input_root: str, output: str, fmt: str = "synthetic", **kw) -> dict:
    """Run scan -> plan -> write in this process (no Ray) and return the plan."""
    from data.pairs import PairConfig
    from pipeline import stages

    pc_keys = {"min_gap", "max_gap", "min_overlap", "max_overlap", "gap_buckets", "pairs_per_scene", "max_corr",
               "stride"}
    pc = PairConfig(**{k: v for k, v in kw.items() if k in pc_keys})
    job = {k: v for k, v in kw.items() if k not in pc_keys}
    cfg = stages.JobConfig(input=input_root, format=fmt, output=output, pairs=pc, **job)
    os.makedirs(output, exist_ok=True) if "://" not in output else None
    from data.scenes import list_scenes

    scans = [stages.scan_scene(u, cfg) for u in list_scenes(input_root, fmt)]
    plan = stages.make_plan(scans, cfg)
    for entry in plan["shards"]:
        st = stages.write_shard(entry, cfg)
        assert st["ok"], st
    stages.write_json(os.path.join(output, "plan.json") if "://" not in output else output + "/plan.json", plan)
    return plan


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    return write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")), n_scenes=3, n_frames=24)


@pytest.fixture(scope="session")
def tiny_shards(tiny_corpus, tmp_path_factory) -> str:
    """Shards of the tiny corpus: a folder with train-*.tar, val-*.tar, plan.json."""
    out = str(tmp_path_factory.mktemp("shards"))
    build_shards(tiny_corpus, out, pairs_per_scene=6, samples_per_shard=4, max_side=160, val_fraction=0.34,
                 max_gap=20, gap_buckets=(1, 5, 15))
    return out


# ----------------------------------------------------------------- shard job (Ray, S3)

@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray shared by the tests that run the shard job in this process.

    2 CPUs, every process on 127.0.0.1, no dashboard. `pipeline.shard.main` reuses it
    (and leaves it running). Tests that need their own Ray run the job as a subprocess.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


class S3Server:
    """A moto S3 server on 127.0.0.1 (real HTTP); `env` points AWS clients at it."""

    KEY_ID = "AKIAGASPTESTKEY7XQ2"
    SECRET = "gaspTestSecret+9f8e7d6c5b4a3928171615"

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.KEY_ID,
                    "AWS_SECRET_ACCESS_KEY": self.SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def fs(self):
        """A fresh s3fs client (no instance cache) for this server."""
        import s3fs

        return s3fs.S3FileSystem(key=self.KEY_ID, secret=self.SECRET, endpoint_url=self.url,
                                 skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server():
    """`moto_server -H 127.0.0.1 -p PORT` for the session; stopped by its PID afterwards."""
    import subprocess
    import time
    import urllib.request

    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(port)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(server.url + "/", timeout=1).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on 127.0.0.1:{port}")
            time.sleep(0.2)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_tar_layout(fileobj) -> list[str]:
    """DESIGN §4 tar rules: members carry mtime 0, uid/gid 0, and come in sorted order. -> names."""
    import tarfile

    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        members = [(m.name, m.mtime, m.uid, m.gid, m.isfile()) for m in tar]
    names = [m[0] for m in members]
    assert names == sorted(names), "tar members are not in sorted order"
    assert all(m[1] == 0 and m[2] == 0 and m[3] == 0 and m[4] for m in members), \
        [m for m in members if m[1] or m[2] or m[3] or not m[4]][:3]
    return names


def check_pair_sample(raw: dict, abs_tol: float = 0.05, rel_tol: float = 0.03):
    """Every member of DESIGN §4 with the right dtypes and shapes; every corr row passes the
    visibility test, rechecked with data.geometry from the STORED depth, K and poses.

    raw: one sample of raw bytes as webdataset yields it. -> shardformat.PairSample
    """
    import io

    import numpy as np
    from PIL import Image

    from data import geometry, shardformat

    assert set(shardformat.MEMBERS) <= set(raw), sorted(raw)
    for m in ("a.depth.png", "b.depth.png"):
        with Image.open(io.BytesIO(bytes(raw[m]))) as im:
            assert im.format == "PNG" and im.mode in ("I;16", "I;16B", "I;16L"), (m, im.mode)
    for m in ("a.jpg", "b.jpg"):
        with Image.open(io.BytesIO(bytes(raw[m]))) as im:
            assert im.format == "JPEG" and im.mode == "RGB", (m, im.mode)
    s = shardformat.decode_sample(raw)
    meta = s.meta
    assert set(shardformat.META_KEYS) <= set(meta), set(shardformat.META_KEYS) - set(meta)
    assert meta["version"] == shardformat.FORMAT_VERSION
    assert meta["gap"] == meta["index_b"] - meta["index_a"] > 0
    for view, rgb, depth in (("a", s.rgb_a, s.depth_a), ("b", s.rgb_b, s.depth_b)):
        W, H = meta[f"size_{view}"]
        assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
        assert depth.shape == (H, W) and depth.dtype == np.float32 and (depth > 0).any()
        assert np.asarray(meta[f"K_{view}"]).shape == (3, 3) and np.asarray(meta[f"T_w{view}"]).shape == (4, 4)
    corr = s.corr
    assert corr.dtype == np.float32 and corr.ndim == 2 and corr.shape[1] == 4
    assert len(corr) == meta["n_corr"] > 0
    uv_a = corr[:, :2].astype(np.float64)
    assert np.array_equal(uv_a, np.round(uv_a)), "A's points are grid pixels"
    z_a = s.depth_a[uv_a[:, 1].astype(int), uv_a[:, 0].astype(int)]
    assert (z_a > 0).all(), "A has depth at every corr point"
    uv_b, z_b = geometry.reproject(uv_a, z_a, s.K_a, s.T_wa, s.K_b, s.T_wb)
    np.testing.assert_allclose(uv_b, corr[:, 2:], atol=2e-3)
    assert geometry.visible_in(uv_b, z_b, s.depth_b, abs_tol, rel_tol).all()
    return s


@pytest.fixture(scope="session")
def shard_checks():
    """The shard-format checks above, for tests: `.tar(fileobj)`, `.sample(raw)`."""
    import types

    return types.SimpleNamespace(tar=check_tar_layout, sample=check_pair_sample)


# ------------------------------------------------- training (DeepSpeed launcher, MLflow server)
# Shared by tests/test_train.py and tests/test_train_resume.py. Every launcher call gets its own
# --master_port; its stdout/stderr go to a file whose tail is shown when a check fails.

TRAIN_PY = os.path.join(ROOT, "launch", "train.py")
ZERO3_JSON = os.path.join(ROOT, "launch", "zero3.json")
DS_LAUNCHER = os.path.join(os.path.dirname(sys.executable), "deepspeed")
# The uninterrupted reference run: the resume tests rerun exactly these flags.
TRAIN_FLAGS = ("--preset", "tiny", "--steps", "24", "--batch-size", "2", "--num-workers", "1", "--lr", "3e-3",
               "--warmup-steps", "3", "--val-every", "12", "--val-batches", "2", "--save-every", "4",
               "--no-system-metrics", "--experiment", "gasp-tests")
# ...with a NaN loss injected on rank 1 at step 3 (the trainer's test hook): the reference run
# shows the bad-step skip, and the resumed runs (same environment) must reproduce it.
TRAIN_ENV = {"GASP_FAULT_NONFINITE": "3:1"}


def log_tail(path: str, n: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"--- last {min(n, len(lines))} lines of {path} ---\n" + "\n".join(lines[-n:])


def read_jsonl(path: str) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_env(extra: dict | None = None) -> dict:
    """The environment of a training subprocess: no inherited rank variables, offline, quiet."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI",
                        "GASP_FAULT_NONFINITE", "GASP_DEBUG_PARTITION")}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    env.update(extra or {})
    return env


class Launch:
    """One `deepspeed --num_gpus N script ...` (or plain python) subprocess, its log in a file."""

    def __init__(self, args: list[str], log_path: str, cwd: str, env: dict | None = None, ranks: int = 2,
                 script: str = TRAIN_PY, launcher: bool = True):
        import subprocess

        self.log_path = log_path
        if launcher:
            cmd = [DS_LAUNCHER, "--master_port", str(free_port()), "--num_gpus", str(ranks), script, *args]
        else:
            cmd = [sys.executable, "-u", script, *args]
        self.cmd = cmd
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=train_env(env), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float) -> int:
        import subprocess

        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.cmd)} ran over {timeout:.0f}s (hang?)\n{self.tail()}")
        finally:
            self._log.flush()

    def kill(self, sig: int | None = None) -> None:
        """Signal the whole process group (launcher, ranks, loader workers); default SIGKILL."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL if sig is None else sig)
        except ProcessLookupError:
            pass
        if sig is None:
            self.proc.wait(timeout=60)
            # SIGKILLed ranks cannot unlink DeepSpeed's /dev/shm workspace: do it for them
            if "--master_port" in self.cmd:
                import glob

                port = self.cmd[self.cmd.index("--master_port") + 1]
                for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
                    os.unlink(path)

    def rank_pids(self) -> dict[int, int]:
        """{local rank: pid} from the launcher's 'process PID spawned with command' lines."""
        import re

        out = {}
        for line in open(self.log_path, errors="replace"):
            m = re.search(r"process (\d+) spawned with command: .*'--local_rank=(\d+)'", line)
            if m:
                out[int(m.group(2))] = int(m.group(1))
        return out

    def text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def tail(self, n: int = 60) -> str:
        return log_tail(self.log_path, n)


def wait_for(predicate, timeout: float, what: str, launch: "Launch | None" = None, poll: float = 0.2):
    """Poll until predicate() is truthy (returns it); fail with the log tail after `timeout` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        if launch is not None and launch.proc.poll() is not None:
            got = predicate()
            if got:
                return got
            raise AssertionError(f"process ended (rc {launch.proc.returncode}) before {what}\n{launch.tail()}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n" + (launch.tail() if launch else ""))


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store; `uri` for MLFLOW_TRACKING_URI."""

    def __init__(self, root: str, port: int):
        import subprocess

        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(root, "mlflow_server.log")
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{os.path.join(root, 'mlflow.db')}",
             "--artifacts-destination", os.path.join(root, "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import time
        import urllib.request

        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).read()
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start on {self.uri}\n{log_tail(self.log_path)}")
                time.sleep(0.3)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str, run_name: str | None = None) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        flt = f"tags.mlflow.runName = '{run_name}'" if run_name else ""
        return client.search_runs([exp.experiment_id], filter_string=flt, max_results=100)

    def stop(self) -> None:
        import signal
        import subprocess

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite, served artifacts) on 127.0.0.1 for the session."""
    server = MlflowServer(str(tmp_path_factory.mktemp("mlflow")), free_port())
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_run(tiny_shards, mlflow_server, tmp_path_factory):
    """The uninterrupted 2-rank ZeRO-3 run of TRAIN_FLAGS / TRAIN_ENV (tracked, partition dump on), run once.

    Returns a namespace: dir (the run folder), rc, log (Launch), log_path, run_name.
    """
    import types

    root = str(tmp_path_factory.mktemp("train_ref"))
    run_dir = os.path.join(root, "run")
    launch = Launch(["--ds_config", ZERO3_JSON, *TRAIN_FLAGS, "--shards", tiny_shards, "--output-dir", run_dir,
                     "--run-name", "reference"], os.path.join(root, "launcher.log"), cwd=root,
                    env={**TRAIN_ENV, "MLFLOW_TRACKING_URI": mlflow_server.uri, "GASP_DEBUG_PARTITION": "1"})
    rc = launch.wait(timeout=600)
    return types.SimpleNamespace(dir=run_dir, rc=rc, launch=launch, run_name="reference", root=root)
