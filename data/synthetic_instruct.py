"""A small LLaVA-format instruction set about the synthetic rooms, for tests and the demo.

    python data/synthetic_instruct.py --output runs/instruct_data [--rooms 4] [--json]

Writes `OUT/annotations.jsonl` (or `.json`) and `OUT/media/room_NNNN/...`: per room, renders of
`data/synthetic.py` as images (`view_0.jpg`, `view_1.jpg`) and a short walk along the room's
camera path as a real H.264 video file written with PyAV (`walk.mp4`), with conversations about
them: which objects are visible, which colour an object is, which of two objects is nearer to
the camera, which objects two views share, and one text-only record. Several records share one
image or the video (what the shard job groups into one sample); the multi-image record has one
`<image>` per image, the video records one `<video>`.

Answers are derived from the renderer's scene description, never from a model: object names
from `Room.prims`, visibility from the primitive hit by each pixel's ray (an object is visible
when it covers at least MIN_VISIBLE of the image), colours from the mean of the object's
texture named by hue / saturation / value (shading ignored), nearness from the median rendered
z-depth over the object's pixels (pairs closer than NEAR_MARGIN in depth are not asked).

THIS IS A PLUMBING AND RETENTION CHECK, NEVER 3D-VQA TRAINING DATA FOR ANY CLAIM: the rooms,
questions and answers are procedural and tiny, the colour names are coarse, and the set exists to
prove that records, media and conversations go through the shard job, the loader and the chat
templates intact (and that a model keeps its language-modelling behaviour on them). A number
measured on it says nothing about spatial reasoning.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python data/synthetic_instruct.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import colorsys
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data import synthetic
from data.cli import opt, parse_into
from data.seeds import derive_seed
from data.video import write_video

MIN_VISIBLE = 0.01   # share of the image an object must cover to count as visible
NEAR_MARGIN = 0.3    # metres of median depth between two objects before "which is nearer" is asked
PROG = "data/synthetic_instruct.py"


def colour_name(rgb: np.ndarray) -> str:
    """A coarse colour word for a mean RGB (3,) in 0..255: hue bins, grey levels by value."""
    r, g, b = (float(x) / 255.0 for x in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.25:
        return "white" if v > 0.75 else "black" if v < 0.25 else "grey"
    deg = h * 360.0
    if deg < 20 or deg >= 330:
        return "brown" if v < 0.45 else "red"
    if deg < 45:
        return "brown" if v < 0.6 else "orange"
    if deg < 70:
        return "yellow"
    if deg < 165:
        return "green"
    if deg < 195:
        return "teal"
    if deg < 255:
        return "blue"
    if deg < 290:
        return "purple"
    return "pink"


def object_word(name: str) -> str:
    """'box_small' -> 'small box'."""
    parts = name.split("_")
    return " ".join(parts[1:] + parts[:1]) if len(parts) > 1 else name


def _plural(word: str, n: int) -> str:
    if n == 1:
        return f"a {word}" if word[0] not in "aeiou" else f"an {word}"
    return f"{n} {word}es" if word.endswith(("s", "x", "ch", "sh")) else f"{n} {word}s"


def _listing(counts: dict[str, int]) -> str:
    items = [_plural(w, n) for w, n in sorted(counts.items())]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class View:
    """One render and what it shows: RGB, z-depth, and per visible object its pixel share and depth."""

    rgb: np.ndarray                   # (H, W, 3) uint8
    depth: np.ndarray                 # (H, W) float32
    visible: dict[int, tuple[float, float]]  # prim index -> (share of pixels, median depth m)


def render_view(room: synthetic.Room, K: np.ndarray, cam2world: np.ndarray, width: int, height: int) -> View:
    rgb, depth = synthetic.render(room, K, cam2world, width, height)
    dirs = synthetic.pixel_rays(K, width, height) @ cam2world[:3, :3].T   # (H*W, 3), z_cam = 1
    _, prim = synthetic.raycast(room, cam2world[:3, 3], dirs)
    prim = prim.reshape(height, width)
    visible = {}
    for i in range(6, len(room.prims)):  # 0..5 are the room shell
        m = prim == i
        share = float(m.mean())
        if share >= MIN_VISIBLE and np.any(depth[m] > 0):
            visible[i] = (share, float(np.median(depth[m][depth[m] > 0])))
    return View(rgb, depth, visible)


def _word_counts(room: synthetic.Room, prims) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in prims:
        w = object_word(room.prims[i].name)
        out[w] = out.get(w, 0) + 1
    return out


def _unique(room: synthetic.Room, prims) -> list[int]:
    """Visible objects whose word names one object only (so 'the X' is unambiguous)."""
    counts = _word_counts(room, prims)
    return [i for i in sorted(prims) if counts[object_word(room.prims[i].name)] == 1]


def _colour(room: synthetic.Room, i: int) -> str:
    tex = room.textures[room.prims[i].tex_id]
    return colour_name(tex.reshape(-1, 3).mean(axis=0))


def _nearer_pair(room: synthetic.Room, view: View) -> tuple[int, int] | None:
    """Two uniquely named visible objects whose depths differ by NEAR_MARGIN: (nearer, farther)."""
    cand = _unique(room, view.visible)
    best = None
    for a in cand:
        for b in cand:
            da, db = view.visible[a][1], view.visible[b][1]
            if a < b and abs(da - db) >= NEAR_MARGIN:
                gap = abs(da - db)
                if best is None or gap > best[0]:
                    best = (gap, (a, b) if da < db else (b, a))
    return best[1] if best else None


def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def room_records(room: synthetic.Room, views: list[View], walk: list[View], rid: str, media: str) -> list[dict]:
    """The records of one room (media paths relative to the media root)."""
    recs: list[dict[str, Any]] = []
    v0 = views[0]
    img0 = f"{media}/view_0.jpg"
    if v0.visible:
        recs.append({"id": f"{rid}_view0_objects", "image": img0, "conversations": _conv(
            "<image>\nWhich objects can you see in this room?", f"I can see {_listing(_word_counts(room, v0.visible))}.")})
    uniq = _unique(room, v0.visible)
    if uniq:
        i = max(uniq, key=lambda k: v0.visible[k][0])
        w = object_word(room.prims[i].name)
        recs.append({"id": f"{rid}_view0_colour", "image": img0, "conversations": _conv(
            f"<image>\nWhat colour is the {w}?", f"The {w} is {_colour(room, i)}.")})
    pair = _nearer_pair(room, v0)
    if pair:
        a, b = (object_word(room.prims[k].name) for k in pair)
        first, second = sorted((a, b))
        recs.append({"id": f"{rid}_view0_nearer", "image": img0, "conversations": _conv(
            f"<image>\nWhich is nearer to the camera, the {first} or the {second}?",
            f"The {a} is nearer to the camera than the {b}.")})
    shared = set(views[0].visible) & set(views[1].visible)
    answer = (f"Both views show {_listing(_word_counts(room, shared))}." if shared
              else "No object appears in both views.")
    recs.append({"id": f"{rid}_views_shared", "image": [img0, f"{media}/view_1.jpg"], "conversations": _conv(
        "<image>\n<image>\nWhich objects appear in both views?", answer)})
    seen = set().union(*(w.visible for w in walk))
    vid = f"{media}/walk.mp4"
    recs.append({"id": f"{rid}_walk_objects", "video": vid, "conversations": _conv(
        "<video>\nWhich objects appear during this walk through the room?",
        f"The walk shows {_listing(_word_counts(room, seen))}." if seen else "The walk shows only walls.")})
    uniq = _unique(room, seen)
    if uniq:
        i = uniq[0]
        w = object_word(room.prims[i].name)
        recs.append({"id": f"{rid}_walk_colour", "video": vid, "conversations": _conv(
            f"<video>\nWhat colour is the {w} in this video?", f"It is {_colour(room, i)}.")
            + _conv("Is it a box, a sphere or a cylinder?",
                    {"box": "A box.", "sphere": "A sphere.", "cylinder": "A cylinder."}[room.prims[i].kind])})
    pair = _nearer_pair(room, walk[0])
    if pair:
        a, b = (object_word(room.prims[k].name) for k in pair)
        recs.append({"id": f"{rid}_walk_start_nearer", "video": vid, "conversations": _conv(
            f"<video>\nAt the start of the video, which is nearer to the camera: the {a} or the {b}?",
            f"The {a}.")})
    recs.append({"id": f"{rid}_text", "conversations": _conv(
        f"A room is {room.size[0]:.1f} m long and {room.size[1]:.1f} m wide. What is its floor area?",
        f"About {room.size[0] * room.size[1]:.1f} square metres.")})
    return recs


def write_dataset(root: str, rooms: int = 3, seed: int = 0, width: int = 160, height: int = 120,
                  video_frames: int = 24, fps: float = 8.0, as_json: bool = False) -> dict[str, Any]:
    """Write the set under root; returns {"annotations": path, "media_root": root, "records": n,
    "videos": {media path: frames}, "images": [media paths]}. Deterministic per seed (the video
    files' bytes depend on the encoder build)."""
    import av

    if width % 2 or height % 2:
        raise ValueError("width and height must be even (the videos are yuv420p)")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    K = synthetic.default_intrinsics(width, height)
    records: list[dict[str, Any]] = []
    videos: dict[str, int] = {}
    images: list[str] = []
    for r in range(rooms):
        room_seed = derive_seed(seed, "instruct-room", r)
        room = synthetic.make_room(room_seed)
        traj = synthetic.make_trajectory(room, video_frames, room_seed + 1)
        media = f"media/room_{r:04d}"
        os.makedirs(os.path.join(root, media), exist_ok=True)
        walk = [render_view(room, K, T, width, height) for T in traj]
        views = [walk[0], walk[-1]]
        for k, v in enumerate(views):
            Image.fromarray(v.rgb).save(os.path.join(root, media, f"view_{k}.jpg"), "JPEG", quality=95)
            images.append(f"{media}/view_{k}.jpg")
        write_video(os.path.join(root, media, "walk.mp4"), [v.rgb for v in walk], fps=fps, codec=codec)
        videos[f"{media}/walk.mp4"] = len(walk)
        records += room_records(room, views, walk, f"room{r:04d}", media)
    path = os.path.join(root, "annotations.json" if as_json else "annotations.jsonl")
    with open(path, "w") as f:
        if as_json:
            json.dump(records, f, indent=1)
        else:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return {"annotations": path, "media_root": root, "records": len(records), "videos": videos, "images": images}


@dataclass
class Args:
    """Flags of data/synthetic_instruct.py."""

    output: str = opt("runs/instruct_data", "folder for annotations.jsonl and media/")
    rooms: int = opt(3, "synthetic rooms (each gives 2 images, 1 video and up to 8 records)")
    seed: int = opt(0, "seed of the rooms")
    width: int = opt(160, "render width (even)")
    height: int = opt(120, "render height (even)")
    video_frames: int = opt(24, "frames of each walk video")
    fps: float = opt(8.0, "frame rate of the walk videos")
    json: bool = opt(False, "write annotations.json (a JSON list) instead of annotations.jsonl")

    def __post_init__(self) -> None:
        if self.rooms < 1 or self.video_frames < 2 or self.fps <= 0:
            raise ValueError("--rooms must be >= 1, --video-frames >= 2 and --fps > 0")
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 16:
            raise ValueError("--width and --height must be even and >= 16")


def main(argv: list[str] | None = None) -> int:
    a = parse_into(Args, argv, PROG, "A small LLaVA-format instruction set about the synthetic rooms "
                                     "(a plumbing check, not training data for any claim).")
    out = write_dataset(a.output, a.rooms, a.seed, a.width, a.height, a.video_frames, a.fps, a.json)
    print(f"{out['records']} records, {len(out['images'])} images, {len(out['videos'])} videos -> {out['annotations']}")
    print(f"shard them: python pipeline/shard.py --format llava-json --input {out['annotations']} "
          f"--media-root {a.output} --output runs/instruct_shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
