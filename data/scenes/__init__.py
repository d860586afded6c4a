"""Scene readers: one Scene API for every corpus layout (DESIGN §3).

`open_scene(url, format)` returns a lazy `Scene`; `list_scenes(root, format)` lists
the scene URLs of a corpus root (local path or s3://). Each reader lives in its own
module and is imported only when its format is asked for.
"""
from __future__ import annotations

import importlib
from typing import Any

from data.scenes.base import Frame, FrameError, Scene, SceneError  # noqa: F401

# format -> (module, scene class, lister function)
FORMATS: dict[str, tuple[str, str, str]] = {
    "posed": ("data.scenes.posed", "PosedScene", "list_posed_scenes"),
    "synthetic": ("data.scenes.posed", "PosedScene", "list_posed_scenes"),
    "scannet": ("data.scenes.scannet", "ScanNetScene", "list_scannet_scenes"),
    "scannetpp": ("data.scenes.scannetpp", "ScanNetPPScene", "list_scannetpp_scenes"),
    "arkitscenes": ("data.scenes.arkitscenes", "ARKitScene", "list_arkit_scenes"),
    "nerfstudio": ("data.scenes.nerfstudio", "NerfstudioScene", "list_nerfstudio_scenes"),
}


def _resolve(format: str) -> tuple[Any, Any]:
    if format not in FORMATS:
        raise SceneError(f"unknown format {format!r}; choose one of {', '.join(sorted(FORMATS))}")
    mod_name, cls_name, lister = FORMATS[format]
    mod = importlib.import_module(mod_name)
    return getattr(mod, cls_name), getattr(mod, lister)


def open_scene(url: str, format: str, **options: Any) -> Scene:
    """Open one scene folder of the given layout (lazy: reads metadata only)."""
    cls, _ = _resolve(format)
    if format == "synthetic":
        options.setdefault("dataset", "synthetic")
    return cls(url, **options)


def list_scenes(root: str, format: str) -> list[str]:
    """Scene URLs under a corpus root, sorted. Raises SceneError when there are none."""
    _, lister = _resolve(format)
    from data.scenes.base import open_fs

    fs, path = open_fs(root)
    if not fs.exists(path):
        raise SceneError(f"--input {root}: no such file or folder")
    scenes = lister(root)
    if not scenes:
        raise SceneError(f"--input {root}: no {format} scenes found (one folder per scene expected; "
                         f"see README 'Corpus layouts')")
    return scenes
