"""Multi-node, simulated on one host: every process on 127.0.0.1, stopped by its PIDs.

- Training as 2 DeepSpeed nodes of 1 rank each: two `deepspeed --hostfile F --num_nodes 2
  --num_gpus 1 --node_rank 0|1 --master_addr 127.0.0.1 --no_ssh` launchers (what a scheduler
  starts on each node), killed after the first checkpoint and started again: every step of the
  run equals the 2-rank single-node reference run's (conftest `reference_run`, same flags).
- The shard job on a Ray cluster of 2 nodes: a head (`ray start --head --node-ip-address
  127.0.0.1`) and a worker node in their own sessions; the job's write tasks run on both nodes,
  its shards are byte-identical to a run without Ray, and every socket of the cluster, its
  workers and the driver stays on 127.0.0.1 for the whole job.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from conftest import DS_LAUNCHER, TRAIN_ENV, TRAIN_FLAGS, TRAIN_PY, ZERO3_JSON, Launch, build_shards, free_port, \
    read_jsonl, train_env, wait_for
from test_shard_job import SHARD, TINY, _distinct_free_ports, kill_session, session_procs, shard_hashes, \
    verify_output

pytestmark = pytest.mark.slow
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}  # the second: IPv4 loopback as an IPv6 socket shows it


# --------------------------------------------------------------------------- DeepSpeed

class NodeLaunch(Launch):
    """One node's `deepspeed` launcher of a 2-node job without ssh (a scheduler's per-node command)."""

    def __init__(self, args: list[str], log_path: str, cwd: str, env: dict, hostfile: str, node_rank: int,
                 port: int):
        self.log_path = log_path
        self.cmd = [DS_LAUNCHER, "--hostfile", hostfile, "--num_nodes", "2", "--num_gpus", "1",
                    "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                    "--no_ssh", TRAIN_PY, *args]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=train_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)


def _latest_complete(run_dir: str) -> int | None:
    ckpt = os.path.join(run_dir, "checkpoints")
    try:
        tag = open(os.path.join(ckpt, "latest")).read().strip()
    except OSError:
        return None
    return int(tag[4:]) if os.path.isfile(os.path.join(ckpt, tag, "trainer_meta.json")) else None


def _two_nodes(args, tmp_path, hostfile, tag) -> list[NodeLaunch]:
    port = free_port()
    return [NodeLaunch(args, str(tmp_path / f"{tag}-node{r}.log"), str(tmp_path), TRAIN_ENV, hostfile, r, port)
            for r in (0, 1)]


def test_two_deepspeed_nodes_checkpoint_resume_and_equal_one_node(reference_run, tiny_shards, tmp_path):
    assert reference_run.rc == 0, reference_run.launch.tail()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("hostA slots=1\nhostB slots=1\n")
    run_dir = str(tmp_path / "run")
    args = ["--ds_config", ZERO3_JSON, *TRAIN_FLAGS, "--shards", tiny_shards, "--output-dir", run_dir,
            "--run-name", "two-nodes", "--no-mlflow", "--no-export"]
    launches: list[NodeLaunch] = []
    try:
        first = _two_nodes(args, tmp_path, str(hostfile), "first")
        launches += first
        k = wait_for(lambda: _latest_complete(run_dir), 400, "the first checkpoint", first[0])
        for node in first:  # both nodes lost at once (SIGKILL of each launcher's whole group)
            node.kill()
        for r, node in enumerate(first):
            assert f"nnodes=2, num_local_procs=1, node_rank={r}" in node.text(), node.tail()
        tag_dir = os.path.join(run_dir, "checkpoints", f"step{k:08d}")
        for rank in (0, 1):  # each node's rank saved its part
            assert json.load(open(os.path.join(tag_dir, f"trainer_rank{rank}.json")))["step"] == k

        again = _two_nodes(args, tmp_path, str(hostfile), "again")
        launches += again
        for node in again:
            assert node.wait(timeout=400) == 0, node.tail()
        assert f"resumed from {tag_dir} at step {k}" in again[0].text(), again[0].tail()
    finally:
        for node in launches:
            if node.proc.poll() is None:
                node.kill()
    ref = read_jsonl(os.path.join(reference_run.dir, "train_log.jsonl"))
    got = read_jsonl(os.path.join(run_dir, "train_log.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 25))
    for a, b in zip(got, ref):  # 2 nodes x 1 rank == 1 node x 2 ranks, across the kill and resume
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9) and a["skipped"] == b["skipped"], a["step"]
        assert sum(a["checksums"], []) == pytest.approx(sum(b["checksums"], []), rel=1e-7), a["step"]
    assert _latest_complete(run_dir) == 24


# --------------------------------------------------------------------------------- Ray

# Ray 2.60's `ray start` cannot put a WORKER node on loopback: with multi-node clusters enabled
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, Linux default on) it rewrites the literal 127.0.0.1 of
# --address and --node-ip-address to the host's outward address (services.resolve_ip_for_localhost),
# and with it off (what keeps the head on loopback) it refuses to start a worker node
# (scripts.py: "Multi-node Ray clusters are not supported"). So the worker node is started as
# `ray start --address` starts it, by ray._private.node.Node with the same parameters, in its own
# process and session; the head is the real `ray start --head`.
WORKER_NODE = """
import sys
from ray._private.node import Node
from ray._private.parameter import RayParams
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
Node(RayParams(node_ip_address="127.0.0.1", gcs_address=a["address"], num_cpus=1, temp_dir=a["temp"],
               node_manager_port=int(a["nm"]), object_manager_port=int(a["om"]), min_worker_port=0,
               max_worker_port=0, dashboard_agent_listen_port=int(a["ah"]), metrics_agent_port=int(a["ag"]),
               runtime_env_agent_port=int(a["re"]), metrics_export_port=int(a["me"])),
     head=False, shutdown_at_exit=False, spawn_reaper=False)
"""


def _off_loopback(pids: set[int]) -> list[tuple]:
    """Sockets of these processes whose local or remote address is not 127.0.0.1."""
    bad = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and not ({c.laddr.ip} | ({c.raddr.ip} if c.raddr else set())) <= LOOPBACK:
            bad.append((c.pid, c.laddr, c.raddr, c.status))
    return bad


def test_shard_job_on_a_two_node_ray_cluster(tiny_corpus, tmp_path, shard_checks):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    ports = _distinct_free_ports(("gcs", "dash", "client", "nm0", "om0", "ah0", "ag0", "re0", "me0", "nm1", "om1",
                                  "ah1", "ag1", "re1", "me1", "autoscaler_metrics", "dash_metrics"))
    temp = tempfile.mkdtemp(prefix="gr", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]),
           "DASHBOARD_METRIC_PORT": str(ports["dash_metrics"]),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{ports['gcs']}"
    sessions: list[int] = []
    try:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
             "--num-cpus", "1", "--include-dashboard", "false", "--dashboard-host", "127.0.0.1", "--dashboard-port",
             str(ports["dash"]), "--ray-client-server-port", str(ports["client"]), "--node-manager-port",
             str(ports["nm0"]), "--object-manager-port", str(ports["om0"]), "--dashboard-agent-listen-port",
             str(ports["ah0"]), "--dashboard-agent-grpc-port", str(ports["ag0"]), "--runtime-env-agent-port",
             str(ports["re0"]), "--metrics-export-port", str(ports["me0"]), "--min-worker-port", "0",
             "--max-worker-port", "0", "--temp-dir", temp, "--disable-usage-stats"],
            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sessions.append(head.pid)  # its daemons stay in this session after `ray start` returns
        assert head.wait(timeout=120) == 0, (tmp_path / "head.log").read_text()[-3000:]
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER_NODE, "address", address, "temp", temp, "nm", str(ports["nm1"]),
             "om", str(ports["om1"]), "ah", str(ports["ah1"]), "ag", str(ports["ag1"]), "re", str(ports["re1"]),
             "me", str(ports["me1"])], env=env, stdout=open(tmp_path / "worker.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        sessions.append(worker.pid)
        assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        nodes = _alive_nodes(address, env)
        assert len(nodes) == 2, nodes

        out = str(tmp_path / "out")
        log = tmp_path / "job.log"
        with open(log, "w") as f:  # a plain driver joining through RAY_ADDRESS (data/ and pipeline/ shipped)
            job = subprocess.Popen([sys.executable, SHARD, "--input", tiny_corpus, "--output", out, *TINY],
                                   cwd=str(tmp_path),
                                   env={**env, "RAY_ADDRESS": address, "GASP_TEST_WRITE_DELAY": "0.3"},
                                   stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        sessions.append(job.pid)
        bad: list[tuple] = []
        seen: set[int] = set()
        while job.poll() is None:  # the sockets of every process of the cluster and the job, all along
            pids = {p.pid for sid in sessions for p in session_procs(sid)}
            seen |= pids
            bad += _off_loopback(pids)
            time.sleep(0.25)
        text = log.read_text()
        assert job.returncode == 0, text[-4000:]
        pids = {p.pid for sid in sessions for p in session_procs(sid)}
        bad += _off_loopback(pids)
        assert not bad, f"Ray sockets beyond 127.0.0.1: {bad[:10]}"
        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.pid in pids and c.status == psutil.CONN_LISTEN}
        assert listening and listening <= LOOPBACK, listening
        assert len(seen) > len(pids)  # the job's own processes (driver, its tasks' workers) were watched too
    finally:
        for sid in sessions:
            kill_session(sid)
        shutil.rmtree(temp, ignore_errors=True)
    assert not any(session_procs(sid) for sid in sessions), "processes of the test's cluster are still running"

    assert f"[ray] cluster at {address} (2 CPUs)" in text, text[-3000:]
    # the write tasks (5 shards of 1-2 clips, >= 0.3 s each for 2 CPUs, one a node) ran on both nodes; the
    # 3 short scan tasks on one or both, as Ray's scheduler placed them
    m = re.search(r"\[write\] 5 tasks ran on 2 node\(s\): (\w+) (\d+), (\w+) (\d+)", text)
    assert m, text[-3000:]
    assert {m.group(1), m.group(3)} == {n[:12] for n in nodes} and int(m.group(2)) + int(m.group(4)) == 5
    m = re.search(r"\[scan\] 3 tasks ran on [12] node\(s\): (.*)", text)
    assert m and {x.split()[0] for x in m.group(1).split(", ")} <= {n[:12] for n in nodes}, text[-3000:]
    manifest, _ = verify_output(out, shard_checks)
    c = manifest["counts"]  # 3 clips of 4 frames in each of the 3 scenes (one of them val), 6 pairs a clip
    assert manifest["complete"] and (c["clips"], c["clips_train"], c["clips_val"], c["pairs"],
                                     c["frames_stored"], c["shards"]) == (9, 6, 3, 54, 36, 5), c
    alone = str(tmp_path / "alone")  # the same shards as scan -> plan -> write in one process, no Ray
    build_shards(tiny_corpus, alone, clip_frames=4, clip_window=16, clips_per_scene=3, samples_per_shard=2,
                 max_side=160, val_fraction=0.34)
    assert shard_hashes(out) == shard_hashes(alone)


def _alive_nodes(address: str, env: dict) -> list[str]:
    """Node ids of the cluster's live nodes, asked by a separate driver."""
    code = ("import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps(sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])))")
    p = subprocess.run([sys.executable, "-c", code], env={**env, "RAY_ADDRESS": address}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
