"""ScanNet++ iPhone stream, `--format scannetpp` (DESIGN §3).

```
SCENE/iphone/rgb.mkv                  RGB video, 1920x1440; frame k = frame_%06d, k from 0 in presentation order
SCENE/iphone/depth.bin                ARKit depth, 256x192 a frame, in one of two encodings:
                                        whole file: one raw-deflate stream of float32 metres (N x 192 x 256)
                                        per frame:  uint32 little-endian byte count, then an lz4 block of
                                                    uint16 millimetres, or a raw-deflate block of float32 metres
SCENE/iphone/pose_intrinsic_imu.json  {"frame_000000": {"timestamp", "intrinsic": 3x3 for the RGB size,
                                       "pose", "aligned_pose": 4x4 camera-to-world, OpenCV axes, "imu"}, ...}
```
What each file means follows the ScanNet++ toolkit (scannetpp/scannetpp
`iphone/prepare_iphone_data.py`): `extract_rgb` numbers the video's frames from 0
(`ffmpeg -start_number 0 frame_%06d.jpg`); `extract_depth` first inflates the whole file
(`zlib.decompress(wbits=-MAX_WBITS)`, float32, reshape (-1, 192, 256)), else walks
per-frame records, each an lz4 block of 192 x 256 uint16 or, failing that, raw deflate of
float32 (x1000 to millimetres); its depth frame ids are the record numbers. The json's
`aligned_pose` is the ARKit pose moved into the aligned scan's world (the laser-scan mesh
frame, which `pose` is not in); it is camera-to-world in OpenCV axes. The DSLR stream
(fisheye, no depth) is out of scope.

One pixel-aligned view per frame. RGB (1920x1440, K from the json) and depth (256x192,
K_depth = K resized to 256x192 by DESIGN §3's rule, `fx' = fx sx, cx' = (cx + 0.5) sx - 0.5`)
are one camera at two resolutions. The stored view is the depth grid times `VIEW_SCALE`
(2: 512x384): depth by nearest sampling, which at an integer factor repeats each ARKit
depth sample over exactly a 2x2 block (never interpolated, and no sample is dropped or
favoured), RGB area-averaged down from 1920x1440 (PIL bicubic, whose support widens with the
reduction), K of the view = K resized to 512x384 by the same rule (the rule composes, so it is
also K_depth resized). Why not the depth grid (256x192): it throws away 98% of the colour
pixels a VLM would see. Why not the RGB grid: each depth sample would cover 7.5 x 7.5 RGB
pixels with a non-integer phase, ~56 stored depths per measured one. At the shard job's
default `--max-side 640` the 512x384 view is stored as it is.

Pixel centres: ARKit intrinsics are taken to put pixel centres at integer coordinates (our
convention, K used as given). Apple documents the principal point as an offset "from the
top-left corner of the image frame", which does not say whether that corner is pixel (0, 0)'s
centre or its outer edge; the ARKitScenes toolkit (apple/ARKitScenes `threedod/
benchmark_scripts/utils/tenFpsDataLoader.py`, `generate_point`) unprojects integer pixel
indices with the same ARKit K unchanged, and so does this project's `arkitscenes` reader, so
the two ARKit corpora agree. The other reading moves every point by 0.5 px at 1920x1440, i.e.
0.13 px in the 512x384 view: below what the photometric self-check or ARKit's poses resolve,
so the data cannot settle it. The conventions the self-check does catch (an unscaled K on the
depth grid, poses read in ARKit's OpenGL camera axes, `aligned_pose` taken as world-to-camera)
are tested.

Reading: the video is indexed once by demuxing (`video_frames.VideoIndex`: no decoding) and
frames are decoded on demand with seeking (`video_frames.VideoFrames`); the scan does not decode
RGB (it needs depth only; a frame whose packet does not decode fails later, in the write task,
as a counted skip). Per-frame depth records are indexed in one pass over their byte counts and
read by range; a whole-file deflate stream has no random access, so it is inflated in order
(once for the scan), and pickling a scene whose frames are few (the shard job's scene shell)
attaches those frames' depth, so write tasks never inflate the stream.
"""
from __future__ import annotations

import collections
import re
import zlib
from typing import Any

import numpy as np
from PIL import Image

from data import geometry
from data.scenes.base import Frame, FrameError, Scene, SceneError, load_json, open_fs, url_join
from data.scenes.ranges import RangeFile
from data.scenes.scannet import scene_children
from data.scenes.video_frames import VideoError, VideoFrames, VideoIndex

LAYOUT_HINT = ("expected SCENE/iphone/rgb.mkv, depth.bin and pose_intrinsic_imu.json as ScanNet++ ships them "
               "(README 'Corpus layouts')")
DEPTH_SIZE = (256, 192)  # (W, H) of ARKit's depth maps in depth.bin
VIEW_SCALE = 2  # stored view = the depth grid times this (module docstring)
MAX_ASPECT_MISMATCH = 0.01
FRAME_KEY = re.compile(r"frame_(\d+)")
MAX_CARRIED_FRAMES = 256  # a pickled scene with at most this many frames carries their depth (deflate stream)
KEEP_FRAMES = 64  # depth frames kept while inflating a stream in order past them (frames the caller wants)
INFLATE_CHUNK = 1 << 20
PER_FRAME, DEFLATE_STREAM = "per-frame", "deflate-stream"


class DepthBin:
    """ScanNet++ `depth.bin`, either encoding (module docstring). Pickles as its index only."""

    def __init__(self, url: str, scene: str, size: tuple[int, int] = DEPTH_SIZE):
        self.url, self.scene, self.size = url, scene, size
        self.file = RangeFile(url)
        self.records: list[tuple[int, int]] = []  # per frame: (offset, bytes) of the record's data
        self.truncated = False
        self.encoding = self._index()
        self._inflate: dict[str, Any] | None = None
        self._kept: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_inflate"], state["_kept"] = None, collections.OrderedDict()
        return state

    @property
    def frame_bytes(self) -> int:
        return self.size[0] * self.size[1]

    def _index(self) -> str:
        """Walk the per-frame byte counts once; else check the head is one raw-deflate stream."""
        try:
            total = self.file.size
        except FileNotFoundError:
            raise SceneError(f"scene {self.scene}: missing {self.url}; {LAYOUT_HINT}") from None
        limit = self.frame_bytes * 4 + 4096  # the largest record: deflate of float32 (a little expanded)
        records, pos, plausible = [], 0, True
        with self.file.stream() as f:
            while pos + 4 <= total:
                f.seek(pos)
                n = int.from_bytes(f.read(4), "little")
                if not 0 < n <= limit:
                    plausible = False
                    break
                if pos + 4 + n > total:
                    break
                records.append((pos + 4, n))
                pos += 4 + n
            if records and plausible and pos == total:
                self.records = records
                return PER_FRAME
            f.seek(0)
            head = f.read(1 << 16)
        try:
            zlib.decompressobj(-zlib.MAX_WBITS).decompress(head, self.frame_bytes * 4)
            return DEFLATE_STREAM
        except zlib.error:
            pass
        if records and plausible:  # the chain of records was cut: keep the whole ones
            self.records, self.truncated = records, True
            return PER_FRAME
        raise SceneError(f"scene {self.scene}: {self.url} is neither one raw-deflate stream nor per-frame "
                         f"size-prefixed lz4/deflate records ({total} bytes)")

    # -- decoding ----------------------------------------------------------------------
    def _decode_record(self, data: bytes) -> np.ndarray:
        """One per-frame record -> float32 (H, W) metres: lz4 uint16 mm, else raw deflate float32 m."""
        W, H = self.size
        try:
            import lz4.block
        except ImportError:  # pragma: no cover - a dependency of the package
            raise SceneError(f"scene {self.scene}: {self.url} holds lz4 blocks: pip install lz4") from None
        try:
            raw = lz4.block.decompress(data, uncompressed_size=W * H * 2)
            if len(raw) == W * H * 2:
                return np.frombuffer(raw, dtype="<u2").reshape(H, W).astype(np.float32) / np.float32(1000.0)
        except lz4.block.LZ4BlockError:
            pass
        raw = zlib.decompress(data, wbits=-zlib.MAX_WBITS)
        if len(raw) != W * H * 4:
            raise ValueError(f"depth record holds {len(raw)} bytes, neither {W}x{H} uint16 nor float32")
        return np.frombuffer(raw, dtype="<f4").reshape(H, W).copy()

    def frame(self, k: int, keep: set[int] | None = None) -> np.ndarray:
        """Depth of record k: float32 (H, W) metres as stored (non-finite or <= 0 not yet zeroed).

        IndexError when the file holds no record k. keep: other records worth keeping while
        inflating a whole-file stream in order (the frames the caller will ask for).
        """
        if self.encoding == PER_FRAME:
            if not 0 <= k < len(self.records):
                raise IndexError(f"{self.url} holds {len(self.records)} depth records, no record {k}")
            offset, n = self.records[k]
            return self._decode_record(self.file.read(offset, n))
        if k in self._kept:
            return self._kept.pop(k)
        return self._inflate_to(k, keep or set())

    def _inflate_to(self, k: int, keep: set[int]) -> np.ndarray:
        """Frame k of the whole-file stream, inflating in order from where the last call stopped."""
        st = self._inflate
        if st is None or st["next"] > k:
            st = self._inflate = {"d": zlib.decompressobj(-zlib.MAX_WBITS), "pos": 0, "buf": bytearray(), "next": 0}
        nbytes = self.frame_bytes * 4
        W, H = self.size
        total = self.file.size
        while True:
            while len(st["buf"]) >= nbytes:
                j = st["next"]
                chunk = bytes(st["buf"][:nbytes])
                del st["buf"][:nbytes]
                st["next"] += 1
                if j == k:
                    return np.frombuffer(chunk, dtype="<f4").reshape(H, W).copy()
                if j in keep:
                    self._kept[j] = np.frombuffer(chunk, dtype="<f4").reshape(H, W).copy()
                    while len(self._kept) > KEEP_FRAMES:
                        self._kept.popitem(last=False)
            d = st["d"]
            if d.eof or st["pos"] >= total:
                tail = "truncated" if not d.eof else "ended"
                raise IndexError(f"{self.url}: the deflate stream {tail} after {st['next']} depth frames, "
                                 f"no frame {k}")
            n = min(INFLATE_CHUNK, total - st["pos"])
            data = self.file.read(st["pos"], n)
            st["pos"] += n
            st["buf"] += d.decompress(data)


def _matrix(value: Any, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr.reshape(shape) if arr.size == shape[0] * shape[1] else None


def pose_from_json(entry: dict) -> np.ndarray | None:
    """A frame's camera-to-world (4, 4), OpenCV axes: `aligned_pose` as stored (None if absent or garbage)."""
    return _matrix(entry.get("aligned_pose"), (4, 4))


def view_intrinsics(K_rgb: np.ndarray, rgb_size: tuple[int, int], view_size: tuple[int, int]) -> np.ndarray:
    """K of the stored view: the RGB K resized by DESIGN §3's rule (integer pixel centres assumed)."""
    return geometry.resize_intrinsics(K_rgb, rgb_size, view_size)


class ScanNetPPScene(Scene):
    """One ScanNet++ scene folder (its iPhone stream). Frames in video order."""

    dataset = "scannetpp"

    def __init__(self, url: str, name: str | None = None, view_scale: int = VIEW_SCALE):
        super().__init__(url, name)
        fs, path = open_fs(self.url)
        if not fs.isdir(path):
            raise SceneError(f"scene {self.name}: {self.url} is not a folder; {LAYOUT_HINT}")
        if int(view_scale) != view_scale or not 1 <= view_scale <= 7:
            raise SceneError(f"view_scale must be an integer 1..7 (got {view_scale})")
        self.iphone = url_join(self.url, "iphone")
        json_url = url_join(self.iphone, "pose_intrinsic_imu.json")
        try:
            meta = load_json(json_url)
        except FileNotFoundError:
            raise SceneError(f"scene {self.name}: missing {json_url}; {LAYOUT_HINT}") from None
        if not isinstance(meta, dict):
            raise SceneError(f"scene {self.name}: {json_url} is not an object of frame_%06d entries")
        entries = {int(m.group(1)): v for key, v in meta.items() if (m := FRAME_KEY.fullmatch(str(key)))}
        if not entries:
            raise SceneError(f"scene {self.name}: {json_url} holds no frame_%06d entries")
        video_url = url_join(self.iphone, "rgb.mkv")
        try:
            self.video = VideoIndex.build(video_url)
        except FileNotFoundError:
            raise SceneError(f"scene {self.name}: missing {video_url}; {LAYOUT_HINT}") from None
        except VideoError as e:
            raise SceneError(f"scene {self.name}: {e}") from None
        self.depth = DepthBin(url_join(self.iphone, "depth.bin"), self.name)
        self.rgb_size = self.video.size
        W, H = self.rgb_size
        if abs((W / H) / (DEPTH_SIZE[0] / DEPTH_SIZE[1]) - 1) > MAX_ASPECT_MISMATCH:
            raise SceneError(f"scene {self.name}: {video_url} is {W}x{H}, not the 4:3 of the {DEPTH_SIZE[0]}x"
                             f"{DEPTH_SIZE[1]} depth maps (a rotated or cropped video?)")
        self.view_size = (DEPTH_SIZE[0] * int(view_scale), DEPTH_SIZE[1] * int(view_scale))
        self.fps = self.video.fps
        self.depth_scale = 1000.0
        self._frames_reader: VideoFrames | None = None
        n_video = len(self.video)
        n_depth = len(self.depth.records) if self.depth.encoding == PER_FRAME else None
        for k in sorted(set(entries) | set(range(n_video))):
            name = f"frame_{k:06d}"
            if k >= n_video:
                self.skip(name, "no frame in rgb.mkv")
                continue
            if k not in entries or not isinstance(entries[k], dict):
                self.skip(name, "no entry in pose_intrinsic_imu.json")
                continue
            if n_depth is not None and k >= n_depth:
                self.skip(name, "truncated depth.bin" if self.depth.truncated else "no record in depth.bin")
                continue
            entry = entries[k]
            cam2world = pose_from_json(entry)
            if cam2world is None:
                self.skip(name, "garbage aligned_pose")
                continue
            problem = geometry.pose_problem(cam2world)
            if problem:
                self.skip(name, problem)
                continue
            K = _matrix(entry.get("intrinsic"), (3, 3))
            if K is None or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                self.skip(name, "garbage intrinsic")
                continue
            ts = entry.get("timestamp")
            extra = {"depth": self.depth.records[k]} if n_depth is not None else {}
            self.frames.append(Frame(index=k, name=name, K=view_intrinsics(K, self.rgb_size, self.view_size),
                                     cam2world=cam2world, size=self.view_size,
                                     timestamp=float(ts) if isinstance(ts, (int, float)) else None, extra=extra))
        self._carried: dict[int, bytes] = {}
        self._wanted: tuple[int, set[int]] | None = None

    def wanted(self) -> set[int]:
        """Indices of this scene's frames (of a shell: the frames the plan uses), cached per frame list."""
        if self._wanted is None or self._wanted[0] != id(self.frames):
            self._wanted = (id(self.frames), {f.index for f in self.frames})
        return self._wanted[1]

    # -- pickling: the scene shell --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_frames_reader"] = state["_wanted"] = None
        if self.depth.encoding == DEFLATE_STREAM and len(self.frames) <= MAX_CARRIED_FRAMES:
            state["_carried"] = self.carry_depth()
        return state

    def carry_depth(self) -> dict[int, bytes]:
        """{frame index: zlib(float32 depth)} of this scene's frames (whole-file deflate stream only).

        Inflates the stream once, in order, up to the last frame; frames whose depth is missing
        are left out (their read fails as it would have). What pickling attaches.
        """
        want = self.wanted()
        out = {k: v for k, v in self._carried.items() if k in want}
        for k in sorted(want - set(out)):
            try:
                depth = self.depth.frame(k, keep=want)
            except (IndexError, zlib.error, OSError):
                break
            out[k] = zlib.compress(np.ascontiguousarray(depth, dtype="<f4").tobytes(), 1)
        return out

    # -- reads ----------------------------------------------------------------------------
    def _video_frames(self) -> VideoFrames:
        if self._frames_reader is None:
            self._frames_reader = VideoFrames(self.video, transform=self._to_view, keep=self.wanted())
        return self._frames_reader

    def _to_view(self, rgb: np.ndarray) -> np.ndarray:
        if (rgb.shape[1], rgb.shape[0]) != self.rgb_size:
            raise ValueError(f"decoded frame is {rgb.shape[1]}x{rgb.shape[0]}, the stream says "
                             f"{self.rgb_size[0]}x{self.rgb_size[1]}")
        return np.asarray(Image.fromarray(rgb).resize(self.view_size, Image.BICUBIC))

    def _rgb_shape(self, frame: Frame) -> tuple[int, int]:
        """The view's size without decoding: the scan needs depth only (module docstring)."""
        return self.view_size[1], self.view_size[0]

    def _read_rgb(self, frame: Frame) -> np.ndarray:
        try:
            return self._video_frames().get(frame.index)
        except (VideoError, IndexError) as e:
            raise FrameError(self.name, frame.name, f"unreadable rgb ({e})") from None

    def _read_depth(self, frame: Frame) -> np.ndarray:
        blob = self._carried.get(frame.index)
        if blob is not None:
            W, H = DEPTH_SIZE
            depth = np.frombuffer(zlib.decompress(blob), dtype="<f4").reshape(H, W)
        else:
            try:
                depth = self.depth.frame(frame.index, keep=self.wanted())
            except IndexError as e:
                raise FrameError(self.name, frame.name, f"missing depth ({e})") from None
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        return geometry.resize_depth_nearest(depth, self.view_size)


def list_scannetpp_scenes(root: str) -> list[str]:
    """Scene folders (URLs) under a corpus root that hold an `iphone/` folder, sorted."""
    return sorted(s for s, kids in scene_children(root).items() if "iphone" in kids)
