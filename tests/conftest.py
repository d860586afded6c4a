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
