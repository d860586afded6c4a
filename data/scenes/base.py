"""The Scene API every corpus reader implements (DESIGN §3).

A `Scene` is lazy: constructing it reads only metadata (intrinsics, poses, the file
list); RGB and depth are read per frame on demand, through fsspec, so local paths
and s3:// URLs are one code path. Frames with an unusable pose or a missing file are
dropped at construction and listed in `scene.skipped` as (frame, reason); frames
whose image turns out broken when read raise `FrameError`, which long jobs count and
skip.
"""
from __future__ import annotations

import abc
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from data import geometry
from data.storage import open_fs, read_bytes, url_join  # noqa: F401  (re-exported for the readers)

# A frame with less valid depth than this fraction is skipped ("almost no valid depth").
MIN_VALID_DEPTH_FRACTION = 0.05


class SceneError(Exception):
    """A scene (or corpus) that cannot be read at all; the message is one line."""


class FrameError(Exception):
    """One frame that cannot be used; carries scene, frame and a short reason."""

    def __init__(self, scene: str, frame: str, reason: str):
        super().__init__(f"scene {scene} frame {frame}: {reason}")
        self.scene, self.frame, self.reason = scene, frame, reason


@dataclass(frozen=True)
class Frame:
    """Metadata of one usable frame. RGB and depth share K and are pixel-aligned."""

    index: int
    """Position in the scene's full frame order (skipped frames keep their slot)."""
    name: str
    K: np.ndarray
    """(3, 3) intrinsics of the stored RGB and depth (pixel-centre convention)."""
    cam2world: np.ndarray
    """(4, 4) OpenCV-axes camera-to-world."""
    size: tuple[int, int]
    """Nominal (W, H) of the RGB and depth; `Scene.load` checks the real shapes."""
    timestamp: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def fit_view(rgb: np.ndarray, depth: np.ndarray, K: np.ndarray,
             max_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rgb, depth, K) with the longer side at most max_side (DESIGN §3 rule; never upscales).

    RGB: PIL bicubic (area-aware when shrinking); depth: nearest-exact; K: `resize_intrinsics`.
    """
    size = (rgb.shape[1], rgb.shape[0])
    if max(size) <= max_side:
        return rgb, depth, np.array(K, dtype=np.float64)
    new = geometry.fit_size(size, max_side)
    return (np.asarray(Image.fromarray(rgb).resize(new, Image.BICUBIC)),
            geometry.resize_depth_nearest(depth, new), geometry.resize_intrinsics(K, size, new))


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3). Raises OSError/ValueError on a broken image."""
    return np.asarray(decode_rgb_image(data))


def decode_rgb_image(data: bytes) -> Image.Image:
    """JPEG/PNG bytes -> the decoded RGB PIL image (no copy into an array: a PIL warp can take it as it
    is). Raises what `decode_rgb` raises."""
    im = Image.open(io.BytesIO(data))
    im.load()  # forces a full decode: a truncated JPEG fails here
    return im if im.mode == "RGB" else im.convert("RGB")


def checked_image_size(data: bytes) -> tuple[int, int]:
    """(W, H) of JPEG/PNG bytes from the header, after a check that the rest of the file is whole.

    What the scan asks of an RGB it does not use. Raises what `decode_rgb` raises for a broken
    file, at a fraction of a decode: PNG walks every chunk to IEND and checks its CRC (PIL's
    `verify`, no inflate); JPEG parses all entropy-coded data at 1/8 scale (`draft`), so a
    truncated or cut file fails as in a full read (a PNG cut after its last pixel data, which a
    decode still accepts, fails here too); any other format is fully decoded.
    """
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        if im.format == "PNG":
            im.verify()
        elif im.format == "JPEG":
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
        else:
            im.load()
    return size


def decode_depth(data: bytes, name: str, depth_scale: float) -> np.ndarray:
    """Depth file bytes -> float32 (H, W) metres (or scene units); 0 = invalid.

    `.png`: 16-bit integer image divided by depth_scale. `.npy`: float32 in metres.
    """
    if name.endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.ndim != 2:
            raise ValueError(f"depth array has shape {arr.shape}, expected (H, W)")
        arr = arr.astype(np.float32)
    else:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"depth PNG has mode {im.mode}, expected 16-bit")
            arr = np.asarray(im).astype(np.float32) / float(depth_scale)
    arr = np.where(np.isfinite(arr) & (arr > 0), arr, 0.0).astype(np.float32)
    return arr


class Scene(abc.ABC):
    """One scene of a corpus: frames in order, lazy RGB and depth."""

    dataset: str = "?"
    reader_version: int = 1
    """Bumped when what the reader returns changes: a shard job never reuses a plan of another version."""

    def __init__(self, url: str, name: str | None = None):
        self.url = url.rstrip("/")
        self.name = name or self.url.split("/")[-1]
        self.frames: list[Frame] = []
        self.skipped: list[tuple[str, str]] = []
        self.metric_depth: bool = True
        self.source: str = self.url
        self.object_groups: list[list[int]] | None = None
        """Per-pixel object ids are available (`load_objects`) when this is a list: the groups of ids
        that look alike (synthetic rooms; DESIGN §4.1's optional `fKK.objects.png`). None: no ids."""

    # -- readers implement these two ------------------------------------------------
    @abc.abstractmethod
    def _read_rgb(self, frame: Frame) -> np.ndarray:
        """uint8 (H, W, 3), aligned with depth."""

    @abc.abstractmethod
    def _read_depth(self, frame: Frame) -> np.ndarray:
        """float32 (H, W) z-depth in metres (scene units if not metric), 0 = invalid."""

    # -- shared ---------------------------------------------------------------------
    def frame_seconds(self) -> float | None:
        """Seconds between consecutive frame indices (the capture rate over the corpus's sampling), when
        the frames carry timestamps: the median over consecutive usable frames; None otherwise."""
        stamped = [(f.index, f.timestamp) for f in self.frames if f.timestamp is not None]
        if len(stamped) < 2:
            return None
        steps = [(t1 - t0) / (i1 - i0) for (i0, t0), (i1, t1) in zip(stamped, stamped[1:]) if i1 > i0]
        steps = [s for s in steps if np.isfinite(s) and s > 0]
        return float(np.median(steps)) if steps else None

    def skip(self, frame: str, reason: str) -> None:
        self.skipped.append((frame, reason))

    def _rgb_shape(self, frame: Frame) -> tuple[int, int]:
        """(H, W) the frame's RGB decodes to, raising as `_read_rgb` does for a broken image.

        What the scan asks (it needs only depth). Default: a full `_read_rgb`; readers whose
        RGB read is expensive check it more cheaply.
        """
        return tuple(self._read_rgb(frame).shape[:2])

    def _guarded(self, what: str, read, frame: Frame):
        """`read(frame)` with its failures turned into FrameError ('missing/unreadable <what>')."""
        try:
            return read(frame)
        except FrameError:
            raise
        except FileNotFoundError:
            raise FrameError(self.name, frame.name, f"missing {what} file") from None
        except Exception as e:  # PIL raises several types for broken files
            raise FrameError(self.name, frame.name, f"unreadable {what} ({type(e).__name__}: {e})") from None

    def _check_depth(self, frame: Frame, rgb_hw: tuple[int, int], depth: np.ndarray) -> None:
        H, W = rgb_hw
        if depth.shape != (H, W):
            raise FrameError(self.name, frame.name,
                             f"depth is {depth.shape[1]}x{depth.shape[0]}, rgb is {W}x{H}: they must be aligned")
        if (depth > 0).mean() < MIN_VALID_DEPTH_FRACTION:
            raise FrameError(self.name, frame.name, "almost no valid depth")

    def load(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 (H, W, 3), depth float32 (H, W)) of a frame, checked.

        Raises FrameError (scene, frame, reason) for a broken or missing image, a
        size mismatch, or almost no valid depth.
        """
        rgb = self._guarded("rgb", self._read_rgb, frame)
        depth = self._guarded("depth", self._read_depth, frame)
        self._check_depth(frame, rgb.shape[:2], depth)
        return rgb, depth

    def _read_objects(self, frame: Frame) -> np.ndarray:
        """uint16 (H, W) object id per pixel (0: none), aligned with depth; readers with ids implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no per-pixel object ids")

    def load_objects(self, frame: Frame, rgb_hw: tuple[int, int]) -> np.ndarray | None:
        """A frame's object ids, checked against its RGB's (H, W); None when the scene has none
        (`object_groups` is None). FrameError for a missing, broken or misaligned file."""
        if self.object_groups is None:
            return None
        ids = self._guarded("objects", self._read_objects, frame)
        if ids.shape != tuple(rgb_hw) or ids.dtype != np.uint16:
            raise FrameError(self.name, frame.name, f"object ids are {ids.dtype} {ids.shape[1::-1]}, rgb is "
                             f"{rgb_hw[1]}x{rgb_hw[0]}: they must be uint16 and aligned")
        return ids

    def load_depth(self, frame: Frame) -> np.ndarray:
        """A frame's depth, with every check of `load` (the RGB too, through `_rgb_shape`).

        The scan reads frames this way: it needs depth only, and a frame it passes must
        still be one that `load` accepts.
        """
        hw = self._guarded("rgb", self._rgb_shape, frame)
        depth = self._guarded("depth", self._read_depth, frame)
        self._check_depth(frame, hw, depth)
        return depth

    def view(self, frame: Frame, max_side: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rgb, depth, K) of a frame, resized by `fit_view` (no resize when max_side is None)."""
        rgb, depth = self.load(frame)
        return fit_view(rgb, depth, frame.K, max_side or max(rgb.shape[:2]))

    def summary(self) -> dict[str, Any]:
        return {"scene": self.name, "dataset": self.dataset, "frames": len(self.frames),
                "skipped": len(self.skipped), "metric_depth": self.metric_depth}


def parse_matrix(value: Any, shape: tuple[int, int]) -> np.ndarray:
    """A nested list / flat list / whitespace text to a float64 matrix of `shape`."""
    if isinstance(value, str):
        arr = np.array([float(t) for t in value.split()], dtype=np.float64)
    else:
        arr = np.asarray(value, dtype=np.float64)
    if arr.size != shape[0] * shape[1]:
        raise ValueError(f"has {arr.size} numbers, expected {shape[0]}x{shape[1]}")
    return arr.reshape(shape)


def load_json(url: str) -> Any:
    try:
        return json.loads(read_bytes(url).decode("utf-8"))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise SceneError(f"{url}: not valid JSON ({e})") from None
