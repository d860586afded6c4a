"""Downstream benchmarks of `launch/evaluate.py`: VSI-Bench, All-Angles Bench, BLINK multi-view.

One module per benchmark (`vsibench`, `allangles`, `blink`), each exposing the same small
interface that the runner (`runner.py`) drives:

- `NAME`, `DEFAULT_MAX_NEW_TOKENS`, `WHERE` (where the data come from, one line),
  `REFERENCE` (the reference code followed), `PROMPT_VERSION`, `HEADLINE` (the paper's
  headline sub-score key) and `LABEL` (its name in tables);
- `load(data, annotations, family) -> (root, annotation file, list[Question])`: read and
  validate the annotations (BenchmarkError, one line, on anything malformed); prompts may
  depend on the model family (All-Angles, as the authors' fork prompts each family);
- `missing_media(questions) -> list[str]`: files the selected questions need but lack;
- `missing_message(root, missing, total) -> str`: the one line telling the user what to get;
- `visuals(question, loader) -> list[PIL.Image]`: the images fed to the model
  (`loader.frames(video)` / `loader.image(path)` / `loader.image_bytes(data, name)`, resized);
- `scenes(questions) -> set[(dataset, scene)] | None`: the corpus scenes the questions are
  built on, for the training-leakage check (`leakage.py`; None: they name none);
- `score(record, prediction, reference, family) -> dict`: per-question score fields (pure,
  `scoring.py`, under a `references.Reference`);
- `aggregate(rows, reference, family) -> dict`, `metrics(aggregate) -> dict[str, float]`.

Scoring is pure and lives in `scoring.py` (numpy only), its versions in `references.py`;
`generation.py` runs the model; `video.py` samples frames with PyAV; `compare.py` puts two
models side by side; `leakage.py` checks benchmark scenes against training manifests.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

BENCHMARKS = {"vsi-bench": "vsibench", "all-angles": "allangles", "blink-multiview": "blink"}
"""`--benchmark` name -> module of this package."""


class BenchmarkError(Exception):
    """Missing or malformed benchmark files; the message is one line saying what is expected."""


@dataclass
class Question:
    """One benchmark question, ready for the model."""

    key: str
    """Unique id (the resume key in predictions.jsonl)."""
    prompt: str
    """The user turn's text (after the images)."""
    media: list[str]
    """Files it needs: [video] (VSI-Bench) or the view images (All-Angles)."""
    record: dict[str, Any] = field(default_factory=dict)
    """Fields saved with its prediction (ids, type or category, ground truth, ...)."""
    group: str = ""
    """Questions of one group share media (same scene video); they run next to each other."""
    payload: dict[str, Any] = field(default_factory=dict, repr=False)
    """What the model needs that is not saved with the prediction (BLINK's embedded image bytes)."""


def get(name: str) -> ModuleType:
    """The module of benchmark `name` (a key of BENCHMARKS)."""
    return importlib.import_module(f"{__name__}.{BENCHMARKS[name]}")


def given_annotations(name: str, data: str, annotations: str, expected: str,
                      where: str) -> tuple[str, str | None]:
    """(media root, annotation file or None) from `--data` / `--annotations`, the part every
    benchmark shares: an explicit `--annotations` file, or `--data` naming the file itself,
    else `--data` must be a folder (None: the benchmark looks inside it for its own names)."""
    if annotations:
        if not os.path.isfile(annotations):
            raise BenchmarkError(f"{name}: --annotations {annotations}: no such file; expected {expected}")
        return (data if os.path.isdir(data) else os.path.dirname(os.path.abspath(annotations))), annotations
    if os.path.isfile(data):
        return os.path.dirname(os.path.abspath(data)), data
    if not os.path.isdir(data):
        raise BenchmarkError(f"{name}: --data {data}: no such folder; download the benchmark from {where}")
    return data, None
