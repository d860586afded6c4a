"""Tests of data/synthetic.py: exact geometry of the procedural rooms, the posed layout."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data import synthetic as syn

W, H = 160, 120
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def room():
    return syn.make_room(7)


@pytest.fixture(scope="module")
def traj(room):
    return syn.make_trajectory(room, 60, 11)


@pytest.fixture(scope="module")
def views(room, traj):
    """Rendered (rgb, depth) of frames 0, 1, 10 and 40 at W x H."""
    K = syn.default_intrinsics(W, H)
    return {i: syn.render(room, K, traj[i], W, H) for i in (0, 1, 10, 40)}


def unproject(depth, K, cam2world, u, v):
    """World points (N, 3) of integer pixels u, v (N,) with their z-depth."""
    z = depth[v, u].astype(np.float64)
    cam = (np.linalg.inv(K) @ np.stack([u, v, np.ones_like(u)]).astype(np.float64)) * z
    return (cam2world[:3, :3] @ cam + cam2world[:3, 3:]).T


def project(points, K, cam2world):
    """Pixels (N, 2) and z-depth (N,) of world points (N, 3)."""
    world2cam = np.linalg.inv(cam2world)
    cam = world2cam[:3, :3] @ points.T + world2cam[:3, 3:]
    pix = K @ cam
    return (pix[:2] / pix[2]).T, cam[2]


def reproject(view_a, view_b, T_a, T_b, K, stride=2):
    """Visibility of A's grid pixels in B (DESIGN section 4 test) and the matched colours."""
    (rgb_a, d_a), (rgb_b, d_b) = view_a, view_b
    v, u = np.mgrid[0:H:stride, 0:W:stride]
    ok = d_a[v, u] > 0
    u, v = u[ok], v[ok]
    pix, z = project(unproject(d_a, K, T_a, u, v), K, T_b)
    ub, vb = np.round(pix[:, 0]).astype(int), np.round(pix[:, 1]).astype(int)
    inside = (z > 0) & (ub >= 0) & (ub < W) & (vb >= 0) & (vb < H)
    zb = np.zeros_like(z)
    zb[inside] = d_b[vb[inside], ub[inside]]
    vis = inside & (np.abs(zb - z) <= np.maximum(0.05, 0.03 * z))
    return vis, rgb_a[v[vis], u[vis]].astype(float), rgb_b[vb[vis], ub[vis]].astype(float)


# ----------------------------------------------------------------------------- camera model

def test_default_intrinsics_pixel_centres():
    K = syn.default_intrinsics(320, 240, hfov_deg=70)
    assert K.dtype == np.float64 and K.shape == (3, 3)
    assert K[0, 2] == 159.5 and K[1, 2] == 119.5 and K[0, 0] == K[1, 1]
    # the outer pixel edges (u = -0.5 and u = W - 0.5) span exactly the field of view
    assert np.isclose(2 * np.degrees(np.arctan((320 / 2) / K[0, 0])), 70.0)
    rays = syn.pixel_rays(K, 320, 240)
    assert rays.shape == (240 * 320, 3) and np.all(rays[:, 2] == 1)
    assert np.allclose(rays[0, :2], -rays[-1, :2])          # symmetric about the centre


def test_depth_is_z_depth_on_fronto_parallel_wall(room):
    shell = dataclasses.replace(room, prims=room.prims[:6])
    X, Y, _ = room.size
    T = syn.look_at(np.array([X - 1.5, Y / 2, 1.4]), np.array([1.0, 0.0, 0.0]))
    K = syn.default_intrinsics(W, H)
    rgb, depth = syn.render(shell, K, T, W, H)
    rays = syn.pixel_rays(K, W, H) @ T[:3, :3].T
    _, prim = syn.raycast(shell, T[:3, 3], rays)
    on_wall = (prim == 3).reshape(H, W)                     # wall_x1, facing the camera
    assert shell.prims[3].name == "wall_x1" and on_wall.mean() > 0.9
    np.testing.assert_allclose(depth[on_wall], 1.5, atol=1e-5)
    # ray length differs from z-depth away from the optical axis
    corner_len = depth[0, 0] * np.linalg.norm(syn.pixel_rays(K, W, H)[0])
    assert on_wall[0, 0] and corner_len > 1.2 * depth[0, 0]
    # the wall is textured, not a flat colour
    assert rgb[on_wall].std(axis=0).min() > 10


def test_unprojected_pixels_lie_on_surfaces(room, traj, views):
    K = syn.default_intrinsics(W, H)
    T = traj[10]
    _, depth = views[10]
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, W, 500), rng.integers(0, H, 500)
    assert np.all(depth[v, u] > 0)                          # a closed room: every pixel hits
    pts = unproject(depth, K, T, u, v)
    assert syn.distance_to_prims(room, pts).max() < 1e-4
    # the same point by an independent ray (unit direction, metric t) from the camera
    eye = T[:3, 3]
    dirs = (pts - eye) / np.linalg.norm(pts - eye, axis=1, keepdims=True)
    t, _ = syn.raycast(room, np.tile(eye, (len(pts), 1)), dirs)
    assert np.abs(eye + t[:, None] * dirs - pts).max() < 1e-4


def _surface_samples(p, eye):
    """Known surface points (M, 3) of a sphere or box facing `eye`, with their normals (M, 3)."""
    if p.kind == "sphere":
        n = (eye - p.centre) / np.linalg.norm(eye - p.centre)
        return (p.centre + p.radius * n)[None], n[None]
    if p.kind != "box":
        return np.zeros((0, 3)), np.zeros((0, 3))
    normals = np.concatenate([-np.eye(3), np.eye(3)])
    points = p.centre + normals * (p.hi - p.lo) / 2                    # face centres
    facing = np.einsum("ij,ij->i", normals, eye - points) > 0
    return points[facing], normals[facing]


def test_known_point_projects_where_render_shows_it(room, traj):
    """Face centres of boxes and the nearest point of spheres: where an unoccluded one
    projects, the rendered pixel shows that primitive at that point's z-depth."""
    K = syn.default_intrinsics(W, H)
    checked = 0
    for T in traj[::6]:
        eye = T[:3, 3]
        rays = syn.pixel_rays(K, W, H) @ T[:3, :3].T
        _, depth = syn.render(room, K, T, W, H)
        for k, p in enumerate(room.prims):
            for point, normal in zip(*_surface_samples(p, eye)):
                dist = np.linalg.norm(point - eye)
                if normal @ (eye - point) < 0.5 * dist:               # skip grazing faces
                    continue
                pix, z = project(point[None], K, T)
                u, v = np.round(pix[0]).astype(int)
                if z[0] <= 0 or not (0 <= u < W and 0 <= v < H):
                    continue
                t, prim = syn.raycast(room, eye, ((point - eye) / dist)[None])
                if prim[0] != k:                                    # occluded
                    continue
                assert abs(t[0] - dist) < 1e-9
                _, prim_pix = syn.raycast(room, eye, rays[v * W + u][None])
                assert prim_pix[0] == k
                assert abs(depth[v, u] - z[0]) < 0.05
                checked += 1
    assert checked >= 5


def test_raycast_analytic_and_occlusion():
    room = syn.make_room(1)
    X, Y, Z = room.size
    box = syn.Primitive("box", np.array([2.0, 1.0, 0.0]), np.array([2.5, 2.0, 1.0]), 0, 1.0, "box")
    ball = syn.Primitive("sphere", np.array([3.0, 1.3, 0.3]), np.array([3.4, 1.7, 0.7]), 0, 1.0, "ball")
    can = syn.Primitive("cylinder", np.array([0.8, 2.8, 0.0]), np.array([1.2, 3.2, 0.9]), 0, 1.0, "can")
    scene = dataclasses.replace(room, prims=room.prims[:6] + [box, ball, can])
    o = np.array([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5], [0.5, 3.0, 0.5], [1.0, 3.0, 2.0], [1.0, 1.5, 0.5]])
    d = np.array([[1.0, 0, 0], [-1.0, 0, 0], [1.0, 0, 0], [0, 0, -2.0], [0, 0, 1.0]])
    t, prim = syn.raycast(scene, o, d)
    np.testing.assert_allclose(t, [1.0, 1.0, 0.3, 0.55, Z - 0.5], atol=1e-12)
    assert prim.tolist() == [6, 2, 8, 8, 1]                 # box occludes the ball; wall_x0; can side; can top; ceiling
    no_box = dataclasses.replace(scene, prims=room.prims[:6] + [ball, can])
    t, prim = syn.raycast(no_box, o[:1], d[:1])
    assert prim[0] == 6 and abs(t[0] - 2.0) < 1e-12       # sphere surface at x = 3.0
    # outside the room looking away: no hit; walls are one-sided (the ray enters through wall_x0)
    t, prim = syn.raycast(scene, np.array([-1.0, 0.5, 1.5]), np.array([[-1.0, 0, 0], [1.0, 0, 0]]))
    assert np.isinf(t[0]) and prim[0] == -1
    assert prim[1] == 3 and abs(t[1] - (X + 1.0)) < 1e-12


# ----------------------------------------------------------------------------- trajectories

@pytest.mark.parametrize("seed", range(10))
def test_trajectory_inside_room_and_smooth(seed):
    room = syn.make_room(seed)
    poses = np.stack(syn.make_trajectory(room, 150, seed + 100))
    assert poses.shape == (150, 4, 4) and poses.dtype == np.float64
    R, eye = poses[:, :3, :3], poses[:, :3, 3]
    assert np.allclose(R.transpose(0, 2, 1) @ R, np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(R), 1.0) and np.all(poses[:, 3] == [0, 0, 0, 1])
    assert np.all(eye > 0.3) and np.all(eye < room.size - 0.3)
    assert np.all((eye[:, 2] >= 1.2) & (eye[:, 2] <= 1.8))
    assert syn.distance_to_prims(room, eye).min() >= syn.CAMERA_CLEARANCE
    assert np.allclose(R[:, 2, 0], 0.0) and np.all(R[:, 2, 1] < 0)   # zero roll, camera y points down
    steps = np.linalg.norm(np.diff(eye, axis=0), axis=1)
    assert steps.min() > 0.02 and steps.max() < 0.09
    rel = R[:-1].transpose(0, 2, 1) @ R[1:]
    angles = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() < 3.5


def test_consecutive_and_distant_frames_overlap(traj, views):
    K = syn.default_intrinsics(W, H)
    for gap, min_overlap in ((1, 0.9), (10, 0.6), (40, 0.3)):
        vis, col_a, col_b = reproject(views[0], views[gap], traj[0], traj[gap], K)
        err = np.abs(col_a - col_b).mean()
        shuffled = np.abs(col_a - col_b[np.random.default_rng(0).permutation(len(col_b))]).mean()
        print(f"gap {gap}: overlap {vis.mean():.2f}, photo err {err:.1f} vs shuffled {shuffled:.1f}")
        assert vis.mean() >= min_overlap
        assert err < 0.35 * shuffled


# ----------------------------------------------------------------------------- rooms

@pytest.mark.parametrize("seed", range(8))
def test_lookalike_pairs(seed):
    room = syn.make_room(seed, lookalikes=True)
    assert len(room.lookalikes) >= 2
    for i, j in room.lookalikes:
        a, b = room.prims[i], room.prims[j]
        assert a.kind == b.kind and a.tex_id == b.tex_id and a.tile == b.tile
        np.testing.assert_allclose(a.hi - a.lo, b.hi - b.lo, atol=1e-12)
        assert np.linalg.norm(a.centre - b.centre) >= 1.0
        # the same relative surface point looks identical on both
        offsets = np.array([[0.5, 0.5, 1.0], [0.2, 0.7, 1.0]])
        pa, pb = a.lo + offsets * (a.hi - a.lo), b.lo + offsets * (b.hi - b.lo)
        if a.kind == "sphere":
            pa, pb = a.centre + [0, 0, a.radius], b.centre + [0, 0, b.radius]
            pa, pb = pa[None], pb[None]
        np.testing.assert_allclose(syn.shade(room, pa, np.full(len(pa), i)),
                                   syn.shade(room, pb, np.full(len(pb), j)), atol=1e-3)
    unique = syn.make_room(seed, lookalikes=False)
    tex = [p.tex_id for p in unique.prims]
    assert unique.lookalikes == [] and len(set(tex)) == len(tex)


def test_rooms_vary_and_are_deterministic():
    rooms = [syn.make_room(s) for s in range(12)]
    sizes = np.stack([r.size for r in rooms])
    assert np.all(sizes >= [4, 3, 2.5]) and np.all(sizes <= [7, 6, 3])
    assert len({tuple(np.round(s, 6)) for s in sizes}) == 12
    kinds = set()
    stacked = 0
    for r in rooms:
        objects = r.prims[6:]
        assert 6 <= len(objects) <= 14
        assert [p.name for p in r.prims[:6]] == ["floor", "ceiling", "wall_x0", "wall_x1", "wall_y0", "wall_y1"]
        kinds |= {p.kind for p in objects}
        stacked += sum(p.lo[2] > 0 for p in objects)
        assert all(t.shape == (syn.TEX_SIZE, syn.TEX_SIZE, 3) and t.dtype == np.uint8 for t in r.textures)
        assert min(t.std() for t in r.textures) > 5              # no flat colours
    assert kinds == {"box", "sphere", "cylinder"} and stacked >= 5
    a, b = syn.make_room(3), syn.make_room(3)
    assert len(a.prims) == len(b.prims)
    for p, q in zip(a.prims, b.prims):
        assert p.kind == q.kind and np.array_equal(p.lo, q.lo) and np.array_equal(p.hi, q.hi)
    assert all(np.array_equal(s, t) for s, t in zip(a.textures, b.textures))


def test_photos_ship_in_the_wheel_and_nothing_downloads():
    names = syn.available_photos()
    assert len(names) >= 10 and "astronaut" in names and "brick" in names
    for name in names:
        img = syn.load_photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    code = ("import sys, data.synthetic as s; s.make_room(0); "
            "print('pooch' in sys.modules, 'skimage' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_render_time_320x240(room, traj):
    K = syn.default_intrinsics(320, 240)
    syn.render(room, K, traj[0], 320, 240)
    times = []
    for T in traj[:5]:
        t0 = time.perf_counter()
        rgb, depth = syn.render(room, K, T, 320, 240)
        times.append(time.perf_counter() - t0)
    assert rgb.shape == (240, 320, 3) and rgb.dtype == np.uint8
    assert depth.shape == (240, 320) and depth.dtype == np.float32
    print(f"render 320x240: median {1000 * np.median(times):.1f} ms per frame")


# ----------------------------------------------------------------------------- posed layout

def test_depth_to_png_mm():
    d = np.array([[0.0, 1.2344, 1.2346], [65.535, 65.6, np.inf]], dtype=np.float32)
    assert syn.depth_to_png_mm(d).tolist() == [[0, 1234, 1235], [65535, 0, 0]]


def test_write_scene_posed_layout(tmp_path):
    path = pathlib.Path(syn.write_scene(tmp_path, "scene", seed=5, n_frames=3, width=W, height=H))
    assert path == tmp_path / "scene"
    meta = json.loads((path / "cameras.json").read_text())
    assert meta["depth_scale"] == 1000.0 and meta["metric_depth"] is True
    assert meta["synthetic"]["seed"] == 5 and meta["synthetic"]["generator"] == "gasp-synthetic-v2"
    assert [f["name"] for f in meta["frames"]] == ["000000", "000001", "000002"]
    room = syn.room_for_scene(meta)
    for f in meta["frames"]:
        assert set(f) == {"name", "rgb", "depth", "K", "cam2world"}
        assert f["rgb"] == f"rgb/{f['name']}.jpg" and f["depth"] == f"depth/{f['name']}.png"
        K, T = np.array(f["K"]), np.array(f["cam2world"])
        assert K.shape == (3, 3) and T.shape == (4, 4) and np.array_equal(T[3], [0, 0, 0, 1])
        rgb_ref, depth_ref = syn.render(room, K, T, W, H)
        with Image.open(path / f["depth"]) as im:
            assert im.mode == "I;16" and im.size == (W, H)
            mm = np.asarray(im)
        assert mm.dtype == np.uint16
        assert np.array_equal(mm, syn.depth_to_png_mm(depth_ref))
        with Image.open(path / f["rgb"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            rgb = np.asarray(im).astype(float)
        assert np.abs(rgb - rgb_ref).mean() < 4


def test_write_scene_npy_depth(tmp_path):
    path = pathlib.Path(syn.write_scene(tmp_path, "s", seed=2, n_frames=2, width=W, height=H, depth_format="npy"))
    meta = json.loads((path / "cameras.json").read_text())
    room = syn.room_for_scene(meta)
    for f in meta["frames"]:
        assert f["depth"].endswith(".npy")
        depth = np.load(path / f["depth"])
        assert depth.dtype == np.float32 and depth.shape == (H, W)
        _, ref = syn.render(room, np.array(f["K"]), np.array(f["cam2world"]), W, H)
        assert np.array_equal(depth, ref)
    with pytest.raises(ValueError):
        syn.write_scene(tmp_path, "bad", seed=2, n_frames=1, depth_format="exr")


def test_write_scene_is_byte_identical(tmp_path):
    a = pathlib.Path(syn.write_scene(tmp_path / "a", "x", seed=9, n_frames=3, width=W, height=H))
    b = pathlib.Path(syn.write_scene(tmp_path / "b", "x", seed=9, n_frames=3, width=W, height=H))
    c = pathlib.Path(syn.write_scene(tmp_path / "c", "x", seed=10, n_frames=3, width=W, height=H))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 7
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "rgb/000000.jpg").read_bytes() != (c / "rgb/000000.jpg").read_bytes()


def test_write_corpus(tmp_path):
    paths = syn.write_corpus(tmp_path, 2, seed=4, n_frames=2, width=W, height=H)
    assert [pathlib.Path(p).name for p in paths] == ["scene_0000", "scene_0001"]
    metas = [json.loads((pathlib.Path(p) / "cameras.json").read_text()) for p in paths]
    assert metas[0]["synthetic"]["seed"] != metas[1]["synthetic"]["seed"]
    assert syn.write_corpus(tmp_path / "again", 2, seed=4, n_frames=2, width=W, height=H)
    again = json.loads((tmp_path / "again" / "scene_0001" / "cameras.json").read_text())
    assert again == metas[1]
    with pytest.raises(ValueError):
        syn.room_for_scene({"frames": []})
