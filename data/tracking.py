"""MLflow: one store for shard jobs, training runs, probes and benchmarks (DESIGN §7).

`MLFLOW_TRACKING_URI` if set, else the local store `sqlite:///runs/mlflow.db`.
Rank 0 tracks; every other rank gets `NullTracker`, which has the same methods.
mlflow is imported lazily so that importing this module costs nothing.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any

DEFAULT_STORE = "sqlite:///runs/mlflow.db"
DEFAULT_EXPERIMENT = "gasp"
log = logging.getLogger(__name__)
_SECRET = re.compile(r"(key|secret|token|password|credential)", re.I)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    return uri


def mlflow_key(text: str) -> str:
    """A metric-name part MLflow accepts (letters, digits, _ - . / and space; anything else becomes _)."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in str(text))


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a credential; stringify long values."""
    out = {}
    for k, v in params.items():
        if _SECRET.search(k):
            continue
        s = str(v)
        out[k] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


class NullTracker:
    """What non-zero ranks (and runs with tracking off) get: every method does nothing."""

    run_id: str | None = None
    active = False

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """A thin wrapper over one MLflow run (created, or resumed by run id)."""

    active = True

    def __init__(self, run_name: str, experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                 tags: dict[str, Any] | None = None, system_metrics: bool = False):
        import mlflow

        self._mlflow = mlflow
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None and uri.startswith("sqlite:///"):
            # keep artifacts beside the sqlite store (not in ./mlruns of whatever the cwd is)
            root = os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlartifacts")
            try:
                mlflow.create_experiment(experiment, artifact_location=pathlib.Path(root).as_uri())
            except Exception:  # created meanwhile by another process
                pass
        mlflow.set_experiment(experiment)
        kw: dict[str, Any] = {"log_system_metrics": system_metrics}
        if run_id:
            self.run = mlflow.start_run(run_id=run_id, **kw)
        else:
            self.run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()},
                                        **kw)
        self.run_id = self.run.info.run_id
        self.experiment = experiment

    def log_params(self, params: dict[str, Any]) -> None:
        clean = scrub(params)
        items = list(clean.items())
        for i in range(0, len(items), 90):  # the store takes at most 100 params a batch
            try:
                self._mlflow.log_params(dict(items[i:i + 90]))
            except Exception as e:  # a resumed run re-logging the same params is fine
                log.debug("log_params: %s", e)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def git_commit(cwd: str | None = None) -> str | None:
    """The checkout's commit (with '-dirty' when there are local changes), or None."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or None
    except Exception:
        return None
