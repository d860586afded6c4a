"""The shard format, version 1 (DESIGN §4): one WebDataset sample per frame pair.

Members of a sample (key `{shard:06d}_{index:05d}`):
`a.jpg`, `b.jpg` (RGB), `a.depth.png`, `b.depth.png` (uint16 depth in units of
1/depth_scale, pixel-aligned with that view's RGB), `corr.npy` (float32 (N, 4):
uA, vA, uB, vB in stored pixels) and `json` (metadata, see `META_KEYS`).
Encoding is deterministic: the same inputs give the same bytes.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
MEMBERS = ("a.jpg", "b.jpg", "a.depth.png", "b.depth.png", "corr.npy", "json")
META_KEYS = ("version", "dataset", "scene", "frame_a", "frame_b", "index_a", "index_b", "gap", "K_a", "K_b",
             "T_wa", "T_wb", "size_a", "size_b", "overlap_ab", "overlap_ba", "n_corr", "depth_scale",
             "metric_depth", "photo_err", "photo_err_shuffled", "source")
JPEG_QUALITY = 95
UINT16_MAX = 65535


class FormatError(Exception):
    """A shard, sample or manifest this code cannot read; the message is one line."""


def sample_key(shard: int, index: int) -> str:
    return f"{shard:06d}_{index:05d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def check_version(version: Any, where: str) -> None:
    """Refuse a major format version this code does not know (one line)."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"{where}: unreadable shard format version {version!r}") from None
    if major != FORMAT_VERSION:
        raise FormatError(f"{where}: shard format version {version} is not supported (this code reads "
                          f"version {FORMAT_VERSION}); re-shard with this release or upgrade the reader")


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


def encode_depth_png(depth: np.ndarray, depth_scale: float) -> bytes:
    """float32 (H, W) depth -> 16-bit PNG bytes; 0 and out-of-range values stay invalid (0)."""
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0) * depth_scale
    q = np.rint(d)
    q[(q > UINT16_MAX) | (q < 0)] = 0
    buf = io.BytesIO()
    Image.fromarray(q.astype(np.uint16)).save(buf, format="PNG")
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


def make_sample(key: str, rgb_a: np.ndarray, depth_a: np.ndarray, rgb_b: np.ndarray, depth_b: np.ndarray,
                corr: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """A sample dict of bytes ready for `webdataset.TarWriter` (encoder off)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: metadata lacks {missing}")
    scale = float(meta["depth_scale"])
    return {
        "__key__": key,
        "a.jpg": encode_jpeg(rgb_a),
        "b.jpg": encode_jpeg(rgb_b),
        "a.depth.png": encode_depth_png(depth_a, scale),
        "b.depth.png": encode_depth_png(depth_b, scale),
        "corr.npy": encode_npy(np.ascontiguousarray(corr, dtype=np.float32)),
        "json": encode_json(meta),
    }


@dataclass
class PairSample:
    """A decoded sample: the two views, their depth in metres, correspondences, metadata."""

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


def decode_sample(sample: dict[str, Any]) -> PairSample:
    """Raw tar members (bytes) -> PairSample, checking version, members, dtypes and shapes.

    Raises FormatError (one line naming the key) for anything malformed.
    """
    key = sample.get("__key__", "?")
    where = f"sample {key}" + (f" of {sample['__url__']}" if "__url__" in sample else "")
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise FormatError(f"{where}: missing member(s) {', '.join(missing)}")
    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
    except Exception as e:
        raise FormatError(f"{where}: unreadable json ({e})") from None
    check_version(meta.get("version"), where)
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
    return PairSample(key, rgb_a, rgb_b, depth_a, depth_b, corr, meta)


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))
