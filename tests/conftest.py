"""Shared factories: tiny synthetic scenes, tiny shards (no Ray), process-group teardown.

Tiny VLMs come from `model.presets` (random weights from real config classes).
"""
from __future__ import annotations

import json
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


def one_line(e: BaseException) -> str:
    """The message of a user-facing error, asserted to be one non-empty line."""
    msg = str(e)
    assert msg and "\n" not in msg, f"not a single line: {msg!r}"
    return msg


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
                      seed: int = 0, step: float = 0.1) -> str:
    """A small synthetic corpus in the posed layout (deterministic); the camera moves `step` m a frame."""
    from data import synthetic

    os.makedirs(root, exist_ok=True)
    for i in range(n_scenes):
        name = f"scene_{i:04d}"
        if not os.path.exists(os.path.join(root, name, "cameras.json")):
            synthetic.write_scene(root, name, seed=seed * 100 + i, n_frames=n_frames, width=width, height=height,
                                  step=step)
    return root


def build_shards(input_root: str, output: str, fmt: str = "synthetic", **kw) -> dict:
    """Run scan -> plan -> write in this process (no Ray) and return the plan."""
    from data.pairs import ClipConfig
    from pipeline import stages

    cc_keys = {f for f in ClipConfig.__dataclass_fields__}
    cc = ClipConfig(**{k: v for k, v in kw.items() if k in cc_keys})
    job = {k: v for k, v in kw.items() if k not in cc_keys}
    cfg = stages.JobConfig(input=input_root, format=fmt, output=output, clips=cc, **job)
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
    """Shards of the tiny corpus (clips of up to 4 frames in windows of 16): train-*.tar, val-*.tar, plan.json."""
    out = str(tmp_path_factory.mktemp("shards"))
    build_shards(tiny_corpus, out, clip_frames=4, clip_window=16, clips_per_scene=3, samples_per_shard=2,
                 max_side=160, val_fraction=0.34)
    return out


def build_instruct_shards(output: str, rooms: int = 4, frames: int = 8, samples_per_shard: int = 3,
                          val_fraction: float = 0.34, seed: int = 1, width: int = 160, height: int = 120) -> str:
    """The synthetic instruction set (data/synthetic_instruct.py, rendered at width x height) sharded in this
    process (no Ray): the instruction job's own plan and write stages, and its manifest. Returns the output
    folder."""
    from data import synthetic_instruct

    data = os.path.join(output, "_data")
    info = synthetic_instruct.write_dataset(data, rooms=rooms, seed=seed, width=width, height=height, video_frames=16)
    return shard_llava_json(info["annotations"], data, output, frames=frames, samples_per_shard=samples_per_shard,
                            val_fraction=val_fraction, seed=seed)


def shard_llava_json(annotations: str, media_root: str, output: str, frames: int = 8, samples_per_shard: int = 3,
                     val_fraction: float = 0.34, seed: int = 1) -> str:
    """A LLaVA-format annotation file sharded in this process (no Ray): the instruction job's own plan and
    write stages, and its manifest. Returns the output folder."""
    from pipeline import instruct, stages

    os.makedirs(output, exist_ok=True)
    cfg = instruct.InstructConfig(input=annotations, media_root=media_root, output=output, frames=frames,
                                  samples_per_shard=samples_per_shard, val_fraction=val_fraction, seed=seed)
    loaded = instruct.load_annotations(cfg.input, cfg.output)
    plan = instruct.make_plan(loaded, cfg)
    stats = {}
    for entry in plan["shards"]:
        st = instruct.write_shard(entry, cfg)
        assert st["ok"], st
        stats[st["name"]] = {k: v for k, v in st.items() if k != "ok"}
    stages.write_json(os.path.join(output, "plan.json"), plan)
    stages.write_json(os.path.join(output, "manifest.json"), instruct.build_manifest(plan, stats, cfg))
    return output


@pytest.fixture(scope="session")
def tiny_instruct_shards(tmp_path_factory) -> str:
    """Instruction shards of the synthetic set (4 rooms): images, videos and text-only records in both splits."""
    return build_instruct_shards(str(tmp_path_factory.mktemp("instruct_shards")))


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
    """A version-1 pair (the golden shard): every member of DESIGN §4.1 v1 with the right dtypes and shapes;
    every corr row passes the visibility test, rechecked with data.geometry from the STORED depth, K and poses.

    raw: one sample of raw bytes as webdataset yields it. -> shardformat.PairSample
    """
    import io

    import numpy as np
    from PIL import Image

    from data import geometry, shardformat

    assert set(shardformat.MEMBERS_V1) <= set(raw), sorted(raw)
    for m in ("a.depth.png", "b.depth.png"):
        with Image.open(io.BytesIO(bytes(raw[m]))) as im:
            assert im.format == "PNG" and im.mode in ("I;16", "I;16B", "I;16L"), (m, im.mode)
    for m in ("a.jpg", "b.jpg"):
        with Image.open(io.BytesIO(bytes(raw[m]))) as im:
            assert im.format == "JPEG" and im.mode == "RGB", (m, im.mode)
    s = shardformat.decode_pair(raw)
    meta = s.meta
    assert set(shardformat.META_KEYS_V1) <= set(meta), set(shardformat.META_KEYS_V1) - set(meta)
    assert meta["version"] == 1
    assert meta["gap"] == meta["index_b"] - meta["index_a"] > 0
    for view, rgb, depth in (("a", s.rgb_a, s.depth_a), ("b", s.rgb_b, s.depth_b)):
        W, H = meta[f"size_{view}"]
        assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
        assert depth.shape == (H, W) and depth.dtype == np.float32 and (depth > 0).any()
        assert np.asarray(meta[f"K_{view}"]).shape == (3, 3) and np.asarray(meta[f"T_w{view}"]).shape == (4, 4)
    corr = s.corr
    assert corr.dtype == np.float32 and corr.ndim == 2 and corr.shape[1] == 4
    assert len(corr) == meta["n_corr"] > 0
    _check_corr(corr, s.depth_a, s.K_a, s.T_wa, s.depth_b, s.K_b, s.T_wb, abs_tol, rel_tol)
    return s


def _check_corr(corr, depth_a, K_a, T_wa, depth_b, K_b, T_wb, abs_tol, rel_tol) -> None:
    """(N, 4) rows of one pair: A's points are grid pixels with depth, reprojected onto B's points, visible there."""
    import numpy as np

    from data import geometry

    uv_a = corr[:, :2].astype(np.float64)
    assert np.array_equal(uv_a, np.round(uv_a)), "A's points are grid pixels"
    z_a = depth_a[uv_a[:, 1].astype(int), uv_a[:, 0].astype(int)]
    assert (z_a > 0).all(), "A has depth at every corr point"
    uv_b, z_b = geometry.reproject(uv_a, z_a, K_a, T_wa, K_b, T_wb)
    np.testing.assert_allclose(uv_b, corr[:, 2:], atol=2e-3)
    assert geometry.visible_in(uv_b, z_b, depth_b, abs_tol, rel_tol).all()


def check_clip_sample(raw: dict, abs_tol: float = 0.05, rel_tol: float = 0.03):
    """A version-2 clip: every member of DESIGN §4.1 with the right modes, dtypes and shapes; corr rows grouped
    by pair i < j ascending, counted per pair, and each passing the visibility test of its pair, rechecked with
    data.geometry from the STORED depth, K and poses.

    raw: one sample of raw bytes as webdataset yields it. -> shardformat.ClipSample
    """
    import io

    import numpy as np
    from PIL import Image

    from data import shardformat

    meta = json.loads(bytes(raw["json"]).decode())
    K = len(meta["frames"])
    assert 2 <= K <= 32 and meta["version"] == 2 and meta["kind"] == "clip"
    assert set(shardformat.META_KEYS_V2) <= set(meta), set(shardformat.META_KEYS_V2) - set(meta)
    want = {m for k in range(K) for m in shardformat.frame_members(k)} | {"corr.npy", "json"}
    assert want <= set(raw), sorted(want - set(raw))
    for k in range(K):
        rgb_m, depth_m = shardformat.frame_members(k)
        with Image.open(io.BytesIO(bytes(raw[depth_m]))) as im:
            assert im.format == "PNG" and im.mode in ("I;16", "I;16B", "I;16L"), (depth_m, im.mode)
        with Image.open(io.BytesIO(bytes(raw[rgb_m]))) as im:
            assert im.format == "JPEG" and im.mode == "RGB", (rgb_m, im.mode)
    s = shardformat.decode_sample(raw)
    ix = meta["indices"]
    assert ix == sorted(ix) and len(set(ix)) == K and ix[-1] - ix[0] >= 1
    pairs = shardformat.clip_pairs(K)
    assert meta["pairs"] == [list(p) for p in pairs] and len(meta["n_corr"]) == len(pairs)
    assert len(meta["photo_err"]) == len(meta["photo_err_shuffled"]) == len(pairs)
    assert np.asarray(meta["overlap"]).shape == (K, K)
    for k in range(K):
        W, H = meta["sizes"][k]
        assert s.rgb[k].shape == (H, W, 3) and s.rgb[k].dtype == np.uint8
        assert s.depth[k].shape == (H, W) and s.depth[k].dtype == np.float32 and (s.depth[k] > 0).any()
        assert s.K(k).shape == (3, 3) and s.T_w(k).shape == (4, 4)
    corr = s.corr
    assert corr.dtype == np.float32 and corr.ndim == 2 and corr.shape[1] == 6
    order = [tuple(int(x) for x in row) for row in corr[:, :2]]
    assert order == sorted(order), "corr rows are grouped by pair ascending"
    assert len(corr) == sum(meta["n_corr"]) > 0
    for p, (i, j) in enumerate(pairs):
        rows = s.pair_corr(i, j)
        assert len(rows) == meta["n_corr"][p]
        if len(rows):
            _check_corr(rows, s.depth[i], s.K(i), s.T_w(i), s.depth[j], s.K(j), s.T_w(j), abs_tol, rel_tol)
    return s


@pytest.fixture(scope="session")
def shard_checks():
    """The shard-format checks above, for tests: `.tar(fileobj)`, `.sample(raw)` (v2 clip), `.pair(raw)` (v1)."""
    import types

    return types.SimpleNamespace(tar=check_tar_layout, sample=check_clip_sample, pair=check_pair_sample)


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


def run_logged(name: str, cmd: list[str], log_path: str, cwd: str) -> None:
    """A benchmark's step (tests/benchmarks): `cmd` in `cwd` on this checkout, CPU threads = cores, no hub,
    no inherited rank variables, stdout and stderr to `log_path`; prints the command and its seconds, and
    stops with the log's tail when it fails."""
    import subprocess
    import sys
    import time

    print("$ " + " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS=str(os.cpu_count() or 1), HF_HUB_OFFLINE="1")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{name}: exit {rc}\n{log_tail(log_path, 30)}")
    print(f"  {name}: {time.time() - t0:.0f} s", flush=True)


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


_DS_OP_READY = False


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of CPU tensor memory that `fn()` allocates beyond what was live before it, from the torch
    profiler's raw allocation and free records in time order (an op's own `self_cpu_memory_usage`
    would count frees made inside a Python-level scope, such as an autograd Function, at its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def prebuild_deepspeed_op() -> None:
    """Build DeepSpeed's CPU comm op once, in the pytest process, before the first training subprocess.

    Its first build takes ~30-60 s on 2 cores; done inside a test's ranks, a test timeout that kills them
    mid-build left torch's build lock behind and every later DeepSpeed test then waited on it forever
    (a clean CI machine ran past its limit that way). A lock left by an earlier killed session is
    removed first (launch.distributed.clear_stale_build_lock).
    """
    global _DS_OP_READY
    if _DS_OP_READY:
        return
    _DS_OP_READY = True
    from launch.distributed import clear_stale_build_lock

    clear_stale_build_lock()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def train_env(extra: dict | None = None) -> dict:
    """The environment of a training subprocess: no inherited rank variables, offline, quiet."""
    prebuild_deepspeed_op()
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


# ----------------------------------------------------------------- clip batches with hand-made labels

def clip_batch(adapter, clips: list[list] | None = None, seed: int = 0, anchors: list[list[tuple]] | None = None):
    """A collated clip batch (the loader's layout, data/stream.py) of random-image clips with hand-made
    labels. clips: frames per clip (default two clips of 3 and 2 frames, B = a sideways shift of A);
    anchors: per supervised pair [(cell of A, target cell of B, z_b), ...] (default: every pair i < j
    gets four anchors, two of them sharing a target, the second clip's pair only two)."""
    import numpy as np
    import torch

    from data.labels import ClipLabels, ClipPairLabels
    from data.shardformat import clip_pairs
    from data.stream import PreparedClip, collate_clips

    rng = np.random.default_rng(seed)
    if clips is None:
        a = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        b = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        clips = [[a, np.roll(a, 40, axis=1), np.roll(a, 80, axis=1)], [b, np.roll(b, 40, axis=1)]]
    items, k = [], 0
    for c, frames in enumerate(clips):
        grids = [adapter.grid((f.shape[1], f.shape[0])) for f in frames]
        pairs = []
        for i, j in clip_pairs(len(frames)):
            n = min(grids[i].n_cells, grids[j].n_cells)
            spec = anchors[k] if anchors is not None else (
                [(0, 1, 2.0), (5, 6, 2.5), (7, 6, 3.0), (n - 2, n - 1, 1.5)] if c == 0 else [(0, 1, 2.0), (5, 6, 2.5)])
            k += 1
            pairs.append(ClipPairLabels(i, j, np.array([a for a, _, _ in spec], dtype=np.int64),
                                        np.array([t for _, t, _ in spec], dtype=np.int64),
                                        np.array([z for _, _, z in spec], dtype=np.float32), 3 * (j - i)))
        depth = [np.linspace(1.0, 4.0, g.n_cells).astype(np.float32) for g in grids]
        labels = ClipLabels([(g.rows, g.cols) for g in grids], depth, [np.ones(g.n_cells, bool) for g in grids], pairs)
        items.append(PreparedClip(f"clip{c}", "synthetic", adapter.encode_clip(frames), labels))
    return collate_clips(items, adapter)


def union_batch(batches: list[dict], pad_token_id: int = 0) -> dict:
    """One clip batch holding every clip of `batches` (what one process sees of a whole step): sequences
    right-padded to the longest, per-frame / per-pair tensors concatenated with their frame, row and clip
    indices shifted, labels padded to the longest anchor list. Qwen-family model inputs only."""
    import torch
    import torch.nn.functional as F

    out: dict = {}
    S = max(b["input_ids"].shape[1] for b in batches)
    N = max(b["cell_pos"].shape[1] for b in batches)
    M = max(b["anchor_a"].shape[1] for b in batches)
    rows = frames = 0
    parts: dict[str, list] = {}
    for b in batches:
        pad_s = S - b["input_ids"].shape[1]
        parts.setdefault("input_ids", []).append(F.pad(b["input_ids"], (0, pad_s), value=pad_token_id))
        for k in ("attention_mask", "mm_token_type_ids"):
            parts.setdefault(k, []).append(F.pad(b[k], (0, pad_s)))
        for k in ("pixel_values", "image_grid_thw", "grid", "dt", "n_anchors", "n_frames"):
            parts.setdefault(k, []).append(b[k])
        for k in ("cell_pos", "cell_mask", "depth", "depth_valid"):
            parts.setdefault(k, []).append(F.pad(b[k], (0, N - b[k].shape[1])))
        for k in ("anchor_a", "target_b", "z_b", "anchor_mask"):
            parts.setdefault(k, []).append(F.pad(b[k], (0, M - b[k].shape[1])))
        parts.setdefault("frame_clip", []).append(b["frame_clip"] + rows)
        parts.setdefault("pair_clip", []).append(b["pair_clip"] + rows)
        parts.setdefault("pair_frames", []).append(b["pair_frames"] + frames)
        rows += b["input_ids"].shape[0]
        frames += b["cell_pos"].shape[0]
    out = {k: torch.cat(v, 0) for k, v in parts.items()}
    out["keys"] = [k for b in batches for k in b["keys"]]
    out["datasets"] = [d for b in batches for d in b["datasets"]]
    return out
