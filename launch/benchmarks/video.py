"""Uniform frame sampling of a video file with PyAV (no torchvision, no decord).

The frames kept are `np.linspace(0, n - 1, num_frames, dtype=int)` of the n frames of
the first video stream: the uniform sampling of lmms-eval's video loaders
(`load_video` of the LLaVA-style models; the Qwen2.5-VL model of
EvolvingLMMs-Lab/lmms-eval lmms_eval/models/simple/qwen2_5_vl.py subsamples its
decoded frames with the same linspace, default `max_num_frames` 32). Frames are
decoded once, in order; only the wanted ones are converted to RGB.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class VideoError(Exception):
    """A video that cannot be opened or decoded; the message is one line with the path."""


def frame_indices(n_frames: int, num: int) -> np.ndarray:
    """The indices kept out of `n_frames`: linspace(0, n - 1, num) truncated to int (may repeat)."""
    if n_frames < 1:
        raise ValueError("a video needs at least one frame")
    return np.linspace(0, n_frames - 1, num, dtype=int)


def _count_frames(container, stream) -> int:
    """Frames of `stream`: the container's count when it has one, else the demuxed packets."""
    n = int(stream.frames or 0)
    if n > 0:
        return n
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


@contextlib.contextmanager
def _video_stream(path: str):
    """(container, first video stream) of `path`, closed afterwards; VideoError (one line) otherwise."""
    import av

    try:
        container = av.open(path)
    except Exception as e:  # av.error.* (file missing, not a media file, ...)
        raise VideoError(f"cannot open video {path}: {type(e).__name__}: {e}") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path} holds no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def sample_frames(path: str, num_frames: int) -> list[np.ndarray]:
    """`num_frames` uint8 (H, W, 3) RGB frames sampled uniformly over the whole video."""
    with _video_stream(path) as (container, stream):
        return _sample(path, container, stream, num_frames)


def _sample(path: str, container, stream, num_frames: int) -> list[np.ndarray]:
    try:
        stream.thread_type = "AUTO"
        n = _count_frames(container, stream)
        if n < 1:
            raise VideoError(f"{path} holds no frames")
        wanted = frame_indices(n, num_frames)
        want_set = set(int(i) for i in wanted)
        last_wanted = int(wanted[-1])
        got: dict[int, np.ndarray] = {}
        i = -1
        for i, frame in enumerate(container.decode(stream)):
            if i in want_set:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last_wanted:
                break
        decoded = i + 1
        if decoded <= 0:
            raise VideoError(f"{path}: no frame could be decoded")
        if len(got) < len(want_set):
            # the container announced more frames than it decodes: repeat the last one decoded
            if not got:
                raise VideoError(f"{path}: none of the sampled frames could be decoded")
            log.warning("%s: %d frames announced, %d decoded; missing sampled frames repeat the last one",
                        path, n, decoded)
            for j in sorted(want_set - set(got)):
                got[j] = got[max((k for k in got if k < j), default=min(got))]
        return [got[int(j)] for j in wanted]
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"cannot decode video {path}: {type(e).__name__}: {e}") from None


def video_seconds(path: str) -> float:
    """Duration in seconds: the stream's frame count over its average frame rate (as qwen_vl_utils
    computes a video's sampling rate); the container's duration when the rate is unknown."""
    with _video_stream(path) as (container, stream):
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if rate > 0:
            return _count_frames(container, stream) / rate
        if container.duration:
            return container.duration / 1e6
        raise VideoError(f"{path}: neither a frame rate nor a duration")


class FrameCache:
    """A small LRU of processed frame lists keyed by (path, num_frames).

    Many VSI-Bench questions share one scene video; questions are processed grouped
    by scene, so a handful of entries avoids decoding a video twice.
    """

    def __init__(self, loader: Callable[[str, int], list], size: int = 4):
        self.loader, self.size = loader, size
        self._d: "collections.OrderedDict[tuple[str, int], list]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, num_frames: int) -> list:
        key = (path, num_frames)
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = self.loader(path, num_frames)
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value
