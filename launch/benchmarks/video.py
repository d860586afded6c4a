"""Video frames for the benchmark evaluators: the PyAV sampling of `data/video.py`, and a cache.

The sampling itself (VideoError, frame_indices, sample_frames, video_seconds, the stream
opener) lives in `data/video.py`, shared with the instruction shard job; it is re-exported
here under the names the evaluators import.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

from data.video import VideoError, frame_indices, open_video, sample_frames, video_seconds  # noqa: F401


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
