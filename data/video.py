"""Uniform frame sampling of a video file with PyAV (no torchvision, no decord).

The frames kept are `np.linspace(0, n - 1, num_frames, dtype=int)` of the n frames of
the first video stream: the uniform sampling of lmms-eval's video loaders
(`load_video` of the LLaVA-style models; the Qwen2.5-VL model of
EvolvingLMMs-Lab/lmms-eval lmms_eval/models/simple/qwen2_5_vl.py subsamples its
decoded frames with the same linspace, default `max_num_frames` 32) and of LLaVA-Video's
training loader (LLaVA-VL/LLaVA-NeXT `process_video_with_decord`: linspace over the frame
count once a video has more than `frames_upbound` frames, timestamps `index / fps`).
Frames are decoded once, in order; only the wanted ones are converted to RGB.

Two entry points:
- `sample_frames(path, num)`: exactly `num` frames (indices may repeat for a short video), as
  the benchmark evaluators feed models;
- `sample_video(source, max_frames)`: at most `max_frames` distinct frames with the seconds at
  which each is shown (what instruction shards store, DESIGN §4.2). `source` is a path or a
  seekable binary file object (a video read from s3:// into memory).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Union

import numpy as np

log = logging.getLogger(__name__)

Source = Union[str, BinaryIO]
# sample_video refuses a video that decodes to fewer than this share of the frames its container
# announces: what a truncated upload looks like (a few missing frames are common and resampled).
MIN_DECODED_SHARE = 0.9


class VideoError(Exception):
    """A video that cannot be opened or decoded; the message is one line with the path."""


def frame_indices(n_frames: int, num: int) -> np.ndarray:
    """The indices kept out of `n_frames`: linspace(0, n - 1, num) truncated to int (may repeat)."""
    if n_frames < 1:
        raise ValueError("a video needs at least one frame")
    return np.linspace(0, n_frames - 1, num, dtype=int)


def _name(source: Source, name: str | None) -> str:
    return name or (source if isinstance(source, str) else getattr(source, "name", "<video bytes>"))


def _count_frames(container, stream) -> int:
    """Frames of `stream`: the container's count when it has one, else the demuxed packets."""
    n = int(stream.frames or 0)
    if n > 0:
        return n
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


@contextlib.contextmanager
def open_video(source: Source, name: str | None = None):
    """(container, first video stream) of a path or binary file object, closed afterwards;
    VideoError (one line naming the video) otherwise."""
    import av

    where = _name(source, name)
    try:
        container = av.open(source)
    except Exception as e:  # av.error.* (file missing, not a media file, ...)
        raise VideoError(f"cannot open video {where}: {type(e).__name__}: {e}") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{where} holds no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _decode(where: str, container, stream, wanted: np.ndarray) -> tuple[dict[int, tuple[np.ndarray, float | None]], int]:
    """Decode in order up to the last wanted index: ({index: (RGB (H, W, 3) uint8, seconds or None)}, frames
    decoded). Seconds are the frame's presentation time (pts * time_base), None when it has none."""
    want_set = set(int(i) for i in wanted)
    last_wanted = int(wanted[-1])
    got: dict[int, tuple[np.ndarray, float | None]] = {}
    i = -1
    for i, frame in enumerate(container.decode(stream)):
        if i in want_set:
            t = frame.time
            got[i] = (frame.to_ndarray(format="rgb24"), None if t is None else float(t))
        if i >= last_wanted:
            break
    decoded = i + 1
    if decoded <= 0:
        raise VideoError(f"{where}: no frame could be decoded")
    return got, decoded


def sample_frames(path: str, num_frames: int) -> list[np.ndarray]:
    """`num_frames` uint8 (H, W, 3) RGB frames sampled uniformly over the whole video."""
    with open_video(path) as (container, stream):
        return _sample(path, container, stream, num_frames)


def _sample(path: str, container, stream, num_frames: int) -> list[np.ndarray]:
    try:
        stream.thread_type = "AUTO"
        n = _count_frames(container, stream)
        if n < 1:
            raise VideoError(f"{path} holds no frames")
        wanted = frame_indices(n, num_frames)
        want_set = set(int(i) for i in wanted)
        got_t, decoded = _decode(path, container, stream, wanted)
        got = {k: v[0] for k, v in got_t.items()}
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


@dataclass
class SampledVideo:
    """Frames sampled uniformly over a video, in time order."""

    frames: list[np.ndarray]
    """RGB uint8 (H, W, 3) each."""
    timestamps: list[float]
    """Seconds at which each kept frame is shown, from the first frame (0.0), increasing."""
    indices: list[int]
    """Position of each kept frame among the decoded frames."""
    n_frames: int
    """Frames of the video (as decoded when the container's count was wrong)."""
    seconds: float
    """Duration: frames over the average frame rate (as `video_seconds`)."""


def sample_video(source: Source, max_frames: int, name: str | None = None) -> SampledVideo:
    """At most `max_frames` distinct frames, `linspace(0, n - 1, min(max_frames, n))`, with their timestamps.

    A container that announces more frames than it decodes is resampled over the frames it does
    decode, unless fewer than MIN_DECODED_SHARE of them decode (a truncated file): VideoError.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 (got {max_frames})")
    where = _name(source, name)
    with open_video(source, name) as (container, stream):
        try:
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            n = _count_frames(container, stream)
            if n < 1:
                raise VideoError(f"{where} holds no frames")
            wanted = frame_indices(n, min(max_frames, n))
            got, decoded = _decode(where, container, stream, wanted)
            if len(got) < len(wanted):  # fewer frames than announced: sample over what decodes
                if decoded < MIN_DECODED_SHARE * n:
                    raise VideoError(f"{where}: truncated or corrupt, {decoded} of {n} announced frames decode")
                log.warning("%s: %d frames announced, %d decoded; sampling over the decoded ones", where, n, decoded)
                n = decoded
                wanted = frame_indices(n, min(max_frames, n))
                container.seek(0)
                got, decoded = _decode(where, container, stream, wanted)
                if len(got) < len(wanted):
                    raise VideoError(f"{where}: decodes differently on a second pass")
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"cannot decode video {where}: {type(e).__name__}: {e}") from None
    idx = [int(i) for i in wanted]
    times = [got[i][1] for i in idx]
    if rate > 0 and any(t is None for t in times):
        times = [i / rate for i in idx]  # no presentation times: the frame rate's
    elif any(t is None for t in times):
        raise VideoError(f"{where}: neither presentation times nor a frame rate")
    t0 = times[0]
    stamps = [round(t - t0, 6) for t in times]
    if any(b <= a for a, b in zip(stamps, stamps[1:])):
        raise VideoError(f"{where}: frame times do not increase ({stamps[:8]}...)")
    seconds = n / rate if rate > 0 else stamps[-1]
    return SampledVideo([got[i][0] for i in idx], stamps, idx, n, float(seconds))


def video_seconds(path: str) -> float:
    """Duration in seconds: the stream's frame count over its average frame rate (as qwen_vl_utils
    computes a video's sampling rate); the container's duration when the rate is unknown."""
    with open_video(path) as (container, stream):
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if rate > 0:
            return _count_frames(container, stream) / rate
        if container.duration:
            return container.duration / 1e6
        raise VideoError(f"{path}: neither a frame rate nor a duration")


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = 4.0, codec: str = "libx264",
                **options: Any) -> None:
    """Write RGB uint8 frames (H, W, 3), even H and W, as a video file (tests, demo data, benchmarks).

    `frames` may be a generator (a long video need not sit in memory); `options` go to the
    encoder (e.g. preset="veryfast", crf=23, or qp=0 for lossless libx264).
    """
    import fractions
    import itertools

    import av

    it = iter(frames)
    first = next(it)
    H, W = first.shape[:2]
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        if options:
            s.options = {k: str(v) for k, v in options.items()}
        for a in itertools.chain([first], it):
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a, dtype=np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
