"""Streaming loader: WebDataset shards of scene clips -> padded batches with token labels.

    stream = SampleStream(["runs/shards"], adapter, batch_size=4, rank=r, world_size=w, num_workers=4)
    for epoch in range(stream.epoch, n_epochs):
        stream.set_epoch(epoch)
        for batch in stream:            # exactly len(stream) batches, on every rank
            out = model(**adapter.model_inputs(batch), output_hidden_states=True)
            ...
            ckpt["loader"] = stream.state_dict()     # per rank (see "Resuming")
    stream.load_state_dict(ckpt["loader"])           # next batches = an uninterrupted run's

The pipeline of one worker (`_EpochReader.batches`, one explicit list of stages):

    per shard set: shard list -> seeded shard shuffle of the epoch (same on all ranks)
        -> split by node (rank) -> split by worker -> tar members grouped into samples
        (bad shard: counted, rate-limited warning, next shard) -> seeded shuffle buffer,
        drained at the end of each pass; a worker that needs more starts another pass
    -> mix the shard sets by weight (seeded) -> fast-forward after a restore (no decoding)
    -> decode (dispatch on `kind`, then `version`: `shardformat.decode_sample`; a version-1 pair
       is a clip of two frames; bad sample: counted, warned, dropped)
    -> the supervised pairs (every i < j, or a seeded subset of `pairs_per_clip`)
    -> labels (`data.labels.clip_labels`: D_b once per frame, anchors per pair)
    -> `adapter.encode_clip` -> batch (`adapter.collate` + per-frame and per-pair padded labels)

It is written as plain generators rather than a `webdataset.DataPipeline` because the
stages must see an explicit rank, worker and epoch (webdataset's own splitters read
torch.distributed / the environment), count what they drop, and replay deterministically
for resuming; webdataset still expands brace patterns and provides the shuffle buffer.
webdataset 1.0 has no s3:// handler: shards are opened through fsspec (local paths and
s3:// are one code path). Depth PNGs are 16-bit, so samples are decoded with
`shardformat.decode_sample`, never webdataset's autodecoder (8-bit PNGs).

Sources (`sources`: a list; each entry is one shard set, optionally weighted)
    - a shard job's output folder (`OUT/`): its `manifest.json` if present, else the
      `{split}-*.tar` in it (sample counts from each shard's `.stats.json`);
    - a `manifest.json` (any `*.json`): its shards of `split`; an unknown `format_version`
      is refused with one `FormatError` line before anything is read;
    - one `.tar`, a brace pattern `train-{000000..000003}.tar`, or `a.tar::b.tar`;
    - a Python list of shard URLs (one set);
    - any of these on s3:// (through fsspec/s3fs; credentials and endpoint from the
      environment, e.g. AWS_ENDPOINT_URL).
    Shard sets without a manifest are probed: the first sample of the first shard must
    have a known format version (else one FormatError line).

Mixing syntax: `LOCATION[:WEIGHT]`, e.g. `--shards runs/a/manifest.json:0.7 s3://b/shards/:0.3`
    (the weight is a number after the LAST colon; `s3://x` has none). Either every set
    has a weight or none has; without weights each set is drawn in proportion to its
    sample count (i.e. the union, each sample about once per epoch). Each sample picks
    its set at random with the normalised weights (seeded per epoch, rank and worker).

Epoch length and uneven ends: an epoch is `batches_per_epoch` batches on EVERY rank
    (an uneven end hangs collective training), by default
    `sum(samples of all sets) // (world_size * batch_size)` from the manifest / stats
    counts (a set without counts is counted by reading its tars once). Each rank's
    share is cut across its workers; a worker stops after its quota. Policy when a
    worker's shards run out before its quota: it starts another pass over its shards
    (reshuffled; samples repeat). A worker whose shards hold more than its quota leaves
    the rest for later epochs (the shard order changes each epoch). An epoch reads every
    sample exactly once across ranks when the shards are of equal size, their number is
    a multiple of ranks x workers, and each worker's share is a multiple of the batch
    size (e.g. 8 shards of 2 pairs, 2 ranks x 2 workers, batch 2); otherwise some
    samples repeat or wait for a later epoch. Fewer shards than ranks x workers:
    RESAMPLE, not an error: a worker with no shard of a set draws one of that set's
    shards at random (seeded) per pass, so such samples repeat across ranks; a warning
    says so once per worker and epoch.

Resuming: `state_dict()` is JSON-serialisable and per rank: the epoch, the batches this
    rank handed out in it, and per worker the raw samples it consumed and its bad-data
    counters (each batch carries its worker's position to the main process, so this
    works with DataLoader workers). `load_state_dict` accepts it (or a list with one
    state per rank). On restore each worker rebuilds its epoch's sample stream and
    skips the consumed raw samples WITHOUT decoding: the cost is re-reading the tar
    bytes of this epoch that the worker had consumed (plus its shuffle-buffer read-ahead),
    i.e. (batches done this epoch / workers) x batch_size samples per worker, in
    parallel across workers: I/O and tar parsing only (~1 ms a pair locally), no
    JPEG/PNG decode, no labels, no processor. The DataLoader's round robin is rotated so the
    next batch comes from the worker whose turn it was. A state of another rank (e.g.
    only rank 0's was saved) falls back to a full replay of this rank's epoch so far
    (decoding and discarding). A state saved with other settings (world size, batch
    size, num_workers, seed, sources, batches per epoch) is refused in one line.

Bad data: a truncated tar, an unreadable shard, a missing member, a corrupt npy / JPEG /
    PNG / json, an unknown format version in a sample: skipped, counted by reason, and
    warned about (at most every `warn_every` seconds per worker, with the counts); the
    stream goes on. `stream.stats()` returns the counts delivered so far. A worker that
    sees `max_consecutive_bad` bad samples in a row, or a pass over its shards with no
    sample at all, stops with an error (nothing usable is left to read).

The batch (B clips of K_b frames, F = sum K_b frames, P supervised pairs; `losses/gasp.py`
    consumes the label part through `pair_view`):
    the adapter's model inputs (input_ids, attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw, ...; the frames of all clips in batch order);
    per frame: frame_clip (F,) long (its batch row), cell_pos (F, N) long + cell_mask (F, N)
    bool (the sequence position of each cell's token in its row), grid (F, 2) long (rows,
    cols), depth (F, N) float32 and depth_valid (F, N) bool (D_b of the frame's cells);
    per pair: pair_frames (P, 2) long (frames A, B in the batch numbering), pair_clip (P,)
    long, dt (P,) long (index_B - index_A), anchor_a / target_b (P, M) long, z_b (P, M)
    float32, anchor_mask (P, M) bool, n_anchors (P,) long, lookalike (P, M) bool (look-alike
    anchors, `data.labels`) and objects_known (P,) bool (the clip stores object ids: synthetic);
    per clip: n_frames (B,) long, keys, datasets (lists of B). Padding is 0 / False; M may be 0.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import torch

from data import shardformat
from data.adapter import FamilyAdapter
from data.chat import ConversationError, lm_items
from data.instruct import InstructionSample, decode_instruction, draw_conversation
from data.labels import MIN_CORR, ClipLabels, clip_labels
from data.seeds import derive_seed
from data.shardformat import ClipSample, FormatError
from data.sources import parse_spec  # noqa: F401  (part of this module's API)
from data.storage import is_local, open_fs, read_json

log = logging.getLogger(__name__)

STATE_VERSION = 1
REASONS = ("shard_unreadable", "tar_truncated", "missing_member", "unknown_version", "unknown_kind", "corrupt_member",
           "bad_meta", "bad_labels", "encode_error", "bad_conversation", "too_long")
"""Why a shard or sample was skipped (keys of `stats()`)."""


# ============================================================================ sources

@dataclass
class ShardSet:
    """One shard set: its shard URLs, their sample counts, and its mixing weight."""

    name: str
    """The spec it came from (for messages)."""
    urls: list[str]
    samples: list[int]
    """Samples per shard (same order as urls)."""
    weight: float | None = None
    """Mixing weight as given (None: proportional to the sample count)."""
    kind: str = "clip"
    """What its samples are: 'clip' (scene clips, format 1 or 2) or 'instruction' (conversations)."""

    @property
    def n_samples(self) -> int:
        return int(sum(self.samples))

    def fingerprint(self) -> str:
        """What a saved loader state must match (not the location: the data may move to s3://)."""
        first, last = (self.urls[0].rsplit("/", 1)[-1], self.urls[-1].rsplit("/", 1)[-1]) if self.urls else ("", "")
        return f"{len(self.urls)} shards {first}..{last}, {self.n_samples} samples"


MANIFEST_KINDS = {"clips": "clip", "clip": "clip", "pairs": "clip", "instruction": "instruction"}
"""A manifest's `kind` -> the kind of its samples (manifests without one hold scene clips)."""


def _join(root: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return root.rstrip("/") + "/" + name


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path from fs.glob back to a URL of the same protocol."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def open_shard(url: str):
    """A binary file object of a shard, local or remote (fsspec; large read-ahead on object stores)."""
    fs, path = open_fs(url)
    if is_local(fs):
        return open(path, "rb")
    return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")


def _shard_counts(urls: list[str], where: str) -> list[int]:
    """Samples per shard: from each shard's `.stats.json`, else by reading the tar once."""
    counts = []
    for url in urls:
        stats = read_json(url[: -len(".tar")] + ".stats.json") if url.endswith(".tar") else None
        if stats is not None and "samples" in stats:
            counts.append(int(stats["samples"]))
            continue
        log.info("%s: counting the samples of %s (no stats.json; a manifest avoids this)", where, url)
        counts.append(sum(1 for _ in tar_samples(url, lambda reason, message: log.warning("%s", message))))
    return counts


def _raise_on_error(reason: str, message: str) -> None:
    raise FormatError(message)


def _from_manifest(url: str, split: str, weight: float | None, name: str) -> ShardSet:
    manifest = read_json(url)
    if manifest is None:
        raise FileNotFoundError(f"shard manifest {url} does not exist")
    kind = MANIFEST_KINDS.get(str(manifest.get("kind", "clips")))
    if kind is None:
        raise FormatError(f"shard manifest {url}: kind {manifest.get('kind')!r} is not one of "
                          f"{', '.join(MANIFEST_KINDS)}")
    shardformat.check_version(manifest.get("format_version"), f"shard manifest {url}", kind)
    root = url.rsplit("/", 1)[0] if "/" in url else "."
    entries = [s for s in manifest.get("shards", []) if s.get("split", split) == split]
    if not entries:
        splits = sorted({s.get("split") for s in manifest.get("shards", [])})
        raise ValueError(f"shard manifest {url} has no {split!r} shards (splits: {', '.join(map(str, splits))})")
    entries.sort(key=lambda s: s["name"])
    return ShardSet(name, [_join(root, s["name"]) for s in entries], [int(s["samples"]) for s in entries], weight,
                    kind)


def resolve_source(source: str | Sequence[str], split: str = "train") -> ShardSet:
    """One entry of `sources` -> its ShardSet (see the module docstring for the forms)."""
    if not isinstance(source, str):
        import webdataset as wds

        urls = [u for s in source for u in wds.shardlists.expand_urls(str(s))]
        name = f"{urls[0]}..(+{len(urls) - 1})" if urls else "[]"
        return _checked(ShardSet(name, urls, _shard_counts(urls, name), None))
    location, weight = parse_spec(source)
    if location.endswith(".json"):
        return _from_manifest(location, split, weight, source)
    if location.endswith(".tar") or "{" in location or "::" in location:
        import webdataset as wds

        urls = wds.shardlists.expand_urls(location)
        return _checked(ShardSet(source, urls, _shard_counts(urls, source), weight))
    # a shard job's output folder
    fs, path = open_fs(location)
    if not fs.isdir(path):
        raise FileNotFoundError(f"shard source {location}: no such folder, manifest or .tar")
    folder = location.rstrip("/")
    if fs.exists(path.rstrip("/") + "/manifest.json"):
        return _from_manifest(folder + "/manifest.json", split, weight, source)
    plan = read_json(folder + "/plan.json")
    if plan is not None:
        shardformat.check_version(plan.get("format_version"), f"shard plan {folder}/plan.json",
                                  MANIFEST_KINDS.get(str(plan.get("kind", "clips")), "clip"))
    found = sorted(fs.glob(path.rstrip("/") + f"/{split}-*.tar"))
    if not found:
        raise FileNotFoundError(f"shard source {location}: no {split}-*.tar shards in it")
    urls = [_unstrip(fs, p) for p in found]
    return _checked(ShardSet(source, urls, _shard_counts(urls, source), weight))


def _checked(shard_set: ShardSet) -> ShardSet:
    """Probe a set without a manifest: the first sample's format version must be known."""
    if not shard_set.urls:
        raise FileNotFoundError(f"shard source {shard_set.name}: no shards")
    for url in shard_set.urls[:3]:
        try:
            first = next(tar_samples(url, _raise_on_error), None)
        except FormatError:
            continue  # an unreadable shard is the stream's business (counted, skipped)
        if first is not None and "json" in first:
            try:
                meta = json.loads(bytes(first["json"]).decode("utf-8"))
            except Exception:
                continue
            shard_set.kind = shardformat.sample_kind(meta)
            shardformat.check_version(meta.get("version"), f"shard set {shard_set.name} ({url})", shard_set.kind)
            break
    return shard_set


# ======================================================================= tar reading

def tar_samples(url: str, on_error) -> Iterator[dict[str, Any]]:
    """Tar members of one shard grouped into samples {__key__, __url__, member: bytes}.

    Members `KEY.EXT` (KEY up to the first dot of the file name) with the same KEY in a
    row form one sample. A shard that cannot be opened, or whose tar breaks off
    (truncated, corrupt header), calls `on_error(reason, message)`; the sample being
    read when it broke is dropped, the ones before it were already yielded.
    """
    try:
        f = open_shard(url)
    except Exception as e:
        on_error("shard_unreadable", f"shard {url}: cannot open ({type(e).__name__}: {e})")
        return
    current: dict[str, Any] | None = None
    try:
        with f:
            stream = tarfile.open(fileobj=f, mode="r|*")
            for info in stream:
                if not info.isreg():
                    continue
                directory, _, base = info.name.rpartition("/")
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{directory}/{stem}" if directory else stem
                if current is not None and current["__key__"] != key:
                    yield current  # the next key has begun: the previous sample is whole
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = stream.extractfile(info).read()
                stream.members = []  # do not keep every TarInfo of the shard
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        key = current["__key__"] if current else "-"
        on_error("tar_truncated", f"shard {url}: tar breaks off near sample {key} ({type(e).__name__}: {e})")
        return
    if current is not None:
        yield current


# ================================================================== bad-data counting

class BadDataLog:
    """Counts skipped shards / samples by reason; warns at most every `every` seconds."""

    def __init__(self, where: str, every: float = 30.0):
        self.where, self.every = where, every
        self.counts: collections.Counter = collections.Counter()
        self._last = -float("inf")
        self.quiet = False

    def __call__(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if self.quiet or now - self._last < self.every:
            return
        self._last = now
        total = sum(self.counts[r] for r in REASONS)
        log.warning("skipped bad data (%s): %s [%s: %d skipped so far: %s]", reason, message, self.where, total,
                    ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items()) if r in REASONS))


# ============================================================ decode, labels, collate

def decode_checked(sample: dict[str, Any]) -> tuple[ClipSample | InstructionSample | None, str, str]:
    """Raw members -> (ClipSample or InstructionSample, "", "") or (None, reason, message) for a bad sample.

    Dispatch on the sample's `kind` (none: a clip; "instruction": a conversation sample), then on
    its `version` (clips: 1, a pair, read as a clip of two frames; 2, a clip).
    """
    key = sample.get("__key__", "?")
    where = f"sample {key} of {sample.get('__url__', '?')}"
    try:
        meta = shardformat.read_meta(sample)
    except FormatError as e:
        reason = "missing_member" if "json" not in sample else "corrupt_member"
        return None, reason, str(e)
    kind = shardformat.sample_kind(meta)
    if kind == "instruction":
        try:
            shardformat.check_version(meta.get("version"), where, kind)
        except FormatError as e:
            return None, "unknown_version", str(e)
        try:
            return decode_instruction(sample), "", ""
        except FormatError as e:
            reason = "missing_member" if "missing member" in str(e) else "corrupt_member"
            return None, reason, str(e)
    if kind != "clip":
        return None, "unknown_kind", f"{where}: a {kind!r} sample, neither a scene clip nor an instruction sample"
    try:
        members = shardformat.members_of(meta, where)
    except FormatError as e:
        return None, "unknown_version", str(e)
    missing = [m for m in members if m not in sample]
    if missing:
        return None, "missing_member", f"{where}: missing member(s) {', '.join(missing)}"
    try:
        clip = shardformat.decode_sample(sample)
    except FormatError as e:
        return None, "corrupt_member", str(e)
    try:
        for k in range(clip.n_frames):
            K, T = clip.K(k), clip.T_w(k)
            if K.shape != (3, 3) or not np.isfinite(K).all():
                raise ValueError(f"K of frame {k} is not a finite 3x3 matrix")
            if T.shape != (4, 4) or not np.isfinite(T).all():
                raise ValueError(f"T_w of frame {k} is not a finite 4x4 matrix")
            clip.index(k)
    except Exception as e:
        return None, "bad_meta", f"{where}: scene {meta.get('scene')} frames {meta.get('frames')}: {e}"
    return clip, "", ""


@dataclass
class PreparedClip:
    """One clip ready to batch: its key, dataset, the adapter's encoding and its labels."""

    key: str
    dataset: str
    encoded: dict[str, Any]
    labels: ClipLabels
    source: int = 0
    """Index of the shard set it came from."""
    kind = "clip"

    @property
    def n_tokens(self) -> int:
        return int(self.encoded["input_ids"].shape[0])


@dataclass
class PreparedConversation:
    """One conversation ready to batch: the adapter's encoding with its LM `labels` (DESIGN §5)."""

    key: str
    dataset: str
    encoded: dict[str, Any]
    source: int = 0
    kind = "instruction"

    @property
    def n_tokens(self) -> int:
        return int(self.encoded["input_ids"].shape[0])


def prepare_conversation(sample: InstructionSample, adapter: FamilyAdapter, rng: np.random.Generator,
                         max_seq_len: int = 0, video_frames: int = 16,
                         ) -> tuple[PreparedConversation | None, str, str]:
    """InstructionSample -> one of its conversations (drawn with `rng`) encoded with labels, or
    (None, reason, message)."""
    where = f"instruction sample {sample.key} (ids {', '.join(sample.ids[:3])})"
    conversation = draw_conversation(sample, rng)
    try:
        encoded = adapter.encode_conversation(sample.frames, sample.media, conversation, sample.timestamps,
                                              max_len=max_seq_len, video_frames=video_frames)
    except ConversationError as e:
        return None, ("too_long" if e.reason == "too_long" else "bad_conversation"), f"{where}: {e}"
    except Exception as e:
        return None, "encode_error", f"{where}: encode_conversation failed ({type(e).__name__}: {e})"
    dataset = "instruction:" + (sample.source[0].rsplit("/", 1)[-1] if sample.source else "?")
    return PreparedConversation(sample.key, dataset, encoded), "", ""


def choose_pairs(n_frames: int, pairs_per_clip: int, rng: np.random.Generator | None) -> list[tuple[int, int]]:
    """The supervised pairs of a clip: every i < j, or a seeded subset of `pairs_per_clip` of them
    (in ascending order) when the clip has more."""
    pairs = shardformat.clip_pairs(n_frames)
    if pairs_per_clip and len(pairs) > pairs_per_clip:
        if rng is None:
            raise ValueError("subsampling pairs needs an rng")
        keep = np.sort(rng.choice(len(pairs), size=pairs_per_clip, replace=False))
        pairs = [pairs[k] for k in keep]
    return pairs


def prepare_clip(clip: ClipSample, adapter: FamilyAdapter, min_corr: int = MIN_CORR, pairs_per_clip: int = 0,
                 rng: np.random.Generator | None = None) -> tuple[PreparedClip | None, str, str]:
    """ClipSample -> (PreparedClip, "", "") or (None, reason, message)."""
    grids = [adapter.grid(clip.size(k)) for k in range(clip.n_frames)]
    where = f"sample {clip.key} (scene {clip.meta.get('scene')}, frames {clip.meta.get('frames')})"
    try:
        labels = clip_labels(clip, grids, choose_pairs(clip.n_frames, pairs_per_clip, rng), min_corr)
    except Exception as e:
        return None, "bad_labels", f"{where}: labels failed ({type(e).__name__}: {e})"
    try:
        encoded = adapter.encode_clip(clip.rgb)
    except Exception as e:
        return None, "encode_error", f"{where}: encode_clip failed ({type(e).__name__}: {e})"
    got = [len(p) for p in encoded["cell_pos"]]
    if got != [g.n_cells for g in grids]:
        raise RuntimeError(f"{where}: the adapter gives {got} vision tokens per frame but its grids have "
                           f"{[g.n_cells for g in grids]} cells")
    return PreparedClip(clip.key, str(clip.meta.get("dataset") or "?"), encoded, labels), "", ""


def _pad(rows: list[np.ndarray | torch.Tensor], dtype: torch.dtype,
         width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D rows with zeros -> (B, width) tensor and (B, width) bool mask."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.zeros((len(rows), width), dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r)
        out[b, :n] = torch.as_tensor(np.asarray(r) if not isinstance(r, torch.Tensor) else r, dtype=dtype)
        mask[b, :n] = True
    return out, mask


_MEDIA = ("pixel_values", "pixel_values_videos")
"""The media keys of an encoded item that `pixel_dtype` casts."""


def collate_clips(items: Sequence[PreparedClip | PreparedConversation], adapter: FamilyAdapter,
                  pixel_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A padded batch of clips and conversations (see the module docstring) from prepared items.

    Frames of all clips are numbered in batch order (clip 0's frames, then clip 1's, ...);
    each supervised pair names its two frames in that numbering, so the model gathers pairs
    from per-frame features in one op; a conversation adds no frame, only its LM labels.
    `pixel_dtype` casts the pixel values.
    """
    encoded = [it.encoded for it in items]
    if pixel_dtype is not None:  # cast each item's media, so the batch is concatenated once, already cast
        encoded = [{k: (v.to(pixel_dtype) if k in _MEDIA and isinstance(v, torch.Tensor) and v.is_floating_point()
                        else v) for k, v in e.items()} for e in encoded]
    batch = adapter.collate(encoded)
    cell_pos = batch.pop("cell_pos")  # B lists of K LongTensors
    frame_clip, positions, grids, depth, valid = [], [], [], [], []
    pair_frames, pair_clip, dt, anchor_a, target_b, z_b, alike, known = [], [], [], [], [], [], [], []
    first = 0
    for b, it in enumerate(items):
        if it.kind != "clip":
            continue
        lab = it.labels
        for k, pos in enumerate(cell_pos[b]):
            frame_clip.append(b)
            positions.append(pos)
            grids.append(lab.grids[k])
            depth.append(lab.depth[k])
            valid.append(lab.depth_valid[k])
        for p in lab.pairs:
            pair_frames.append((first + p.i, first + p.j))
            pair_clip.append(b)
            dt.append(p.dt)
            anchor_a.append(p.anchor_a)
            target_b.append(p.target_b)
            z_b.append(p.z_b)
            known.append(p.lookalike is not None)
            alike.append(p.lookalike if p.lookalike is not None else np.zeros(len(p.anchor_a), dtype=bool))
        first += len(cell_pos[b])
    batch["frame_clip"] = torch.tensor(frame_clip, dtype=torch.long)  # (F,)
    batch["cell_pos"], batch["cell_mask"] = _pad(positions, torch.long)  # (F, N)
    N = batch["cell_pos"].shape[1]
    batch["grid"] = torch.tensor(grids, dtype=torch.long).reshape(-1, 2)  # (F, 2) rows, cols
    batch["depth"], _ = _pad(depth, torch.float32, N)  # (F, N)
    batch["depth_valid"], _ = _pad(valid, torch.bool, N)  # (F, N)
    batch["pair_frames"] = torch.tensor(pair_frames, dtype=torch.long).reshape(-1, 2)  # (P, 2) frames a, b
    batch["pair_clip"] = torch.tensor(pair_clip, dtype=torch.long)  # (P,)
    batch["dt"] = torch.tensor(dt, dtype=torch.long)  # (P,)
    batch["anchor_a"], batch["anchor_mask"] = _pad(anchor_a, torch.long)  # (P, M)
    batch["target_b"], _ = _pad(target_b, torch.long)  # (P, M)
    batch["z_b"], _ = _pad(z_b, torch.float32)  # (P, M)
    batch["lookalike"], _ = _pad(alike, torch.bool)  # (P, M) look-alike anchors (clips with object ids)
    batch["objects_known"] = torch.tensor(known, dtype=torch.bool)  # (P,) the pair's clip has object ids
    batch["n_anchors"] = torch.tensor([len(a) for a in anchor_a], dtype=torch.long)  # (P,)
    batch["n_frames"] = torch.tensor([len(c) for c in cell_pos], dtype=torch.long)  # (B,)
    batch["n_lm"] = torch.tensor(lm_items(batch["labels"]), dtype=torch.long)  # () labelled positions used
    batch["keys"] = [it.key for it in items]
    batch["datasets"] = [it.dataset for it in items]
    batch["kinds"] = [it.kind for it in items]
    batch["sources"] = [it.source for it in items]
    return batch


# ==================================================================== one worker

@dataclass
class _WorkerPlan:
    """What one logical worker does in one epoch (sent to the DataLoader worker)."""

    lw: int
    """Logical worker index (0..W-1): batch i of the epoch comes from worker i % W."""
    n_batches: int
    """Its quota of batches this epoch."""
    done: int = 0
    """Batches it delivered before a restore."""
    skip_raw: int | None = 0
    """Raw samples to pass without decoding (fast restore); None: replay `done` batches."""
    stats: dict[str, int] = field(default_factory=dict)
    """Its counters at the restore point."""


class _EpochReader(torch.utils.data.IterableDataset):
    """The per-worker pipeline of one epoch of one rank (picklable; no DataLoader inside)."""

    def __init__(self, sets: list[ShardSet], probs: np.ndarray, adapter: FamilyAdapter, *, epoch: int, rank: int,
                 world_size: int, n_workers: int, batch_size: int, seed: int, shuffle_buffer: int,
                 shuffle_initial: int, warn_every: float, max_consecutive_bad: int, min_corr: int,
                 plans: list[_WorkerPlan], rotation: int, pixel_dtype: torch.dtype | None = None,
                 pairs_per_clip: int = 0, max_tokens: int = 0, max_seq_len: int = 0, video_frames: int = 16):
        super().__init__()
        self.pixel_dtype, self.pairs_per_clip = pixel_dtype, pairs_per_clip
        self.max_tokens, self.max_seq_len, self.video_frames = max_tokens, max_seq_len, video_frames
        self.sets, self.probs, self.adapter = sets, probs, adapter
        self.epoch, self.rank, self.world_size, self.n_workers = epoch, rank, world_size, n_workers
        self.batch_size, self.seed = batch_size, seed
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.warn_every, self.max_consecutive_bad, self.min_corr = warn_every, max_consecutive_bad, min_corr
        self.plans, self.rotation = plans, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            # A SIGTERM to the whole process group (SLURM preemption, the launcher) must reach the
            # trainer, which checkpoints and shuts its workers down itself; a worker that died of it
            # would make the DataLoader raise mid-step instead.
            import signal

            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.n_workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, the stream was built for {self.n_workers}")
        lw = (physical + self.rotation) % self.n_workers  # rotated so the next batch comes first
        return self.batches(self.plans[lw])

    # ---------------------------------------------------------------- the pipeline
    def batches(self, plan: _WorkerPlan) -> Iterator[dict[str, Any]]:
        """Batches of logical worker `plan.lw`: the whole pipeline, stage by stage."""
        bad = BadDataLog(f"rank {self.rank} worker {plan.lw}", self.warn_every)
        position = {"raw": 0}
        # 1-6 per shard set: shard order of the epoch -> this rank's shards -> this worker's
        #     shards -> samples of each tar (bad shards counted) -> shuffle buffer; passes repeat
        per_set = [self._set_samples(i, plan.lw, bad) for i in range(len(self.sets))]
        # 7 mix the shard sets by weight (seeded per epoch, rank, worker)
        raw = self._mix(per_set, plan.lw)
        # 8 count raw samples (the resume position), fast-forward past those consumed before a restore
        raw = self._counted(raw, position)
        if plan.skip_raw:
            bad.quiet = True
            for _ in itertools.islice(raw, plan.skip_raw):
                pass
            bad.quiet = False
            bad.counts = collections.Counter(plan.stats)
        # 9 decode -> labels -> encode; bad samples counted, warned about and dropped
        prepared = self._prepared(raw, bad)
        # 10 batch (up to batch_size items; with max_tokens, while the padded batch holds at most that many
        #    tokens), up to this worker's quota (a replay-restore rebuilds the delivered batches and drops them)
        replay = plan.skip_raw is None
        done = 0 if replay else plan.done
        carry: list[PreparedClip | PreparedConversation] = []
        while done < plan.n_batches:
            items, carry = self._take(prepared, carry)
            done += 1
            if done <= plan.done and replay:
                continue
            batch = collate_clips(items, self.adapter, self.pixel_dtype)
            stats = dict(bad.counts)
            if carry:  # the item held back for the next batch is re-read after a restore: not consumed yet
                stats["samples"] -= 1
            batch["_pos"] = {"epoch": self.epoch, "worker": plan.lw, "raw": position["raw"] - len(carry),
                             "batches": done, "stats": stats}
            yield batch

    def _take(self, prepared: Iterator, carry: list) -> tuple[list, list]:
        """The next batch's items and the item held back (token packing): (items, carry)."""
        items, longest = [], 0
        while len(items) < self.batch_size:
            it = carry.pop() if carry else next(prepared)
            longest_then = max(longest, it.n_tokens)
            if self.max_tokens and items and (len(items) + 1) * longest_then > self.max_tokens:
                return items, [it]
            items.append(it)
            longest = longest_then
        return items, []

    def _set_samples(self, s: int, lw: int, bad: BadDataLog) -> Iterator[dict[str, Any]]:
        """Endless raw samples of shard set s for logical worker lw, pass after pass."""
        import webdataset as wds

        shard_set = self.sets[s]
        n = len(shard_set.urls)
        # seeded shard shuffle of the epoch: the same permutation on every rank
        order = np.random.default_rng(derive_seed(self.seed, "shards", self.epoch, s)).permutation(n)
        mine = order[self.rank::self.world_size][lw::self.n_workers]  # split by node, then by worker
        if len(mine) == 0:
            log.warning("shard set %s has %d shards for %d ranks x %d workers: rank %d worker %d resamples its "
                        "shards at random (samples repeat across ranks)", shard_set.name, n, self.world_size,
                        self.n_workers, self.rank, lw)
        for pass_ in itertools.count():
            rng = np.random.default_rng(derive_seed(self.seed, "pass", self.epoch, s, self.rank, lw, pass_))
            if len(mine) == 0:
                shards = rng.choice(n, size=1)  # resample: one random shard per pass
            elif pass_ == 0:
                shards = mine
            else:
                shards = rng.permutation(mine)
            samples = (smp for i in shards for smp in tar_samples(shard_set.urls[i], bad))
            got = 0
            shuffle_seed = derive_seed(self.seed, "buffer", self.epoch, s, self.rank, lw, pass_)
            for smp in wds.filters.shuffle(self.shuffle_buffer, self.shuffle_initial, seed=shuffle_seed)(samples):
                got += 1
                yield smp
            if got == 0:
                raise RuntimeError(f"shard set {shard_set.name}: rank {self.rank} worker {lw} read no sample in a "
                                   f"pass over its {len(shards)} shard(s) (bad data so far: {dict(bad.counts)})")

    def _mix(self, per_set: list[Iterator[dict[str, Any]]], lw: int) -> Iterator[dict[str, Any]]:
        """Raw samples of all sets, each tagged with its set (`__set__`), mixed by weight.

        A deterministic interleave: the n-th sample comes from the set furthest below its share of n
        (smooth weighted round robin), so every worker of every rank draws each set within one sample
        of its weight at any point, and a restore replays the same sequence.
        """
        n_sets = len(per_set)
        credit = np.zeros(n_sets)
        while True:
            credit += self.probs
            s = int(np.argmax(credit))
            credit[s] -= 1.0
            smp = next(per_set[s])
            smp["__set__"] = s
            yield smp

    @staticmethod
    def _counted(samples: Iterator[dict[str, Any]], position: dict[str, int]) -> Iterator[dict[str, Any]]:
        for smp in samples:
            position["raw"] += 1
            yield smp

    def _prepared(self, samples: Iterator[dict[str, Any]], bad: BadDataLog,
                  ) -> Iterator[PreparedClip | PreparedConversation]:
        consecutive = 0
        for smp in samples:
            decoded, reason, message = decode_checked(smp)
            item = None
            if isinstance(decoded, InstructionSample):
                # the conversation a visit trains on: seeded per epoch and sample
                rng = np.random.default_rng(derive_seed(self.seed, "conversation", self.epoch, decoded.key))
                item, reason, message = prepare_conversation(decoded, self.adapter, rng, self.max_seq_len,
                                                             self.video_frames)
            elif decoded is not None:
                rng = (np.random.default_rng(derive_seed(self.seed, "pairs", self.epoch, decoded.key))
                       if self.pairs_per_clip else None)  # the pairs a visit supervises: seeded per epoch
                item, reason, message = prepare_clip(decoded, self.adapter, self.min_corr, self.pairs_per_clip, rng)
            if item is not None:
                item.source = int(smp.get("__set__", 0))
            if item is None:
                bad(reason, message)
                consecutive += 1
                if consecutive >= self.max_consecutive_bad:
                    raise RuntimeError(f"{bad.where}: {consecutive} bad samples in a row, last: {message} "
                                       f"(counts: {dict(bad.counts)})")
                continue
            consecutive = 0
            bad.counts["samples"] += 1
            yield item


# ====================================================================== the stream

class SampleStream:
    """Batches of scene clips with token labels for rank `rank` of `world_size`.

    sources: shard sets (see the module docstring: folders, manifests, tars, brace
        patterns, lists, s3://, each `LOCATION[:WEIGHT]`).
    adapter: the model family's `FamilyAdapter` (grid, encode_clip, collate).
    batch_size: samples (clips) per batch on this rank.
    rank, world_size: this process's place (default: RANK / WORLD_SIZE from the
        environment, else 0 / 1). Passed to the workers explicitly.
    num_workers: DataLoader worker processes (0: read in this process).
    seed: seeds the shard order, shuffle buffers and mixing (with the epoch).
    split: 'train' or 'val' (folders and manifests).
    batches_per_epoch: override the epoch length computed from the sample counts.
    shuffle_buffer, shuffle_initial: samples held (raw bytes, ~0.1-0.5 MB each) and
        gathered before the first is drawn, per worker and shard set.
    warn_every: seconds between two bad-data warnings of one worker.
    max_consecutive_bad: bad samples in a row after which a worker gives up.
    prefetch_factor, pin_memory, multiprocessing_context: passed to the DataLoader
        (workers are not persistent: they restart, by fork by default, every epoch).
    pixel_dtype: cast pixel_values in the workers (e.g. torch.bfloat16 for a bf16 model:
        half the bytes through the worker queue and to the GPU); None keeps float32.
    pairs_per_clip: supervise at most this many pairs i < j of a clip (a seeded subset per
        clip and epoch); 0: every pair.
    max_tokens: pack a batch by tokens: it takes items while (items x its longest sequence) stays
        at most this (a batch always holds at least one item, at most batch_size); 0: batch_size
        items. The epoch stays `batches_per_epoch` batches, so a packed epoch reads fewer samples.
    max_seq_len: cut a conversation longer than this many tokens (never inside its media; one
        whose media do not fit is skipped as `too_long`); 0: no limit.
    video_frames: the frames a conversation's video is given with (at most; LLaVA-OneVision:
        exactly, spread over the stored frames).
    """

    def __init__(self, sources: Sequence[str | Sequence[str]] | str, adapter: FamilyAdapter, *, batch_size: int,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 split: str = "train", batches_per_epoch: int | None = None, shuffle_buffer: int = 128,
                 shuffle_initial: int = 32, warn_every: float = 30.0, max_consecutive_bad: int = 1000,
                 min_corr: int = MIN_CORR, prefetch_factor: int = 2, pin_memory: bool = False,
                 multiprocessing_context: str | None = None, pixel_dtype: torch.dtype | None = None,
                 pairs_per_clip: int = 0, max_tokens: int = 0, max_seq_len: int = 0, video_frames: int = 16):
        if isinstance(sources, str):
            sources = [sources]
        if not sources:
            raise ValueError("no shard sources given")
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size {self.world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (got {num_workers})")
        self.adapter, self.batch_size, self.num_workers = adapter, int(batch_size), int(num_workers)
        self.seed, self.split = int(seed), split
        self.shuffle_buffer, self.shuffle_initial = int(shuffle_buffer), int(shuffle_initial)
        self.warn_every, self.max_consecutive_bad, self.min_corr = warn_every, max_consecutive_bad, min_corr
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.pixel_dtype = pixel_dtype
        if pairs_per_clip < 0:
            raise ValueError(f"pairs_per_clip must be >= 0 (got {pairs_per_clip})")
        self.pairs_per_clip = int(pairs_per_clip)
        for name, v in (("max_tokens", max_tokens), ("max_seq_len", max_seq_len)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0 (got {v})")
        if video_frames < 1:
            raise ValueError(f"video_frames must be >= 1 (got {video_frames})")
        self.max_tokens, self.max_seq_len, self.video_frames = int(max_tokens), int(max_seq_len), int(video_frames)

        self.sets = [resolve_source(s, split) for s in sources]
        weights = [s.weight for s in self.sets]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise ValueError("give a weight to every shard set (LOCATION:WEIGHT) or to none")
        for s in self.sets:
            if s.n_samples == 0:
                raise ValueError(f"shard set {s.name} has no samples")
        raw = np.array([s.n_samples if s.weight is None else s.weight for s in self.sets], dtype=np.float64)
        self.probs = raw / raw.sum()
        total = sum(s.n_samples for s in self.sets)
        per_rank = total // (self.world_size * self.batch_size)
        self.batches_per_epoch = int(batches_per_epoch) if batches_per_epoch is not None else per_rank
        if self.batches_per_epoch < 1:
            raise ValueError(f"{total} samples make no full batch of {self.batch_size} on each of "
                             f"{self.world_size} ranks; lower the batch size or pass batches_per_epoch")
        self._n_logical = max(1, self.num_workers)
        self._epoch = 0
        self._batches = 0  # handed out in the current epoch
        self._positions: dict[int, dict[str, Any]] = {}  # logical worker -> last _pos seen
        self._stats_done: collections.Counter = collections.Counter()  # finished epochs

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def describe(self) -> str:
        sets = "; ".join(f"{s.name}: {len(s.urls)} shards, {s.n_samples} samples, p={p:.3f}"
                         for s, p in zip(self.sets, self.probs))
        return (f"{sets} | rank {self.rank}/{self.world_size}, {self.num_workers} workers, batch {self.batch_size}, "
                f"{self.batches_per_epoch} batches per epoch")

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (a no-op when already there, so a restored position is kept)."""
        if int(epoch) != self._epoch:
            self._finish_epoch()
            self._epoch = int(epoch)

    def _finish_epoch(self) -> None:
        for pos in self._positions.values():
            self._stats_done.update(pos["stats"])
        self._positions, self._batches = {}, 0

    # -------------------------------------------------------------------- iterate
    def _plans(self) -> list[_WorkerPlan]:
        W, nb = self._n_logical, self.batches_per_epoch
        plans = []
        for lw in range(W):
            n = len(range(lw, nb, W))
            done = len(range(lw, self._batches, W))
            pos = self._positions.get(lw)
            if pos is None and done > 0:
                plans.append(_WorkerPlan(lw, n, done=done, skip_raw=None))  # replay: rebuild, drop `done`
            elif pos is not None:
                if pos["batches"] != done:
                    raise RuntimeError(f"loader state is inconsistent: worker {lw} delivered {pos['batches']} "
                                       f"batches, expected {done}")
                plans.append(_WorkerPlan(lw, n, done=done, skip_raw=int(pos["raw"]), stats=dict(pos["stats"])))
            else:
                plans.append(_WorkerPlan(lw, n))
        return plans

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; at its end the stream moves to the next epoch."""
        reader = _EpochReader(self.sets, self.probs, self.adapter, epoch=self._epoch, rank=self.rank,
                              world_size=self.world_size, n_workers=self._n_logical, batch_size=self.batch_size,
                              seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                              shuffle_initial=self.shuffle_initial, warn_every=self.warn_every,
                              max_consecutive_bad=self.max_consecutive_bad, min_corr=self.min_corr,
                              plans=self._plans(), rotation=self._batches % self._n_logical,
                              pixel_dtype=self.pixel_dtype, pairs_per_clip=self.pairs_per_clip,
                              max_tokens=self.max_tokens, max_seq_len=self.max_seq_len,
                              video_frames=self.video_frames)
        if self._batches < self.batches_per_epoch:
            if self.num_workers == 0:
                it: Iterator[dict[str, Any]] = reader.batches(reader.plans[0])
            else:
                loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=self.num_workers,
                                                     prefetch_factor=self.prefetch_factor,
                                                     pin_memory=self.pin_memory, persistent_workers=False,
                                                     multiprocessing_context=self.multiprocessing_context)
                it = iter(loader)
            for batch in it:
                pos = batch.pop("_pos")
                if pos["epoch"] != self._epoch:
                    raise RuntimeError(f"batch of epoch {pos['epoch']} in epoch {self._epoch}")
                self._positions[pos["worker"]] = pos
                self._batches += 1
                yield batch
                if self._batches >= self.batches_per_epoch:
                    break
            if self._batches < self.batches_per_epoch:
                raise RuntimeError(f"epoch {self._epoch} ended after {self._batches} of {self.batches_per_epoch} "
                                   f"batches on rank {self.rank}")
        if self._batches >= self.batches_per_epoch:
            self._finish_epoch()
            self._epoch += 1

    def forever(self) -> Iterator[dict[str, Any]]:
        """Batches across epochs, endlessly (the epoch advances by itself)."""
        while True:
            yield from self

    # ---------------------------------------------------------------------- state
    def _config(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "batch_size": self.batch_size, "num_workers": self._n_logical,
                "seed": self.seed, "batches_per_epoch": self.batches_per_epoch, "split": self.split,
                "pairs_per_clip": self.pairs_per_clip, "max_tokens": self.max_tokens,
                "max_seq_len": self.max_seq_len, "video_frames": self.video_frames,
                "sources": [s.fingerprint() + f"|{p:.6f}" for s, p in zip(self.sets, self.probs)]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-serialisable). A finished epoch is saved as the next one's start."""
        epoch, batches, positions = self._epoch, self._batches, self._positions
        done = collections.Counter(self._stats_done)
        if batches >= self.batches_per_epoch:
            for pos in positions.values():
                done.update(pos["stats"])
            epoch, batches, positions = epoch + 1, 0, {}
        return {"version": STATE_VERSION, "rank": self.rank, "epoch": epoch, "batches": batches,
                "config": self._config(),
                "workers": {str(lw): {"raw": int(p["raw"]), "batches": int(p["batches"]), "stats": dict(p["stats"])}
                            for lw, p in sorted(positions.items())},
                "stats_done": dict(done)}

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Restore a position saved by `state_dict` (or a list of one state per rank)."""
        if not isinstance(state, dict):
            states = list(state)
            mine = [s for s in states if s.get("rank") == self.rank]
            state = mine[0] if mine else states[0]
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        cfg, now = state["config"], self._config()
        for k in now:
            if cfg.get(k) != now[k]:
                raise ValueError(f"loader state was saved with {k}={cfg.get(k)!r}, this stream has {now[k]!r}; "
                                 f"resume with the same data settings or start a fresh loader state")
        self._epoch, self._batches = int(state["epoch"]), int(state["batches"])
        self._stats_done = collections.Counter(state.get("stats_done", {}))
        if state.get("rank") == self.rank:
            self._positions = {int(lw): dict(p, worker=int(lw), epoch=self._epoch)
                               for lw, p in state["workers"].items()}
        else:
            log.warning("loader state of rank %s restored on rank %d: replaying %d batches of epoch %d (decoding)",
                        state.get("rank"), self.rank, self._batches, self._epoch)
            self._positions = {}  # no worker position: each replays its delivered batches
            self._stats_done = collections.Counter()  # the other rank's counts are not ours

    def stats(self) -> dict[str, int]:
        """Counts delivered so far on this rank: good samples and skipped ones by reason."""
        total = collections.Counter(self._stats_done)
        for pos in self._positions.values():
            total.update(pos["stats"])
        out = {"samples": int(total.get("samples", 0))}
        out.update({r: int(total.get(r, 0)) for r in REASONS})
        out["skipped"] = sum(out[r] for r in REASONS)
        return out
