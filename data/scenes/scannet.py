"""ScanNet SensReader exports, `--format scannet` (DESIGN §3).

```
SCENE/color/{i}.jpg        colour camera, 1296x968 in ScanNet v2
SCENE/depth/{i}.png        uint16 millimetres (depth_shift 1000), 640x480
SCENE/pose/{i}.txt         4x4 camera-to-world, text (-inf where tracking was lost)
SCENE/intrinsic/intrinsic_color.txt  intrinsic_depth.txt   4x4 each, K in the top-left 3x3
SCENE/intrinsic/extrinsic_color.txt  extrinsic_depth.txt   4x4 each
```
(ScanNet/ScanNet `SensReader/python/SensorData.py`: `export_poses` writes
`camera_to_world`, `export_intrinsics` the four matrices; both with `%f`.)

Colour and depth have different K and sizes. Each frame is read as ONE view in the
depth camera: depth as stored, colour resampled onto the depth pixel grid (never a
plain resize, which is off by the K mismatch):

- Extrinsics. ScanNet/ScanNet `SensReader/src/sensorData.h` (`CalibrationData`):
  `m_extrinsic` "should be the mapping to base frame in a multi-view setup (typically
  it's depth to color; and the color extrinsic is the identity)". So each extrinsic
  maps its camera's points into one base frame, and depth-camera points go to the
  colour camera by `depth_to_color = inv(extrinsic_color) @ extrinsic_depth`.
  In the ScanNet v2 release both are the identity: "Color and depth are already
  aligned, so no extrinsic matrices should be applied" (ScanNet/ScanNet issue #92).
  Then the cameras share a centre and colour is sampled through the homography
  `inv(H) = K_c @ inv(K_d)` (`geometry.align_color_to_depth` without extrinsics).
  Otherwise alignment goes through depth (unproject, move by depth_to_color, project).
- Poses. `pose/{i}.txt` is taken as the DEPTH camera's camera-to-world: ScanNet's
  trajectories come from depth-based fusion and its meshes are fused from depth with
  them (with identity extrinsics the two cameras coincide anyway).
- Pixel centres are at integer coordinates (ScanNet's depth K has cx = 319.5 for a
  640-wide image), our convention: K is used as stored.
"""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
from PIL import Image

from data import geometry
from data.scenes.base import (Frame, FrameError, Scene, SceneError, decode_depth, decode_rgb, open_fs,
                              read_bytes, url_join)

LAYOUT_HINT = ("expected SensReader exports: SCENE/color/i.jpg, depth/i.png, pose/i.txt, "
               "intrinsic/{intrinsic,extrinsic}_{color,depth}.txt (README 'Corpus layouts')")
DEPTH_SCALE = 1000.0  # SensReader depth_shift: uint16 millimetres
EXTRINSIC_IDENTITY_TOL = 1e-6


def read_matrix_file(url: str, shape: tuple[int, int], scene: str) -> np.ndarray:
    """A whitespace text matrix file -> float64 array of `shape`; SceneError (one line) if bad."""
    try:
        text = read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise SceneError(f"scene {scene}: missing {url}; {LAYOUT_HINT}") from None
    try:
        arr = np.array([float(t) for t in text.split()], dtype=np.float64)
        return arr.reshape(shape)
    except ValueError:
        raise SceneError(f"scene {scene}: {url} is not a {shape[0]}x{shape[1]} matrix of numbers") from None


def _numeric_stems(paths: list[str], folder: str, ext: str) -> dict[int, str]:
    """{i: path} for files `{folder}/{i}{ext}` with an integer stem (folder: full path)."""
    out: dict[int, str] = {}
    for p in paths:
        head, _, fname = p.rpartition("/")
        if head != folder or not fname.endswith(ext):
            continue
        stem = fname[: -len(ext)]
        if stem.isdigit():
            out[int(stem)] = p
    return out


def _image_size(fs, path: str) -> tuple[int, int] | None:
    """(W, H) from an image header (one small read), None if unreadable."""
    try:
        with fs.open(path, "rb") as f, Image.open(f) as im:
            return im.size
    except Exception:
        return None


class ScanNetScene(Scene):
    """One SensReader export folder. Frames sorted by their integer index."""

    dataset = "scannet"

    def __init__(self, url: str, name: str | None = None):
        super().__init__(url, name)
        fs, path = open_fs(self.url)
        if not fs.isdir(path):
            raise SceneError(f"scene {self.name}: {self.url} is not a folder; {LAYOUT_HINT}")
        base = path.rstrip("/")
        intr = url_join(self.url, "intrinsic")
        self.K_color = read_matrix_file(url_join(intr, "intrinsic_color.txt"), (4, 4), self.name)[:3, :3]
        self.K_depth = read_matrix_file(url_join(intr, "intrinsic_depth.txt"), (4, 4), self.name)[:3, :3]
        ext_c = read_matrix_file(url_join(intr, "extrinsic_color.txt"), (4, 4), self.name)
        ext_d = read_matrix_file(url_join(intr, "extrinsic_depth.txt"), (4, 4), self.name)
        for label, K in (("intrinsic_color.txt", self.K_color), ("intrinsic_depth.txt", self.K_depth)):
            if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise SceneError(f"scene {self.name}: {url_join(intr, label)} holds no usable K")
        for label, E in (("extrinsic_color.txt", ext_c), ("extrinsic_depth.txt", ext_d)):
            problem = geometry.pose_problem(E)
            if problem:
                raise SceneError(f"scene {self.name}: {url_join(intr, label)}: {problem}")
        # depth-camera points -> colour-camera points (both extrinsics map into one base frame)
        d2c = np.linalg.inv(ext_c) @ ext_d
        self.depth_to_color: np.ndarray | None = (
            None if np.abs(d2c - np.eye(4)).max() < EXTRINSIC_IDENTITY_TOL else d2c)
        self.depth_scale = DEPTH_SCALE
        self._depth_cache: tuple[str, np.ndarray] | None = None

        # one listing of the scene; no per-frame exists() calls
        files = [p.rstrip("/") for p in fs.find(base)]
        colors = _numeric_stems(files, f"{base}/color", ".jpg")
        depths = _numeric_stems(files, f"{base}/depth", ".png")
        poses = _numeric_stems(files, f"{base}/pose", ".txt")
        indices = sorted(set(colors) | set(depths) | set(poses))
        if not indices:
            raise SceneError(f"scene {self.name}: no frames under {self.url}; {LAYOUT_HINT}")
        have_all = [i for i in indices if i in colors and i in depths and i in poses]
        for i in indices:
            if i not in colors:
                self.skip(str(i), "missing colour file")
            elif i not in depths:
                self.skip(str(i), "missing depth file")
            elif i not in poses:
                self.skip(str(i), "missing pose file")
        # thousands of tiny pose files: one batched cat (concurrent on s3)
        texts = fs.cat([poses[i] for i in have_all], on_error="return") if have_all else {}
        self.depth_size = self._nominal_depth_size(fs, [depths[i] for i in have_all[:3]])
        position = {i: k for k, i in enumerate(indices)}  # slot in the full frame order
        for i in have_all:
            raw = texts.get(poses[i])
            if not isinstance(raw, bytes):
                self.skip(str(i), "unreadable pose file")
                continue
            try:
                cam2world = np.array([float(t) for t in raw.decode("utf-8").split()]).reshape(4, 4)
            except ValueError:
                self.skip(str(i), "garbage pose file (expected 16 numbers)")
                continue
            problem = geometry.pose_problem(cam2world)  # -inf poses land here
            if problem:
                self.skip(str(i), problem)
                continue
            self.frames.append(Frame(index=position[i], name=str(i), K=self.K_depth.copy(), cam2world=cam2world,
                                     size=self.depth_size,
                                     extra={"rgb": f"color/{i}.jpg", "depth": f"depth/{i}.png"}))

    def _nominal_depth_size(self, fs, paths: list[str]) -> tuple[int, int]:
        """Depth (W, H) shared by the scene: the commonest of a few headers (default 640x480)."""
        sizes = [s for s in (_image_size(fs, p) for p in paths) if s]
        return Counter(sizes).most_common(1)[0][0] if sizes else (640, 480)

    def _read_depth(self, frame: Frame) -> np.ndarray:
        if self._depth_cache is not None and self._depth_cache[0] == frame.name:
            depth = self._depth_cache[1]
            self._depth_cache = None
            return depth
        rel = frame.extra["depth"]
        return decode_depth(read_bytes(url_join(self.url, rel)), rel, self.depth_scale)

    def _rgb_shape(self, frame: Frame) -> tuple[int, int]:
        """The colour JPEG decodes (at 1/8 scale: every entropy-coded block is still parsed, so a
        truncated or corrupt file fails as in a full read), without the alignment; what
        `_read_rgb` would return is always on the depth grid."""
        with Image.open(io.BytesIO(read_bytes(url_join(self.url, frame.extra["rgb"])))) as im:
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        return frame.size[1], frame.size[0]

    def _read_rgb(self, frame: Frame) -> np.ndarray:
        """Colour resampled onto the depth grid: uint8 (Hd, Wd, 3), sharing K_depth."""
        rgb = decode_rgb(read_bytes(url_join(self.url, frame.extra["rgb"])))
        depth = None
        if self.depth_to_color is not None:  # alignment through depth needs it first
            try:
                depth = self._read_depth(frame)
            except Exception as e:
                raise FrameError(self.name, frame.name, f"unreadable depth ({type(e).__name__}: {e})") from None
            self._depth_cache = (frame.name, depth)  # load() reads it next
        return geometry.align_color_to_depth(rgb, self.K_color, self.K_depth, frame.size,
                                             depth=depth, depth_to_color=self.depth_to_color)


def scene_children(root: str) -> dict[str, set[str]]:
    """{scene url: names of its direct children} for every folder under a corpus root.

    One glob two levels deep (a listing of the root and of each scene folder; nothing
    inside the per-frame folders is listed).
    """
    fs, path = open_fs(root)
    base = path.rstrip("/")
    proto = root.split("://")[0] + "://" if "://" in root else ""
    out: dict[str, set[str]] = {}
    for hit in fs.glob(base + "/*/*"):
        scene, _, child = hit.rstrip("/").rpartition("/")
        out.setdefault(proto + scene, set()).add(child)
    return out


def list_scannet_scenes(root: str) -> list[str]:
    """Scene folders (URLs) under a corpus root that hold a `pose/` folder, sorted."""
    return sorted(s for s, kids in scene_children(root).items() if "pose" in kids)
