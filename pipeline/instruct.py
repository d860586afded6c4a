"""`pipeline/shard.py --format llava-json`: LLaVA instruction data -> WebDataset shards (DESIGN §4.2, §4.3).

    python pipeline/shard.py --format llava-json --input ANNOTATIONS.jsonl --media-root ROOT --output OUT [--frames 32]

Stages: read (driver, before Ray: every annotation file read once, hashed and validated;
malformed records counted with their ids) -> plan (driver: records sharing an image set or a
video grouped into one sample, train/val split by media, a seeded shuffle cut into shards;
plan.json) -> write (one Ray task per shard: read the media, decode each video to at most
`--frames` frames sampled uniformly over its length, encode, tar, then stats.json) ->
manifest.json and a one-screen summary. Media that turn out missing or broken are skipped and
counted by reason in the write tasks, never written.

A rerun reuses plan.json only when the annotation files' content, the media list and the
arguments are the same (else it refuses in one line; `--overwrite` replans), and writes only
the shards that have no stats.json yet: the shards come out byte-identical.
Nothing here imports Ray at module level (pipeline/ray_tasks.py runs the tasks).
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data import instruct, shardformat
from data.progress import Progress
from data.seeds import derive_seed
from data.storage import open_fs, url_join
from pipeline import job, stages

FORMAT = "llava-json"
PLAN_VERSION = 1
MANIFEST_VERSION = 1
ANNOTATION_SUFFIXES = (".json", ".jsonl")
MAX_REPORTED = 1000  # malformed records / skipped media listed by id in plan.json and manifest.json
MAX_SKIPPED_PER_SHARD = 50
MAX_FRAMES = instruct.MAX_MEDIA  # members f00 ... f99


class InstructError(Exception):
    """A user-facing failure: printed as one line."""


@dataclass
class InstructConfig:
    """What an instruction shard job needs (recorded in plan.json and the manifest)."""

    input: str
    """An annotation file (.json / .jsonl) or a folder of them (local or s3://)."""
    media_root: str
    """Folder the records' media paths are relative to (local or s3://)."""
    output: str
    """Output folder or s3:// prefix (shards do not depend on it)."""
    frames: int = 32
    """At most this many frames per video, sampled uniformly over its length."""
    samples_per_shard: int = 64
    """Samples (image sets, videos, text-only records) per tar shard."""
    val_fraction: float = 0.1
    """Fraction of the media (connected image sets, videos) in the val split."""
    seed: int = 0
    """Seed of the split and the shuffle."""

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("input", "media_root", "output"):
            d[k] = stages.public_url(d[k])
        return d

    def content_dict(self, annotations: list[dict[str, Any]], media: dict[str, Any]) -> dict[str, Any]:
        """What decides the shards' bytes: the annotation files' content, the media list, the arguments."""
        return {"format": FORMAT, "plan_version": PLAN_VERSION, "frames": self.frames,
                "samples_per_shard": self.samples_per_shard, "val_fraction": self.val_fraction, "seed": self.seed,
                "media_root": stages.public_url(self.media_root),
                "annotations": [[a["file"], a["sha256"]] for a in annotations], "media": media}


def content_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ read (driver)

@dataclass
class Loaded:
    """The annotations as read by the driver."""

    records: list[instruct.Record]
    errors: list[instruct.RecordError]
    annotations: list[dict[str, Any]]  # [{"file", "sha256", "records", "malformed"}]
    media: dict[str, Any]  # {"count", "sha256"} of the sorted list of media paths the records name


def annotation_files(url: str, output: str = "") -> list[tuple[str, str]]:
    """[(url, name)] of the annotation files at --input: the file itself, or every .json / .jsonl under
    the folder (recursively, sorted; names relative to it), except hidden ones and what lies under
    `output` (the job's own plan.json, manifest.json and stats)."""
    fs, path = stages.fresh_fs(url)
    if not fs.isdir(path):
        return [(url, url.rstrip("/").rsplit("/", 1)[-1])]
    root = path.rstrip("/") + "/"
    skip = open_fs(output)[1].rstrip("/") + "/" if output else None
    out = []
    for p in sorted(fs.find(path)):
        rel = p[len(root):] if p.startswith(root) else p.rsplit("/", 1)[-1]
        if (rel.lower().endswith(ANNOTATION_SUFFIXES) and not any(part.startswith(".") for part in rel.split("/"))
                and not (skip and (p + "/").startswith(skip))):
            out.append((url_join(url, rel), rel))
    return out


def load_annotations(url: str, output: str = "") -> Loaded:
    """Read, hash and validate every annotation file (raises InstructError for an unreadable file)."""
    files = annotation_files(url, output)
    if not files:
        raise InstructError(f"--input {stages.public_url(url)}: no .json or .jsonl annotation file in that folder")
    records, errors, annotations = [], [], []
    for u, name in files:
        try:
            fs, p = open_fs(u)
            with fs.open(p, "rb") as f:
                data = f.read()
        except Exception as e:
            raise InstructError(f"annotation file {stages.public_url(u)}: cannot be read "
                                f"({type(e).__name__}: {e})") from None
        try:
            recs, errs = instruct.parse_annotations(data, name)
        except instruct.AnnotationError as e:
            raise InstructError(f"annotation file {stages.public_url(u)}: {e}") from None
        records += recs
        errors += errs
        annotations.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "records": len(recs) + len(errs),
                            "malformed": len(errs)})
    paths = sorted({f for r in records for f in r.files})
    media = {"count": len(paths), "sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    return Loaded(records, errors, annotations, media)


# ------------------------------------------------------------------------ plan (driver)

def split_groups(groups: list[instruct.Group], cfg: InstructConfig) -> list[str]:
    """train/val of each group, by media: image sets that share an image are one unit, so no file
    (and no video) lands in both splits. Deterministic per seed (stages.split_names on the units)."""
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for gi, g in enumerate(groups):
        for f in g.files:
            if f in owner:
                a, b = find(gi), find(owner[f])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[f] = gi
    unit = [groups[find(i)].key for i in range(len(groups))]
    split = stages.split_names(unit, cfg.seed, cfg.val_fraction)
    return [split[u] for u in unit]


def make_plan(loaded: Loaded, cfg: InstructConfig) -> dict[str, Any]:
    """Deterministic plan: group by media, split by media, shuffle each split, cut into shards."""
    groups = instruct.group_records(loaded.records)
    splits = split_groups(groups, cfg)
    shards: list[dict[str, Any]] = []
    for which in ("train", "val"):
        items = [{"media": g.media, "files": list(g.files), "ids": [r.id for r in g.records],
                  "source": [r.origin for r in g.records], "conversations": [r.conversations for r in g.records]}
                 for g, s in zip(groups, splits) if s == which]
        rng = np.random.default_rng(derive_seed(cfg.seed, "instruct-plan", which))
        items = [items[i] for i in rng.permutation(len(items))]
        n = cfg.samples_per_shard
        for k in range(0, len(items), n):
            shards.append({"split": which, "shard": k // n, "name": shardformat.shard_name(which, k // n),
                           "samples": items[k:k + n]})
    malformed = collections.Counter(e.reason for e in loaded.errors)
    content = cfg.content_dict(loaded.annotations, loaded.media)
    return {"plan_version": PLAN_VERSION, "kind": instruct.KIND, "format_version": instruct.FORMAT_VERSION,
            "content_hash": content_hash(content), "config": cfg.public(), "annotations": loaded.annotations,
            "media": loaded.media,
            "records": {"read": len(loaded.records) + len(loaded.errors), "valid": len(loaded.records),
                        "malformed": len(loaded.errors)},
            "malformed_by_reason": dict(sorted(malformed.items())),
            "malformed_records": [{"id": e.record_id, "reason": e.reason, "detail": e.detail}
                                  for e in loaded.errors[:MAX_REPORTED]],
            "media_split": {sp: sum(1 for g, s in zip(groups, splits) if s == sp and g.media != "none")
                            for sp in ("train", "val")},
            "shards": shards}


# ------------------------------------------------------------------------ write (one Ray task per shard)

class MediaError(Exception):
    """A sample's media is missing or does not decode: skipped and counted by `reason`."""

    def __init__(self, reason: str, file: str, detail: str = ""):
        self.reason, self.file, self.detail = reason, file, detail
        super().__init__(f"{reason}: {file}" + (f" ({detail})" if detail else ""))


def _read(url: str) -> bytes:
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def render_sample(item: dict[str, Any], cfg: InstructConfig, timings: dict[str, float]) -> tuple[list[bytes], list[float]]:
    """(fNN.jpg members, timestamps) of one planned sample. Raises MediaError (missing / unreadable).

    Any other error (a storage outage, ...) propagates: the shard fails and is retried, nothing is
    counted as broken media.
    """
    from data import video

    if item["media"] == "none":
        return [], []
    if item["media"] == "image":
        jpgs = []
        for f in item["files"]:
            t = time.perf_counter()
            try:
                data = _read(url_join(cfg.media_root, f))
            except FileNotFoundError:
                raise MediaError("missing image", f) from None
            t1 = time.perf_counter()
            timings["read"] += t1 - t
            try:
                jpgs.append(instruct.image_member(data, f))
            except ValueError as e:
                raise MediaError("unreadable image", f, str(e)) from None
            timings["decode"] += time.perf_counter() - t1
        return jpgs, []
    (f,) = item["files"]
    url = url_join(cfg.media_root, f)
    t = time.perf_counter()
    fs, path = open_fs(url)
    if stages.is_local(fs):
        if not os.path.isfile(path):
            raise MediaError("missing video", f)
        source: Any = path
    else:
        try:
            source = io.BytesIO(_read(url))
        except FileNotFoundError:
            raise MediaError("missing video", f) from None
    t1 = time.perf_counter()
    timings["read"] += t1 - t
    try:
        sv = video.sample_video(source, cfg.frames, name=f)
    except video.VideoError as e:
        raise MediaError("unreadable video", f, str(e)) from None
    t2 = time.perf_counter()
    timings["decode"] += t2 - t1
    jpgs = [shardformat.encode_jpeg(fr) for fr in sv.frames]
    timings["encode"] += time.perf_counter() - t2
    return jpgs, sv.timestamps


def write_shard(entry: dict[str, Any], cfg: InstructConfig) -> dict[str, Any]:
    """Write one planned shard (tar, then its stats.json). Returns a status dict, never raises.

    Published as stages.publish_tar publishes clip shards (whole or not at all); stats.json goes
    last and marks the shard done.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    name, shard_idx = entry["name"], int(entry["shard"])
    timings: dict[str, float] = collections.defaultdict(float)
    skipped: collections.Counter = collections.Counter()
    skipped_items: list[dict[str, str]] = []
    by_media: collections.Counter = collections.Counter()
    counts = {"samples": 0, "conversations": 0, "frames": 0}
    delay = float(os.environ.get(stages.TEST_DELAY_ENV) or 0.0)

    def samples():
        for i, item in enumerate(entry["samples"]):
            if delay:
                time.sleep(delay)
            try:
                jpgs, stamps = render_sample(item, cfg, timings)
            except MediaError as e:
                skipped[e.reason] += 1
                if len(skipped_items) < MAX_SKIPPED_PER_SHARD:
                    skipped_items.append({"file": e.file, "reason": e.reason, "ids": item["ids"][:3],
                                          "detail": stages.one_line(e.detail, 200)})
                continue
            meta = instruct.make_meta(item["ids"], item["source"], item["conversations"], item["media"],
                                      item["files"], len(jpgs), stamps)
            counts["samples"] += 1
            counts["conversations"] += len(item["conversations"])
            counts["frames"] += len(jpgs)
            by_media[item["media"]] += 1
            yield instruct.encode_sample(shardformat.sample_key(shard_idx, i), meta, jpgs)

    try:
        digest, size = stages.publish_tar(cfg.output, name, samples(), timings)
        stats = {"name": name, "split": entry["split"], "shard": shard_idx, **counts,
                 "planned": len(entry["samples"]), "bytes": size, "sha256": digest,
                 "by_media": dict(sorted(by_media.items())),
                 "skipped": dict(sorted(skipped.items())), "skipped_items": skipped_items,
                 "seconds": {k: round(v, 4) for k, v in sorted(timings.items())},
                 "total_seconds": round(time.perf_counter() - t0, 4),
                 "cpu_seconds": round(time.process_time() - c0, 4)}
        stages.write_json(stages.stats_url_of(cfg.output, name), stats)
        return {"ok": True, **stats}
    except Exception as e:
        return {"ok": False, "name": name, "error": stages.one_line(f"{type(e).__name__}: {e}"),
                "trace": traceback.format_exc(limit=6)}


# ------------------------------------------------------------------------ driver

def prepare(args: Any) -> tuple[InstructConfig, Loaded, dict[str, Any] | None]:
    """Checks, annotation reading and the plan.json look-up, all before Ray. Raises InstructError."""
    from pipeline import shard

    if not args.input:
        raise InstructError(f"--input is required with --format {FORMAT}: an annotation file (.json, .jsonl) "
                            f"or a folder of them")
    if not args.media_root:
        raise InstructError(f"--media-root is required with --format {FORMAT}: the folder the records' "
                            f"image and video paths are relative to")
    try:
        shard.check_args(args)  # input exists, output writable; local paths made absolute
    except shard.JobError as e:
        raise InstructError(str(e)) from None
    if "://" not in args.media_root:
        args.media_root = os.path.abspath(args.media_root)
    why = job.unreachable("--media-root", args.media_root, folder=True)
    if why:
        raise InstructError(why)
    cfg = InstructConfig(input=args.input.rstrip("/"), media_root=args.media_root.rstrip("/"),
                         output=args.output.rstrip("/"), frames=args.frames, samples_per_shard=args.samples_per_shard,
                         val_fraction=args.val_fraction, seed=args.seed)
    loaded = load_annotations(cfg.input, cfg.output)
    want = content_hash(cfg.content_dict(loaded.annotations, loaded.media))
    try:
        old_plan = stages.read_json(url_join(cfg.output, "plan.json"))
    except ValueError:
        old_plan = {"content_hash": "unreadable"}
    if old_plan is not None and (old_plan.get("content_hash") != want or old_plan.get("plan_version") != PLAN_VERSION
                                 or old_plan.get("kind") != instruct.KIND):
        if not args.overwrite:
            raise InstructError(f"{stages.public_url(cfg.output)} holds shards made from other annotations, media "
                                f"or arguments (plan.json differs); use another --output or pass --overwrite")
        n = shard.clear_output(cfg.output)
        print(f"[overwrite] removed {n} files of the earlier job from {stages.public_url(cfg.output)}", flush=True)
        old_plan = None
    return cfg, loaded, old_plan


def main(args: Any, t_start: float | None = None) -> int:
    """The job for `--format llava-json` (args: pipeline.shard.ShardArgs). Exit status as pipeline/shard.py."""
    t_start = time.time() if t_start is None else t_start
    times: dict[str, float] = {}
    try:
        t0 = time.time()
        cfg, loaded, old_plan = prepare(args)
        times["read"] = time.time() - t0
    except InstructError as e:
        job.err(str(e))
        return 2
    return job.run_in_ray(args, lambda: run_job(args, cfg, loaded, old_plan, times, t_start), (InstructError,))


def run_job(args: Any, cfg: InstructConfig, loaded: Loaded, old_plan: dict[str, Any] | None,
            times: dict[str, float], t_start: float) -> int:
    import ray

    from pipeline import ray_tasks

    print(f"[job] {len(loaded.annotations)} annotation files at {stages.public_url(cfg.input)} "
          f"({len(loaded.records) + len(loaded.errors)} records, {len(loaded.errors)} malformed), media under "
          f"{stages.public_url(cfg.media_root)} -> {stages.public_url(cfg.output)}", flush=True)
    job.warn_if_local_output(cfg.output)
    plan_url = url_join(cfg.output, "plan.json")
    t0 = time.time()
    if old_plan is not None:
        plan = old_plan
        print(f"[plan] reusing {stages.public_url(plan_url)} ({len(plan['shards'])} shards)", flush=True)
    else:
        plan = make_plan(loaded, cfg)
        stages.write_json(plan_url, plan)
        kinds = collections.Counter(s["media"] for e in plan["shards"] for s in e["samples"])
        print(f"[plan] {sum(kinds.values())} samples (video {kinds['video']}, image {kinds['image']}, text "
              f"{kinds['none']}) in {len(plan['shards'])} shards; media train {plan['media_split']['train']} / val "
              f"{plan['media_split']['val']} -> {stages.public_url(plan_url)}", flush=True)
    times["plan"] = time.time() - t0

    t0 = time.time()
    done, todo, folder, local = job.shards_to_write(cfg, plan)
    cfg_ref = ray.put(cfg)
    prog = Progress("write", len(todo), "shards", args.quiet, rate_unit="samples")
    results = ray_tasks.run_tasks(write_shard, todo, lambda e: (e, cfg_ref), prog, args.retries,
                                  label=lambda e: e["name"], name="write_instruct_shard",
                                  amount=lambda r: int(r.get("samples") or 0))
    if local:
        stages.sweep_parts(folder, [e["name"] for e in plan["shards"]])
    failed = [r for _, r, _ in results if not r.get("ok")]
    written = {r["name"]: {k: v for k, v in r.items() if k != "ok"} for _, r, _ in results if r.get("ok")}
    times["write"] = time.time() - t0

    manifest = build_manifest(plan, {**done, **written}, cfg, failed)
    stages.write_json(url_join(cfg.output, "manifest.json"), manifest)
    times["total"] = time.time() - t_start
    new_samples = sum(int(r.get("samples") or 0) for r in written.values())
    print_summary(manifest, times, new_samples, len(written), cfg)
    record = (lambda: record_mlflow(manifest, args, times, new_samples)) if args.mlflow else None
    code = job.record_and_report(record, failed, args.retries)
    c = manifest["counts"]
    for what, frac in (("of the records are malformed", c["records_malformed_fraction"]),
                       ("of the samples have missing or broken media", c["samples_skipped_fraction"])):
        if frac > args.max_broken_fraction:
            job.err(f"{frac:.1%} {what} (more than --max-broken-fraction {args.max_broken_fraction:g}); see "
                    f"malformed_by_reason and skipped_by_reason in manifest.json")
            code = 1
    if not failed and c["samples"] == 0 and not code:
        job.err("no sample was written (see malformed_by_reason and skipped_by_reason in manifest.json)")
        code = 1
    return code


# ------------------------------------------------------------------------ manifest and summary

def build_manifest(plan: dict[str, Any], stats: dict[str, dict[str, Any]], cfg: InstructConfig,
                   failed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Counts, shards (size, sha256), skipped media and malformed records by reason, config.

    Built from plan.json and the shards' stats.json only, so a rerun gives the same manifest.
    """
    skipped: collections.Counter = collections.Counter()
    by_media: collections.Counter = collections.Counter()
    skipped_media: list[dict[str, Any]] = []
    shards = []
    conv = frames = 0
    for e in plan["shards"]:
        st = stats.get(e["name"])
        if st is None:
            continue
        shards.append({k: st[k] for k in ("name", "split", "samples", "bytes", "sha256")})
        skipped.update(st.get("skipped") or {})
        by_media.update(st.get("by_media") or {})
        conv += int(st.get("conversations") or 0)
        frames += int(st.get("frames") or 0)
        room = MAX_REPORTED - len(skipped_media)
        if room > 0:
            skipped_media += [{**it, "shard": e["name"]} for it in (st.get("skipped_items") or [])[:room]]
    planned = sum(len(e["samples"]) for e in plan["shards"])
    planned_done = sum(len(e["samples"]) for e in plan["shards"] if e["name"] in stats)
    n_skipped = sum(skipped.values())
    rec = plan["records"]
    counts = {"annotation_files": len(plan["annotations"]), "records": rec["read"], "records_valid": rec["valid"],
              "records_malformed": rec["malformed"],
              "records_malformed_fraction": round(rec["malformed"] / rec["read"], 4) if rec["read"] else 0.0,
              "samples": sum(s["samples"] for s in shards), "samples_planned": planned,
              "samples_skipped": n_skipped,
              "samples_skipped_fraction": round(n_skipped / planned_done, 4) if planned_done else 0.0,
              "conversations": conv, "frames": frames,
              "shards": len(shards), "shards_planned": len(plan["shards"]), "shards_failed": len(failed or []),
              "bytes": sum(s["bytes"] for s in shards),
              "media_train": plan["media_split"]["train"], "media_val": plan["media_split"]["val"]}
    for m in instruct.MEDIA:
        counts[f"samples_{m}"] = int(by_media.get(m, 0))
    for split in ("train", "val"):
        counts[f"samples_{split}"] = sum(s["samples"] for s in shards if s["split"] == split)
    public_cfg = dict(plan["config"])
    public_cfg["output"] = stages.public_url(cfg.output)
    return {"version": MANIFEST_VERSION, "format_version": plan["format_version"], "kind": instruct.KIND,
            "content_hash": plan["content_hash"], "complete": len(shards) == len(plan["shards"]),
            "counts": counts, "shards": shards,
            "skipped_by_reason": dict(sorted(skipped.items())), "skipped_media": skipped_media,
            "malformed_by_reason": plan["malformed_by_reason"], "malformed_records": plan["malformed_records"],
            "annotations": plan["annotations"],
            "failed_shards": sorted(r.get("name") for r in failed or []), "config": public_cfg}


def print_summary(m: dict[str, Any], times: dict[str, float], new_samples: int, new_shards: int,
                  cfg: InstructConfig) -> None:
    """The one-screen table: records, malformed by reason (first ids), samples, skipped media by reason."""
    c = m["counts"]
    rows = [("annotations", f"{c['annotation_files']} files, {c['records']} records ({c['records_malformed']} "
                            f"malformed = {c['records_malformed_fraction']:.1%})")]
    first: dict[str, list[str]] = collections.defaultdict(list)
    for r in m["malformed_records"]:
        first[r["reason"]].append(r["id"])
    for reason, n in sorted(m["malformed_by_reason"].items(), key=lambda x: (-x[1], x[0]))[:6]:
        ids = first.get(reason, [])[:3]
        rows.append(("  malformed: " + reason, f"{n} (ids: {', '.join(ids)}{', ...' if n > len(ids) else ''})"))
    rows.append(("samples", f"{c['samples']} of {c['samples_planned']} planned (video {c['samples_video']}, image "
                            f"{c['samples_image']}, text {c['samples_none']}; train {c['samples_train']}, val "
                            f"{c['samples_val']})"))
    rows.append(("conversations", f"{c['conversations']} ({c['frames']} frames stored, videos at most "
                                  f"{cfg.frames} frames)"))
    media_first: dict[str, list[str]] = collections.defaultdict(list)
    for it in m["skipped_media"]:
        media_first[it["reason"]].append(it["file"])
    rows.append(("skipped media", f"{c['samples_skipped']} samples = {c['samples_skipped_fraction']:.1%}"))
    for reason, n in sorted(m["skipped_by_reason"].items(), key=lambda x: (-x[1], x[0]))[:6]:
        files = media_first.get(reason, [])[:2]
        rows.append(("  skipped: " + reason, f"{n} ({', '.join(files)}{', ...' if n > len(files) else ''})"))
    rows += [("shards", f"{c['shards']} of {c['shards_planned']} ({new_shards} written now, "
                        f"{c['shards_failed']} failed)"),
             ("bytes", f"{c['bytes'] / 1e6:.1f} MB"),
             ("samples/s", f"{new_samples / max(times.get('write', 0.0), 1e-9):.1f} ({new_samples} samples written "
                           f"in {times.get('write', 0.0):.1f}s)" if new_samples else "- (nothing left to write)"),
             ("time", f"read {times.get('read', 0.0):.1f}s, plan {times.get('plan', 0.0):.1f}s, write "
                      f"{times.get('write', 0.0):.1f}s, total {times.get('total', 0.0):.1f}s"),
             ("output", f"{stages.public_url(cfg.output)} (manifest.json)")]
    w = max(len(r[0]) for r in rows)
    print("\n== instruction shard job summary " + "=" * 38)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("=" * 71, flush=True)


def record_mlflow(manifest: dict[str, Any], args: Any, times: dict[str, float], new_samples: int) -> None:
    """The job's MLflow run (`job.record_mlflow`), with malformed records by reason and samples/s."""
    from data.cli import flat_dict

    params = {k: v for k, v in flat_dict(args).items()
              if k in ("format", "frames", "samples_per_shard", "val_fraction", "seed", "retries")}
    for k in ("input", "output", "media_root"):
        params[k] = stages.public_url(getattr(args, k)) or ""
    metrics = {f"malformed.{k}": v for k, v in manifest["malformed_by_reason"].items()}
    if times.get("write"):
        metrics["samples_per_s"] = new_samples / times["write"]
    job.record_mlflow(manifest, args, times, run_name="shard-job-instruct",
                      tags={"kind": "shard", "data": instruct.KIND}, params=params, metrics=metrics, output=args.output)
