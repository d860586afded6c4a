"""Shard-set specs and what a shard job recorded beside its shards (no torch: entry points
check their `--shards` flags with this before anything heavy is imported).

    parse_spec("runs/a/manifest.json:0.7") -> ("runs/a/manifest.json", 0.7)
    recorded("runs/shards")                -> Recorded(manifest, manifest_sha256, kind, clip_frames, format, ...)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

from data.storage import open_fs

log = logging.getLogger(__name__)


def parse_spec(spec: str) -> tuple[str, float | None]:
    """`LOCATION[:WEIGHT]` -> (location, weight or None). The weight follows the last colon."""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            weight = float(tail)
        except ValueError:
            return spec, None
        if not head:
            raise ValueError(f"shard spec {spec!r}: no location before the weight")
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"shard spec {spec!r}: the weight must be a positive number")
        return head, weight
    return spec, None


@dataclass
class Recorded:
    """What the shard job wrote beside a shard set (all None when nothing is found)."""

    manifest: str | None = None
    manifest_sha256: str | None = None
    kind: str | None = None
    """The manifest's kind: 'clips' or 'instruction'."""
    clip_frames: int | None = None
    """The most frames a clip of the set holds (2 for version-1 pair shards)."""
    format: str | None = None
    """The corpus layout the set was made from (scannet, arkitscenes, ...)."""
    splits: dict | None = None
    """{split: [scene keys]} of a clip manifest (what the evaluator's leakage check reads)."""
    recorded_from: str | None = None
    """'manifest.json' or 'plan.json'."""


def _candidates(location: str) -> list[str]:
    """Where a set's records may be: its manifest, else the shard job's plan.json."""
    if location.endswith(".json"):
        return [location]
    if location.endswith(".tar") or "{" in location or "::" in location:
        folder = location.split("::")[0].rsplit("/", 1)[0] if "/" in location else "."
    else:
        folder = location.rstrip("/")
    return [folder + "/manifest.json", folder + "/plan.json"]


def _read(url: str) -> tuple[dict, str] | None:
    try:
        fs, path = open_fs(url)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            data = f.read()
        return json.loads(data.decode("utf-8")), hashlib.sha256(data).hexdigest()
    except Exception as e:  # unreadable records only cost the defaults
        log.debug("cannot read %s: %s", url, e)
        return None


def recorded(location: str) -> Recorded:
    """The manifest (and its sha256), kind, clip size, corpus layout and splits of a shard set's location."""
    out = Recorded()
    for url in _candidates(location):
        got = _read(url)
        if got is None:
            continue
        doc, digest = got
        config = doc.get("config") or {}
        if out.manifest is None and not url.endswith("plan.json"):
            out.manifest, out.manifest_sha256 = url, digest
        out.kind = out.kind or str(doc.get("kind") or "clips")
        if out.clip_frames is None:
            k = config.get("clip_frames")
            if k is None and int(str(doc.get("format_version", 2)).split(".")[0]) == 1:
                k = 2
            out.clip_frames = int(k) if k is not None else None
        out.format = out.format or config.get("format")
        if out.splits is None and isinstance(doc.get("splits"), dict):
            out.splits = doc["splits"]
        out.recorded_from = out.recorded_from or url.rsplit("/", 1)[-1]
    return out
