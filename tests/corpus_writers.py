"""Write a synthetic room (data.synthetic) in each corpus's exact on-disk layout.

Each writer renders one room along its trajectory and encodes it with that corpus's
own conventions, so a reader test proves the reader undoes exactly those:

- `write_scannet_scene`: SensReader export. Colour and depth are two cameras with
  different K and sizes (colour ~70 deg wide at 1296x968 or a scaled-down size,
  depth ScanNet's 577.87 px focal at 640x480), optionally with differing extrinsics;
  uint16 mm depth PNGs, `%f` text matrices, `-inf` poses where asked.
- `write_arkit_scene`: raw ARKitScenes. `.traj` rows are WORLD-TO-CAMERA axis-angle
  + translation, timestamps in seconds; images at 60 fps of which only the posed
  ones have a `.traj` row nearby; `.pincam` per image.
- `write_nerfstudio_scene`: transforms.json in OpenGL axes with cx, cy at the +0.5
  pixel-centre convention, poses already moved by `applied_transform` (as
  ns-process-data writes them), frames listed out of order; depth through
  `depth_file_path` or a `depth_root` folder.

Every writer returns a `Truth` with what the reader should give back.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from data import geometry, synthetic

SCANNET_COLOR_SIZE = (1296, 968)
SCANNET_DEPTH_SIZE = (640, 480)
# ScanNet-like depth camera; a colour camera with a wider view and an off-centre
# principal point, so that a plain resize of colour onto depth is visibly wrong.
SCANNET_K_DEPTH = np.array([[577.87, 0.0, 319.5], [0.0, 577.87, 239.5], [0.0, 0.0, 1.0]])
SCANNET_K_COLOR = np.array([[925.4, 0.0, 650.2], [0.0, 928.2, 478.9], [0.0, 0.0, 1.0]])


@dataclass
class Truth:
    """What a reader should return for a written scene (per frame, in the stored camera)."""

    path: str
    room: synthetic.Room
    K: np.ndarray
    """(3, 3) K of the stored view, integer pixel centres (ScanNet: the depth camera)."""
    cam2world: list[np.ndarray]
    """(4, 4) OpenCV camera-to-world of each stored view, in the world the file uses."""
    depth: list[np.ndarray]
    """(H, W) float32 rendered z-depth of each stored view."""
    rgb: list[np.ndarray]
    """(H, W, 3) uint8 rendered directly in the stored view's camera."""
    names: list[str]
    extra: dict = field(default_factory=dict)


def _mat_text(M: np.ndarray) -> str:
    """SensorData.save_mat_to_file: one row per line, np.savetxt fmt '%f'."""
    return "".join(" ".join("%f" % x for x in row) + "\n" for row in np.asarray(M, dtype=np.float64))


def _save_depth_png(path: pathlib.Path, depth: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic.depth_to_png_mm(depth)).save(path)


def write_scannet_scene(root: str | pathlib.Path, name: str, seed: int, n_frames: int = 4,
                        color_size: tuple[int, int] = SCANNET_COLOR_SIZE,
                        depth_size: tuple[int, int] = SCANNET_DEPTH_SIZE, step: float = 0.08,
                        depth_to_color: np.ndarray | None = None, inf_pose_frames: tuple[int, ...] = (),
                        first_index: int = 0) -> Truth:
    """A SensReader export of one synthetic room at root/name.

    Frames are numbered first_index, first_index + 1, ... The depth camera follows the
    room's trajectory; the colour camera sits at `cam2world_depth @ inv(depth_to_color)`
    (identity by default: shared centre, as in ScanNet v2), with extrinsic_color = I and
    extrinsic_depth = depth_to_color. Frames in `inf_pose_frames` (positions) get a pose
    file of -inf, as SensReader writes for lost tracking.
    """
    scene = pathlib.Path(root) / name
    for sub in ("color", "depth", "pose", "intrinsic"):
        (scene / sub).mkdir(parents=True, exist_ok=True)
    room = synthetic.make_room(seed)
    K_d = geometry.resize_intrinsics(SCANNET_K_DEPTH, SCANNET_DEPTH_SIZE, depth_size)
    K_c = geometry.resize_intrinsics(SCANNET_K_COLOR, SCANNET_COLOR_SIZE, color_size)
    d2c = np.eye(4) if depth_to_color is None else np.asarray(depth_to_color, dtype=np.float64)
    for fname, M in (("intrinsic_color.txt", np.pad(K_c, (0, 1))), ("intrinsic_depth.txt", np.pad(K_d, (0, 1))),
                     ("extrinsic_color.txt", np.eye(4)), ("extrinsic_depth.txt", d2c)):
        if fname.startswith("intrinsic"):
            M[3, 3] = 1.0
        (scene / "intrinsic" / fname).write_text(_mat_text(M))
    truth = Truth(str(scene), room, K_d, [], [], [], [], extra={"K_color": K_c, "depth_to_color": d2c})
    for k, T_d in enumerate(synthetic.make_trajectory(room, n_frames, seed + 1, step=step)):
        i = first_index + k
        rgb_d, depth = synthetic.render(room, K_d, T_d, *depth_size)
        rgb_c, _ = synthetic.render(room, K_c, T_d @ geometry.invert_pose(d2c), *color_size)
        Image.fromarray(rgb_c).save(scene / "color" / f"{i}.jpg", "JPEG", quality=92)
        _save_depth_png(scene / "depth" / f"{i}.png", depth)
        pose = np.full((4, 4), -np.inf) if k in inf_pose_frames else T_d
        (scene / "pose" / f"{i}.txt").write_text(_mat_text(pose))
        truth.cam2world.append(T_d)
        truth.depth.append(depth)
        truth.rgb.append(rgb_d)
        truth.names.append(str(i))
    return truth


ARKIT_T0 = 6845.7061  # seconds, like the toolkit's sample timestamps


def write_arkit_scene(root: str | pathlib.Path, name: str, seed: int, n_frames: int = 4,
                      size: tuple[int, int] = (256, 192), step: float = 0.08, pose_jitter: float = 0.002,
                      unposed_between: bool = True) -> Truth:
    """A raw ARKitScenes video folder of one synthetic room at root/name (video id = name).

    Posed frames are 0.1 s apart (the 10 Hz `.traj` of the toolkit's sample data); each
    gets a `.traj` row `pose_jitter` seconds off its image timestamp. With
    `unposed_between`, an extra 60 fps image (with depth and .pincam) follows each posed
    one at +1/60 s, with no `.traj` row within a frame interval: readers must skip it.
    """
    scene = pathlib.Path(root) / name
    for sub in ("lowres_wide", "lowres_depth", "lowres_wide_intrinsics"):
        (scene / sub).mkdir(parents=True, exist_ok=True)
    room = synthetic.make_room(seed)
    W, H = size
    K = synthetic.default_intrinsics(W, H, hfov_deg=62.0)
    K[0, 2] += 0.6
    K[1, 2] -= 0.4
    truth = Truth(str(scene), room, K, [], [], [], [], extra={"unposed": []})
    rows = []
    for k, T in enumerate(synthetic.make_trajectory(room, n_frames, seed + 1, step=step)):
        t = ARKIT_T0 + 0.1 * k
        rgb, depth = synthetic.render(room, K, T, W, H)
        stamps = [(f"{t:.3f}", True)] + ([(f"{t + 1 / 60:.3f}", False)] if unposed_between else [])
        for ts, posed in stamps:
            stem = f"{name}_{ts}"
            Image.fromarray(rgb).save(scene / "lowres_wide" / f"{stem}.png")
            _save_depth_png(scene / "lowres_depth" / f"{stem}.png", depth)
            (scene / "lowres_wide_intrinsics" / f"{stem}.pincam").write_text(
                f"{W} {H} {K[0, 0]:.6f} {K[1, 1]:.6f} {K[0, 2]:.6f} {K[1, 2]:.6f}\n")
            if not posed:
                truth.extra["unposed"].append(ts)
        world2cam = geometry.invert_pose(T)
        rvec = Rotation.from_matrix(world2cam[:3, :3]).as_rotvec()
        rows.append(" ".join(f"{x:.17g}" for x in [t + pose_jitter, *rvec, *world2cam[:3, 3]]))
        truth.cam2world.append(T)
        truth.depth.append(depth)
        truth.rgb.append(rgb)
        truth.names.append(f"{t:.3f}")
    (scene / "lowres_wide.traj").write_text("\n".join(rows) + "\n")
    return truth


# nerfstudio's colmap_to_json world change (COLMAP world -> z up): rows (0, 2, 1), third negated
NS_APPLIED_TRANSFORM = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])


def undistort_points(xy_d: np.ndarray, dist, iters: int = 200) -> np.ndarray:
    """Normalized points whose distortion (`geometry.distort_normalized`) is xy_d: fixed-point
    iteration x = (x_d - tangential(x)) / radial(x), checked to 1e-10."""
    k1, k2, k3, k4, p1, p2 = dist
    xd, yd = xy_d[:, 0], xy_d[:, 1]
    x, y = xd.copy(), yd.copy()
    for _ in range(iters):
        r = x * x + y * y
        d = 1.0 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
        x = (xd - 2 * p1 * x * y - p2 * (r + 2 * x * x)) / d
        y = (yd - 2 * p2 * x * y - p1 * (r + 2 * y * y)) / d
    xy = np.stack([x, y], axis=1)
    assert np.abs(geometry.distort_normalized(xy, dist) - xy_d).max() < 1e-10, "undistortion did not converge"
    return xy


def lens_rays(K: np.ndarray, dist, width: int, height: int) -> np.ndarray:
    """Rays (H*W, 3), z = 1, of the pixels of an image taken through the lens `dist`: pixel (u, v)
    sees the undistorted point that distorts to ((u - cx) / fx, (v - cy) / fy)."""
    v, u = np.mgrid[0:height, 0:width]
    xy_d = np.stack([(u.ravel() - K[0, 2]) / K[0, 0], (v.ravel() - K[1, 2]) / K[1, 1]], axis=1)
    return np.concatenate([undistort_points(xy_d, dist), np.ones((xy_d.shape[0], 1))], axis=1)


def write_nerfstudio_scene(root: str | pathlib.Path, name: str, seed: int, n_frames: int = 4,
                           size: tuple[int, int] = (320, 240), step: float = 0.08, depth: str | None = "file",
                           depth_root: str | pathlib.Path | None = None, applied_transform: bool = True,
                           json_extra: dict | None = None, dist: tuple[float, ...] | None = None) -> Truth:
    """A nerfstudio scene folder (transforms.json + images/) of one synthetic room at root/name.

    dist: (k1, k2, k3, k4, p1, p2) of a lens: images and depth are ray-cast through it (each
    stored pixel sees its distorted ray) and the json carries the parameters; the Truth
    keeps the pinhole renders of the same K (what an undistorting reader should give back).

    depth: "file" writes depths/<stem>.png (uint16 mm) named by each frame's
    depth_file_path; "root" writes <depth_root>/<name>/<stem>.npy (float32); None
    writes no depth. Poses are OpenGL-axes camera-to-world, moved by nerfstudio's
    applied_transform when asked (the Truth's cam2world is then in that world too).
    Frames are listed in reverse order. json_extra is merged into the top level.
    """
    scene = pathlib.Path(root) / name
    (scene / "images").mkdir(parents=True, exist_ok=True)
    room = synthetic.make_room(seed)
    W, H = size
    K = synthetic.default_intrinsics(W, H, hfov_deg=66.0)
    K[0, 2] -= 1.3
    K[1, 2] += 0.7
    A = NS_APPLIED_TRANSFORM if applied_transform else np.eye(4)
    meta = {"camera_model": "OPENCV", "fl_x": K[0, 0], "fl_y": K[1, 1],
            "cx": K[0, 2] + 0.5, "cy": K[1, 2] + 0.5,  # nerfstudio: pixel centres at +0.5
            "w": W, "h": H, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": []}
    rays = None
    if dist is not None:
        meta.update(dict(zip(geometry.DISTORTION_KEYS, map(float, dist))))
        rays = lens_rays(K, dist, W, H)
    if applied_transform:
        meta["applied_transform"] = A[:3].tolist()
    truth = Truth(str(scene), room, K, [], [], [], [], extra={"applied_transform": A})
    for k, T in enumerate(synthetic.make_trajectory(room, n_frames, seed + 1, step=step)):
        stem = f"frame_{k + 1:05d}"
        rgb, z = synthetic.render(room, K, T, W, H)
        if rays is not None:  # stored through the lens; the truth stays the pinhole view
            rgb_lens, z_lens = synthetic.render(room, K, T, W, H, rays=rays)
            Image.fromarray(rgb_lens).save(scene / "images" / f"{stem}.png")
        else:
            Image.fromarray(rgb).save(scene / "images" / f"{stem}.png")
            z_lens = z
        T_file = A @ T
        fr = {"file_path": f"images/{stem}.png", "transform_matrix": geometry.gl_to_cv(T_file).tolist(),
              "colmap_im_id": k + 1}
        if depth == "file":
            _save_depth_png(scene / "depths" / f"{stem}.png", z_lens)
            fr["depth_file_path"] = f"depths/{stem}.png"
        elif depth == "root":
            folder = pathlib.Path(depth_root) / name
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{stem}.npy", z_lens.astype(np.float32))
        meta["frames"].append(fr)
        truth.cam2world.append(T_file)
        truth.depth.append(z)
        truth.rgb.append(rgb)
        truth.names.append(stem)
    meta["frames"].reverse()
    meta.update(json_extra or {})
    (scene / "transforms.json").write_text(json.dumps(meta, indent=2))
    return truth


# ----------------------------------------------------------------------------- ScanNet .sens

SENS_VERSION = 4  # ScanNet SensReader/c++/src/sensorData.h M_SENSOR_DATA_VERSION


def _f32(M: np.ndarray) -> np.ndarray:
    """float64 copy of M rounded to float32: what a `.sens` stores."""
    return np.asarray(M, dtype=np.float32).astype(np.float64)


def sens_file_bytes(K_color4: np.ndarray, ext_color: np.ndarray, K_depth4: np.ndarray, ext_depth: np.ndarray,
                    color_size: tuple[int, int], depth_size: tuple[int, int], frames: list[tuple],
                    depth_shift: float = 1000.0, version: int = SENS_VERSION, sensor_name: str = "StructureSensor",
                    color_codec: int = 2, depth_codec: int = 1) -> bytes:
    """A `.sens` file from ScanNet's published layout (SensReader/c++/src/sensorData.h
    `writeHeaderToFile`, `RGBDFrame::saveToFile`, then the IMU count), written here with struct,
    independently of the reader. frames: (cam2world 4x4, timestamp_color, timestamp_depth,
    colour bytes, depth bytes) each. Little-endian, matrices row-major float32."""
    import struct

    name = sensor_name.encode()
    out = [struct.pack("<IQ", version, len(name)), name]
    for M in (K_color4, ext_color, K_depth4, ext_depth):
        out.append(struct.pack("<16f", *np.asarray(M, dtype=np.float64).ravel()))
    out.append(struct.pack("<ii", color_codec, depth_codec))
    out.append(struct.pack("<4I", *color_size, *depth_size))
    out.append(struct.pack("<f", depth_shift))
    out.append(struct.pack("<Q", len(frames)))
    for T, t_c, t_d, color, depth in frames:
        out.append(struct.pack("<16f", *np.asarray(T, dtype=np.float64).ravel()))
        out.append(struct.pack("<4Q", t_c, t_d, len(color), len(depth)))
        out += [color, depth]
    out.append(struct.pack("<Q", 0))  # no IMU frames
    return b"".join(out)


def _exact_text(M: np.ndarray) -> str:
    """A matrix as text that parses back to exactly the same float64 numbers ('%.17g')."""
    return "".join(" ".join("%.17g" % x for x in row) + "\n" for row in np.asarray(M, dtype=np.float64))


def write_scannet_sens_scene(root: str | pathlib.Path, name: str, seed: int, layout: str = "sens",
                             n_frames: int = 4, color_size: tuple[int, int] = (324, 242),
                             depth_size: tuple[int, int] = (160, 120), step: float = 0.08,
                             depth_to_color: np.ndarray | None = None, inf_pose_frames: tuple[int, ...] = (),
                             export_text: str = "exact") -> Truth:
    """One synthetic room as ScanNet ships it, `SCENE/SCENE.sens` (layout "sens"), or as the same
    data after SensReader's export (layout "export": color/, depth/, pose/, intrinsic/).

    Deterministic per seed: both layouts of one seed hold the same numbers. Everything the
    `.sens` stores is float32 (K, extrinsics, poses; the Truth holds those float32 values), and
    the export holds the very same JPEG bytes and uint16 depth. `export_text`: "exact" writes the
    export's matrices with 17 significant digits (parse back to the `.sens` float32 values),
    "sensreader" with '%f' as SensReader/python `save_mat_to_file` does (6 decimals). (SensReader
    also decodes and re-encodes each JPEG; "exact" keeps the bytes, so both layouts must give
    identical shards.) Frames at positions `inf_pose_frames` carry an all -inf pose, as SensReader
    writes for lost tracking.
    """
    import io
    import zlib

    scene = pathlib.Path(root) / name
    scene.mkdir(parents=True, exist_ok=True)
    room = synthetic.make_room(seed)
    K_d = _f32(geometry.resize_intrinsics(SCANNET_K_DEPTH, SCANNET_DEPTH_SIZE, depth_size))
    K_c = _f32(geometry.resize_intrinsics(SCANNET_K_COLOR, SCANNET_COLOR_SIZE, color_size))
    d2c = np.eye(4) if depth_to_color is None else _f32(depth_to_color)
    K_c4, K_d4 = np.pad(K_c, (0, 1)), np.pad(K_d, (0, 1))
    K_c4[3, 3] = K_d4[3, 3] = 1.0
    truth = Truth(str(scene), room, K_d, [], [], [], [], extra={"K_color": K_c, "depth_to_color": d2c,
                                                               "jpeg": [], "depth_mm": []})
    records = []
    for k, T_true in enumerate(synthetic.make_trajectory(room, n_frames, seed + 1, step=step)):
        T_d = _f32(T_true)
        rgb_d, depth = synthetic.render(room, K_d, T_d, *depth_size)
        rgb_c, _ = synthetic.render(room, K_c, T_d @ geometry.invert_pose(d2c), *color_size)
        buf = io.BytesIO()
        Image.fromarray(rgb_c).save(buf, "JPEG", quality=92)
        mm = synthetic.depth_to_png_mm(depth)
        pose = np.full((4, 4), -np.inf) if k in inf_pose_frames else T_d
        records.append((pose, 1_000_000 + 33_333 * k, 1_000_000 + 33_333 * k + 100, buf.getvalue(),
                        zlib.compress(mm.astype("<u2").tobytes())))
        truth.cam2world.append(T_d)
        truth.depth.append(mm.astype(np.float32) / np.float32(1000.0))
        truth.rgb.append(rgb_d)
        truth.names.append(str(k))
        truth.extra["jpeg"].append(buf.getvalue())
        truth.extra["depth_mm"].append(mm)
    if layout == "sens":
        (scene / f"{name}.sens").write_bytes(sens_file_bytes(K_c4, np.eye(4), K_d4, d2c, color_size, depth_size,
                                                             records))
    elif layout == "export":
        text = _exact_text if export_text == "exact" else _mat_text
        for sub in ("color", "depth", "pose", "intrinsic"):
            (scene / sub).mkdir(exist_ok=True)
        for fname, M in (("intrinsic_color.txt", K_c4), ("intrinsic_depth.txt", K_d4),
                         ("extrinsic_color.txt", np.eye(4)), ("extrinsic_depth.txt", d2c)):
            (scene / "intrinsic" / fname).write_text(text(M))
        for k, (pose, _, _, jpeg, _) in enumerate(records):
            (scene / "color" / f"{k}.jpg").write_bytes(jpeg)
            Image.fromarray(truth.extra["depth_mm"][k]).save(scene / "depth" / f"{k}.png")
            (scene / "pose" / f"{k}.txt").write_text(text(pose))
    else:
        raise ValueError(f"layout must be 'sens' or 'export', got {layout!r}")
    return truth


# ----------------------------------------------------------------------------- ScanNet++ iPhone

SCANNETPP_DEPTH_SIZE = (256, 192)
SCANNETPP_VIEW_SIZE = (512, 384)  # the reader's stored view: the depth grid x 2


def encode_video(path: str | pathlib.Path, frames: list[np.ndarray], fps: int = 60, gop: int = 6,
                 codec: str = "libx264", crf: int = 10, bframes: int = 2) -> None:
    """Encode RGB frames (H, W, 3) uint8 as a real video with PyAV (Matroska when the name ends in .mkv):
    a keyframe every `gop` frames, B-frames (so decode order differs from presentation order)."""
    import av

    H, W = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"g": str(gop), "keyint_min": str(gop), "bf": str(bframes), "crf": str(crf),
                     "sc_threshold": "0"}
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def depth_bin_bytes(depths: list[np.ndarray], encoding: str) -> bytes:
    """A ScanNet++ depth.bin of float32 metre maps (192, 256), in the layouts the toolkit's
    `extract_depth` reads: "stream" (the whole file one raw-deflate stream of float32), "lz4"
    (per frame: uint32 LE size + lz4 block of uint16 mm), "deflate" (per frame: size + raw
    deflate of float32)."""
    import zlib

    import lz4.block

    def raw_deflate(b: bytes) -> bytes:
        z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        return z.compress(b) + z.flush()

    if encoding == "stream":
        return raw_deflate(b"".join(np.asarray(d, dtype="<f4").tobytes() for d in depths))
    out = []
    for d in depths:
        if encoding == "lz4":
            block = lz4.block.compress(synthetic.depth_to_png_mm(d).astype("<u2").tobytes(), store_size=False)
        elif encoding == "deflate":
            block = raw_deflate(np.asarray(d, dtype="<f4").tobytes())
        else:
            raise ValueError(f"encoding must be stream, lz4 or deflate, got {encoding!r}")
        out += [len(block).to_bytes(4, "little"), block]
    return b"".join(out)


def write_scannetpp_scene(root: str | pathlib.Path, name: str, seed: int, n_frames: int = 12,
                          rgb_size: tuple[int, int] = (960, 720), encoding: str = "lz4", step: float = 0.06,
                          fps: int = 60, gop: int = 6, t0: float = 2871.5124, view_renders: bool = True) -> Truth:
    """A ScanNet++ scene folder (SCENE/iphone/rgb.mkv, depth.bin, pose_intrinsic_imu.json) of one room.

    The RGB (rgb_size, ARKit-like K with an off-centre principal point) is ray-cast and encoded
    as H.264 in Matroska with PyAV; depth is ray-cast at 256x192 with the RGB K resized by
    DESIGN §3's rule and stored with `encoding` (see depth_bin_bytes); `aligned_pose` holds the
    OpenCV camera-to-world, `pose` the same camera in another world (as the raw ARKit pose is).
    The Truth is the reader's stored view (512x384): its K, the renders made directly in it
    (`view_renders`; else the RGB renders resized to it, which is cheaper), and the depth the
    reader must return (each depth sample repeated over a 2x2 block; millimetre-quantised for lz4).
    """
    scene = pathlib.Path(root) / name / "iphone"
    scene.mkdir(parents=True, exist_ok=True)
    room = synthetic.make_room(seed)
    W, H = rgb_size
    K = synthetic.default_intrinsics(W, H, hfov_deg=64.0)
    K[0, 2] += 3.1 * W / 960
    K[1, 2] -= 2.2 * W / 960
    K_d = geometry.resize_intrinsics(K, rgb_size, SCANNETPP_DEPTH_SIZE)
    K_v = geometry.resize_intrinsics(K, rgb_size, SCANNETPP_VIEW_SIZE)
    other_world = np.eye(4)
    other_world[:3, :3] = geometry.axis_angle_to_matrix([0.0, 0.0, 0.7])
    other_world[:3, 3] = [1.5, -0.4, 0.2]
    truth = Truth(str(scene.parent), room, K_v, [], [], [], [], extra={"K_rgb": K, "K_depth": K_d, "rgb_full": []})
    frames, depths, meta = [], [], {}
    for k, T in enumerate(synthetic.make_trajectory(room, n_frames, seed + 1, step=step)):
        rgb, _ = synthetic.render(room, K, T, W, H)
        _, depth = synthetic.render(room, K_d, T, *SCANNETPP_DEPTH_SIZE)
        rgb_v = (synthetic.render(room, K_v, T, *SCANNETPP_VIEW_SIZE)[0] if view_renders else
                 np.asarray(Image.fromarray(rgb).resize(SCANNETPP_VIEW_SIZE, Image.BICUBIC)))
        frames.append(rgb)
        depths.append(depth)
        stored = (synthetic.depth_to_png_mm(depth).astype(np.float32) / np.float32(1000.0)
                  if encoding == "lz4" else depth.astype(np.float32))
        truth.depth.append(geometry.resize_depth_nearest(stored, SCANNETPP_VIEW_SIZE))
        truth.rgb.append(rgb_v)
        truth.cam2world.append(T)
        truth.names.append(f"frame_{k:06d}")
        truth.extra["rgb_full"].append(rgb)
        meta[f"frame_{k:06d}"] = {"timestamp": t0 + k / fps, "intrinsic": K.tolist(),
                                  "pose": (other_world @ T).tolist(), "aligned_pose": T.tolist(),
                                  "imu": {"gravity": [0.0, -9.81, 0.0]}}
    encode_video(scene / "rgb.mkv", frames, fps=fps, gop=gop)
    (scene / "depth.bin").write_bytes(depth_bin_bytes(depths, encoding))
    (scene / "pose_intrinsic_imu.json").write_text(json.dumps(meta))
    return truth
