"""Procedurally generated indoor rooms with exact ground truth (pure numpy).

World frame: metres, z up, floor at z = 0; a room spans [0, X] x [0, Y] x [0, Z].
Cameras follow DESIGN section 3: OpenCV axes, poses are `cam2world` (4, 4),
depth is z-depth, the centre of pixel (u, v) is (u, v).

A room is a list of primitives (6 axis-aligned quads for the shell, solid
axis-aligned boxes, spheres, vertical cylinders). Each carries a texture cut
from a photograph shipped inside the scikit-image wheel (read from its files,
never downloaded) tiled in metres, and a view-independent Lambertian shading
factor from a fixed directional light, so a surface point has the same colour
from every view (up to mip-map blur). Rendering is exact vectorised ray casting.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import time
from dataclasses import dataclass, field

import math

import numpy as np
from PIL import Image

from data.seeds import derive_seed

GENERATOR = "gasp-synthetic-v2"  # v2: trajectories seeded with data.seeds.derive_seed
TEX_SIZE = 128          # texels per tile side
CAMERA_CLEARANCE = 0.3  # metres between any camera centre and any primitive
_BAND = (0.85, 1.15)    # radial scale range of the camera band around room.path
_BAND_CLEAR = 0.45      # 2D clearance kept between objects and the camera band
_EPS = 1e-9

# Real photographs of skimage.data that ship inside the wheel (no pooch fetch).
_PHOTO_FILES = {
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png",
    "cell": "cell.png", "chelsea": "chelsea.png", "clock_motion": "clock_motion.png",
    "coffee": "coffee.png", "coins": "coins.png", "grass": "grass.png",
    "gravel": "gravel.png", "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png", "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png", "page": "page.png",
    "retina": "retina.jpg", "rocket": "rocket.jpg", "text": "text.png",
}


# ----------------------------------------------------------------------------- textures

def skimage_data_dir() -> pathlib.Path:
    """Folder of the data files inside the installed scikit-image package."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("scikit-image is not installed: pip install scikit-image")
    return pathlib.Path(spec.origin).parent / "data"


def available_photos() -> list[str]:
    """Names of the photographs whose files exist in the installed wheel, sorted."""
    d = skimage_data_dir()
    return sorted(n for n, f in _PHOTO_FILES.items() if (d / f).is_file())


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """Photograph `name` as read-only RGB uint8 (H, W, 3), read straight from the wheel."""
    with Image.open(skimage_data_dir() / _PHOTO_FILES[name]) as im:
        img = np.array(im.convert("RGB"), dtype=np.uint8)
    img.setflags(write=False)
    return img


def make_texture(rng: np.random.Generator, photos: list[str]) -> tuple[np.ndarray, str]:
    """Random crop / rotation / flip / contrast stretch / colour tint of a photo.

    Returns the texture (TEX_SIZE, TEX_SIZE, 3) uint8 and the photo's name."""
    name = photos[int(rng.integers(len(photos)))]
    img = load_photo(name)
    h, w = img.shape[:2]
    side = int(rng.uniform(0.25, 0.7) * min(h, w))
    y0 = int(rng.integers(int(0.1 * h), max(int(0.9 * h) - side, int(0.1 * h)) + 1))
    x0 = int(rng.integers(int(0.1 * w), max(int(0.9 * w) - side, int(0.1 * w)) + 1))
    crop = Image.fromarray(img[y0:y0 + side, x0:x0 + side]).resize(
        (TEX_SIZE, TEX_SIZE), Image.Resampling.LANCZOS)
    tex = np.rot90(np.asarray(crop, dtype=np.float64), k=int(rng.integers(4)))
    if rng.random() < 0.5:
        tex = tex[:, ::-1]
    lo, hi = np.percentile(tex, [2.0, 98.0])
    tex = 30.0 + (tex - lo) * (200.0 / max(hi - lo, 1.0))          # contrast stretch
    gray = tex.mean(axis=2, keepdims=True)
    tex = gray + rng.uniform(0.5, 1.3) * (tex - gray)               # saturation
    tex = tex * rng.uniform(0.55, 1.15, size=3)                      # colour tint
    return np.clip(np.round(tex), 0, 255).astype(np.uint8), name


def _mipmaps(tex: np.ndarray) -> list[np.ndarray]:
    """Box-filtered pyramid of a square texture, each level flattened (S*S, 3) float32."""
    level = tex.astype(np.float32)
    out = [level.reshape(-1, 3)]
    while level.shape[0] > 8:
        level = 0.25 * (level[0::2, 0::2] + level[1::2, 0::2] + level[0::2, 1::2] + level[1::2, 1::2])
        out.append(level.reshape(-1, 3))
    return out


def _bilinear(flat: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Sample a wrapped texture level (S*S, 3) at uv (M, 2) in tiles -> (M, 3)."""
    size = int(round(np.sqrt(flat.shape[0])))
    s = uv[:, 0] * size - 0.5
    t = uv[:, 1] * size - 0.5
    c0, r0 = np.floor(s), np.floor(t)
    fs, ft = (s - c0)[:, None].astype(np.float32), (t - r0)[:, None].astype(np.float32)
    c0, r0 = c0.astype(np.int64) % size, r0.astype(np.int64) % size
    c1, r1 = (c0 + 1) % size, (r0 + 1) % size
    top = flat[r0 * size + c0] * (1 - fs) + flat[r0 * size + c1] * fs
    bot = flat[r1 * size + c0] * (1 - fs) + flat[r1 * size + c1] * fs
    return top * (1 - ft) + bot * ft


# ----------------------------------------------------------------------------- scene model

@dataclass
class Primitive:
    """One textured surface. `lo`, `hi` (3,) are its axis-aligned bounds:
    quad: lo[a] == hi[a] on its normal axis a; box: the box; sphere: the cube
    around it; cylinder (vertical): the box around it."""
    kind: str                     # "quad" | "box" | "sphere" | "cylinder"
    lo: np.ndarray
    hi: np.ndarray
    tex_id: int
    tile: float                   # metres per texture tile
    name: str = ""
    normal: np.ndarray | None = None   # quad only: (3,) unit normal facing the room

    @property
    def centre(self) -> np.ndarray:
        return 0.5 * (self.lo + self.hi)

    @property
    def radius(self) -> float:
        return 0.5 * float(self.hi[0] - self.lo[0])


@dataclass
class Room:
    size: np.ndarray                          # (3,) X, Y, Z in metres
    prims: list[Primitive]                    # 0..5 are floor, ceiling and the 4 walls
    textures: list[np.ndarray]                # (TEX_SIZE, TEX_SIZE, 3) uint8 each
    texture_sources: list[str]                # photo each texture was cut from
    light: np.ndarray                         # (3,) unit direction towards the light
    ambient: float
    path: tuple[float, float, float, float]   # camera band ellipse (cx, cy, a, b), kept free
    lookalikes: list[tuple[int, int]]         # prim-id pairs: same shape, size and texture
    seed: int
    _mips: list | None = field(default=None, repr=False, compare=False)

    @property
    def mipmaps(self) -> list[list[np.ndarray]]:
        if self._mips is None:
            self._mips = [_mipmaps(t) for t in self.textures]
        return self._mips


def _ellipse_band(path, n_theta: int = 256) -> np.ndarray:
    """Points (n, 2) covering the camera band around the path ellipse."""
    cx, cy, a, b = path
    th = np.linspace(0.0, 2 * np.pi, n_theta, endpoint=False)
    s = np.linspace(_BAND[0], _BAND[1], 5)[:, None]
    return np.stack([cx + s * a * np.cos(th), cy + s * b * np.sin(th)], -1).reshape(-1, 2)


def _fits(lo, hi, room_size, prims, band, gap=0.05) -> bool:
    """Inside the room, clear of the camera band, no overlap with other objects."""
    if np.any(lo[:2] < 0.02) or np.any(hi[:2] > room_size[:2] - 0.02) or hi[2] > room_size[2] - 0.2:
        return False
    d = np.linalg.norm(np.maximum(np.maximum(lo[:2] - band, band - hi[:2]), 0.0), axis=1)
    if d.min() < _BAND_CLEAR:
        return False
    for p in prims:
        if p.kind == "quad":
            continue
        if (np.all(lo[:2] < p.hi[:2] + gap) and np.all(hi[:2] > p.lo[:2] - gap)
                and lo[2] < p.hi[2] - 1e-9 and hi[2] > p.lo[2] + 1e-9):
            return False
    return True


# Object templates: kind, size ranges (width, depth, height) or (radius, height).
_FLOOR = {
    "cabinet": ("box", (0.5, 1.2), (0.35, 0.55), (0.6, 1.2)),
    "shelf": ("box", (0.6, 1.4), (0.25, 0.4), (1.4, 2.1)),
    "table": ("box", (0.8, 1.6), (0.5, 0.9), (0.7, 0.8)),
    "crate": ("box", (0.3, 0.6), (0.3, 0.6), (0.3, 0.6)),
    "bin": ("cylinder", (0.12, 0.3), None, (0.4, 1.1)),
    "ball": ("sphere", (0.15, 0.35), None, None),
}
_STACKED = {
    "box_small": ("box", (0.15, 0.4), (0.15, 0.4), (0.1, 0.35)),
    "vase": ("cylinder", (0.05, 0.15), None, (0.15, 0.4)),
    "globe": ("sphere", (0.08, 0.2), None, None),
}


def _sample_dims(rng, template) -> tuple[str, np.ndarray]:
    """Extent (3,) of a template instance (footprint x, footprint y, height)."""
    kind, w, d, h = template
    if kind == "box":
        dims = np.array([rng.uniform(*w), rng.uniform(*d), rng.uniform(*h)])
        return kind, dims if rng.random() < 0.5 else dims[[1, 0, 2]]
    r = rng.uniform(*w)
    return kind, np.array([2 * r, 2 * r, rng.uniform(*h) if kind == "cylinder" else 2 * r])


def _place(rng, kind, dims, room: Room, band, stacked: bool, tries=60, away_from=None):
    """Find lo, hi for an object of extent `dims`, on the floor (against a wall or
    free) or on top of an existing box; None if nothing fits."""
    X, Y, _ = room.size
    supports = [p for p in room.prims if p.kind == "box" and p.hi[2] < room.size[2] - 0.5]
    for _ in range(tries):
        if stacked:
            if not supports:
                return None
            sup = supports[int(rng.integers(len(supports)))]
            room_xy = sup.hi[:2] - sup.lo[:2] - dims[:2] - 0.04
            if np.any(room_xy < 0):
                continue
            lo = np.array([*(sup.lo[:2] + 0.02 + rng.random(2) * room_xy), sup.hi[2]])
        elif rng.random() < 0.75:                       # against a random wall
            wall = int(rng.integers(4))
            axis, side = wall // 2, wall % 2
            lo = np.array([rng.uniform(0, X - dims[0]), rng.uniform(0, Y - dims[1]), 0.0])
            lo[axis] = 0.03 if side == 0 else room.size[axis] - 0.03 - dims[axis]
        else:                                           # free standing
            lo = np.array([rng.uniform(0, X - dims[0]), rng.uniform(0, Y - dims[1]), 0.0])
        hi = lo + dims
        if away_from is not None and np.linalg.norm(0.5 * (lo + hi) - away_from) < 1.0:
            continue
        if _fits(lo, hi, room.size, room.prims, band):
            return lo, hi
    return None


def make_room(seed: int, lookalikes: bool = True) -> Room:
    """Random room: 4-7 x 3-6 x 2.5-3 m, 6-14 objects; with `lookalikes`, 2-3 pairs
    of identical objects (same shape, size, texture) at different positions."""
    rng = np.random.Generator(np.random.PCG64(seed))
    photos = available_photos()
    if len(photos) < 4:
        raise RuntimeError(f"scikit-image ships only {len(photos)} photos in {skimage_data_dir()}")
    size = np.array([rng.uniform(4, 7), rng.uniform(3, 6), rng.uniform(2.5, 3.0)])
    elev, azim = np.deg2rad(rng.uniform(35, 65)), rng.uniform(0, 2 * np.pi)
    light = np.array([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
    margin = rng.uniform(0.95, 1.15)
    path = (size[0] / 2, size[1] / 2, size[0] / 2 - margin, size[1] / 2 - margin)
    room = Room(size, [], [], [], light, float(rng.uniform(0.45, 0.6)), path, [], int(seed))
    band = _ellipse_band(path)

    def new_texture() -> int:
        tex, src = make_texture(rng, photos)
        room.textures.append(tex)
        room.texture_sources.append(src)
        return len(room.textures) - 1

    for name, axis, sign in [("floor", 2, 1), ("ceiling", 2, -1), ("wall_x0", 0, 1),
                             ("wall_x1", 0, -1), ("wall_y0", 1, 1), ("wall_y1", 1, -1)]:
        lo, hi, normal = np.zeros(3), size.copy(), np.zeros(3)
        lo[axis] = hi[axis] = 0.0 if sign > 0 else size[axis]
        normal[axis] = sign
        room.prims.append(Primitive("quad", lo, hi, new_texture(), rng.uniform(0.7, 1.5), name, normal))

    def add(name, kind, dims, stacked, tex_id=None, tile=None, away_from=None):
        spot = _place(rng, kind, dims, room, band, stacked, away_from=away_from)
        if spot is None:
            return None
        tex_id = new_texture() if tex_id is None else tex_id
        tile = rng.uniform(0.4, 1.0) if tile is None else tile
        room.prims.append(Primitive(kind, spot[0], spot[1], tex_id, tile, name))
        return len(room.prims) - 1

    def random_object(stacked):
        table = _STACKED if stacked else _FLOOR
        name = list(table)[int(rng.integers(len(table)))]
        return (name, *_sample_dims(rng, table[name]))

    n_objects = int(rng.integers(6, 15))
    n_floor = max(2, n_objects // 2 - 1)
    for _ in range(4 * n_floor):
        if len(room.prims) - 6 >= n_floor:
            break
        add(*random_object(stacked=False), stacked=False)
    n_pairs = int(rng.integers(2, 4)) if lookalikes else 0
    for _ in range(30):
        if len(room.lookalikes) >= n_pairs:
            break
        stacked = rng.random() < 0.5
        name, kind, dims = random_object(stacked)
        first = add(name, kind, dims, stacked)
        if first is None:
            continue
        p = room.prims[first]
        second = add(name, kind, dims, stacked, p.tex_id, p.tile, away_from=p.centre)
        if second is None:
            room.prims.pop()
            room.textures.pop()
            room.texture_sources.pop()
            continue
        room.lookalikes.append((first, second))
    for _ in range(6 * n_objects):
        if len(room.prims) - 6 >= n_objects:
            break
        stacked = rng.random() < 0.6
        add(*random_object(stacked), stacked=stacked)
    return room


# ----------------------------------------------------------------------------- ray casting

# Rays are passed per axis: o[a] is a scalar (shared origin) or (N,), d[a] and inv[a] = 1 / d[a] are (N,).

def _hit_quad(p: Primitive, o, d, inv):
    a = int(np.argmax(np.abs(p.normal)))
    t = (p.lo[a] - o[a]) * inv[a]
    ok = (t > _EPS) & (d[a] * p.normal[a] < 0)
    for b in {0, 1, 2} - {a}:
        x = o[b] + t * d[b]
        ok &= (x >= p.lo[b] - 1e-9) & (x <= p.hi[b] + 1e-9)
    return np.where(ok, t, np.inf)


def _hit_box(p: Primitive, o, d, inv):
    near, far = -np.inf, np.inf
    for a in range(3):
        t1, t2 = (p.lo[a] - o[a]) * inv[a], (p.hi[a] - o[a]) * inv[a]
        near, far = np.maximum(near, np.minimum(t1, t2)), np.minimum(far, np.maximum(t1, t2))
    return np.where((near <= far) & (near > _EPS), near, np.inf)


def _hit_sphere(p: Primitive, o, d, inv):
    oc = [o[a] - p.centre[a] for a in range(3)]
    a2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    b = oc[0] * d[0] + oc[1] * d[1] + oc[2] * d[2]
    disc = b * b - a2 * (oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2] - p.radius ** 2)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a2
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _hit_cylinder(p: Primitive, o, d, inv):
    c, r = p.centre, p.radius
    ox, oy, dx, dy = o[0] - c[0], o[1] - c[1], d[0], d[1]
    a2 = dx * dx + dy * dy
    b = ox * dx + oy * dy
    disc = b * b - a2 * (ox * ox + oy * oy - r * r)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a2
    z = o[2] + t * d[2]
    best = np.where((disc >= 0) & (a2 > 0) & (t > _EPS) & (z >= p.lo[2]) & (z <= p.hi[2]), t, np.inf)
    for zc in (p.lo[2], p.hi[2]):
        tc = (zc - o[2]) * inv[2]
        inside = (ox + tc * dx) ** 2 + (oy + tc * dy) ** 2 <= r * r
        best = np.where((tc > _EPS) & inside & (tc < best), tc, best)
    return best


_HIT = {"quad": _hit_quad, "box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def raycast(room: Room, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of rays `origins + t * dirs` (origins (N, 3) or (3,), dirs (N, 3)).

    Returns t (N,) float64 in units of |dirs| (metres for unit dirs; z-depth for
    camera rays with z_cam = 1), inf where nothing is hit, and prim_id (N,) int64, -1 there."""
    dirs = np.asarray(dirs, dtype=np.float64).reshape(-1, 3)
    origins = np.asarray(origins, dtype=np.float64)
    o = list(origins) if origins.shape == (3,) else [origins.reshape(-1, 3)[:, a].copy() for a in range(3)]
    d = [dirs[:, a].copy() for a in range(3)]
    best = np.full(len(dirs), np.inf)
    prim_id = np.full(len(dirs), -1, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = [1.0 / x for x in d]
        for i, p in enumerate(room.prims):
            t = _HIT[p.kind](p, o, d, inv)
            closer = t < best
            best = np.where(closer, t, best)
            prim_id[closer] = i
    return best, prim_id


def distance_to_prims(room: Room, points: np.ndarray) -> np.ndarray:
    """Euclidean distance (N,) from points (N, 3) to the nearest primitive (0 inside a solid)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.full(len(pts), np.inf)
    for p in room.prims:
        if p.kind in ("quad", "box"):
            dist = np.linalg.norm(pts - np.clip(pts, p.lo, p.hi), axis=1)
        elif p.kind == "sphere":
            dist = np.maximum(np.linalg.norm(pts - p.centre, axis=1) - p.radius, 0.0)
        else:
            dr = np.maximum(np.linalg.norm(pts[:, :2] - p.centre[:2], axis=1) - p.radius, 0.0)
            dz = np.maximum(np.maximum(p.lo[2] - pts[:, 2], pts[:, 2] - p.hi[2]), 0.0)
            dist = np.hypot(dr, dz)
        out = np.minimum(out, dist)
    return out


def _rowdot(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """v (N, 3) . w (3,) -> (N,), elementwise (no BLAS threads, same bits on every machine)."""
    return v[:, 0] * w[0] + v[:, 1] * w[1] + v[:, 2] * w[2]


def _transform(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(M @ v.T).T for M (3, 3), v (N, 3), elementwise like _rowdot."""
    return np.stack([_rowdot(v, row) for row in M], axis=-1)


def _surface(p: Primitive, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normals (M, 3) and texture coordinates (M, 2) in tiles of hit points x (M, 3) on p."""
    n = np.zeros_like(x)
    idx = np.arange(len(x))
    if p.kind in ("quad", "box"):
        if p.kind == "quad":
            axis = np.full(len(x), int(np.argmax(np.abs(p.normal))))
            n[:] = p.normal
        else:
            dl, dh = np.abs(x - p.lo), np.abs(x - p.hi)
            axis = np.argmin(np.minimum(dl, dh), axis=1)
            n[idx, axis] = np.where(dl[idx, axis] < dh[idx, axis], -1.0, 1.0)
        u = np.where(axis == 0, x[:, 1] - p.lo[1], x[:, 0] - p.lo[0])
        v = np.where(axis == 2, x[:, 1] - p.lo[1], p.hi[2] - x[:, 2])
        return n, np.stack([u, v], -1) / p.tile
    c, r = p.centre, p.radius
    tile_u = 2 * np.pi * r / max(1, round(2 * np.pi * r / p.tile))   # seamless wrap
    if p.kind == "sphere":
        n = (x - c) / r
        u = r * np.arctan2(n[:, 1], n[:, 0])
        v = r * np.arccos(np.clip(n[:, 2], -1.0, 1.0))
        return n, np.stack([u / tile_u, v / p.tile], -1)
    rad = np.linalg.norm(x[:, :2] - c[:2], axis=1)
    face = np.argmin(np.stack([np.abs(rad - r), np.abs(x[:, 2] - p.hi[2]), np.abs(x[:, 2] - p.lo[2])], 1), 1)
    side = face == 0
    n[side, :2] = (x[side, :2] - c[:2]) / r
    n[~side, 2] = np.where(face[~side] == 1, 1.0, -1.0)
    u = np.where(side, r * np.arctan2(x[:, 1] - c[1], x[:, 0] - c[0]) / tile_u, (x[:, 0] - p.lo[0]) / p.tile)
    v = np.where(side, p.hi[2] - x[:, 2], x[:, 1] - p.lo[1]) / p.tile
    return n, np.stack([u, v], -1)


def _groups(keys: np.ndarray):
    """(key, indices) for each distinct value of the integer array keys (M,)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    for idx in np.split(order, cuts):
        if len(idx):
            yield int(keys[idx[0]]), idx


def shade(room: Room, points: np.ndarray, prim_id: np.ndarray, footprint: np.ndarray | None = None) -> np.ndarray:
    """Colour (M, 3) float32 in 0..255 of surface points (M, 3) lying on prims `prim_id` (M,).

    `footprint` (M,) is the pixel size in metres at each point (depth / fx); it picks
    the mip level (trilinear). None samples the full-resolution texture."""
    out = np.zeros((len(points), 3), dtype=np.float32)
    for i, m in _groups(np.asarray(prim_id)):
        p = room.prims[i]
        n, uv = _surface(p, points[m])
        shading = room.ambient + (1 - room.ambient) * np.maximum(_rowdot(n, room.light), 0.0)
        mips = room.mipmaps[p.tex_id]
        if footprint is None:
            col = _bilinear(mips[0], uv)
        else:
            level = np.clip(np.log2(np.maximum(footprint[m] * TEX_SIZE / p.tile, 1e-6)), 0, len(mips) - 1)
            l0 = np.minimum(level.astype(np.int64), len(mips) - 2)
            frac = (level - l0)[:, None].astype(np.float32)
            col = np.empty((len(m), 3), dtype=np.float32)
            for lv, k in _groups(l0):
                col[k] = _bilinear(mips[lv], uv[k]) * (1 - frac[k]) + _bilinear(mips[lv + 1], uv[k]) * frac[k]
        out[m] = col * shading[:, None].astype(np.float32)
    return out


# ----------------------------------------------------------------------------- cameras

def default_intrinsics(width: int, height: int, hfov_deg: float = 70.0) -> np.ndarray:
    """K (3, 3) float64 with square pixels, cx = (W - 1) / 2, cy = (H - 1) / 2."""
    f = 0.5 * width / np.tan(np.deg2rad(hfov_deg) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def pixel_rays(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-frame rays (H*W, 3) `inv(K) @ [u, v, 1]`, row-major, z = 1."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], -1)
    return _transform(np.linalg.inv(K), pix)


def _norm3(v: np.ndarray) -> float:
    """|v| of a 3-vector in a fixed order of operations (np.linalg.norm goes through the BLAS kernel the
    CPU selects, whose last bit differs between machines)."""
    return math.sqrt(float(v[0]) * float(v[0]) + float(v[1]) * float(v[1]) + float(v[2]) * float(v[2]))


def look_at(eye: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """cam2world (4, 4) at `eye` looking along `forward`, zero roll (camera x horizontal)."""
    z = forward / _norm3(forward)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= _norm3(x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    T[:3, 3] = eye
    return T


# The camera path uses the C library's scalar sin / cos / atan2, not numpy's: numpy dispatches float64
# sin / cos to SIMD code chosen by the CPU (AVX-512 or not), whose last bit differs between machines,
# and the poses are written to the shards in full precision (tests/test_shard_job.py's golden bytes).
_sin = np.vectorize(math.sin, otypes=[np.float64])
_cos = np.vectorize(math.cos, otypes=[np.float64])
_atan2 = np.vectorize(math.atan2, otypes=[np.float64])
_asin = np.vectorize(math.asin, otypes=[np.float64])


def _smooth_periodic(rng, theta: np.ndarray, amplitude: float, harmonics: int = 3) -> np.ndarray:
    """Random smooth periodic function of theta with max |value| <= amplitude."""
    w = rng.normal(size=(harmonics, 2)) / np.arange(1, harmonics + 1)[:, None]
    k = np.arange(1, harmonics + 1)[:, None]
    f = (w[:, :1] * _cos(k * theta) + w[:, 1:] * _sin(k * theta)).sum(0)
    return amplitude * f / np.abs(w).sum()


def make_trajectory(room: Room, n_frames: int, seed: int, step: float | None = None) -> list[np.ndarray]:
    """Smooth camera path: cam2world (4, 4) float64 per frame.

    The camera moves along a wobbly closed curve inside the free band around
    room.path at 1.25-1.75 m height, `step` metres per frame (random 3-5 cm when
    None), pitched 4-20 degrees down, roll 0. Its yaw swings smoothly (+-30-60
    degrees, no full turn per loop) about the direction of one room corner, so it
    turns ~0.4-1.4 degrees per frame on average (at most ~3) and frames 40 apart
    still share much of the view. Every camera centre is at least CAMERA_CLEARANCE from every primitive."""
    return _band_trajectory(room, n_frames, seed, step, (0.03, 0.05), None)


def _band_trajectory(room: Room, n_frames: int, seed: int, step: float | None,
                     step_range: tuple[float, float],
                     sway_range: tuple[tuple[float, float], tuple[float, float]] | None) -> list[np.ndarray]:
    """The path of make_trajectory, `step` drawn from step_range when None.

    sway_range None is make_trajectory's path bit for bit (same draws, same operations).
    Otherwise ((amp_lo, amp_hi) degrees, (period_lo, period_hi) metres): the yaw gets an extra
    sinusoid of the distance travelled, amplitude and period drawn from those ranges after all
    of the walk's draws that precede its retry loop, so the camera looks left and right as it goes."""
    rng = np.random.Generator(np.random.PCG64(seed))
    cx, cy, a, b = room.path
    step = rng.uniform(*step_range) if step is None else step
    theta = np.linspace(0.0, 2 * np.pi, 4097)
    corner = rng.choice([-1.0, 1.0], size=2) * room.size[:2] / 2       # face a random corner
    psi0 = _atan2(corner[1], corner[0]) + np.deg2rad(rng.uniform(-10, 10))
    amp = np.deg2rad(rng.uniform(30, 60))
    theta0 = _atan2(a * _sin(psi0), b * _cos(psi0))   # path point nearest the faced side
    if sway_range is not None:
        sway_amp = np.deg2rad(rng.uniform(*sway_range[0]))
        sway_phase = 2 * np.pi * step * np.arange(n_frames) / rng.uniform(*sway_range[1]) + rng.uniform(0, 2 * np.pi)
        sway = sway_amp * _sin(sway_phase)            # (n_frames,) radians
    for attempt in range(21):
        calm = attempt == 20                          # last resort: the plain ellipse
        scale = 1.0 + (0 if calm else _smooth_periodic(rng, theta, 0.9 * (_BAND[1] - 1)))
        height = 1.5 + (0 if calm else _smooth_periodic(rng, theta, 0.25))
        yaw_off = np.deg2rad(0 if calm else _smooth_periodic(rng, theta, 15.0))
        pitch = np.deg2rad(-12.0 + (0 if calm else _smooth_periodic(rng, theta, 8.0)))
        curve = np.stack([cx + scale * a * _cos(theta), cy + scale * b * _sin(theta),
                          np.broadcast_to(height, theta.shape)], -1)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
        s = (rng.uniform(0, arc[-1]) + (1 if rng.random() < 0.5 else -1) * step * np.arange(n_frames)) % arc[-1]
        th = np.interp(s, arc, theta)
        eye = np.stack([np.interp(th, theta, curve[:, i]) for i in range(3)], -1)
        yaw = psi0 - amp * _sin(th - theta0) + np.interp(th, theta, yaw_off)
        if sway_range is not None:
            yaw = yaw + sway
        pt = np.interp(th, theta, pitch)
        fwd = np.stack([_cos(pt) * _cos(yaw), _cos(pt) * _sin(yaw), _sin(pt)], -1)
        if distance_to_prims(room, eye).min() >= CAMERA_CLEARANCE:
            return [look_at(e, f) for e, f in zip(eye, fwd)]
    raise RuntimeError(f"room seed {room.seed}: no camera path keeps {CAMERA_CLEARANCE} m clearance")


MOTIONS = ("walk", "orbit", "sweep", "scan")
_SWEEP_STEP = (0.08, 0.12)         # metres a frame
_SWEEP_SWAY = ((20.0, 35.0), (3.0, 5.0))   # extra yaw sinusoid: amplitude degrees, period metres
_SCAN_SWAY = ((40.0, 55.0), (1.2, 2.0))    # scan: the sweep with a wide, quick look left and right
_ORBIT_RADIUS = (1.2, 2.5)         # metres from the orbited object's vertical axis
_ORBIT_HEIGHT = (1.2, 1.8)         # camera height range, metres
_ORBIT_BOB = 0.12                  # max height variation about the orbit's mean height, metres
_ORBIT_RATE = (2.0, 4.0)           # degrees of orbit per frame
_ORBIT_FALLBACK_RADII = (1.1, 1.0, 0.9, 0.8, 0.7, 0.6)   # tried, in this order, when nothing fits at 1.2-2.5 m
_ORBIT_GRID = 720                  # feasibility samples around a circle
_ORBIT_MIN_ARC = 100.0             # degrees: shortest clear arc the camera goes back and forth along
_ORBIT_GOOD_ARC = 150.0            # degrees: arcs this long (or the whole path) preferred to look-alikes
_ORBIT_LOOK = 0.3                  # max distance of the look point from the object's centre, x radius
_ORBIT_SOFTNESS = 0.97             # k of the soft triangle wave: closer to 1, sharper turns


def _check_motion(motion: str) -> None:
    """ValueError naming MOTIONS unless `motion` is one of them."""
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}")


def make_motion_trajectory(room: Room, n_frames: int, seed: int, motion: str,
                           step: float | None = None) -> list[np.ndarray]:
    """Camera path of kind `motion` (one of MOTIONS): cam2world (4, 4) float64 per frame, roll 0.

    walk:  make_trajectory(room, n_frames, seed, step), bit for bit: 3-5 cm a frame, ~0.9 degrees
           of turn a frame on average (60-frame paths, 40 rooms).
    sweep: the walk's band path at `step` metres a frame (random 8-12 cm when None) with an extra
           yaw swing (+-20-35 degrees, period 3-5 m travelled): ~3.6 degrees of turn a frame on
           average, ~11 at most, so frames 24 apart share ~1/3 of the view.
    scan:  the sweep with a wider, quicker look left and right (+-40-55 degrees, period 1.2-2 m
           travelled, so 10-25 frames): scene points cross the image between most frames that
           still share a view, where a guess of "the same place in the image" fails.
    orbit: circles one object at 1.2-2.5 m from its vertical axis (1.1 ... 0.6 m only when nothing
           fits there), camera 1.2-1.8 m high, looking at the object's centre plus a smooth offset
           of norm <= 0.3 x radius (the centre stays within ~17 degrees of the optical axis), 2-4
           degrees of orbit a frame (`step`, if given: metres of arc a frame). Where no clear arc
           is as long as the path, it goes back and forth along the longest (>= 100 degrees),
           starting at rest at one end and slowing to turn at the other. Look-alike pairs' objects
           are preferred among objects with an arc of >= 150 degrees (or the whole path) in view
           (_orbit_trajectory states the order). RuntimeError naming the room seed if no object fits.
    Every camera centre is inside the room and at least CAMERA_CLEARANCE from every primitive;
    the same (room, n_frames, seed, motion, step) gives the same poses on every machine. For orbit
    the first frames of a longer path are not the shorter path (the arc is chosen for n_frames)."""
    _check_motion(motion)
    if motion == "walk":
        return make_trajectory(room, n_frames, seed, step)
    if motion in ("sweep", "scan"):
        return _band_trajectory(room, n_frames, seed, step, _SWEEP_STEP,
                                _SWEEP_SWAY if motion == "sweep" else _SCAN_SWAY)
    return _orbit_trajectory(room, n_frames, seed, step)


def _orbit_eyes(centre: np.ndarray, radius: float, phi: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Camera centres (N, 3) on the circle of `radius` about centre's vertical axis at angles phi (N,)."""
    return np.stack([centre[0] + radius * _cos(phi), centre[1] + radius * _sin(phi), height], -1)


def _orbit_clear(room: Room, eyes: np.ndarray) -> np.ndarray:
    """(N,) bool: inside the room by CAMERA_CLEARANCE and CAMERA_CLEARANCE from every primitive."""
    inside = np.all((eyes >= CAMERA_CLEARANCE) & (eyes <= room.size - CAMERA_CLEARANCE), axis=1)
    return inside & (distance_to_prims(room, eyes) >= CAMERA_CLEARANCE)


def _clear_runs(clear: np.ndarray) -> list[tuple[int, int]]:
    """Maximal circular runs of True in clear (G,) as (first index, length), longest first;
    [(0, G)] when all of it is True."""
    n = len(clear)
    if clear.all():
        return [(0, n)]
    if not clear.any():
        return []
    shift = int(np.flatnonzero(~clear)[0])            # start scanning just after a blocked sample
    rolled = np.roll(clear, -shift).astype(np.int8)
    edges = np.diff(np.concatenate([[0], rolled, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    runs = [((int(lo) + shift) % n, int(hi - lo)) for lo, hi in zip(starts, ends)]
    return sorted(runs, key=lambda r: -r[1])


def _orbit_trajectory(room: Room, n_frames: int, seed: int, step: float | None) -> list[np.ndarray]:
    """The "orbit" motion of make_motion_trajectory (its docstring states the contract).

    Candidates are every object at 4 seeded radii in 1.2-2.5 m. At a radius the camera uses the
    longest arc of the circle whose camera centres are clear (0.5-degree grid, 1 degree trimmed at
    each end, exact frame positions checked again): the whole circle (it goes round), an arc at
    least as long as the path (one pass at constant speed, seeded start), or an arc of at least
    _ORBIT_MIN_ARC degrees (back and forth: a soft triangle wave whose mid-leg speed is the orbit
    rate, slowing to a stop at the arc's ends). The chosen candidate maximises, in this order: the
    object is the first thing hit from the camera towards its centre in >= 3/4 of the frames; the
    path's arc (capped at the arc it would sweep in one pass) reaches min(that pass, _ORBIT_GOOD_ARC);
    it is one of a look-alike pair; that capped arc; ties go to the seeded object order. Only if no
    candidate exists are the fallback radii tried, the first that gives one taken."""
    rng = np.random.Generator(np.random.PCG64(seed))
    twins = sorted({i for pair in room.lookalikes for i in pair})
    others = [i for i in range(6, len(room.prims)) if i not in twins]
    order = [twins[k] for k in rng.permutation(len(twins))] + [others[k] for k in rng.permutation(len(others))]
    if not order:
        raise RuntimeError(f"room seed {room.seed}: no object to orbit")
    rate = np.deg2rad(rng.uniform(*_ORBIT_RATE))      # radians a frame unless step is given
    sense = 1.0 if rng.random() < 0.5 else -1.0
    mean_height = rng.uniform(_ORBIT_HEIGHT[0] + _ORBIT_BOB, _ORBIT_HEIGHT[1] - _ORBIT_BOB)
    radii = {i: rng.uniform(*_ORBIT_RADIUS, size=4) for i in order}
    bob_w = rng.normal(size=(3, 2))                   # height and look-offset shapes, drawn once
    look_w = rng.normal(size=(3, 3, 2))
    cell = 2 * np.pi / _ORBIT_GRID
    grid = np.arange(_ORBIT_GRID) * cell
    frames = np.arange(n_frames, dtype=np.float64)

    def periodic(w, phi, amplitude):                  # as _smooth_periodic, weights given: |value| <= amplitude
        k = np.arange(1, 4)[:, None]
        w = w / k
        return amplitude * (w[:, :1] * _cos(k * phi) + w[:, 1:] * _sin(k * phi)).sum(0) / np.abs(w).sum()

    def height(phi):
        return mean_height + periodic(bob_w, phi, _ORBIT_BOB)

    def angles(lo, arc, span, per_frame):             # orbit angles (n_frames,) inside [lo, lo + arc]
        if arc >= 2 * np.pi:                          # the whole circle: go round
            return lo + rng.uniform(0, 2 * np.pi) + sense * per_frame * frames
        if arc >= span:                               # one pass, constant speed
            start = lo + rng.uniform(0, arc - span)
            return start + per_frame * frames if sense > 0 else start + span - per_frame * frames
        # back and forth: s = asin(k sin psi) / asin(k) in [-1, 1], psi advancing pi a leg, so that
        # d(angle)/d(frame) = per_frame at mid-leg
        k = _ORBIT_SOFTNESS
        leg = 0.5 * arc * np.pi * k / math.asin(k) / per_frame      # frames a leg
        s = _asin(k * _sin(-0.5 * np.pi + np.pi * frames / leg)) / math.asin(k)
        return lo + 0.5 * arc * (1 + s) if sense > 0 else lo + arc - 0.5 * arc * (1 + s)

    def candidate(i, radius):                         # (preference key, i, radius, eyes, phi) about prim i, or None
        c = room.prims[i].centre
        per_frame = rate if step is None else step / radius
        span = per_frame * (n_frames - 1)             # radians one pass would sweep
        runs = _clear_runs(_orbit_clear(room, _orbit_eyes(c, radius, grid, height(grid))))
        if not runs:
            return None
        first, length = runs[0]
        if length == _ORBIT_GRID:
            lo, arc = 0.0, 2 * np.pi
        else:
            lo, arc = (first + 2) * cell, (length - 5) * cell       # trimmed 1 degree at each end
        if arc < span and arc < np.deg2rad(_ORBIT_MIN_ARC):
            return None
        phi = angles(lo, arc, span, per_frame)
        eyes = _orbit_eyes(c, radius, phi, height(phi))
        if not _orbit_clear(room, eyes).all():
            return None
        _, hit = raycast(room, eyes, c - eyes)
        used = min(arc, span)
        key = (bool((hit == i).mean() >= 0.75), bool(used >= min(span, np.deg2rad(_ORBIT_GOOD_ARC)) - 1e-9),
               i in twins, used)
        return key, i, radius, eyes, phi

    best = None
    for i in order:
        for radius in radii[i]:
            got = candidate(i, float(radius))
            if got is not None and (best is None or got[0] > best[0]):
                best = got
    if best is None:                                  # fallback radii: the first candidate found
        best = next((got for radius in _ORBIT_FALLBACK_RADII for i in order
                     if (got := candidate(i, radius)) is not None), None)
    if best is None:
        raise RuntimeError(f"room seed {room.seed}: no object has a clear orbit arc of {_ORBIT_MIN_ARC:.0f} "
                           f"degrees (or of the whole {n_frames}-frame path) keeping {CAMERA_CLEARANCE} m clearance")
    _, i, radius, eyes, phi = best
    c = room.prims[i].centre
    # look point: the centre plus a smooth offset of norm <= _ORBIT_LOOK * radius (<= ~17 degrees off axis)
    look = c + np.stack([periodic(look_w[a], phi, _ORBIT_LOOK * radius) for a in range(3)], -1) / math.sqrt(3)
    return [look_at(e, t - e) for e, t in zip(eyes, look)]


# ----------------------------------------------------------------------------- rendering

def render(room: Room, K: np.ndarray, cam2world: np.ndarray, width: int, height: int,
           rays: np.ndarray | None = None, return_ids: bool = False):
    """Ray-cast one view: rgb (H, W, 3) uint8 and z-depth (H, W) float32 in metres (0 = no hit);
    with `return_ids` also the object id of each pixel, uint16 (H, W): `object_id(prim)`, 0 = no hit.

    rays: camera-frame rays (H*W, 3) with z = 1, row-major (default `pixel_rays(K, ...)`, a
    pinhole; a lens model passes its own).
    """
    rays = pixel_rays(K, width, height) if rays is None else rays
    dirs = _transform(cam2world[:3, :3], rays)   # z_cam = 1, so t is the z-depth
    origin = cam2world[:3, 3]
    t, prim_id = raycast(room, origin, dirs)
    hit = np.isfinite(t)
    points = origin + t[hit, None] * dirs[hit]
    colour = shade(room, points, prim_id[hit], footprint=t[hit] / K[0, 0])
    rgb = np.zeros((height * width, 3), dtype=np.uint8)
    rgb[hit] = np.clip(np.round(colour), 0, 255).astype(np.uint8)
    depth = np.where(hit, t, 0.0).astype(np.float32)
    if return_ids:
        ids = np.where(hit, prim_id + 1, 0).astype(np.uint16)
        return rgb.reshape(height, width, 3), depth.reshape(height, width), ids.reshape(height, width)
    return rgb.reshape(height, width, 3), depth.reshape(height, width)


def object_id(prim: int) -> int:
    """The id a scene's object files give primitive `prim` of its room (0 is 'no object')."""
    return int(prim) + 1


def object_groups(room: Room) -> list[list[int]]:
    """The look-alike pairs of a room as lists of object ids (same shape, size and texture)."""
    return [[object_id(a), object_id(b)] for a, b in room.lookalikes]


# ----------------------------------------------------------------------------- posed layout

def depth_to_png_mm(depth: np.ndarray) -> np.ndarray:
    """uint16 (H, W) millimetres: round(depth * 1000), 0 where invalid or beyond 65.535 m."""
    mm = np.round(np.asarray(depth, dtype=np.float64) * 1000.0)
    mm[~np.isfinite(mm) | (mm <= 0) | (mm > 65535)] = 0
    return mm.astype(np.uint16)


def write_scene(root: str | os.PathLike, name: str, seed: int, n_frames: int = 60, width: int = 320,
                height: int = 240, depth_format: str = "png", lookalikes: bool = True,
                step: float | None = None, motion: str = "walk", objects: bool = False,
                hfov: float = 70.0) -> str:
    """Render one room along its trajectory into the `posed` layout (DESIGN section 3)
    at root/name; cameras.json is written last. Returns the scene path.

    step: metres the camera moves per frame (default random 3-5 cm); its turning rate
    scales with it (a faster camera gives wider-baseline pairs at the same frame gap).
    motion: the kind of camera path, one of MOTIONS (make_motion_trajectory; "walk" is
    make_trajectory's path); recorded as cameras.json's synthetic "motion".
    objects: also write objects/NNNNNN.png (uint16 object id of each pixel, `object_id`; 0 = none),
    name it in each frame entry, and list the look-alike pairs as `object_groups`.
    hfov: horizontal field of view in degrees (`default_intrinsics`)."""
    if depth_format not in ("png", "npy"):
        raise ValueError(f"depth_format must be 'png' or 'npy', got {depth_format!r}")
    _check_motion(motion)
    scene = pathlib.Path(root) / name
    (scene / "rgb").mkdir(parents=True, exist_ok=True)
    (scene / "depth").mkdir(parents=True, exist_ok=True)
    if objects:
        (scene / "objects").mkdir(parents=True, exist_ok=True)
    room = make_room(seed, lookalikes)
    traj_seed = derive_seed(seed, 1)
    if not 10.0 <= hfov <= 150.0:
        raise ValueError(f"hfov must be 10-150 degrees, got {hfov}")
    K = default_intrinsics(width, height, hfov)
    frames = []
    for i, cam2world in enumerate(make_motion_trajectory(room, n_frames, traj_seed, motion, step=step)):
        rgb, depth, ids = render(room, K, cam2world, width, height, return_ids=True)
        fname = f"{i:06d}"
        Image.fromarray(rgb).save(scene / "rgb" / f"{fname}.jpg", "JPEG", quality=95)
        if depth_format == "png":
            Image.fromarray(depth_to_png_mm(depth)).save(scene / "depth" / f"{fname}.png")
        else:
            np.save(scene / "depth" / f"{fname}.npy", depth.astype(np.float32))
        frames.append({"name": fname, "rgb": f"rgb/{fname}.jpg", "depth": f"depth/{fname}.{depth_format}",
                       "K": K.tolist(), "cam2world": cam2world.tolist()})
        if objects:
            Image.fromarray(ids).save(scene / "objects" / f"{fname}.png")
            frames[-1]["objects"] = f"objects/{fname}.png"
    meta = {"depth_scale": 1000.0, "metric_depth": True, "frames": frames,
            "synthetic": {"seed": int(seed), "generator": GENERATOR, "lookalikes": bool(lookalikes),
                          "trajectory_seed": traj_seed, "step": step, "motion": motion, "hfov": hfov}}
    if objects:
        meta["object_groups"] = object_groups(room)
    (scene / "cameras.json").write_text(json.dumps(meta, indent=1))
    return str(scene)


def write_corpus(root: str | os.PathLike, n_scenes: int, seed: int = 0, **kw) -> list[str]:
    """Write scenes scene_0000 ... each from its own seed derived from `seed`."""
    return [write_scene(root, f"scene_{i:04d}", derive_seed(seed, 1000 + i), **kw) for i in range(n_scenes)]


def room_for_scene(cameras: dict) -> Room:
    """Regenerate the Room of a synthetic scene from its parsed cameras.json."""
    meta = cameras.get("synthetic")
    if not meta or meta.get("generator") != GENERATOR:
        raise ValueError(f"not a {GENERATOR} scene: cameras.json has synthetic={meta!r}")
    return make_room(int(meta["seed"]), bool(meta.get("lookalikes", True)))


if __name__ == "__main__":
    room = make_room(0)
    K = default_intrinsics(320, 240)
    poses = make_trajectory(room, 20, 0)
    render(room, K, poses[0], 320, 240)                  # warm-up
    times = []
    for T in poses:
        t0 = time.perf_counter()
        render(room, K, T, 320, 240)
        times.append(time.perf_counter() - t0)
    print(f"room 0: {len(room.prims)} primitives, {len(room.lookalikes)} look-alike pairs, "
          f"photos: {', '.join(available_photos())}")
    print(f"render 320x240: median {1000 * np.median(times):.1f} ms, max {1000 * max(times):.1f} ms per frame")
