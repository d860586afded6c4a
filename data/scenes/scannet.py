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

The raw `SCENE/SCENE.sens` is read directly when the folder holds it (it is preferred over
an export in the same folder: the export re-encodes every colour JPEG and rounds poses and
intrinsics to 6 decimals, the `.sens` is what was captured). Its layout, all little-endian,
as ScanNet/ScanNet `SensReader/c++/src/sensorData.h` writes it (`SensorData::
writeHeaderToFile`, `CalibrationData::saveToFile`, `RGBDFrame::saveToFile`) and
`SensReader/python/SensorData.py` (`SensorData.load`, `RGBDFrame.load`) reads it:

```
uint32 version (4: M_SENSOR_DATA_VERSION)   uint64 n, char[n] sensor name
float32[16] intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth (row-major 4x4)
int32 colour codec (-1 unknown, 0 raw, 1 png, 2 jpeg)   int32 depth codec (0 raw_ushort, 1 zlib_ushort, 2 occi_ushort)
uint32 colour width, height, depth width, height   float32 depth_shift (1000: millimetres)
uint64 n_frames, then per frame:
    float32[16] camera_to_world   uint64 timestamp_color, timestamp_depth (microseconds)
    uint64 colour bytes, depth bytes   colour data   depth data (zlib of uint16 depth_height x depth_width)
uint64 n_imu_frames, IMU frames (not read)
```
Opening the scene walks the frame headers once (96 bytes each, skipping the data: one
sequential pass, `ranges.RangeFile`) and records each frame's data offset in its `Frame`;
the index travels with the frames into the shard job's scene shell, so write tasks read
just their frames' bytes (a range read each, local or s3://). Colour and depth then go
through exactly the export path's decoding and alignment. A `-inf` pose (lost tracking) is
skipped and counted like a `-inf` pose file; a file cut short keeps its whole frames and
counts the rest as `truncated .sens file`; a wrong version or a header that does not parse
fails the scene in one line.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data import geometry
from data.scenes.base import (Frame, FrameError, Scene, SceneError, decode_depth, decode_rgb_image,
                              open_fs, read_bytes, url_join)
from data.scenes.ranges import RangeFile

LAYOUT_HINT = ("expected SCENE/SCENE.sens or SensReader exports: SCENE/color/i.jpg, depth/i.png, pose/i.txt, "
               "intrinsic/{intrinsic,extrinsic}_{color,depth}.txt (README 'Corpus layouts')")
DEPTH_SCALE = 1000.0  # SensReader depth_shift: uint16 millimetres
EXTRINSIC_IDENTITY_TOL = 1e-6

# ---- SensorData (.sens), see the module docstring
SENS_VERSION = 4
SENS_COLOR_CODECS = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
SENS_DEPTH_CODECS = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
_SENS_CALIB = struct.Struct("<64f")  # intrinsic_color, extrinsic_color, intrinsic_depth, extrinsic_depth
_SENS_TAIL = struct.Struct("<ii4IfQ")  # codecs, sizes, depth_shift, n_frames
SENS_FRAME_HEADER = struct.Struct("<16f4Q")  # camera_to_world, 2 timestamps, 2 byte sizes: 96 bytes
MAX_SENSOR_NAME = 4096
TRUNCATED = "truncated .sens file"


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


@dataclass(frozen=True)
class SensHeader:
    """What a `.sens` header says (module docstring); matrices float64 from the file's float32."""

    version: int
    sensor_name: str
    intrinsic_color: np.ndarray
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_codec: str
    depth_codec: str
    color_size: tuple[int, int]
    depth_size: tuple[int, int]
    depth_shift: float
    n_frames: int
    frames_offset: int
    """Byte offset of the first frame header."""


def _read_exact(f, n: int, what: str, url: str, scene: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise SceneError(f"scene {scene}: {url} ends inside its header ({what}): a truncated or partial "
                         f"download; fetch the .sens again")
    return b


def read_sens_header(f, url: str, scene: str) -> SensHeader:
    """Parse a `.sens` header from a file object at offset 0. SceneError (one line) if it is not one."""
    (version,) = struct.unpack("<I", _read_exact(f, 4, "version", url, scene))
    if version != SENS_VERSION:
        raise SceneError(f"scene {scene}: {url} is SensorData version {version}, not version {SENS_VERSION} "
                         f"(ScanNet v2's .sens, the only layout read): not a ScanNet .sens, or a damaged one; "
                         f"fetch it again with download-scannet.py --type .sens")
    (n,) = struct.unpack("<Q", _read_exact(f, 8, "sensor name length", url, scene))
    if n > MAX_SENSOR_NAME:
        raise SceneError(f"scene {scene}: {url} is not a SensorData file (sensor name of {n} bytes)")
    name = _read_exact(f, n, "sensor name", url, scene).decode("utf-8", "replace")
    m = np.asarray(_SENS_CALIB.unpack(_read_exact(f, _SENS_CALIB.size, "calibration", url, scene)),
                   dtype=np.float64).reshape(4, 4, 4)
    c_codec, d_codec, cw, ch, dw, dh, shift, n_frames = _SENS_TAIL.unpack(
        _read_exact(f, _SENS_TAIL.size, "image sizes", url, scene))
    if c_codec not in SENS_COLOR_CODECS or SENS_COLOR_CODECS[c_codec] == "unknown":
        raise SceneError(f"scene {scene}: {url}: colour codec {c_codec} is not one of raw, png, jpeg")
    if SENS_DEPTH_CODECS.get(d_codec) not in ("raw_ushort", "zlib_ushort"):
        what = SENS_DEPTH_CODECS.get(d_codec, str(d_codec))
        raise SceneError(f"scene {scene}: {url}: depth codec {what} is not supported (raw_ushort or zlib_ushort; "
                         f"occi_ushort needs Occipital's codec)")
    if min(cw, ch, dw, dh) < 1 or not (np.isfinite(shift) and shift > 0):
        raise SceneError(f"scene {scene}: {url}: header holds no usable image sizes or depth_shift "
                         f"({cw}x{ch}, {dw}x{dh}, {shift})")
    return SensHeader(version=version, sensor_name=name, intrinsic_color=m[0], extrinsic_color=m[1],
                      intrinsic_depth=m[2], extrinsic_depth=m[3], color_codec=SENS_COLOR_CODECS[c_codec],
                      depth_codec=SENS_DEPTH_CODECS[d_codec], color_size=(int(cw), int(ch)),
                      depth_size=(int(dw), int(dh)), depth_shift=float(shift), n_frames=int(n_frames),
                      frames_offset=4 + 8 + n + _SENS_CALIB.size + _SENS_TAIL.size)


@dataclass(frozen=True)
class SensRecord:
    """One frame of a `.sens`: where its colour and depth bytes lie, and its header fields."""

    index: int
    cam2world: np.ndarray
    timestamp_color: int
    timestamp_depth: int
    offset: int
    """Byte offset of the colour data; the depth data follows it."""
    color_bytes: int
    depth_bytes: int


def index_sens(f, header: SensHeader, file_size: int) -> tuple[list[SensRecord], int | None]:
    """Walk the frame headers once from `header.frames_offset`, skipping the data.

    Returns (records of the whole frames, index of the first frame cut off by the end of the
    file or None). f: a seekable binary file object.
    """
    records: list[SensRecord] = []
    pos = header.frames_offset
    hsize = SENS_FRAME_HEADER.size
    for k in range(header.n_frames):
        if pos + hsize > file_size:
            return records, k
        f.seek(pos)
        raw = f.read(hsize)
        if len(raw) != hsize:
            return records, k
        vals = SENS_FRAME_HEADER.unpack(raw)
        t_c, t_d, n_c, n_d = vals[16:]
        data = pos + hsize
        if data + n_c + n_d > file_size:
            return records, k
        records.append(SensRecord(k, np.asarray(vals[:16], dtype=np.float32).astype(np.float64).reshape(4, 4),
                                  int(t_c), int(t_d), data, int(n_c), int(n_d)))
        pos = data + n_c + n_d
    return records, None


def depth_from_uint16(arr: np.ndarray, depth_scale: float) -> np.ndarray:
    """uint16 (H, W) -> float32 metres, 0 = invalid: the same arithmetic as `base.decode_depth` on a PNG."""
    out = arr.astype(np.float32) / float(depth_scale)
    return np.where(np.isfinite(out) & (out > 0), out, 0.0).astype(np.float32)


class ScanNetScene(Scene):
    """One ScanNet scene folder: `SCENE.sens`, else a SensReader export. Frames sorted by their integer index."""

    dataset = "scannet"

    def __init__(self, url: str, name: str | None = None):
        super().__init__(url, name)
        fs, path = open_fs(self.url)
        if not fs.isdir(path):
            raise SceneError(f"scene {self.name}: {self.url} is not a folder; {LAYOUT_HINT}")
        self._depth_cache: tuple[str, np.ndarray] | None = None
        self._sens_blob: tuple[str, bytes, bytes] | None = None
        self.sens: SensHeader | None = None
        kids = {p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False)}
        if f"{self.name}.sens" in kids:
            self._open_sens(url_join(self.url, f"{self.name}.sens"))
            return
        base = path.rstrip("/")
        intr = url_join(self.url, "intrinsic")
        self.K_color = read_matrix_file(url_join(intr, "intrinsic_color.txt"), (4, 4), self.name)[:3, :3]
        self.K_depth = read_matrix_file(url_join(intr, "intrinsic_depth.txt"), (4, 4), self.name)[:3, :3]
        ext_c = read_matrix_file(url_join(intr, "extrinsic_color.txt"), (4, 4), self.name)
        ext_d = read_matrix_file(url_join(intr, "extrinsic_depth.txt"), (4, 4), self.name)
        self._calibrate(ext_c, ext_d, {k: url_join(intr, k + ".txt") for k in
                                       ("intrinsic_color", "intrinsic_depth", "extrinsic_color", "extrinsic_depth")})
        self.depth_scale = DEPTH_SCALE

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

    def _calibrate(self, ext_c: np.ndarray, ext_d: np.ndarray, where: dict[str, str]) -> None:
        """Check K_color, K_depth and the extrinsics; set depth_to_color (None: shared camera centre).

        where: {"intrinsic_color", "intrinsic_depth", "extrinsic_color", "extrinsic_depth"} -> the
        place each came from, for the one-line error.
        """
        for label, K in (("intrinsic_color", self.K_color), ("intrinsic_depth", self.K_depth)):
            if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise SceneError(f"scene {self.name}: {where[label]} holds no usable K")
        for label, E in (("extrinsic_color", ext_c), ("extrinsic_depth", ext_d)):
            problem = geometry.pose_problem(E)
            if problem:
                raise SceneError(f"scene {self.name}: {where[label]}: {problem}")
        # depth-camera points -> colour-camera points (both extrinsics map into one base frame)
        d2c = np.linalg.inv(ext_c) @ ext_d
        self.depth_to_color: np.ndarray | None = (
            None if np.abs(d2c - np.eye(4)).max() < EXTRINSIC_IDENTITY_TOL else d2c)

    def _open_sens(self, sens_url: str) -> None:
        """Read the header and walk the frame headers of SCENE.sens once (module docstring)."""
        self.sens_file = RangeFile(sens_url)
        try:
            size = self.sens_file.size
            with self.sens_file.stream() as f:
                header = read_sens_header(f, sens_url, self.name)
                records, cut = index_sens(f, header, size)
        except FileNotFoundError:
            raise SceneError(f"scene {self.name}: missing {sens_url}; {LAYOUT_HINT}") from None
        self.sens = header
        self.K_color = header.intrinsic_color[:3, :3].copy()
        self.K_depth = header.intrinsic_depth[:3, :3].copy()
        self._calibrate(header.extrinsic_color, header.extrinsic_depth,
                        {k: f"{sens_url} ({k})" for k in
                         ("intrinsic_color", "intrinsic_depth", "extrinsic_color", "extrinsic_depth")})
        self.depth_scale = header.depth_shift
        self.depth_size = header.depth_size
        if cut is not None and not records:
            raise SceneError(f"scene {self.name}: {sens_url} ends ({size} bytes) before its first whole frame "
                             f"({header.n_frames} announced): a truncated or partial download; fetch it again")
        for r in records:
            problem = geometry.pose_problem(r.cam2world)  # -inf poses (lost tracking) land here
            if problem:
                self.skip(str(r.index), problem)
                continue
            self.frames.append(Frame(index=r.index, name=str(r.index), K=self.K_depth.copy(), cam2world=r.cam2world,
                                     size=self.depth_size, timestamp=r.timestamp_color * 1e-6 or None,
                                     extra={"sens": (r.offset, r.color_bytes, r.depth_bytes)}))
        if cut is not None:
            for k in range(cut, header.n_frames):
                self.skip(str(k), TRUNCATED)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_depth_cache"] = state["_sens_blob"] = None  # per-frame read caches stay in their process
        return state

    def _sens_bytes(self, frame: Frame) -> tuple[bytes, bytes]:
        """(colour, depth) data of a `.sens` frame: one range read of both, kept for the next call."""
        if self._sens_blob is not None and self._sens_blob[0] == frame.name:
            return self._sens_blob[1], self._sens_blob[2]
        offset, n_color, n_depth = frame.extra["sens"]
        blob = self.sens_file.read(offset, n_color + n_depth)
        self._sens_blob = (frame.name, blob[:n_color], blob[n_color:])
        return self._sens_blob[1], self._sens_blob[2]

    def _color_bytes(self, frame: Frame) -> bytes:
        if self.sens is not None:
            return self._sens_bytes(frame)[0]
        return read_bytes(url_join(self.url, frame.extra["rgb"]))

    def _decode_color(self, data: bytes) -> np.ndarray | Image.Image:
        """Raw colour as an array; JPEG as the decoder's PIL image, which the alignment warps as it is
        (no array of the full frame)."""
        if self.sens is not None and self.sens.color_codec == "raw":
            W, H = self.sens.color_size
            if len(data) != W * H * 3:
                raise ValueError(f"raw colour holds {len(data)} bytes, expected {W}x{H}x3")
            return np.frombuffer(data, dtype=np.uint8).reshape(H, W, 3)
        return decode_rgb_image(data)

    def _sens_depth(self, frame: Frame) -> np.ndarray:
        data = self._sens_bytes(frame)[1]
        raw = zlib.decompress(data) if self.sens.depth_codec == "zlib_ushort" else data
        W, H = self.sens.depth_size
        if len(raw) != W * H * 2:
            raise ValueError(f"depth holds {len(raw)} bytes, expected {W}x{H} uint16")
        return depth_from_uint16(np.frombuffer(raw, dtype="<u2").reshape(H, W), self.depth_scale)

    def _nominal_depth_size(self, fs, paths: list[str]) -> tuple[int, int]:
        """Depth (W, H) shared by the scene: the commonest of a few headers (default 640x480)."""
        sizes = [s for s in (_image_size(fs, p) for p in paths) if s]
        return Counter(sizes).most_common(1)[0][0] if sizes else (640, 480)

    def _read_depth(self, frame: Frame) -> np.ndarray:
        if self._depth_cache is not None and self._depth_cache[0] == frame.name:
            depth = self._depth_cache[1]
            self._depth_cache = None
            return depth
        if self.sens is not None:
            return self._sens_depth(frame)
        rel = frame.extra["depth"]
        return decode_depth(read_bytes(url_join(self.url, rel)), rel, self.depth_scale)

    def _rgb_shape(self, frame: Frame) -> tuple[int, int]:
        """The colour JPEG decodes (at 1/8 scale: every entropy-coded block is still parsed, so a
        truncated or corrupt file fails as in a full read), without the alignment; what
        `_read_rgb` would return is always on the depth grid."""
        data = self._color_bytes(frame)
        if self.sens is not None and self.sens.color_codec == "raw":
            self._decode_color(data)
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
        return frame.size[1], frame.size[0]

    def _read_rgb(self, frame: Frame) -> np.ndarray:
        """Colour resampled onto the depth grid: uint8 (Hd, Wd, 3), sharing K_depth."""
        rgb = self._decode_color(self._color_bytes(frame))
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
    """Scene folders (URLs) under a corpus root that hold `SCENE.sens` or a `pose/` folder, sorted."""
    return sorted(s for s, kids in scene_children(root).items()
                  if "pose" in kids or f"{s.rstrip('/').rpartition('/')[2]}.sens" in kids)
