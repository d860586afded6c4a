"""The evaluation loop: resumable predictions, batched generation, progress, results, MLflow.

Output folder (one per benchmark x model x settings):

    OUT/run.json            the settings the predictions were made with; a rerun with other
                            settings is refused (unless --overwrite), so answers never mix
    OUT/predictions.jsonl   one JSON line per answered question, appended and fsync'ed after
                            every batch; a rerun skips the questions it holds (a torn last
                            line from a crash is dropped)
    OUT/results.json        scores recomputed from predictions.jsonl (written atomically), under
                            the benchmark's default reference version; results-<version>.json
                            under another `--reference`
"""
from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from data.progress import Progress
from launch.benchmarks import BenchmarkError, Question
from launch.benchmarks import generation
from launch.benchmarks.video import FrameCache, VideoError, sample_frames, video_seconds

RUN_FILE, PREDICTIONS, RESULTS = "run.json", "predictions.jsonl", "results.json"
RUN_VERSION = 1


class MediaError(Exception):
    """An image or video that cannot be read mid-run; one line naming the file."""


# ------------------------------------------------------------------ output folder

def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


LEGACY_VALUES = {"frames_as": {"images": "clip"}}
"""Signature values written by earlier versions under another name (--frames-as images is now clip)."""


def prepare_output(out: str, signature: dict[str, Any], overwrite: bool) -> None:
    """Create OUT and its run.json; BenchmarkError if OUT holds predictions of other settings."""
    os.makedirs(out, exist_ok=True)
    run_path = os.path.join(out, RUN_FILE)
    old = None
    if os.path.isfile(run_path):
        try:
            with open(run_path, encoding="utf-8") as f:
                old = json.load(f).get("signature")
        except (OSError, ValueError):
            old = None
    if isinstance(old, dict):
        old = {k: LEGACY_VALUES.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in old.items()}
    has_preds = os.path.isfile(os.path.join(out, PREDICTIONS))
    if (old is not None and old != signature) or (old is None and has_preds):
        if not overwrite:
            diff = sorted(k for k in set(old or {}) | set(signature) if (old or {}).get(k) != signature.get(k))
            raise BenchmarkError(f"{out} holds predictions made with other settings ({', '.join(diff)} differ); "
                                 f"use another --output or pass --overwrite to discard them")
        for name in [PREDICTIONS, RESULTS] + sorted(os.path.basename(p) for p in
                                                    glob.glob(os.path.join(out, "results-*.json"))):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        old = None
    if old is None:
        _write_atomic(run_path, json.dumps({"version": RUN_VERSION, "signature": signature,
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")


class PredictionStore:
    """OUT/predictions.jsonl: load what is there (repairing a torn tail), append batches durably."""

    def __init__(self, out: str):
        self.path = os.path.join(out, PREDICTIONS)

    def load(self) -> dict[str, dict[str, Any]]:
        """{key: row} of the saved predictions (first occurrence of a key wins)."""
        if not os.path.isfile(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        rows: dict[str, dict[str, Any]] = {}
        bad = 0
        lines = text.split("\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = str(row["key"])
                _ = row["prediction"]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            rows.setdefault(key, row)
        n_lines = sum(1 for ln in lines if ln.strip())
        if bad or len(rows) != n_lines or (text and not text.endswith("\n")):
            # a crash mid-write leaves a torn last line: rewrite the file with the whole rows only
            _write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()))
            if bad:
                print(f"[eval] dropped {bad} incomplete line(s) of {self.path}", file=sys.stderr, flush=True)
        return rows

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------ media

class MediaLoader:
    """Images for the model: video frames (sampled, cached per video) and view images, resized."""

    def __init__(self, resize: Callable[[np.ndarray], Any], num_frames: int, cache_videos: int = 4,
                 frame_resize: Callable[[np.ndarray], Any] | None = None):
        self.resize, self.num_frames = resize, num_frames
        self.frame_resize = frame_resize or resize
        self._videos = FrameCache(self._load_video, size=cache_videos)
        self._seconds: dict[str, float] = {}

    def _load_video(self, path: str, num: int) -> list:
        try:
            return [self.frame_resize(f) for f in sample_frames(path, num)]
        except VideoError as e:
            raise MediaError(str(e)) from None

    def frames(self, path: str) -> list:
        return self._videos.get(path, self.num_frames)

    def seconds(self, path: str) -> float:
        """The video's duration (cached)."""
        if path not in self._seconds:
            try:
                self._seconds[path] = video_seconds(path)
            except VideoError as e:
                raise MediaError(str(e)) from None
        return self._seconds[path]

    def image(self, path: str):
        from PIL import Image

        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise MediaError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        return self.resize(rgb)

    def image_bytes(self, data: bytes, name: str):
        """An image embedded in the annotation file (encoded bytes), RGB, resized; `name` for messages."""
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise MediaError(f"cannot decode embedded image {name}: {type(e).__name__}: {e}") from None
        return self.resize(rgb)


# ------------------------------------------------------------------ the loop

def order_by_group(questions: Sequence[Question]) -> list[Question]:
    """Questions sharing media next to each other (groups in order of first appearance, stable)."""
    first: dict[str, int] = {}
    for i, q in enumerate(questions):
        first.setdefault(q.group, i)
    return sorted(questions, key=lambda q: first[q.group])


def batches(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def run(pending: Sequence[Question], bench, model, processor, loader: MediaLoader, store: PredictionStore, *,
        batch_size: int, max_new_tokens: int, device, resized: bool, progress: Progress,
        as_video: bool = False, family: str | None = None) -> int:
    """Answer `pending` in batches, appending each batch to the store. Returns the number answered.

    The media of the next batch are decoded in a background thread while the model
    generates the current one. `as_video`: a video question's frames go in as one video
    input (Qwen), with the video's duration, instead of as images. Each saved row carries
    its score under the benchmark's default reference version (`family` for the versions
    whose post-processing depends on it); results files rescore under `--reference`.
    """
    as_video = as_video and getattr(bench, "IS_VIDEO", False)
    system = getattr(bench, "system_prompt", lambda family: None)(family)  # the reference's system turn
    todo = list(batches(order_by_group(pending), batch_size))
    if not todo:
        return 0

    def visuals(batch: list[Question]) -> list[tuple[list, float | None]]:
        return [(bench.visuals(q, loader), loader.seconds(q.media[0]) if as_video else None) for q in batch]

    n = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(visuals, todo[0])
        for i, batch in enumerate(todo):
            images = nxt.result()
            if i + 1 < len(todo):
                nxt = pool.submit(visuals, todo[i + 1])
            requests = [generation.Request(images=ims, text=q.prompt, video_seconds=sec, system=system)
                        for q, (ims, sec) in zip(batch, images)]
            images = [ims for ims, _ in images]
            answers = generation.generate_batch(model, processor, requests, max_new_tokens=max_new_tokens,
                                                device=device, resized=resized)
            rows = []
            for q, ims, ans in zip(batch, images, answers):
                row = {"key": q.key, **q.record, "prompt": q.prompt, "n_images": len(ims), "prediction": ans}
                row.update(bench.score(q.record, ans, family=family))
                rows.append(row)
            store.append(rows)
            n += len(rows)
            progress.step(len(rows))
    return n


# ------------------------------------------------------------------ results and tracking

def results_name(reference: str, default: str) -> str:
    """results.json under the benchmark's default reference version, results-<version>.json under another
    (so rescoring a finished run under several versions keeps each)."""
    return RESULTS if reference == default else f"results-{reference}.json"


def write_results(out: str, results: dict[str, Any], name: str = RESULTS) -> str:
    path = os.path.join(out, name)
    _write_atomic(path, json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n")
    return path


_METRIC_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(key: str) -> str:
    """A key MLflow accepts (alphanumerics, _ - . space : /)."""
    return _METRIC_BAD.sub("_", key)


def log_mlflow(params: dict[str, Any], metrics: dict[str, float], artifacts: Sequence[str], *, run_name: str,
               experiment: str, tags: dict[str, Any]) -> str:
    """One MLflow run in the shared store (MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db); its id."""
    from data.tracking import MlflowTracker

    tracker = MlflowTracker(run_name=run_name, experiment=experiment, tags=tags)
    status = "FAILED"
    try:
        tracker.log_params(params)
        tracker.log_metrics({metric_name(k): v for k, v in metrics.items()})
        for path in artifacts:
            tracker.log_artifact(path)
        status = "FINISHED"
        return tracker.run_id
    finally:
        tracker.end(status)
