"""Tests of data/synthetic.py's camera motions (make_motion_trajectory): walk, orbit, sweep."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import pytest

from data import synthetic as syn

ROOMS = (0, 1, 2)          # room seeds; each path's seed is room seed + 100
N = 60                     # frames a path
W, H = 64, 48              # render size of the image-change test


@pytest.fixture(scope="module")
def rooms():
    return {s: syn.make_room(s) for s in ROOMS}


@pytest.fixture(scope="module")
def paths(rooms):
    """(room seed, motion) -> poses (N, 4, 4), each computed once."""
    return {(s, m): np.stack(syn.make_motion_trajectory(rooms[s], N, s + 100, m)) for s in ROOMS for m in syn.MOTIONS}


def rotation_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """Angle (N,) in degrees of the relative rotations R_a^T R_b of rotations (N, 3, 3)."""
    rel = R_a.transpose(0, 2, 1) @ R_b
    return np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def orbited(room, poses):
    """(prim id, centre) of the object whose vertical axis every camera centre is equally far from."""
    eye = poses[:, :3, 3]
    spread, k = min((np.ptp(np.linalg.norm((eye - p.centre)[:, :2], axis=1)), k)
                    for k, p in enumerate(room.prims) if k >= 6)
    assert spread < 1e-9, f"no object at a constant horizontal distance (best spread {spread:.3g} m)"
    return k, room.prims[k].centre


# ----------------------------------------------------------------------------- all motions

@pytest.mark.parametrize("motion", syn.MOTIONS)
def test_rigid_clear_and_inside(rooms, paths, motion):
    for s in ROOMS:
        room, poses = rooms[s], paths[s, motion]
        assert poses.shape == (N, 4, 4) and poses.dtype == np.float64
        R, eye = poses[:, :3, :3], poses[:, :3, 3]
        assert np.allclose(R.transpose(0, 2, 1) @ R, np.eye(3), atol=1e-9)
        assert np.allclose(np.linalg.det(R), 1.0) and np.all(poses[:, 3] == [0, 0, 0, 1])
        assert np.allclose(R[:, 2, 0], 0.0) and np.all(R[:, 2, 1] < 0)     # zero roll, camera y points down
        assert np.all(eye >= syn.CAMERA_CLEARANCE) and np.all(eye <= room.size - syn.CAMERA_CLEARANCE)
        assert syn.distance_to_prims(room, eye).min() >= syn.CAMERA_CLEARANCE
        assert np.all((eye[:, 2] >= 1.2) & (eye[:, 2] <= 1.8))
        # smooth: no frame turns more than twice the path's 99th-percentile turn plus a degree
        turn = rotation_deg(R[:-1], R[1:])
        assert turn.max() <= 2 * np.percentile(turn, 99) + 1.0


@pytest.mark.parametrize("motion", syn.MOTIONS)
def test_deterministic_per_seed(rooms, paths, motion):
    room = rooms[ROOMS[0]]
    again = np.stack(syn.make_motion_trajectory(room, N, ROOMS[0] + 100, motion))
    assert np.array_equal(again, paths[ROOMS[0], motion])
    other = np.stack(syn.make_motion_trajectory(room, N, ROOMS[0] + 101, motion))
    assert np.abs(other[:, :3, 3] - again[:, :3, 3]).max() > 0.1


def test_unknown_motion_is_a_value_error(rooms, tmp_path):
    with pytest.raises(ValueError, match="walk, orbit, sweep.*'spin'"):
        syn.make_motion_trajectory(rooms[ROOMS[0]], 5, 0, "spin")
    with pytest.raises(ValueError, match="walk, orbit, sweep"):
        syn.write_scene(tmp_path, "bad", seed=1, n_frames=2, width=W, height=H, motion="Walk")
    assert not (tmp_path / "bad").exists()                                  # refused before writing


# ----------------------------------------------------------------------------- walk

# make_trajectory's poses recorded from the code before make_motion_trajectory existed (commit 534477b):
# sha256 of the (60, 4, 4) float64 bytes and R[0,0], R[1,2], R[2,2], t of frames 0, 37, 59.
WALK_RECORDED = {
    (7, 11, None): ("2f7f6f45275505945c2f582803e9df30148fad79f98264964b5f54ce49da14e9", {
        0: (-0.5623215952361922, -0.5572174991931304, -0.13442940873631073,
            4.215388818078939, 1.5608686808886623, 1.626636164626633),
        37: (-0.821911536150782, -0.8019029351326546, -0.21930649285487622,
             4.796913953816925, 2.5655778617480025, 1.683247839338244),
        59: (-0.9152368341309067, -0.8830992909907643, -0.26266867321031023,
             4.645113955531179, 3.2582284171925666, 1.6884251543870257)}),
    (3, 5, None): ("1343c86e7bb34fc54ddccaad6ab0aac85b715952a0df26418a506c3c779c9b61", {
        0: (0.5372232841911165, 0.5289813176101832, -0.17449415074133576,
            2.870923600888244, 1.2230969712727124, 1.5466872522059292),
        37: (0.1585570041004264, 0.15579027959974656, -0.18599547673392486,
             2.7578589452868, 2.5415840628130826, 1.4895028825453418),
        59: (0.543969147881, 0.5180759268786796, -0.30485283983292144,
             1.7685369774677495, 2.6327142557887666, 1.4266642358016592)}),
    (12, 99, 0.1): ("482edbf798c2cd7eb8c02cc9aae07964e76dd49d694fe52f19f8696e290864e3", {
        0: (0.7233627922925169, 0.7092196917806005, -0.19677773900606604,
            1.2570095356769366, 1.7127159498963411, 1.445371565956574),
        37: (0.19776691494699644, 0.1954703361139173, -0.15195477988104095,
             2.35633725285874, 4.6992492994010675, 1.492972129246777),
        59: (0.9894267448816351, 0.9578451173323835, -0.25063799197985875,
             3.7686969698688997, 3.2624256766577404, 1.6656055389834887)}),
}


@pytest.mark.parametrize("key", sorted(WALK_RECORDED, key=str))
def test_walk_is_the_unchanged_make_trajectory(key):
    room_seed, seed, step = key
    room = syn.make_room(room_seed)
    poses = np.stack(syn.make_trajectory(room, N, seed, step=step))
    digest, values = WALK_RECORDED[key]
    for f, (r00, r12, r22, tx, ty, tz) in values.items():
        T = poses[f]
        assert (T[0, 0], T[1, 2], T[2, 2], T[0, 3], T[1, 3], T[2, 3]) == (r00, r12, r22, tx, ty, tz), f
    assert hashlib.sha256(poses.tobytes()).hexdigest() == digest
    assert np.array_equal(np.stack(syn.make_motion_trajectory(room, N, seed, "walk", step=step)), poses)


# ----------------------------------------------------------------------------- orbit

def test_orbit_keeps_the_object_in_view_and_turns_about_it(rooms, paths):
    for s in ROOMS:
        room, poses = rooms[s], paths[s, "orbit"]
        k, c = orbited(room, poses)
        eye = poses[:, :3, 3]
        radius = np.linalg.norm((eye - c)[:, :2], axis=1)[0]
        assert 1.2 <= radius <= 2.5
        for w, h in ((W, H), (160, 90)):                                  # 4:3 and 16:9
            K = syn.default_intrinsics(w, h)
            cam = np.einsum("nji,nj->ni", poses[:, :3, :3], c - eye)     # world2cam rotation R^T
            assert np.all(cam[:, 2] > 0.5)                               # in front
            pix = cam @ K.T
            u, v = pix[:, 0] / pix[:, 2], pix[:, 1] / pix[:, 2]
            assert np.all((u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1))
        # not nailed to the image centre: the look point wanders
        K = syn.default_intrinsics(W, H)
        pix = cam @ K.T
        off = np.hypot(*(pix[:, :2] / pix[:, 2:] - K[:2, 2]).T)
        assert np.ptp(off) > 0.5
        # the angle subtended at the object by the camera centres of frames 0 and 24
        a, b = eye[0] - c, eye[24] - c
        azimuth = np.degrees(abs(np.arctan2(a[0] * b[1] - a[1] * b[0], a[0] * b[0] + a[1] * b[1])))
        full = np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        print(f"room {s}: orbits prim {k} ({room.prims[k].name}) at {radius:.2f} m; frames 0-24: "
              f"{azimuth:.0f} degrees about its vertical axis, {full:.0f} degrees in 3D")
        assert azimuth >= 40 and full >= 30
        # 2-4 degrees of orbit a frame, at most (it may slow down to turn back at the end of a clear arc)
        phi = np.unwrap(np.arctan2(eye[:, 1] - c[1], eye[:, 0] - c[0]))
        rate = np.degrees(np.abs(np.diff(phi)))
        assert rate.max() <= 4.0 + 1e-9 and np.median(rate) >= 2.0


def test_orbit_prefers_a_lookalike_then_the_longest_arc(rooms):
    """Shell of room 1 (5.5 x 5.9 m) with three small floor balls: one in the middle (a whole
    circle clear at every radius up to 2.45 m) and two against opposite walls (clear arcs of
    ~150-250 degrees). 200 frames (>= 398 degrees in one pass) are longer than any wall arc."""
    base = rooms[1]
    X, Y, _ = base.size

    def ball(x, y):
        return syn.Primitive("sphere", np.array([x - 0.15, y - 0.15, 0.0]), np.array([x + 0.15, y + 0.15, 0.3]),
                             0, 0.5, "ball")

    prims = base.prims[:6] + [ball(X / 2, 0.9), ball(X / 2, Y - 0.9), ball(X / 2, Y / 2)]
    for seed in (0, 1, 2):
        twins = dataclasses.replace(base, prims=prims, lookalikes=[(6, 7)])
        k, _ = orbited(twins, np.stack(syn.make_motion_trajectory(twins, 200, seed, "orbit")))
        assert k in (6, 7)
        alone = dataclasses.replace(base, prims=prims, lookalikes=[])
        k, _ = orbited(alone, np.stack(syn.make_motion_trajectory(alone, 200, seed, "orbit")))
        assert k == 8


def test_orbit_shrinks_the_radius_then_gives_up(rooms):
    """A slab filling the room at 1-2 m height (camera height) except a square hole of half-side
    1.45 m about a floor ball: at >= 1.2 m every clear arc is < 90 degrees, at 1.1 m the whole
    circle is 0.35 m from the slab. Without the hole nothing fits."""
    base = rooms[1]
    X, Y, Z = base.size
    cx, cy, h = X / 2, Y / 2, 1.45

    def box(lo, hi):
        return syn.Primitive("box", np.array(lo, float), np.array(hi, float), 0, 0.5, "slab")

    ball = syn.Primitive("sphere", np.array([cx - 0.15, cy - 0.15, 0.0]), np.array([cx + 0.15, cy + 0.15, 0.3]),
                         0, 0.5, "ball")
    ring = [box([0, 0, 1], [cx - h, Y, 2]), box([cx + h, 0, 1], [X, Y, 2]),
            box([cx - h, 0, 1], [cx + h, cy - h, 2]), box([cx - h, cy + h, 1], [cx + h, Y, 2])]
    holed = dataclasses.replace(base, prims=base.prims[:6] + [ball] + ring, lookalikes=[])
    poses = np.stack(syn.make_motion_trajectory(holed, N, 5, "orbit"))
    k, c = orbited(holed, poses)
    eye = poses[:, :3, 3]
    assert k == 6 and np.allclose(np.linalg.norm((eye - c)[:, :2], axis=1), 1.1)
    assert syn.distance_to_prims(holed, eye).min() >= syn.CAMERA_CLEARANCE
    full = dataclasses.replace(base, prims=base.prims[:6] + [ball, box([0, 0, 1], [X, Y, 2])], lookalikes=[])
    with pytest.raises(RuntimeError, match=f"room seed {base.seed}: no object has a clear orbit arc"):
        syn.make_motion_trajectory(full, N, 5, "orbit")


def test_orbit_step_is_metres_of_arc(rooms):
    room = rooms[ROOMS[1]]
    poses = np.stack(syn.make_motion_trajectory(room, N, 7, "orbit", step=0.05))
    _, c = orbited(room, poses)
    eye = poses[:, :3, 3]
    radius = np.linalg.norm((eye - c)[:, :2], axis=1)[0]
    arc = radius * np.abs(np.diff(np.unwrap(np.arctan2(eye[:, 1] - c[1], eye[:, 0] - c[0]))))
    assert arc.max() <= 0.05 + 1e-12 and arc.max() >= 0.049


# ----------------------------------------------------------------------------- sweep

def test_sweep_moves_and_turns_much_more_than_walk(paths):
    ratio_t, ratio_r = [], []
    for s in ROOMS:
        walk, sweep = paths[s, "walk"], paths[s, "sweep"]
        both = (("walk", walk), ("sweep", sweep))
        step = {m: np.linalg.norm(np.diff(p[:, :3, 3], axis=0), axis=1) for m, p in both}
        turn = {m: rotation_deg(p[:-1, :3, :3], p[1:, :3, :3]) for m, p in both}
        assert np.all((step["sweep"] > 0.07) & (step["sweep"] < 0.13))    # 8-12 cm a frame
        assert np.all((step["walk"] > 0.02) & (step["walk"] < 0.06))      # 3-5 cm a frame
        assert turn["sweep"].mean() >= 2.0 and turn["sweep"].mean() > 2 * turn["walk"].mean()
        ratio_t.append(step["sweep"].mean() / step["walk"].mean())
        ratio_r.append(turn["sweep"].mean() / turn["walk"].mean())
        print(f"room {s}: walk {100 * step['walk'].mean():.1f} cm {turn['walk'].mean():.2f} deg, "
              f"sweep {100 * step['sweep'].mean():.1f} cm {turn['sweep'].mean():.2f} deg a frame")
    assert min(ratio_t) >= 1.5 and np.mean(ratio_t) >= 2.0
    assert np.mean(ratio_r) >= 3.0


def test_scan_is_the_sweep_path_looking_around_faster(paths):
    """scan: the sweep's camera centres exactly, with a wider and quicker yaw swing (per-frame turn at
    least 1.5x the sweep's in every room)."""
    for s in ROOMS:
        sweep, scan = paths[s, "sweep"], paths[s, "scan"]
        assert np.array_equal(sweep[:, :3, 3], scan[:, :3, 3])
        turn = {m: rotation_deg(p[:-1, :3, :3], p[1:, :3, :3]).mean() for m, p in (("sweep", sweep), ("scan", scan))}
        assert turn["scan"] >= 1.5 * turn["sweep"], (s, turn)


# ----------------------------------------------------------------------------- what a render sees

def test_frames_24_apart_share_less_of_the_view_than_walk(rooms, paths):
    """At 64x48, frames 0 and 24: the fraction of pixels that show the same primitive, and the
    median image displacement of the co-visible surface points (exact depth reprojection)."""
    K = syn.default_intrinsics(W, H)
    rays = syn.pixel_rays(K, W, H)
    pix0 = np.stack(np.meshgrid(np.arange(W), np.arange(H)), -1).reshape(-1, 2)
    same, moved = {m: [] for m in syn.MOTIONS}, {m: [] for m in syn.MOTIONS}
    for s in ROOMS:
        room = rooms[s]
        for m in syn.MOTIONS:
            Ta, Tb = paths[s, m][0], paths[s, m][24]
            ta, ida = syn.raycast(room, Ta[:3, 3], rays @ Ta[:3, :3].T)
            tb, idb = syn.raycast(room, Tb[:3, 3], rays @ Tb[:3, :3].T)
            same[m].append((ida == idb).mean())
            points = Ta[:3, 3] + ta[:, None] * (rays @ Ta[:3, :3].T)      # frame 0's surface points
            cam = (points - Tb[:3, 3]) @ Tb[:3, :3]                         # in frame 24's camera
            uv = (cam @ K.T)[:, :2] / cam[:, 2:]
            ub, vb = np.round(uv).astype(int).T
            inside = (cam[:, 2] > 0) & (ub >= 0) & (ub < W) & (vb >= 0) & (vb < H)
            vis = inside.copy()
            z = cam[inside, 2]
            vis[inside] = np.abs(tb[vb[inside] * W + ub[inside]] - z) < np.maximum(0.05, 0.03 * z)
            moved[m].append(np.median(np.linalg.norm(uv - pix0, axis=1)[vis]) if vis.sum() > 20 else np.inf)
    mean_same = {m: float(np.mean(v)) for m, v in same.items()}
    median_moved = {m: float(np.median(v)) for m, v in moved.items()}
    print("same primitive at frames 0 / 24:", {m: round(v, 2) for m, v in mean_same.items()},
          "median displacement px:", {m: round(v, 1) for m, v in median_moved.items()})
    assert mean_same["walk"] >= 0.5                                    # the renders do line up where they should
    assert mean_same["orbit"] <= mean_same["walk"] - 0.08
    assert mean_same["sweep"] <= mean_same["walk"] - 0.15
    assert median_moved["orbit"] >= 1.4 * median_moved["walk"]
    assert median_moved["sweep"] >= 1.4 * median_moved["walk"]


# ----------------------------------------------------------------------------- write_scene

def test_write_scene_records_and_uses_the_motion(tmp_path):
    for motion in ("walk", "orbit"):
        kw = {} if motion == "walk" else {"motion": motion}
        path = pathlib.Path(syn.write_scene(tmp_path, motion, seed=3, n_frames=3, width=W, height=H, **kw))
        meta = json.loads((path / "cameras.json").read_text())
        assert meta["synthetic"]["motion"] == motion
        room = syn.room_for_scene(meta)
        expect = syn.make_motion_trajectory(room, 3, meta["synthetic"]["trajectory_seed"], motion)
        got = [np.array(f["cam2world"]) for f in meta["frames"]]
        assert all(np.array_equal(g, e) for g, e in zip(got, expect)) and len(got) == 3
    walk = json.loads((tmp_path / "walk" / "cameras.json").read_text())["frames"]
    orbit = json.loads((tmp_path / "orbit" / "cameras.json").read_text())["frames"]
    assert walk[0]["cam2world"] != orbit[0]["cam2world"]


def test_write_scene_field_of_view(tmp_path):
    path = pathlib.Path(syn.write_scene(tmp_path, "narrow", seed=3, n_frames=2, width=W, height=H, hfov=50.0))
    K = np.array(json.loads((path / "cameras.json").read_text())["frames"][0]["K"])
    assert np.allclose(K, syn.default_intrinsics(W, H, 50.0)) and K[0, 0] > syn.default_intrinsics(W, H)[0, 0]
    with pytest.raises(ValueError, match="hfov must be 10-150 degrees"):
        syn.write_scene(tmp_path, "bad", seed=3, n_frames=2, width=W, height=H, hfov=5.0)
