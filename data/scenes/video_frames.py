"""Frames of a video file decoded only where a reader needs them (PyAV): a reader capability.

A corpus that ships its RGB as one video (ScanNet++ iPhone `rgb.mkv`; ARKit-style captures)
numbers its frames in presentation order from 0, as `ffmpeg -i rgb.mkv -start_number 0
frame_%06d.jpg` writes them for a constant-rate stream (the ScanNet++ toolkit's
`iphone/prepare_iphone_data.py extract_rgb`). Two parts:

- `VideoIndex.build(url)`: ONE demux pass (packets only, nothing decoded) that records every
  frame's presentation timestamp and which frames are keyframes. It is plain numbers, so it
  pickles with the scene into the shard job's scene shell: write tasks never rescan.
- `VideoFrames(index, url)`: per process, opened on first use. `get(k)` returns frame k: when
  the decoder already stands before k in k's group of pictures it decodes forward; otherwise
  it seeks (by timestamp) to the keyframe at or before k and decodes from there. Frames it
  passes on the way that the caller will want (`keep`) are kept (converted by `transform`) in
  a small cache, so a clip's frames of one group of pictures cost one decode each.
  `stats` counts frames decoded against frames returned: the decode cost per used frame.

A decode cost of c frames per used frame means the reader decoded c video frames for each
frame the plan uses: about half a group of pictures for scattered frames, 1 for frames read
in order.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from data.storage import is_local, open_fs

STREAM_BLOCK = 4 << 20  # read-ahead of the video file object on an object store
CACHE_FRAMES = 32  # converted frames kept per video (only frames the caller asked to keep)


class VideoError(Exception):
    """A video that cannot be opened, indexed or decoded at a frame; the message is one line."""


def _open_container(url: str):
    """(container, file object or None): local paths go to FFmpeg directly, others through fsspec."""
    import av

    fs, path = open_fs(url)
    if is_local(fs):
        return av.open(path), None
    f = fs.open(path, "rb", cache_type="readahead", block_size=STREAM_BLOCK)
    try:
        return av.open(f), f
    except Exception:
        f.close()
        raise


@dataclass
class VideoIndex:
    """Presentation timestamps of every frame of a video's first video stream, and its keyframes."""

    url: str
    pts: np.ndarray
    """(N,) int64 presentation timestamps, ascending: frame k has pts[k] (stream time base)."""
    keyframe: np.ndarray
    """(N,) bool: frame k is a keyframe (decoding can start there)."""
    time_base: Fraction
    size: tuple[int, int]
    """(W, H) of the decoded frames."""
    fps: float | None = None
    codec: str = ""
    key_before: np.ndarray = field(default=None, repr=False)
    """(N,) int64: the last keyframe at or before each frame (-1 when none)."""

    def __post_init__(self) -> None:
        if self.key_before is None:
            idx = np.where(self.keyframe, np.arange(len(self.pts)), -1)
            self.key_before = np.maximum.accumulate(idx) if len(idx) else idx

    def __len__(self) -> int:
        return len(self.pts)

    def seconds(self, k: int) -> float:
        return float((self.pts[k] - self.pts[0]) * self.time_base)

    @classmethod
    def build(cls, url: str) -> "VideoIndex":
        """Demux every packet once (no decoding). VideoError (one line) if it is not a video."""
        try:
            container, f = _open_container(url)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise VideoError(f"cannot open video {url}: {type(e).__name__}: {e}") from None
        try:
            if not container.streams.video:
                raise VideoError(f"{url} holds no video stream")
            stream = container.streams.video[0]
            pts, key = [], []
            try:
                for p in container.demux(stream):
                    if p.size == 0 or p.pts is None:  # flush packets; a stream without pts is refused below
                        if p.size and p.pts is None:
                            raise VideoError(f"{url}: video packets carry no timestamps (remux it, e.g. "
                                             f"ffmpeg -i IN -c copy OUT.mkv)")
                        continue
                    pts.append(int(p.pts))
                    key.append(bool(p.is_keyframe))
            except VideoError:
                raise
            except Exception as e:  # a truncated or corrupt container: keep what demuxed
                if not pts:
                    raise VideoError(f"cannot read video {url}: {type(e).__name__}: {e}") from None
            if not pts:
                raise VideoError(f"{url} holds no frames")
            order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
            pts_sorted = np.asarray(pts, dtype=np.int64)[order]
            if np.any(np.diff(pts_sorted) == 0):
                raise VideoError(f"{url}: two frames share a timestamp; frames cannot be told apart")
            cc = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate
            return cls(url=url, pts=pts_sorted, keyframe=np.asarray(key, dtype=bool)[order],
                       time_base=Fraction(stream.time_base), size=(int(cc.width), int(cc.height)),
                       fps=float(rate) if rate else None, codec=str(cc.name))
        finally:
            container.close()
            if f is not None:
                f.close()


class VideoFrames:
    """Frames of an indexed video, decoded on demand with seeking (see module docstring)."""

    def __init__(self, index: VideoIndex, url: str | None = None,
                 transform: Callable[[np.ndarray], Any] | None = None, keep: set[int] | None = None,
                 cache_frames: int = CACHE_FRAMES):
        self.index, self.url = index, url or index.url
        self.transform = transform or (lambda a: a)
        self.keep = keep
        self.cache_frames = cache_frames
        self._cache: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
        self._container = self._file = self._stream = self._frames = None
        self._pos = -1  # presentation index of the last frame decoded
        self.stats = {"decoded": 0, "returned": 0, "seeks": 0}

    def __getstate__(self) -> dict[str, Any]:
        return {"index": self.index, "url": self.url, "keep": self.keep, "cache_frames": self.cache_frames}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["index"], state["url"], None, state["keep"], state["cache_frames"])

    def cost_per_frame(self) -> float | None:
        """Frames decoded per frame returned (None before any frame was returned)."""
        return self.stats["decoded"] / self.stats["returned"] if self.stats["returned"] else None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        if self._file is not None:
            self._file.close()
        self._container = self._file = self._stream = self._frames = None
        self._pos = -1

    def _seek(self, k: int) -> None:
        if self._container is None:
            self._container, self._file = _open_container(self.url)
            self._stream = self._container.streams.video[0]
        key = int(self.index.key_before[k])
        target = int(self.index.pts[max(key, 0)])
        self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._pos = -1
        self.stats["seeks"] += 1

    def _decode_to(self, k: int):
        """Decode forward until frame k; frames passed that are in `keep` are cached."""
        pts = self.index.pts
        for frame in self._frames:
            self.stats["decoded"] += 1
            if frame.pts is None:
                raise VideoError(f"{self.url}: a decoded frame carries no timestamp")
            j = int(np.searchsorted(pts, int(frame.pts)))
            if j >= len(pts) or pts[j] != frame.pts:
                raise VideoError(f"{self.url}: decoded a frame at pts {frame.pts} that the index does not list")
            self._pos = j
            if j == k:
                return self.transform(frame.to_ndarray(format="rgb24"))
            if j > k:
                return None
            if self.keep is not None and j in self.keep and j not in self._cache:
                self._put(j, self.transform(frame.to_ndarray(format="rgb24")))
        return None

    def _put(self, j: int, value: Any) -> None:
        self._cache[j] = value
        self._cache.move_to_end(j)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)

    def get(self, k: int) -> Any:
        """Frame k (presentation order, from 0) as `transform(rgb uint8 (H, W, 3))`.

        Raises IndexError for a frame the video does not have, VideoError when it does not decode.
        """
        if not 0 <= k < len(self.index):
            raise IndexError(f"{self.url} has {len(self.index)} frames, no frame {k}")
        if k in self._cache:
            self.stats["returned"] += 1
            return self._cache.pop(k)  # each cached frame is returned once; the caller keeps it
        key = int(self.index.key_before[k])
        if self._frames is None or not (key <= self._pos + 1 and self._pos < k):
            self._seek(k)
        try:
            out = self._decode_to(k)
            if out is None and self.stats["seeks"]:  # the seek landed past k: decode from the start
                self.close()
                self._seek(0)
                out = self._decode_to(k)
        except VideoError:
            self.close()
            raise
        except Exception as e:  # a corrupt packet: reopen next time
            self.close()
            raise VideoError(f"{self.url}: frame {k} does not decode ({type(e).__name__}: {e})") from None
        if out is None:
            self.close()
            raise VideoError(f"{self.url}: frame {k} was not produced by the decoder")
        self.stats["returned"] += 1
        return out
