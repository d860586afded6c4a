"""The project's own plain layout, `posed` (DESIGN §3).

```
SCENE/cameras.json   {"depth_scale": 1000.0, "metric_depth": true,
                      "frames": [{"name": "000000", "rgb": "rgb/000000.jpg",
                                  "depth": "depth/000000.png",
                                  "K": [[fx,0,cx],[0,fy,cy],[0,0,1]],
                                  "cam2world": [[...4x4...]],
                                  "timestamp": 0.0 (optional),
                                  "objects": "objects/000000.png" (optional)}, ...],
                      "object_groups": [[3, 9], ...] (optional, with "objects")}
SCENE/rgb/...  SCENE/depth/...  (uint16 PNG divided by depth_scale, or float32 .npy)
SCENE/objects/...  (optional: uint16 PNG, the id of the object each pixel shows, 0 = none)
```
Object ids are read only when every frame entry names an `objects` file and `object_groups`
(lists of ids that look alike) is a list; the shard job then stores them per frame.
Frame order is list order; RGB and depth of a frame are pixel-aligned and share K
(OpenCV axes, pixel centres at integer coordinates).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from data import geometry
from data.scenes.base import (Frame, Scene, SceneError, decode_depth, decode_rgb, load_json,
                              open_fs, parse_matrix, read_bytes, url_join)

LAYOUT_HINT = ("expected SCENE/cameras.json with 'frames' [{name, rgb, depth, K, cam2world}] "
               "and the rgb/ and depth/ files it names (README: 'The posed layout')")


class PosedScene(Scene):
    dataset = "posed"

    def __init__(self, url: str, name: str | None = None, dataset: str | None = None):
        super().__init__(url, name)
        cam_url = url_join(self.url, "cameras.json")
        fs, path = open_fs(self.url)
        if not fs.exists(path) or not fs.isdir(path):
            raise SceneError(f"{self.url}: no such scene folder")
        try:
            meta = load_json(cam_url)
        except FileNotFoundError:
            raise SceneError(f"{self.url} is not a posed scene: missing cameras.json; {LAYOUT_HINT}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
            raise SceneError(f"{cam_url}: missing the 'frames' list; {LAYOUT_HINT}")
        if not meta["frames"]:
            raise SceneError(f"{cam_url}: 'frames' is empty")
        if dataset:
            self.dataset = dataset
        elif isinstance(meta.get("dataset"), str):
            self.dataset = meta["dataset"]
        self.meta = meta
        self.depth_scale = float(meta.get("depth_scale", 1000.0))
        self.metric_depth = bool(meta.get("metric_depth", True))
        existing = {p.rstrip("/") for p in fs.find(path)}
        base = path.rstrip("/")
        for index, fr in enumerate(meta["frames"]):
            name = str(fr.get("name", f"{index:06d}")) if isinstance(fr, dict) else f"{index:06d}"
            if not isinstance(fr, dict) or "rgb" not in fr or "depth" not in fr:
                self.skip(name, "frame entry lacks 'rgb' or 'depth'")
                continue
            try:
                K = parse_matrix(fr["K"], (3, 3))
            except Exception:
                self.skip(name, "garbage intrinsics")
                continue
            try:
                cam2world = parse_matrix(fr["cam2world"], (4, 4))
            except Exception:
                self.skip(name, "garbage pose")
                continue
            problem = geometry.pose_problem(cam2world)
            if problem:
                self.skip(name, problem)
                continue
            if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                self.skip(name, "garbage intrinsics")
                continue
            rgb_rel, depth_rel = str(fr["rgb"]), str(fr["depth"])
            if f"{base}/{rgb_rel}" not in existing:
                self.skip(name, "missing rgb file")
                continue
            if f"{base}/{depth_rel}" not in existing:
                self.skip(name, "missing depth file")
                continue
            extra = {"rgb": rgb_rel, "depth": depth_rel}
            if "objects" in fr:
                if f"{base}/{fr['objects']}" not in existing:
                    self.skip(name, "missing objects file")
                    continue
                extra["objects"] = str(fr["objects"])
            size = fr.get("size", meta.get("size"))
            self.frames.append(Frame(index=index, name=name, K=K, cam2world=cam2world,
                                     size=tuple(int(x) for x in size) if size else (0, 0),
                                     timestamp=fr.get("timestamp"),
                                     extra=extra))
        if self.frames and self.frames[0].size == (0, 0):
            self._fill_sizes()
        groups = meta.get("object_groups")
        if self.frames and all("objects" in f.extra for f in self.frames) and groups is not None:
            if not (isinstance(groups, list) and all(isinstance(g, list) and all(isinstance(i, int) for i in g)
                                                     for g in groups)):
                raise SceneError(f"{cam_url}: 'object_groups' must be a list of lists of object ids")
            self.object_groups = [list(g) for g in groups]

    def _fill_sizes(self) -> None:
        """Nominal size from the first readable RGB header (one request, no decode).

        Frames of one scene share a camera in this layout; `load()` checks each
        frame's real RGB and depth shapes against each other.
        """
        size = (0, 0)
        for fr in self.frames[:5]:
            fs, path = open_fs(url_join(self.url, fr.extra["rgb"]))
            try:
                with fs.open(path, "rb") as f, Image.open(f) as im:
                    size = im.size
                break
            except Exception:
                continue
        self.frames = [Frame(index=fr.index, name=fr.name, K=fr.K, cam2world=fr.cam2world, size=size,
                             timestamp=fr.timestamp, extra=fr.extra) for fr in self.frames]

    def _read_rgb(self, frame: Frame) -> np.ndarray:
        return decode_rgb(read_bytes(url_join(self.url, frame.extra["rgb"])))

    def _read_depth(self, frame: Frame) -> np.ndarray:
        rel = frame.extra["depth"]
        return decode_depth(read_bytes(url_join(self.url, rel)), rel, self.depth_scale)

    def _read_objects(self, frame: Frame) -> np.ndarray:
        from data.shardformat import decode_objects_png

        return decode_objects_png(read_bytes(url_join(self.url, frame.extra["objects"])))


def list_posed_scenes(root: str) -> list[str]:
    """Scene folders (URLs) under a corpus root that hold a cameras.json, sorted."""
    fs, path = open_fs(root)
    hits = fs.glob(path.rstrip("/") + "/*/cameras.json")
    proto = root.split("://")[0] + "://" if "://" in root else ""
    return sorted(proto + h.rsplit("/", 1)[0] for h in hits)
