"""Ray side of the shard job: start or join Ray, run stage functions as tasks with retries.

Kept apart from `pipeline/stages.py` (plain functions, no Ray) and from the CLI, and
importable by workers (a function of `__main__` would be shipped by value instead).
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable

from data.progress import Progress
from pipeline import stages

# Ray retries a task whose worker died (SIGKILL, OOM, node loss) by itself this many
# times; a task that returned {"ok": False} is resubmitted by the driver (--retries).
SYSTEM_RETRIES = 4
WAIT_S = 0.25  # the driver collects finished tasks (and resubmits failed ones) at least this often
IN_FLIGHT_PER_CPU, MIN_IN_FLIGHT = 4, 64  # tasks submitted ahead of the cluster's CPUs
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by the job supervisor of `ray job submit`
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_ray(num_cpus: int = 0, quiet: bool = False) -> tuple[str, bool]:
    """Join Ray and say where: (description, whether this call started it).

    - already initialised in this process (tests): reuse it;
    - RAY_ADDRESS set (a cluster, or the driver of `ray job submit`): join it; a plain
      driver (not a submitted job) ships `data/` and `pipeline/` as py_modules so that
      workers on other nodes can import them;
    - else: a local Ray in this process, every process on 127.0.0.1, no dashboard.
    """
    import ray

    if ray.is_initialized():
        return f"existing Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)", False
    address = os.environ.get("RAY_ADDRESS")
    kw: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": not quiet}
    if address:
        if JOB_CONFIG_ENV not in os.environ:
            kw["runtime_env"] = {"py_modules": [os.path.join(REPO, "data"), os.path.join(REPO, "pipeline")]}
        ray.init(address=address, **kw)
        where = "ray job" if JOB_CONFIG_ENV in os.environ else "cluster"
        return f"{where} at {address} ({int(ray.cluster_resources().get('CPU', 0))} CPUs)", True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kw.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    if num_cpus:
        kw["num_cpus"] = num_cpus
    ray.init(**kw)
    return f"local Ray in this process ({int(ray.cluster_resources().get('CPU', 0))} CPUs)", True


# ------------------------------------------------------------------------- tasks

def _node_id() -> str:
    """The Ray node this task runs on (hex), reported with each status so the driver can say where."""
    import ray

    return ray.get_runtime_context().get_node_id()


def scan_task(url: str, cfg: stages.JobConfig) -> tuple[dict[str, Any], Any]:
    """stages.scan_scene, with the scene shell as a second return (it stays in the object store)."""
    res = stages.scan_scene(url, cfg)
    shell = res.pop("shell", None)
    res["node"] = _node_id()
    return res, shell


_RUN = {"id": None}


def write_task(entry: dict[str, Any], cfg: stages.JobConfig, shell_refs: dict[str, Any] | None,
               run_id: str = "") -> dict[str, Any]:
    """stages.write_shard, after fetching the shells of the shard's scenes from the object store.

    A worker keeps the scenes it opened for the shards of one run (run_id); a new run (a rerun
    in the same driver, on a corpus that may have changed) starts from an empty cache.
    """
    import ray

    if run_id != _RUN["id"]:
        stages.clear_scene_cache()
        _RUN["id"] = run_id
    shells = None
    if shell_refs:
        keys = sorted(shell_refs)
        try:
            shells = dict(zip(keys, ray.get([shell_refs[k] for k in keys])))
        except Exception:  # a lost shell (its node died): open the scenes instead
            shells = None
    return {**stages.write_shard(entry, cfg, shells), "node": _node_id()}


def synthetic_task(root: str, name: str, seed: int, n_frames: int, motion: str = "walk", hfov: float = 70.0,
                   objects: bool = False) -> dict[str, Any]:
    """Render one scene of the embedded default corpus (data.synthetic, posed layout)."""
    from data import synthetic

    try:
        synthetic.write_scene(root, name, seed=seed, n_frames=n_frames, motion=motion, hfov=hfov, objects=objects)
        return {"ok": True, "name": name}
    except Exception as e:
        return {"ok": False, "name": name, "error": stages.one_line(f"{type(e).__name__}: {e}")}


def run_tasks(fn: Callable, items: list[Any], args_of: Callable[[Any], tuple], progress: Progress,
              retries: int, label: Callable[[Any], str], name: str, num_returns: int = 1,
              amount: Callable[[dict[str, Any]], int] | None = None) -> list[tuple[Any, dict[str, Any], Any]]:
    """Run `fn(*args_of(item))` as one Ray task per item; returns [(item, status, extra ref)].

    The first return of a task is its status dict; with num_returns=2 the second stays
    a reference (`extra ref`). A worker that dies is retried by Ray (SYSTEM_RETRIES);
    a status {"ok": False} or an error that outlived Ray's retries is resubmitted here
    up to `retries` times, then reported as failed. At most IN_FLIGHT_PER_CPU tasks per
    cluster CPU are submitted at a time (the rest follow as tasks finish), so the driver's and
    Ray's queues stay the size of the cluster, not of the job.
    """
    import ray

    remote = ray.remote(fn).options(name=name, num_cpus=1, max_retries=SYSTEM_RETRIES, retry_exceptions=False,
                                    num_returns=num_returns)
    pending: dict[Any, tuple[Any, int, Any]] = {}
    queue = collections.deque((it, 0) for it in items)  # (item, tries) not yet submitted
    window = max(MIN_IN_FLIGHT, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))

    def submit(it: Any, tries: int) -> None:
        refs = remote.remote(*args_of(it))
        first, extra = (refs[0], refs[1]) if num_returns == 2 else (refs, None)
        pending[first] = (it, tries, extra)

    results: list[tuple[Any, dict[str, Any], Any]] = []
    while queue or pending:
        while queue and len(pending) < window:
            submit(*queue.popleft())
        # everything that finished within WAIT_S (or all): one O(window) call per batch of results,
        # not per result (num_returns=1 over all pending made 10,000 tasks cost 10,000 scans of the list)
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=WAIT_S)
        if not done:
            progress.step(0)
            continue
        try:
            statuses = ray.get(done)  # one call for the batch
        except Exception:  # some task raised: fetch one by one to tell which
            statuses = None
        for k, ref in enumerate(done):
            it, tries, extra = pending.pop(ref)
            try:
                res = statuses[k] if statuses is not None else ray.get(ref)
            except Exception as e:  # the task's worker kept dying, or the task itself raised
                res = {"ok": False, "name": label(it), "error": stages.one_line(f"{type(e).__name__}: {e}")}
            if not res.get("ok") and res.get("retryable", True) and tries < retries:
                print(f"[retry] {label(it)}: {res.get('error')}", flush=True)
                queue.appendleft((it, tries + 1))
                continue
            results.append((it, res, extra))
            progress.step(1, amount(res) if amount else 0)
    nodes = collections.Counter(res["node"] for _, res, _ in results if res.get("node"))
    if nodes and not progress.quiet:  # where the work ran (a cluster node that took none stands out)
        print(f"[{progress.stage}] {sum(nodes.values())} tasks ran on {len(nodes)} node(s): "
              + ", ".join(f"{node[:12]} {n}" for node, n in sorted(nodes.items())), flush=True)
    return results
