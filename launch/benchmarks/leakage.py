"""Benchmark scenes in the training data: the check behind evaluate.py's one-line warning.

VSI-Bench is built from ScanNet, ScanNet++ and ARKitScenes videos (its annotations name
each question's `dataset` and `scene_name`); a model whose GASP training clips came from
those scenes is scored on rooms it saw. The training data are known from shard-job
manifests (pipeline/shard.py writes `splits: {train: [scene keys], val: [...]}` and
`config.format`; a scene key is the scene folder's path under the corpus root, e.g.
"scene0011_00" or "Training/41069025") named by `--check-training-manifest`, and from an
export's `gasp_training.json`:

    {"training_manifests": [{"url": str, "sha256": str | null, "format": str,
                             "splits": {"train": [scene keys], "val": [scene keys]}}]}

A benchmark scene matches a training scene when the key's last path component equals
the scene name and, when the manifest's format is one of the benchmark's source corpora
(scannet, scannetpp, arkitscenes), that corpus is the question's `dataset` (a `posed` or
other converted corpus matches by name). Only the train split is leakage; val-split
matches are reported beside it. ScanNet rescans of a benchmark room (scene0011_01 for
scene0011_00: the same room, another capture) are counted separately. Nothing is
downloaded: the benchmark side comes from the user's annotation files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from data.cli import one_line
from data.storage import read_json, url_join

EXPORT_FILE = "gasp_training.json"
SOURCE_CORPORA = ("scannet", "scannetpp", "arkitscenes")
"""Formats whose scenes can only match questions of the same `dataset`."""
_SCANNET_SCAN = re.compile(r"^(scene\d{4})_\d{2}$")


class ManifestError(Exception):
    """A training manifest that cannot be read or is malformed; one line naming the file and the field."""


@dataclass
class TrainingManifest:
    """The scenes of one training shard set."""

    url: str
    origin: str
    """Where it came from: "--check-training-manifest" or the export's gasp_training.json."""
    format: str | None
    train: list[str]
    val: list[str] = field(default_factory=list)
    sha256: str | None = None


def _keys(value: Any, where: str, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ManifestError(f"{where}: {what} must be a list of scene keys (scene folders under the corpus root), "
                            f"got {type(value).__name__}")
    return list(value)


def read_manifest(spec: str) -> TrainingManifest:
    """A shard job's manifest.json (`spec` the file, or the folder holding it; local or s3://)."""
    url = spec if spec.rstrip("/").endswith(".json") else url_join(spec, "manifest.json")
    try:
        data = read_json(url)
    except ValueError as e:
        raise ManifestError(f"--check-training-manifest {spec}: {url} is not JSON ({e})") from None
    except Exception as e:  # storage errors (permissions, endpoint)
        raise ManifestError(f"--check-training-manifest {spec}: cannot read {url} "
                            f"({type(e).__name__}: {one_line(e)})") from None
    if data is None:
        raise ManifestError(f"--check-training-manifest {spec}: no {url}; name a shard job's manifest.json or the "
                            "folder holding it")
    where = f"--check-training-manifest {url}"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a shard job manifest (a JSON object with splits and config)")
    if data.get("kind") == "instruction":
        raise ManifestError(f"{where}: an instruction-data manifest (kind instruction) holds no scenes; name the "
                            "manifest of a scene-clip shard job")
    splits = data.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        raise ManifestError(f"{where}: no splits.train (the scene keys of the train split, as pipeline/shard.py "
                            "writes them)")
    config = data.get("config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is not None and not isinstance(fmt, str):
        raise ManifestError(f"{where}: config.format must be a string, got {type(fmt).__name__}")
    return TrainingManifest(url=url, origin="--check-training-manifest", format=fmt,
                            train=_keys(splits["train"], where, "splits.train"),
                            val=_keys(splits.get("val", []), where, "splits.val"))


def read_export(model_dir: str) -> list[TrainingManifest] | None:
    """The training manifests an export records in DIR/gasp_training.json; None when it has no such file."""
    path = os.path.join(model_dir, EXPORT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise ManifestError(f"--model {model_dir}: {path} is not JSON ({e})") from None
    where = f"--model {model_dir}: {path}"
    entries = data.get("training_manifests") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: training_manifests must be a list of {{url, sha256, format, splits}}")
    out = []
    for i, e in enumerate(entries):
        at = f"training_manifests[{i}]"
        if not isinstance(e, dict):
            raise ManifestError(f"{where}: {at} must be an object with url, sha256, format, splits")
        if not isinstance(e.get("url"), str) or not e["url"]:
            raise ManifestError(f"{where}: {at}.url must be the manifest's URL (a string)")
        if e.get("sha256") is not None and not isinstance(e["sha256"], str):
            raise ManifestError(f"{where}: {at}.sha256 must be a string or null")
        if not isinstance(e.get("format"), str) or not e["format"]:
            raise ManifestError(f"{where}: {at}.format must be the corpus layout (a string, e.g. scannet)")
        splits = e.get("splits")
        if not isinstance(splits, dict) or "train" not in splits:
            raise ManifestError(f"{where}: {at}.splits must be {{\"train\": [scene keys], \"val\": [scene keys]}}")
        out.append(TrainingManifest(url=e["url"], origin=path, format=e["format"], sha256=e.get("sha256"),
                                    train=_keys(splits["train"], where, f"{at}.splits.train"),
                                    val=_keys(splits.get("val", []), where, f"{at}.splits.val")))
    return out


def _scene_of(key: str) -> str:
    return key.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _room(dataset: str, scene: str) -> str | None:
    m = _SCANNET_SCAN.match(scene) if dataset == "scannet" else None
    return m.group(1) if m else None


def check(bench_scenes: Iterable[tuple[str, str]], manifests: list[TrainingManifest]) -> dict[str, Any]:
    """Which benchmark scenes (dataset, scene_name) are in the manifests' train (and val) splits.

    Returns {"checked": True, "n_benchmark_scenes", "n_train_overlap", "train_scenes": ["dataset/scene", ...],
    "n_val_overlap", "val_scenes", "n_rescan_overlap", "rescan_scenes", "manifests": [{url, origin, format,
    sha256, n_train, n_val, n_train_overlap}]}.
    """
    scenes = sorted(set(bench_scenes))
    train_hits: dict[tuple[str, str], list[str]] = {}
    val_hits: set[tuple[str, str]] = set()
    rescan_hits: set[tuple[str, str]] = set()
    per_manifest = []
    for m in manifests:
        train_names = {_scene_of(k) for k in m.train}
        val_names = {_scene_of(k) for k in m.val}
        train_rooms = {r for n in train_names if (r := _room("scannet", n))}
        n_hit = 0
        for ds, sc in scenes:
            if m.format in SOURCE_CORPORA and m.format != ds:
                continue
            if sc in train_names:
                train_hits.setdefault((ds, sc), []).append(m.url)
                n_hit += 1
            elif _room(ds, sc) in train_rooms:  # another scan of the same ScanNet room
                rescan_hits.add((ds, sc))
            if sc in val_names:
                val_hits.add((ds, sc))
        per_manifest.append({"url": m.url, "origin": m.origin, "format": m.format, "sha256": m.sha256,
                             "n_train": len(m.train), "n_val": len(m.val), "n_train_overlap": n_hit})
    rescan_hits -= set(train_hits)
    name = lambda s: f"{s[0]}/{s[1]}"  # noqa: E731
    return {"checked": True, "n_benchmark_scenes": len(scenes),
            "n_train_overlap": len(train_hits), "train_scenes": [name(s) for s in sorted(train_hits)],
            "n_val_overlap": len(val_hits), "val_scenes": [name(s) for s in sorted(val_hits)],
            "n_rescan_overlap": len(rescan_hits), "rescan_scenes": [name(s) for s in sorted(rescan_hits)],
            "manifests": per_manifest}


def warning(benchmark: str, report: dict[str, Any], n_questions: int) -> str | None:
    """The one warning line when benchmark scenes are in a train split (None when none is)."""
    if not report.get("n_train_overlap") and not report.get("n_rescan_overlap"):
        return None
    parts = [f"{m['url']}: {m['n_train_overlap']}" for m in report["manifests"] if m["n_train_overlap"]]
    first = (report["train_scenes"] or report["rescan_scenes"])[:3]
    extra = (f" (+{report['n_rescan_overlap']} ScanNet rooms trained on through another scan)"
             if report["n_rescan_overlap"] else "")
    return (f"WARNING: {report['n_train_overlap']} of {report['n_benchmark_scenes']} {benchmark} scenes are in the "
            f"train split of the training data{extra}"
            f"{' (' + '; '.join(parts) + ')' if parts else ''}; {n_questions} questions ask about scenes the model "
            f"was trained on (first: {', '.join(first)}); the list is in results.json training_leakage")
