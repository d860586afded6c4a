"""The scene-clip shard format (DESIGN §4.1): version 2 clips, version 1 pairs still read.

Version 2: one WebDataset sample per clip of K frames (2 <= K <= 32) of one scene, in frame
order. Members of a sample (key `{shard:06d}_{index:05d}`):

- `f00.jpg` ... `f{K-1:02d}.jpg`: RGB of each frame at the stored resolution;
- `f00.depth.png` ...: uint16 depth in units of 1/depth_scale, pixel-aligned with that frame;
- `f00.objects.png` ... (optional, synthetic data): uint16 id of the object each pixel shows (0: none),
  pixel-aligned with that frame; present exactly when the json says `objects` true, with
  `object_groups` (lists of ids that look alike: same shape, size and texture);
- `corr.npy`: float32 (N, 6) rows `i, j, u_i, v_i, u_j, v_j` for the frame pairs i < j of the
  clip, grouped by (i, j) ascending;
- `json`: metadata (`META_KEYS_V2`): `version` 2, `kind` "clip", `dataset`, `scene`, `frames`
  (names), `indices` (frame indices in the scene), `K` and `T_w` (per frame 3x3 / 4x4
  camera-to-world), `sizes` ([W, H] per frame), `overlap` (K x K), `pairs` ([[i, j], ...],
  i < j ascending), and per pair (in that order) `n_corr`, `photo_err`, `photo_err_shuffled`;
  `depth_scale`, `metric_depth`, `source`.

Version 1 (one pair: `a.jpg`, `b.jpg`, `a.depth.png`, `b.depth.png`, `corr.npy` (N, 4), a json
with `frame_a`, `frame_b`, `gap`, ...) is read as a clip of K = 2 (`decode_sample`), or as
itself (`decode_pair`). A sample's `json` carries `kind`; none means a clip. Readers dispatch
on `kind`, then on `version`, and refuse a major version they do not know in one line.
Encoding is deterministic: the same inputs give the same bytes.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

FORMAT_VERSION = 2
"""The clip format this code writes."""
CLIP_VERSIONS = (1, 2)
"""Major versions of scene-clip samples this code reads (1: pairs, read as clips of 2 frames)."""
KNOWN_VERSIONS = {"clip": CLIP_VERSIONS, "instruction": (1,)}
"""Readable major versions per sample kind."""
MIN_FRAMES, MAX_FRAMES = 2, 32

MEMBERS_V1 = ("a.jpg", "b.jpg", "a.depth.png", "b.depth.png", "corr.npy", "json")
META_KEYS_V1 = ("version", "dataset", "scene", "frame_a", "frame_b", "index_a", "index_b", "gap", "K_a", "K_b",
                "T_wa", "T_wb", "size_a", "size_b", "overlap_ab", "overlap_ba", "n_corr", "depth_scale",
                "metric_depth", "photo_err", "photo_err_shuffled", "source")
META_KEYS_V2 = ("version", "kind", "dataset", "scene", "frames", "indices", "K", "T_w", "sizes", "overlap", "pairs",
                "n_corr", "depth_scale", "metric_depth", "photo_err", "photo_err_shuffled", "source")
JPEG_QUALITY = 95
UINT16_MAX = 65535


class FormatError(Exception):
    """A shard, sample or manifest this code cannot read; the message is one line."""


def sample_key(shard: int, index: int) -> str:
    return f"{shard:06d}_{index:05d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def objects_member(k: int) -> str:
    """The optional member of frame k holding its per-pixel object ids."""
    return f"f{k:02d}.objects.png"


def encode_objects_png(ids: np.ndarray) -> bytes:
    """uint16 (H, W) object ids -> 16-bit PNG bytes (lossless)."""
    ids = np.asarray(ids)
    if ids.dtype != np.uint16 or ids.ndim != 2:
        raise ValueError(f"object ids must be uint16 (H, W), got {ids.dtype} {ids.shape}")
    buf = io.BytesIO()
    Image.fromarray(ids).save(buf, format="PNG")
    return buf.getvalue()


def decode_objects_png(data: bytes) -> np.ndarray:
    """16-bit PNG bytes -> uint16 (H, W) object ids (0: no object)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise FormatError(f"objects PNG has mode {im.mode}, expected 16-bit")
        arr = np.asarray(im)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > UINT16_MAX:
        raise FormatError("objects PNG holds ids outside 0..65535")
    return arr.astype(np.uint16)


def frame_members(k: int) -> tuple[str, str]:
    """The RGB and depth member names of frame k of a version-2 clip."""
    return f"f{k:02d}.jpg", f"f{k:02d}.depth.png"


def clip_pairs(n_frames: int) -> list[tuple[int, int]]:
    """Every pair i < j of a clip of n frames, (i, j) ascending: the order of `corr.npy` and the json lists."""
    return [(i, j) for i in range(n_frames) for j in range(i + 1, n_frames)]


def major_version(version: Any, where: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"{where}: unreadable shard format version {version!r}") from None


def check_version(version: Any, where: str, kind: str = "clip") -> int:
    """The major version, or FormatError (one line) when this code cannot read `kind` samples of it."""
    major = major_version(version, where)
    known = KNOWN_VERSIONS.get(kind)
    if known is None:
        raise FormatError(f"{where}: sample kind {kind!r} is not one of {', '.join(KNOWN_VERSIONS)}")
    if major not in known:
        raise FormatError(f"{where}: {kind} shard format version {version} is not supported (this code reads "
                          f"version {', '.join(map(str, known))}); re-shard with this release or upgrade the reader")
    return major


def depth_scale_for(max_depth: float, metric: bool) -> float:
    """Units per metre (per scene unit) of the uint16 depth.

    Metric depth: 1000 (mm) unless the range needs coarser units. Depth without metric scale
    (COLMAP units, often 0.01-10): the full uint16 range over the sample's largest depth, so the
    quantisation step is max_depth / 65535 whatever the unit (mm steps would be percent errors
    at COLMAP scale). The scale is rounded down to 6 significant digits (stored in the json).
    """
    if not np.isfinite(max_depth) or max_depth <= 0:
        return 1000.0
    if metric:
        if max_depth * 1000.0 < UINT16_MAX:
            return 1000.0
        return float(np.floor(UINT16_MAX / max_depth))
    raw = UINT16_MAX / max_depth
    digits = 6 - int(np.floor(np.log10(raw))) - 1
    scale = float(np.floor(raw * 10.0 ** digits) / 10.0 ** digits)
    return scale if scale * max_depth <= UINT16_MAX else float(np.nextafter(scale, 0.0))


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def quantize_depth(depth: np.ndarray, depth_scale: float) -> np.ndarray:
    """The uint16 units of float32 (H, W) depth; 0 and out-of-range values stay invalid (0)."""
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0) * depth_scale
    q = np.rint(d)
    q[(q > UINT16_MAX) | (q < 0)] = 0
    return q.astype(np.uint16)


def encode_depth_png(depth: np.ndarray, depth_scale: float) -> bytes:
    """float32 (H, W) depth -> 16-bit PNG bytes; 0 and out-of-range values stay invalid (0)."""
    buf = io.BytesIO()
    Image.fromarray(quantize_depth(depth, depth_scale)).save(buf, format="PNG")
    return buf.getvalue()


def decode_depth_png(data: bytes, depth_scale: float) -> np.ndarray:
    """16-bit PNG bytes -> float32 (H, W) depth in metres (scene units); 0 = invalid.

    WebDataset's default PNG decoding gives 8 bits: always decode depth here.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise FormatError(f"depth PNG has mode {im.mode}, expected 16-bit")
        arr = np.asarray(im).astype(np.float32)
    return arr / np.float32(depth_scale)


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def make_clip_sample(key: str, rgbs: Sequence[np.ndarray], depths: Sequence[np.ndarray], corr: np.ndarray,
                     meta: dict[str, Any], *, jpgs: Sequence[bytes] | None = None,
                     pngs: Sequence[bytes] | None = None,
                     objects: Sequence[bytes] | None = None) -> dict[str, Any]:
    """A version-2 sample dict of bytes ready for `webdataset.TarWriter` (encoder off).

    `jpgs` / `pngs`: already encoded members (a frame shared by clips is encoded once).
    `objects`: each frame's encoded object ids (`encode_objects_png`), written as the optional
    `fKK.objects.png` members; then `meta` must say `objects` true and give `object_groups`.
    """
    missing = [k for k in META_KEYS_V2 if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: metadata lacks {missing}")
    n = len(rgbs)
    if not MIN_FRAMES <= n <= MAX_FRAMES or len(depths) != n:
        raise ValueError(f"sample {key}: a clip needs {MIN_FRAMES}-{MAX_FRAMES} frames with depth, got {n}")
    if (objects is not None) != bool(meta.get("objects")) or (objects is not None and len(objects) != n):
        raise ValueError(f"sample {key}: object members ({'none' if objects is None else len(objects)}) and "
                         f"json 'objects' ({meta.get('objects')!r}) disagree for {n} frames")
    if objects is not None and not isinstance(meta.get("object_groups"), list):
        raise ValueError(f"sample {key}: json 'objects' is true but 'object_groups' is not a list")
    corr = np.ascontiguousarray(corr, dtype=np.float32).reshape(-1, 6)
    scale = float(meta["depth_scale"])
    out: dict[str, Any] = {"__key__": key}
    for k in range(n):
        rgb_name, depth_name = frame_members(k)
        out[rgb_name] = jpgs[k] if jpgs is not None else encode_jpeg(rgbs[k])
        out[depth_name] = pngs[k] if pngs is not None else encode_depth_png(depths[k], scale)
        if objects is not None:
            out[objects_member(k)] = objects[k]
    out["corr.npy"] = encode_npy(corr)
    out["json"] = encode_json(meta)
    return out


# ------------------------------------------------------------------ decoded samples

@dataclass
class PairSample:
    """A decoded version-1 sample: the two views, their depth in metres, correspondences, metadata."""

    key: str
    rgb_a: np.ndarray  # (Ha, Wa, 3) uint8
    rgb_b: np.ndarray  # (Hb, Wb, 3) uint8
    depth_a: np.ndarray  # (Ha, Wa) float32
    depth_b: np.ndarray  # (Hb, Wb) float32
    corr: np.ndarray  # (N, 4) float32: uA, vA, uB, vB
    meta: dict[str, Any]

    @property
    def K_a(self) -> np.ndarray:
        return np.asarray(self.meta["K_a"], dtype=np.float64)

    @property
    def K_b(self) -> np.ndarray:
        return np.asarray(self.meta["K_b"], dtype=np.float64)

    @property
    def T_wa(self) -> np.ndarray:
        return np.asarray(self.meta["T_wa"], dtype=np.float64)

    @property
    def T_wb(self) -> np.ndarray:
        return np.asarray(self.meta["T_wb"], dtype=np.float64)


@dataclass
class ClipSample:
    """A decoded clip (either version): K frames in order, depth in metres, correspondences, metadata.

    `meta` always holds the version-2 keys (a version-1 pair is converted: frames, indices, K,
    T_w, sizes, overlap, pairs [[0, 1]], per-pair lists); `version` is the stored major version.
    """

    key: str
    rgb: list[np.ndarray]  # K x (H_k, W_k, 3) uint8
    depth: list[np.ndarray]  # K x (H_k, W_k) float32
    corr: np.ndarray  # (N, 6) float32: i, j, u_i, v_i, u_j, v_j, grouped by (i, j) ascending
    meta: dict[str, Any]
    version: int = FORMAT_VERSION
    objects: list[np.ndarray] | None = None
    """K x (H_k, W_k) uint16 object id per pixel (0: none) where the shard stores them (synthetic data)."""

    @property
    def n_frames(self) -> int:
        return len(self.rgb)

    def K(self, k: int) -> np.ndarray:
        """(3, 3) intrinsics of frame k (stored pixels)."""
        return np.asarray(self.meta["K"][k], dtype=np.float64)

    def T_w(self, k: int) -> np.ndarray:
        """(4, 4) camera-to-world of frame k."""
        return np.asarray(self.meta["T_w"][k], dtype=np.float64)

    def size(self, k: int) -> tuple[int, int]:
        """(W, H) of frame k."""
        return int(self.rgb[k].shape[1]), int(self.rgb[k].shape[0])

    def index(self, k: int) -> int:
        """Frame k's index in its scene (the corpus's own order)."""
        return int(self.meta["indices"][k])

    def pair_corr(self, i: int, j: int) -> np.ndarray:
        """(n, 4) float32 rows `u_i, v_i, u_j, v_j` of pair (i, j)."""
        rows = (self.corr[:, 0] == i) & (self.corr[:, 1] == j)
        return np.ascontiguousarray(self.corr[rows, 2:])


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__', '?')}" + (f" of {sample['__url__']}" if "__url__" in sample else "")


def read_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The parsed `json` member; FormatError (one line) when missing or unreadable."""
    if "json" not in sample:
        raise FormatError(f"{_where(sample)}: missing member(s) json")
    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
    except Exception as e:
        raise FormatError(f"{_where(sample)}: unreadable json ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{_where(sample)}: json is not an object")
    return meta


def sample_kind(meta: dict[str, Any]) -> str:
    """'clip' (also for samples without a kind: formats 1 and 2) or what the sample says."""
    return str(meta.get("kind") or "clip")


def members_of(meta: dict[str, Any], where: str) -> tuple[str, ...]:
    """The members a clip sample of this metadata must have."""
    major = check_version(meta.get("version"), where, "clip")
    if major == 1:
        return MEMBERS_V1
    n = len(meta.get("frames") or ())
    if not MIN_FRAMES <= n <= MAX_FRAMES:
        raise FormatError(f"{where}: a clip lists {n} frames (expected {MIN_FRAMES}-{MAX_FRAMES})")
    objects = tuple(objects_member(k) for k in range(n)) if meta.get("objects") else ()
    return tuple(m for k in range(n) for m in frame_members(k)) + objects + ("corr.npy", "json")


def decode_pair(sample: dict[str, Any]) -> PairSample:
    """Raw members of a version-1 sample -> PairSample, checking members, dtypes and shapes."""
    where = _where(sample)
    meta = read_meta(sample)
    if check_version(meta.get("version"), where, "clip") != 1:
        raise FormatError(f"{where}: version {meta.get('version')} is a clip; read it with decode_sample")
    missing = [m for m in MEMBERS_V1 if m not in sample]
    if missing:
        raise FormatError(f"{where}: missing member(s) {', '.join(missing)}")
    try:
        scale = float(meta["depth_scale"])
        rgb_a = _decode_rgb(sample["a.jpg"])
        rgb_b = _decode_rgb(sample["b.jpg"])
        depth_a = decode_depth_png(sample["a.depth.png"], scale)
        depth_b = decode_depth_png(sample["b.depth.png"], scale)
        corr = decode_npy(sample["corr.npy"])
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    except Exception as e:
        raise FormatError(f"{where}: corrupt member ({type(e).__name__}: {e})") from None
    if corr.dtype != np.float32 or corr.ndim != 2 or corr.shape[1] != 4:
        raise FormatError(f"{where}: corr.npy is {corr.dtype} {corr.shape}, expected float32 (N, 4)")
    if depth_a.shape != rgb_a.shape[:2] or depth_b.shape != rgb_b.shape[:2]:
        raise FormatError(f"{where}: depth and rgb sizes differ")
    return PairSample(str(sample.get("__key__", "?")), rgb_a, rgb_b, depth_a, depth_b, corr, meta)


def pair_as_clip(p: PairSample) -> ClipSample:
    """A version-1 pair as a clip of K = 2 (frame 0 = A, frame 1 = B)."""
    m = p.meta
    corr = np.concatenate([np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (len(p.corr), 1)), p.corr], axis=1)
    meta = {"version": 1, "kind": "clip", "dataset": m.get("dataset"), "scene": m.get("scene"),
            "frames": [m.get("frame_a"), m.get("frame_b")], "indices": [m.get("index_a"), m.get("index_b")],
            "K": [m["K_a"], m["K_b"]], "T_w": [m["T_wa"], m["T_wb"]],
            "sizes": [m.get("size_a") or [p.rgb_a.shape[1], p.rgb_a.shape[0]],
                      m.get("size_b") or [p.rgb_b.shape[1], p.rgb_b.shape[0]]],
            "overlap": [[1.0, m.get("overlap_ab")], [m.get("overlap_ba"), 1.0]], "pairs": [[0, 1]],
            "n_corr": [m.get("n_corr", len(p.corr))], "photo_err": [m.get("photo_err")],
            "photo_err_shuffled": [m.get("photo_err_shuffled")], "depth_scale": m.get("depth_scale"),
            "metric_depth": m.get("metric_depth"), "source": m.get("source")}
    if meta["indices"][0] is None or meta["indices"][1] is None:  # no indices stored: the gap is all we know
        meta["indices"] = [0, int(m.get("gap", 0))]
    return ClipSample(p.key, [p.rgb_a, p.rgb_b], [p.depth_a, p.depth_b], corr, meta, version=1)


def decode_sample(sample: dict[str, Any]) -> ClipSample:
    """Raw tar members (bytes) of a clip sample of either version -> ClipSample.

    Checks kind, version, members, dtypes and shapes; FormatError (one line naming the key) for
    anything malformed.
    """
    where = _where(sample)
    meta = read_meta(sample)
    kind = sample_kind(meta)
    if kind != "clip":
        raise FormatError(f"{where}: a {kind!r} sample, not a scene clip")
    if check_version(meta.get("version"), where, "clip") == 1:
        return pair_as_clip(decode_pair(sample))
    names = members_of(meta, where)
    missing = [m for m in names if m not in sample]
    if missing:
        raise FormatError(f"{where}: missing member(s) {', '.join(missing)}")
    n = len(meta["frames"])
    try:
        scale = float(meta["depth_scale"])
        rgb = [_decode_rgb(sample[frame_members(k)[0]]) for k in range(n)]
        depth = [decode_depth_png(sample[frame_members(k)[1]], scale) for k in range(n)]
        objects = ([decode_objects_png(sample[objects_member(k)]) for k in range(n)] if meta.get("objects")
                   else None)
        corr = decode_npy(sample["corr.npy"])
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    except Exception as e:
        raise FormatError(f"{where}: corrupt member ({type(e).__name__}: {e})") from None
    if objects is not None and any(o.shape != r.shape[:2] for r, o in zip(rgb, objects)):
        raise FormatError(f"{where}: object ids and rgb sizes differ")
    if objects is not None and not isinstance(meta.get("object_groups"), list):
        raise FormatError(f"{where}: json 'objects' is true but 'object_groups' is not a list")
    if corr.dtype != np.float32 or corr.ndim != 2 or corr.shape[1] != 6:
        raise FormatError(f"{where}: corr.npy is {corr.dtype} {corr.shape}, expected float32 (N, 6)")
    if any(d.shape != r.shape[:2] for r, d in zip(rgb, depth)):
        raise FormatError(f"{where}: depth and rgb sizes differ")
    for key in ("indices", "K", "T_w"):
        if len(meta.get(key) or ()) != n:
            raise FormatError(f"{where}: json {key!r} has {len(meta.get(key) or ())} entries for {n} frames")
    if len(corr):
        i, j = corr[:, 0], corr[:, 1]
        if not (np.all(i == np.round(i)) and np.all(i >= 0) and np.all(j > i) and np.all(j < n)):
            raise FormatError(f"{where}: corr.npy frame indices are not pairs i < j of the {n} frames")
    return ClipSample(str(sample.get("__key__", "?")), rgb, depth, corr, meta, version=2, objects=objects)
