"""ARKitScenes raw layout, `--format arkitscenes` (DESIGN §3).

```
SCENE/lowres_wide/{video_id}_{timestamp}.png              RGB, 256x192 (or 192x256)
SCENE/lowres_depth/{video_id}_{timestamp}.png             uint16 millimetres, same grid as RGB
SCENE/lowres_wide_intrinsics/{video_id}_{timestamp}.pincam  one line: w h fx fy cx cy
SCENE/lowres_wide.traj                                    per line: t rx ry rz tx ty tz
```
The 3DOD download nests the same files one level down, `SCENE/SCENE_frames/...`;
both are read. Timestamps are seconds, written with 3 decimals in file names.

Conventions, established from the ARKitScenes toolkit (apple/ARKitScenes):

- `.traj` direction: WORLD-TO-CAMERA. `threedod/benchmark_scripts/utils/tenFpsDataLoader.py`
  `TrajStringToMatrix` builds `extrinsics` from `r_w_to_p` (cv2.Rodrigues of columns
  2-4, `utils/rotation.py convert_angle_axis_to_matrix3`) and `t_w_to_p` (columns 5-7)
  and returns `Rt = np.linalg.inv(extrinsics)`, which `generate_point` uses as the
  pose that "transfer[s] from camera to world". So `cam2world = inv([R(r) | t])`.
- Camera axes: OpenCV already. The same `generate_point` unprojects pixels as
  `inv(K) @ (u z, v z, z)` (x right, y down, z forward) and applies that pose with no
  axis flip; ARKit's native OpenGL-style camera axes do not appear in these files.
  No extra rotation is applied (the `sky_direction` metadata only says how the stored
  image is oriented for display; K and poses describe the image as stored).
- Pixel centres: integer, no conversion. Apple does not document the half-pixel
  convention of `.pincam`; the toolkit's own consumer (`generate_point`) pairs integer
  pixel indices with the stored K, so we do the same (at 256x192 a 0.5 px error would
  be 0.2% of the width).
- Matching frames to poses: the toolkit rounds `.traj` timestamps to 3 decimals and
  takes an exact key match, else any pose within 0.005 s (`TenFpsDataLoader.__getitem__`);
  it does not interpolate. We take the NEAREST pose within `pose_tolerance` (default
  1/120 s: half a 60 fps frame interval, so a pose is never given to the neighbouring
  frame; `.traj` is sparser than the 60 fps `lowres_wide` stream, so most raw frames
  have no pose and are skipped and counted). The toolkit also tries the `.pincam`
  of timestamp +-0.001 s; we take the nearest `.pincam` within 0.0015 s.
- A malformed `.traj` line fails the scene with one line naming file and line
  number: a corrupt trajectory is not something to guess around.
"""
from __future__ import annotations

import numpy as np

from data import geometry
from data.scenes.base import (Frame, FrameError, Scene, SceneError, decode_depth, decode_rgb, open_fs,
                              read_bytes, url_join)
from data.scenes.scannet import scene_children

LAYOUT_HINT = ("expected SCENE/lowres_wide/, lowres_depth/, lowres_wide_intrinsics/*.pincam and "
               "lowres_wide.traj (README 'Corpus layouts')")
DEPTH_SCALE = 1000.0  # uint16 millimetres (apple/ARKitScenes DATA.md)
DEFAULT_POSE_TOLERANCE = 1.0 / 120.0  # seconds
PINCAM_TOLERANCE = 0.0015  # seconds


def traj_line_to_cam2world(tokens: list[float]) -> tuple[float, np.ndarray]:
    """One `.traj` row (t, rx, ry, rz, tx, ty, tz) -> (t, cam2world (4, 4) OpenCV axes).

    The row is world-to-camera (axis-angle rotation in radians, translation in metres).
    """
    world2cam = np.eye(4)
    world2cam[:3, :3] = geometry.axis_angle_to_matrix(np.asarray(tokens[1:4]))
    world2cam[:3, 3] = tokens[4:7]
    return tokens[0], geometry.invert_pose(world2cam)


def parse_traj(text: str, url: str, scene: str) -> tuple[np.ndarray, np.ndarray]:
    """`.traj` text -> timestamps (N,) sorted, cam2world (N, 4, 4). Blank lines are ignored.

    A malformed line raises SceneError naming the file and its 1-based line number.
    """
    stamps, poses = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tokens = [float(t) for t in line.split()]
        except ValueError:
            tokens = []
        if len(tokens) != 7 or not np.isfinite(tokens).all():
            raise SceneError(f"scene {scene}: {url} line {lineno}: expected 7 numbers "
                             f"'timestamp rx ry rz tx ty tz', got {line.strip()[:60]!r}")
        t, cam2world = traj_line_to_cam2world(tokens)
        stamps.append(t)
        poses.append(cam2world)
    if not stamps:
        raise SceneError(f"scene {scene}: {url} holds no poses")
    order = np.argsort(stamps, kind="stable")
    return np.asarray(stamps, dtype=np.float64)[order], np.stack(poses)[order]


def nearest(sorted_values: np.ndarray, x: float) -> int:
    """Index of the value nearest to x in a sorted (N,) array (N >= 1)."""
    j = int(np.searchsorted(sorted_values, x))
    if j == 0:
        return 0
    if j == len(sorted_values):
        return j - 1
    return j if sorted_values[j] - x < x - sorted_values[j - 1] else j - 1


def _stamped(paths: list[str], ext: str) -> dict[str, tuple[float, str]]:
    """{file stem: (timestamp, path)} for `{video_id}_{timestamp}{ext}` files."""
    out = {}
    for p in paths:
        fname = p.rstrip("/").rpartition("/")[2]
        if not fname.endswith(ext):
            continue
        stem = fname[: -len(ext)]
        try:
            out[stem] = (float(stem.rpartition("_")[2]), p)
        except ValueError:
            continue
    return out


class ARKitScene(Scene):
    """One ARKitScenes video folder (raw layout). Frames sorted by timestamp."""

    dataset = "arkitscenes"

    def __init__(self, url: str, name: str | None = None, pose_tolerance: float = DEFAULT_POSE_TOLERANCE):
        super().__init__(url, name)
        fs, path = open_fs(self.url)
        if not fs.isdir(path):
            raise SceneError(f"scene {self.name}: {self.url} is not a folder; {LAYOUT_HINT}")
        kids = {p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False)}
        if "lowres_wide.traj" not in kids and f"{self.name}_frames" in kids:
            self.frames_url = url_join(self.url, f"{self.name}_frames")  # 3DOD nesting
        else:
            self.frames_url = self.url
        traj_url = url_join(self.frames_url, "lowres_wide.traj")
        try:
            traj_text = read_bytes(traj_url).decode("utf-8")
        except FileNotFoundError:
            raise SceneError(f"scene {self.name}: missing {traj_url}; {LAYOUT_HINT}") from None
        stamps, poses = parse_traj(traj_text, traj_url, self.name)
        self.pose_tolerance = float(pose_tolerance)
        self.depth_scale = DEPTH_SCALE

        def listing(folder: str, ext: str) -> dict[str, tuple[float, str]]:
            fpath = open_fs(url_join(self.frames_url, folder))[1]
            return _stamped(fs.ls(fpath, detail=False), ext) if fs.isdir(fpath) else {}

        rgbs = listing("lowres_wide", ".png")
        depths = listing("lowres_depth", ".png")
        pincams = listing("lowres_wide_intrinsics", ".pincam")
        if not rgbs:
            raise SceneError(f"scene {self.name}: no images in {url_join(self.frames_url, 'lowres_wide')}; "
                             f"{LAYOUT_HINT}")
        pin_items = sorted(pincams.values())
        pin_t = np.array([t for t, _ in pin_items])
        wanted: list[tuple[int, str, float, np.ndarray, str]] = []
        for position, (stem, (t, _)) in enumerate(sorted(rgbs.items(), key=lambda kv: (kv[1][0], kv[0]))):
            name = stem.rpartition("_")[2]
            if stem not in depths:
                self.skip(name, "missing depth file")
                continue
            j = nearest(stamps, t)
            if abs(stamps[j] - t) > self.pose_tolerance:
                self.skip(name, f"no pose within {self.pose_tolerance * 1000:.1f} ms")
                continue
            if not len(pin_t) or abs(pin_t[nearest(pin_t, t)] - t) > PINCAM_TOLERANCE:
                self.skip(name, "missing .pincam file")
                continue
            wanted.append((position, stem, t, poses[j], pin_items[nearest(pin_t, t)][1]))
        texts = fs.cat([w[4] for w in wanted], on_error="return") if wanted else {}
        for position, stem, t, cam2world, pin_path in wanted:
            name = stem.rpartition("_")[2]
            try:
                w, h, fx, fy, cx, cy = (float(x) for x in texts.get(pin_path).decode("utf-8").split())
                if not (np.isfinite([fx, fy, cx, cy]).all() and fx > 0 and fy > 0 and w >= 1 and h >= 1):
                    raise ValueError
            except (ValueError, AttributeError, TypeError):  # a failed read comes back as an exception
                self.skip(name, "garbage .pincam (expected 'w h fx fy cx cy')")
                continue
            problem = geometry.pose_problem(cam2world)
            if problem:
                self.skip(name, problem)
                continue
            K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
            self.frames.append(Frame(index=position, name=name, K=K, cam2world=cam2world,
                                     size=(int(round(w)), int(round(h))), timestamp=t,
                                     extra={"rgb": f"lowres_wide/{stem}.png",
                                            "depth": f"lowres_depth/{stem}.png"}))

    def _read_rgb(self, frame: Frame) -> np.ndarray:
        rgb = decode_rgb(read_bytes(url_join(self.frames_url, frame.extra["rgb"])))
        if (rgb.shape[1], rgb.shape[0]) != frame.size:
            raise FrameError(self.name, frame.name, f"rgb is {rgb.shape[1]}x{rgb.shape[0]} but its .pincam "
                                                    f"says {frame.size[0]}x{frame.size[1]}")
        return rgb

    def _read_depth(self, frame: Frame) -> np.ndarray:
        rel = frame.extra["depth"]
        return decode_depth(read_bytes(url_join(self.frames_url, rel)), rel, self.depth_scale)


def list_arkit_scenes(root: str) -> list[str]:
    """Video folders (URLs) under a corpus root holding `lowres_wide.traj` (or a `*_frames/`), sorted."""
    return sorted(s for s, kids in scene_children(root).items()
                  if "lowres_wide.traj" in kids or f"{s.rstrip('/').rpartition('/')[2]}_frames" in kids)
