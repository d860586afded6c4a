"""nerfstudio `transforms.json` scenes (DL3DV and ns-process-data output), `--format nerfstudio`.

```
SCENE/transforms.json   {"camera_model": "OPENCV", "fl_x", "fl_y", "cx", "cy", "w", "h",
                         ("k1", "k2", "k3", "k4", "p1", "p2"), ("applied_transform": 3x4),
                         ("metric_depth": bool),
                         "frames": [{"file_path": "images/frame_00001.png",
                                     "transform_matrix": 4x4 camera-to-world, OpenGL axes,
                                     ("depth_file_path": "depths/frame_00001.png"),
                                     (per-frame fl_x ... h when not given at the top)}, ...]}
SCENE/images/...        RGB named by file_path (relative to SCENE)
```
Depth (DL3DV ships none; users bring MVS or released processed depth), either
- each frame's `depth_file_path` (relative to SCENE), or
- `depth_root`: `<depth_root>/<scene name>/<image file stem>.png` (uint16, divided by
  `depth_scale`, default 1000) or `.npy` (float32), one listing of that folder; a
  `.npy` wins when both exist.
Depth must be z-depth on the image's pixel grid, in the units of the poses'
translations. A scene with no depth at all fails in one line.

Conventions, established from nerfstudio (nerfstudio-project/nerfstudio):
- Axes: OpenGL camera axes (x right, y up, z back); converted with `geometry.gl_to_cv`.
- Pixel centres at +0.5: `nerfstudio/cameras/cameras.py` `Cameras.get_image_coords`
  (`pixel_offset=0.5`, "Defaults to center of pixel") generates pixel (u, v)'s ray at
  `(u + 0.5 - cx) / fx`, so cx, cy are converted with `geometry.half_pixel_to_centre`
  (cx - 0.5, cy - 0.5) to our integer-centre convention.
- `applied_transform` is a record, not a pending step: `nerfstudio/process_data/
  colmap_utils.py` `colmap_to_json` permutes/negates the rows of each c2w (COLMAP world
  -> nerfstudio world, z up) BEFORE writing `transform_matrix`, then stores that same
  world change as `applied_transform` so the dataparser can move the COLMAP point cloud
  (`nerfstudio_dataparser.py`: it only enters `dataparser_transform` for `ply_file_path`).
  The poses in the file therefore already include it; it is NOT applied again. (Any
  rigid world change leaves all pair geometry unchanged anyway.)
- Distortion: non-zero k1..k4, p1, p2 (shared or per frame) are undone on read: RGB and
  depth are resampled onto the pinhole image of the same K and size (`geometry.
  undistortion_map`; the model is nerfstudio's `radial_and_tangential_distort`, OpenCV's),
  RGB bilinear, depth nearest with its values kept (a point's z does not depend on the
  lens). Pixels whose source lies outside the distorted image come out black with depth 0
  (invalid, so no correspondence uses them). A lens model that folds back over more than
  half of the image, or a camera_model that is not a pinhole / OpenCV perspective one
  (fisheye, equirectangular), refuses the scene in one line.
- Frame order: sorted by `file_path` (natural order), as nerfstudio's dataparser sorts
  by file name: `frames` lists COLMAP image ids, not video order.
- Scale: COLMAP poses have no metric scale, so `metric_depth` is False unless the json
  says `"metric_depth": true` or the caller passes `metric_depth=True` (DESIGN §3: the
  visibility test then uses 1% of the scene's median depth).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from data import geometry
from data.scenes.base import (Frame, FrameError, Scene, SceneError, checked_image_size, decode_depth, decode_rgb,
                              load_json, open_fs, read_bytes, url_join)

README_DEPTH = "README 'nerfstudio / DL3DV depth'"
PERSPECTIVE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV", "SIMPLE_RADIAL", "RADIAL")
DISTORTION_KEYS = geometry.DISTORTION_KEYS
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
MAX_FOLDED = 0.5  # of the undistorted image without an unambiguous source under the lens model
_MAPS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # per process, never pickled with a scene


def undistortion_map(K: np.ndarray, dist: tuple[float, ...], size: tuple[int, int]):
    """`geometry.undistortion_map`, cached per camera (a scene usually has one)."""
    key = (np.asarray(K, dtype=np.float64).tobytes(), tuple(dist), tuple(size))
    hit = _MAPS.get(key)
    if hit is None:
        if len(_MAPS) >= 16:
            _MAPS.clear()
        hit = _MAPS[key] = geometry.undistortion_map(K, dist, size)
    return hit


def depth_gather(K: np.ndarray, dist: tuple[float, ...], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`geometry.undistort_depth`'s nearest-pixel sampling of this camera as a gather, cached per camera:
    (destination pixels (M,), their source pixels (M,)), flat indices. The scan reads every frame's depth,
    and a 960x540 map's sampling cost 30 ms a frame; the gather costs a few."""
    key = ("gather", np.asarray(K, dtype=np.float64).tobytes(), tuple(dist), tuple(size))
    hit = _MAPS.get(key)
    if hit is None:
        W, H = size
        uv_src, valid = undistortion_map(K, dist, size)
        src, inside = geometry.sample_nearest(np.arange(H * W).reshape(H, W), uv_src)  # source pixel of each
        dst = np.flatnonzero(inside & valid)
        if len(_MAPS) >= 16:
            _MAPS.clear()
        hit = _MAPS[key] = (dst, src[dst])
    return hit


def natural_key(s: str) -> list[Any]:
    """Sort key that orders embedded integers numerically ('f2' < 'f10')."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _rel(path: str) -> str:
    """A json file path relative to the scene, without a leading './'."""
    return path[2:] if path.startswith("./") else path


class NerfstudioScene(Scene):
    """One folder holding a nerfstudio transforms.json. Frames sorted by file name."""

    dataset = "nerfstudio"

    def __init__(self, url: str, name: str | None = None, depth_root: str | None = None,
                 depth_scale: float = 1000.0, metric_depth: bool | None = None):
        super().__init__(url, name)
        json_url = url_join(self.url, "transforms.json")
        try:
            meta = load_json(json_url)
        except FileNotFoundError:
            raise SceneError(f"scene {self.name}: missing {json_url} (a nerfstudio scene folder holds "
                             f"transforms.json; README 'Corpus layouts')") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
            raise SceneError(f"scene {self.name}: {json_url} has no 'frames' list (or it is empty)")
        self.meta = meta
        self.depth_scale = float(depth_scale)
        self.metric_depth = bool(meta.get("metric_depth", False)) if metric_depth is None else bool(metric_depth)
        self.applied_transform = meta.get("applied_transform")  # recorded, already in the poses
        self._check_camera(meta, json_url)
        frames = []
        for i, f in enumerate(meta["frames"]):
            if isinstance(f, dict) and isinstance(f.get("file_path"), str):
                frames.append(f)
            else:
                self.skip(f"frames[{i}]", "frame entry without 'file_path'")
        if not frames:
            raise SceneError(f"scene {self.name}: {json_url}: no frame has a 'file_path'")
        frames.sort(key=lambda f: natural_key(_rel(f["file_path"])))
        for fr in frames:
            self._check_camera(fr, json_url, frame=_rel(fr["file_path"]))

        fs, path = open_fs(self.url)
        existing = {p.rstrip("/") for p in fs.find(path.rstrip("/"))}  # one listing
        base = path.rstrip("/")
        depth_of = self._depth_files(frames, depth_root, json_url, existing)
        for index, fr in enumerate(frames):
            rel = _rel(fr["file_path"])
            name = rel.rpartition("/")[2].rpartition(".")[0] or rel
            try:
                vals = {k: float(meta[k] if k in meta else fr[k]) for k in INTRINSIC_KEYS}
            except (KeyError, TypeError, ValueError):
                self.skip(name, f"no usable {'/'.join(INTRINSIC_KEYS)} in transforms.json")
                continue
            K = geometry.half_pixel_to_centre(np.array([[vals["fl_x"], 0.0, vals["cx"]],
                                                       [0.0, vals["fl_y"], vals["cy"]], [0.0, 0.0, 1.0]]))
            if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                self.skip(name, "garbage intrinsics")
                continue
            try:
                T = np.asarray(fr["transform_matrix"], dtype=np.float64)
                if T.shape == (3, 4):
                    T = np.vstack([T, [0.0, 0.0, 0.0, 1.0]])
                cam2world = geometry.gl_to_cv(T)
            except (KeyError, TypeError, ValueError):
                self.skip(name, "garbage transform_matrix")
                continue
            problem = geometry.pose_problem(cam2world)
            if problem:
                self.skip(name, problem)
                continue
            if f"{base}/{rel}" not in existing:
                self.skip(name, "missing rgb file")
                continue
            depth_url = depth_of.get(rel)
            if depth_url is None:
                self.skip(name, "missing depth file")
                continue
            extra = {"rgb": rel, "depth_url": depth_url}
            dist = tuple(float((fr[k] if k in fr else meta.get(k, 0.0)) or 0.0) for k in DISTORTION_KEYS)
            if any(dist):
                extra["dist"] = dist
            self.frames.append(Frame(index=index, name=name, K=K, cam2world=cam2world,
                                     size=(int(vals["w"]), int(vals["h"])), extra=extra))
        for K_bytes, dist, size in {(f.K.tobytes(), f.extra["dist"], f.size) for f in self.frames if "dist" in f.extra}:
            folded = geometry.folded_fraction(np.frombuffer(K_bytes).reshape(3, 3), dist, size)
            if folded > MAX_FOLDED:
                raise SceneError(f"scene {self.name}: {json_url}: distortion "
                                 f"{dict(zip(DISTORTION_KEYS, dist))} folds back over {folded:.0%} of "
                                 f"the image; undistort the images first (e.g. COLMAP image_undistorter) and "
                                 f"write a PINHOLE transforms.json")

    def _check_camera(self, d: dict, json_url: str, frame: str | None = None) -> None:
        """Refuse non-perspective camera models and non-numeric distortion, in one line."""
        where = f"{json_url}" + (f" frame {frame}" if frame else "")
        model = d.get("camera_model")
        if model is not None and model not in PERSPECTIVE_MODELS:
            raise SceneError(f"scene {self.name}: {where}: camera_model {model!r} is not supported "
                             f"(only the perspective models {', '.join(PERSPECTIVE_MODELS)}); undistort the "
                             f"images first (e.g. COLMAP image_undistorter) and write a PINHOLE transforms.json")
        try:
            values = [float(d[k] or 0.0) for k in DISTORTION_KEYS if k in d]
        except (TypeError, ValueError):
            raise SceneError(f"scene {self.name}: {where}: distortion parameters are not numbers") from None
        if not all(np.isfinite(values)):
            raise SceneError(f"scene {self.name}: {where}: distortion parameters are not finite")

    def _depth_files(self, frames: list[dict], depth_root: str | None, json_url: str,
                     existing: set[str]) -> dict[str, str]:
        """{image file_path: depth URL} from depth_root or each frame's depth_file_path.

        existing: the scene folder's file listing (paths without protocol).
        """
        out: dict[str, str] = {}
        if depth_root is not None:
            folder = url_join(depth_root, self.name)
            fs, fpath = open_fs(folder)
            if not fs.isdir(fpath):
                raise SceneError(f"scene {self.name}: no depth: {folder}/ does not exist (depth_root layout "
                                 f"<depth_root>/<scene>/<image stem>.png|.npy; {README_DEPTH})")
            by_stem: dict[str, str] = {}
            for p in fs.ls(fpath, detail=False):
                fname = p.rstrip("/").rpartition("/")[2]
                stem, _, ext = fname.rpartition(".")
                if ext == "npy" or (ext == "png" and stem not in by_stem):  # .npy wins over .png
                    by_stem[stem] = url_join(folder, fname)
            for fr in frames:
                rel = _rel(fr["file_path"])
                stem = rel.rpartition("/")[2].rpartition(".")[0]
                if stem in by_stem:
                    out[rel] = by_stem[stem]
            if not out:
                raise SceneError(f"scene {self.name}: no depth: {folder}/ holds no <image stem>.png|.npy "
                                 f"for any frame of {json_url} ({README_DEPTH})")
            return out
        base = open_fs(self.url)[1].rstrip("/")
        named = 0
        for fr in frames:
            d = fr.get("depth_file_path")
            if not isinstance(d, str):
                continue
            named += 1
            if "://" in d or d.startswith("/"):  # an absolute location, used as given
                out[_rel(fr["file_path"])] = d
            elif f"{base}/{_rel(d)}" in existing:
                out[_rel(fr["file_path"])] = url_join(self.url, _rel(d))
        if not named:
            raise SceneError(f"scene {self.name}: no depth: {json_url} frames have no 'depth_file_path' and "
                             f"no depth_root was given (expected <depth_root>/{self.name}/<image stem>.png|.npy; "
                             f"{README_DEPTH})")
        return out

    def _check_size(self, frame: Frame, W: int, H: int) -> None:
        if (W, H) != frame.size:
            raise FrameError(self.name, frame.name, f"rgb is {W}x{H} but transforms.json "
                                                    f"says {frame.size[0]}x{frame.size[1]}")

    def _rgb_shape(self, frame: Frame) -> tuple[int, int]:
        """The image's size from its header, the file checked whole (`checked_image_size`), without
        the decode and undistortion of `_read_rgb` (0.32 s a 960x540 DL3DV frame): the
        undistorted RGB keeps the size and K of the distorted one."""
        W, H = checked_image_size(read_bytes(url_join(self.url, frame.extra["rgb"])))
        self._check_size(frame, W, H)
        return H, W

    def _read_rgb(self, frame: Frame) -> np.ndarray:
        rgb = decode_rgb(read_bytes(url_join(self.url, frame.extra["rgb"])))
        self._check_size(frame, rgb.shape[1], rgb.shape[0])
        if "dist" in frame.extra:
            rgb = geometry.undistort_rgb(rgb, *undistortion_map(frame.K, frame.extra["dist"], frame.size))
        return rgb

    def _read_depth(self, frame: Frame) -> np.ndarray:
        url = frame.extra["depth_url"]
        depth = decode_depth(read_bytes(url), url, self.depth_scale)
        if "dist" in frame.extra and depth.shape == (frame.size[1], frame.size[0]):  # else load() reports it
            dst, src = depth_gather(frame.K, frame.extra["dist"], frame.size)  # = geometry.undistort_depth
            out = np.zeros(depth.size, dtype=np.float32)
            out[dst] = depth.ravel()[src]
            depth = out.reshape(depth.shape)
        return depth


def list_nerfstudio_scenes(root: str) -> list[str]:
    """Scene folders (URLs) under a corpus root that hold a transforms.json, sorted."""
    fs, path = open_fs(root)
    proto = root.split("://")[0] + "://" if "://" in root else ""
    return sorted(proto + h.rsplit("/", 1)[0] for h in fs.glob(path.rstrip("/") + "/*/transforms.json"))
