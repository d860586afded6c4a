"""Instruction samples (DESIGN §4.2): LLaVA conversation records in, WebDataset samples out, and back.

Input: the LLaVA conversation format that LLaVA-Video-178K and LLaVA-OneVision data use, a JSON
list or JSONL of records

    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}]}

media paths relative to the media root. A record is valid when it has a non-empty list of turns,
each `{"from": "human" | "gpt" | "system", "value": text}`, at least one `gpt` turn, and
placeholders that match its media: one `<image>` per image of an image record, exactly one
`<image>` or `<video>` in a video record (LLaVA-Video-178K writes `<image>` for its videos), none
in a text-only record. Anything else raises RecordError with a countable reason and the record's id.

A sample is one image set or video with the conversations of every record that shares it:

    KEY.f00.jpg ... KEY.f{n-1:02d}.jpg   the images as given (JPEG bytes kept, other formats re-encoded),
                                         or the frames sampled from the video, in time order
    KEY.json                             version 1, kind "instruction", ids, source (annotation file of
                                         each conversation), conversations (one list of turns per
                                         record, unchanged), media ("image" | "video" | "none"),
                                         timestamps (seconds of each frame, video only, else []),
                                         files (media paths as given), n_frames

Readers dispatch on `kind`, then refuse a major `version` they do not know (one line). The loader
draws one conversation per visit with `draw_conversation` (seeded). Nothing here imports torch.
"""
from __future__ import annotations

import copy
import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from data.shardformat import FormatError, encode_jpeg, encode_json

FORMAT_VERSION = 1
KIND = "instruction"
MEDIA = ("image", "video", "none")
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
ROLES = ("human", "gpt", "system")
ASSISTANT = "gpt"
MAX_MEDIA = 100  # members f00 ... f99 keep their sorted order
META_KEYS = ("version", "kind", "ids", "source", "conversations", "media", "timestamps", "files", "n_frames")
_FRAME_MEMBER = re.compile(r"^f(\d{2})\.jpg$")


class AnnotationError(Exception):
    """An annotation file that cannot be read at all (not JSON, not a list); one line."""


class RecordError(ValueError):
    """A malformed record: `reason` is countable ("no assistant turn", ...), `record_id` names it."""

    def __init__(self, reason: str, record_id: str, detail: str = ""):
        self.reason, self.record_id, self.detail = reason, record_id, detail
        super().__init__(f"record {record_id}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Record:
    """One valid input record."""

    id: str
    media: str
    """"image" | "video" | "none"."""
    files: tuple[str, ...]
    """Media paths relative to the media root, normalised (images in order; one video)."""
    conversations: list = field(compare=False)
    """The record's turns, exactly as given."""
    origin: str = ""
    """Annotation file the record came from (its name relative to --input)."""
    position: int = 0
    """Index of the record in its file (list index, or 0-based line of a JSONL file)."""

    @property
    def media_key(self) -> str:
        """Records with the same key share their media and become one sample."""
        if self.media == "none":
            return f"none:{self.origin}#{self.position}"
        return f"{self.media}:" + "\n".join(self.files)


# ------------------------------------------------------------------------- parsing

def read_annotations(data: bytes, name: str) -> list[tuple[int, Any]]:
    """[(position, record object)] of a JSON list or a JSONL file (by its name: `.jsonl` is JSONL).

    A JSONL line that is not JSON becomes a RecordError in place of its object; a file that is
    not a JSON list (or not UTF-8) raises AnnotationError.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{name}: not UTF-8 text ({e})") from None
    if name.lower().endswith(".jsonl"):
        out: list[tuple[int, Any]] = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except ValueError as e:
                out.append((i, RecordError("unparseable JSON line", f"{name}#{i}", f"line {i + 1}: {e}")))
        return out
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise AnnotationError(f"{name}: not valid JSON ({e}); a file of one record per line must be named .jsonl")\
            from None
    if isinstance(obj, dict) and "conversations" in obj:  # one record on its own
        obj = [obj]
    if not isinstance(obj, list):
        raise AnnotationError(f"{name}: expected a JSON list of records, got {type(obj).__name__}")
    return list(enumerate(obj))


def placeholder_counts(conversation: list[dict]) -> tuple[int, int]:
    """(`<image>` count, `<video>` count) over every turn of a conversation."""
    n_img = n_vid = 0
    for turn in conversation:
        v = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(v, str):
            n_img += v.count(IMAGE_TOKEN)
            n_vid += v.count(VIDEO_TOKEN)
    return n_img, n_vid


def _media_path(p: Any, rid: str) -> str:
    if not isinstance(p, str) or not p.strip():
        raise RecordError("bad media path", rid, f"{p!r} is not a path")
    norm = posixpath.normpath(p.strip().replace("\\", "/"))
    if norm.startswith("/") or "://" in norm or norm == ".." or norm.startswith("../"):
        raise RecordError("bad media path", rid, f"{p!r} is not relative to the media root")
    return norm


def parse_record(obj: Any, origin: str = "", position: int = 0) -> Record:
    """Validate one record (see the module docstring). Raises RecordError."""
    if isinstance(obj, RecordError):
        raise obj
    fallback = f"{origin}#{position}"
    if not isinstance(obj, dict):
        raise RecordError("not a JSON object", fallback)
    rid = obj.get("id")
    rid = str(rid) if rid not in (None, "") else fallback
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RecordError("no conversations", rid)
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise RecordError("bad turn", rid, f"turn {k} is not {{'from': human|gpt|system, 'value': text}}")
    if not any(t["from"] == ASSISTANT for t in conv):
        raise RecordError("no assistant turn", rid)
    image, video = obj.get("image"), obj.get("video")
    if image in (None, "", []) and video in (None, ""):
        media, files = "none", ()
    elif image not in (None, "", []) and video not in (None, ""):
        raise RecordError("both image and video", rid)
    elif video not in (None, ""):
        media, files = "video", (_media_path(video, rid),)
    else:
        paths = image if isinstance(image, list) else [image]
        media, files = "image", tuple(_media_path(p, rid) for p in paths)
        if len(files) > MAX_MEDIA:
            raise RecordError("too many images", rid, f"{len(files)} > {MAX_MEDIA}")
    n_img, n_vid = placeholder_counts(conv)
    ok = {"none": n_img == n_vid == 0, "image": n_img == len(files) and n_vid == 0,
          "video": n_img + n_vid == 1}[media]
    if not ok:
        want = {"none": "no placeholder", "image": f"{len(files)} {IMAGE_TOKEN}",
                "video": f"one {IMAGE_TOKEN} or {VIDEO_TOKEN}"}[media]
        raise RecordError("placeholder count does not match media", rid,
                          f"{n_img} {IMAGE_TOKEN} and {n_vid} {VIDEO_TOKEN} for {media} {list(files)}; expected {want}")
    return Record(rid, media, files, conv, origin, position)


def parse_annotations(data: bytes, name: str) -> tuple[list[Record], list[RecordError]]:
    """(valid records, malformed ones) of one annotation file, in file order."""
    records, errors = [], []
    for pos, obj in read_annotations(data, name):
        try:
            records.append(parse_record(obj, name, pos))
        except RecordError as e:
            errors.append(e)
    return records, errors


@dataclass
class Group:
    """Records that share one image set or video: one sample."""

    media: str
    files: tuple[str, ...]
    records: list[Record]

    @property
    def key(self) -> str:
        return self.records[0].media_key


def group_records(records: list[Record]) -> list[Group]:
    """One Group per distinct media, in order of first appearance; records keep their input order."""
    groups: dict[str, Group] = {}
    for r in records:
        g = groups.get(r.media_key)
        if g is None:
            groups[r.media_key] = Group(r.media, r.files, [r])
        else:
            g.records.append(r)
    return list(groups.values())


# ------------------------------------------------------------------------- encoding

def image_member(data: bytes, where: str = "image") -> bytes:
    """A `fNN.jpg` member of an input image: its own bytes when it is a JPEG ("as given"), else
    re-encoded as JPEG (RGB, quality 95). Raises ValueError when the image does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # the whole image decodes (a truncated file fails here)
            if im.format == "JPEG":
                return data
            return encode_jpeg(np.asarray(im.convert("RGB")))
    except Exception as e:
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from None


def make_meta(ids: list[str], sources: list[str], conversations: list[list[dict]], media: str,
              files: list[str], n_frames: int, timestamps: list[float] | None = None) -> dict[str, Any]:
    """The `json` member of a sample; checks the sample contract (raises ValueError)."""
    if media not in MEDIA:
        raise ValueError(f"media must be one of {MEDIA}, got {media!r}")
    if not (len(ids) == len(sources) == len(conversations) >= 1):
        raise ValueError("ids, source and conversations need one entry per record (at least one)")
    ts = [float(t) for t in (timestamps or [])]
    if media == "video" and (len(ts) != n_frames or n_frames < 1):
        raise ValueError(f"a video sample needs one timestamp per frame ({len(ts)} for {n_frames})")
    if media != "video" and ts:
        raise ValueError("timestamps are for video samples only")
    if (media == "none") != (n_frames == 0) or n_frames > MAX_MEDIA:
        raise ValueError(f"{n_frames} frames for a {media!r} sample")
    return {"version": FORMAT_VERSION, "kind": KIND, "ids": list(ids), "source": list(sources),
            "conversations": conversations, "media": media, "timestamps": ts, "files": list(files),
            "n_frames": int(n_frames)}


def encode_sample(key: str, meta: dict[str, Any], jpgs: list[bytes]) -> dict[str, Any]:
    """A sample dict of bytes for `webdataset.TarWriter` (encoder off): fNN.jpg members and json."""
    if len(jpgs) != meta["n_frames"]:
        raise ValueError(f"sample {key}: {len(jpgs)} frames, json says {meta['n_frames']}")
    out: dict[str, Any] = {"__key__": key, "json": encode_json(meta)}
    for i, b in enumerate(jpgs):
        out[f"f{i:02d}.jpg"] = b
    return out


# ------------------------------------------------------------------------- decoding

@dataclass
class InstructionSample:
    """A decoded instruction sample."""

    key: str
    frames: list[np.ndarray]
    """RGB uint8 (H, W, 3) per image / sampled video frame, in order; [] for text-only."""
    conversations: list[list[dict]]
    """One list of turns per input record that shares these media."""
    ids: list[str]
    source: list[str]
    media: str
    timestamps: list[float]
    """Seconds of each frame of a video ([] otherwise)."""
    meta: dict[str, Any]


def is_instruction(meta: dict[str, Any]) -> bool:
    """Whether a sample's parsed `json` is an instruction sample (else a clip / pair)."""
    return meta.get("kind") == KIND


def check_version(version: Any, where: str) -> None:
    """Refuse a major instruction-format version this code does not know (one line)."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise FormatError(f"{where}: unreadable instruction format version {version!r}") from None
    if major != FORMAT_VERSION:
        raise FormatError(f"{where}: instruction format version {version} is not supported (this code reads "
                          f"version {FORMAT_VERSION}); re-shard with this release or upgrade the reader")


def decode_instruction(sample: dict[str, Any]) -> InstructionSample:
    """Raw tar members (bytes) -> InstructionSample, checking kind, version, members and the contract.

    Raises FormatError (one line naming the sample) for anything malformed.
    """
    key = sample.get("__key__", "?")
    where = f"sample {key}" + (f" of {sample['__url__']}" if "__url__" in sample else "")
    if "json" not in sample:
        raise FormatError(f"{where}: missing member json")
    try:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
    except Exception as e:
        raise FormatError(f"{where}: unreadable json ({e})") from None
    if not isinstance(meta, dict) or not is_instruction(meta):
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise FormatError(f"{where}: kind {kind!r} is not {KIND!r}")
    check_version(meta.get("version"), where)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise FormatError(f"{where}: json lacks {', '.join(missing)}")
    n = meta["n_frames"]
    members = sorted(int(m.group(1)) for m in (_FRAME_MEMBER.match(k) for k in sample) if m)
    if members != list(range(n)):
        raise FormatError(f"{where}: frame members {members} do not match n_frames {n}")
    media, ts, convs = meta["media"], meta["timestamps"], meta["conversations"]
    if media not in MEDIA or (media == "video" and len(ts) != n) or (media == "none") != (n == 0):
        raise FormatError(f"{where}: media {media!r} with {n} frames and {len(ts)} timestamps")
    if not isinstance(convs, list) or not convs or len(convs) != len(meta["ids"]):
        raise FormatError(f"{where}: {len(meta['ids'])} ids for {len(convs) if isinstance(convs, list) else 0} "
                          f"conversations")
    frames = []
    for i in range(n):
        try:
            with Image.open(io.BytesIO(sample[f"f{i:02d}.jpg"])) as im:
                im.load()
                frames.append(np.asarray(im.convert("RGB")))
        except Exception as e:
            raise FormatError(f"{where}: corrupt member f{i:02d}.jpg ({type(e).__name__}: {e})") from None
    return InstructionSample(key, frames, convs, list(meta["ids"]), list(meta["source"]), media,
                             [float(t) for t in ts], meta)


def draw_conversation(sample: InstructionSample | dict[str, Any], rng: np.random.Generator) -> list[dict]:
    """One conversation of the sample, drawn uniformly with `rng` (a copy: the caller may edit it).

    `sample` is an InstructionSample or its parsed `json`. The loader calls this once per visit of
    the sample, with a generator seeded from (seed, epoch, sample key), so a resumed run draws the same.
    """
    convs = sample.conversations if isinstance(sample, InstructionSample) else sample["conversations"]
    if not convs:
        raise ValueError("an instruction sample without conversations")
    return copy.deepcopy(convs[int(rng.integers(len(convs)))])
