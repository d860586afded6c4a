"""The Ray shard job: video-scene corpora -> WebDataset shards of multi-frame clips (DESIGN §4, §7).

    python pipeline/shard.py                      # embedded default: local Ray, synthetic scenes, ./runs/shards
    python pipeline/shard.py --input ROOT --format scannet --output OUT
    python pipeline/shard.py --format llava-json --input ANNOTATIONS.jsonl --media-root ROOT --output OUT  # pipeline/instruct.py
    ray job submit --address URL --working-dir . -- python pipeline/shard.py --input s3://... --output s3://...

Stages (each a Ray workload): scan (one task per scene) -> plan (driver, written to
plan.json) -> write (one task per shard; tar, then stats.json) -> manifest.json and a
one-screen summary. A rerun with the same arguments reuses plan.json and writes only
the shards that have no stats.json yet; the shards come out byte-identical.
Exit status: 0 done, 1 the job ran but failed (shards failed after retries, too many
broken frames, no pair at all), 2 bad arguments (checked before Ray starts).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python pipeline/shard.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import collections
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.cli import flat_dict, opt, parse_into
from data.pairs import ClipConfig
from data.progress import Progress
from data.scenes import FORMATS, SceneError, list_scenes
from data.storage import open_fs, url_join
from data.synthetic import MOTIONS
from pipeline import instruct, job, stages

DEFAULT_ROOT = "runs"
DEFAULT_SYNTHETIC = os.path.join(DEFAULT_ROOT, "synthetic")
DEFAULT_OUTPUT = os.path.join(DEFAULT_ROOT, "shards")
MANIFEST_VERSION = 1
EPILOG = ("Storage: --input/--output take local paths or s3:// URLs (s3fs); the endpoint comes from "
          "AWS_ENDPOINT_URL, credentials from the standard AWS variables or profile. Ray: RAY_ADDRESS "
          "(or `ray job submit`) joins a cluster, else Ray starts in this process on 127.0.0.1. "
          "Exit status: 0 done, 1 the job failed (see the last lines), 2 bad arguments.")


@dataclass
class ShardArgs:
    """Flags of pipeline/shard.py."""

    input: str = opt("", "corpus root (local path or s3://), one folder per scene; empty: build the "
                         "embedded synthetic corpus under runs/synthetic (runs/synthetic_<motion>_fov<deg>[_objects] "
                         "for other --synthetic-* settings)")
    format: str = opt("synthetic", "corpus layout; llava-json: LLaVA instruction data (pipeline/instruct.py)",
                      choices=sorted([*FORMATS, instruct.FORMAT]))
    output: str = opt(DEFAULT_OUTPUT, "output folder or s3:// prefix for shards, plan.json and manifest.json")
    clip_frames: int = opt(8, "K: frames per clip (2..32; 2 is a pair)")
    clip_window: int = opt(48, "R: a clip's frames lie within this many consecutive frame indices (dt <= R - 1)")
    clips_per_scene: int = opt(8, "clips drawn per scene, their windows spread over the scene")
    samples_per_shard: int = opt(64, "clips per tar shard")
    max_side: int = opt(640, "longer side of stored views in pixels (never upscaled)")
    val_fraction: float = opt(0.1, "fraction of scenes held out as the val split (split by scene)")
    test_fraction: float = opt(0.0, "fraction of scenes held out as the test split (split by scene)")
    seed: int = opt(0, "seed of clip sampling, split and shuffle")
    min_overlap: float = opt(0.3, "every frame overlaps another frame of its clip by at least this "
                                  "(fraction of its valid pixels visible in the other)")
    max_overlap: float = opt(0.98, "no two frames of a clip overlap more than this (drops near-duplicates)")
    max_corr: int = opt(4096, "most correspondences stored per pair")
    max_corr_clip: int = opt(65536, "most correspondences stored per clip (each pair then gets at most "
                                    "this / its pairs)")
    exclude_scenes: str = opt("", "file of scene ids (one a line, # comments) dropped before planning, e.g. a "
                                  "benchmark's evaluation scenes; the manifest lists them")
    depth_root: str = opt("", "nerfstudio/DL3DV only: folder of per-scene depth maps (see README)")
    media_root: str = opt("", "llava-json only: folder or s3:// prefix the records' image and video paths are relative to")
    frames: int = opt(32, "llava-json only: most frames kept per video, sampled uniformly over its length")
    overwrite: bool = opt(False, "replace an output written with different arguments")
    max_broken_fraction: float = opt(0.5, "exit 1 when more than this fraction of all frames is broken "
                                          "(broken frames are always skipped and counted)")
    retries: int = opt(2, "times a failed shard or scene task is resubmitted by the driver "
                          "(a task whose worker dies is also retried by Ray itself)")
    num_cpus: int = opt(0, "CPUs of the local in-process Ray (0: all); ignored when joining a cluster")
    synthetic_scenes: int = opt(8, "embedded default only: scenes in the synthetic corpus")
    synthetic_frames: int = opt(60, "embedded default only: frames per synthetic scene")
    synthetic_motion: str = opt("walk", "embedded default only: camera motion of the synthetic rooms (data/synthetic.py "
                                        f"MOTIONS: {', '.join(MOTIONS)}); a comma list cycles over the scenes "
                                        "(e.g. scan,orbit: scene i gets the (i mod 2)-th)")
    synthetic_hfov: float = opt(70.0, "embedded default only: horizontal field of view of the rooms, degrees")
    synthetic_objects: bool = opt(False, "embedded default only: also write per-pixel object ids (the probe's "
                                         "look-alike subset)")
    mlflow: bool = opt(False, "record the job in MLflow (MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    experiment: str = opt("gasp", "MLflow experiment name")
    quiet: bool = opt(False, "no progress lines (the summary is still printed)")

    def __post_init__(self) -> None:
        self.clip_config()  # raises the one-line errors
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1 (got {self.samples_per_shard})")
        if self.max_side < 16:
            raise ValueError(f"--max-side must be >= 16 (got {self.max_side})")
        for flag in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, flag) < 1.0:
                raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1) (got {getattr(self, flag)})")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"--val-fraction + --test-fraction must leave scenes to train on (got "
                             f"{self.val_fraction} + {self.test_fraction})")
        if not 0.0 <= self.max_broken_fraction <= 1.0:
            raise ValueError(f"--max-broken-fraction must be in [0, 1] (got {self.max_broken_fraction})")
        if self.retries < 0 or self.num_cpus < 0:
            raise ValueError("--retries and --num-cpus must be >= 0")
        if self.synthetic_scenes < 1 or self.synthetic_frames < 2:
            raise ValueError("--synthetic-scenes must be >= 1 and --synthetic-frames >= 2")
        bad = [m for m in self.synthetic_motion.split(",") if m not in MOTIONS]
        if bad or not self.synthetic_motion:
            raise ValueError(f"--synthetic-motion: unknown {', '.join(bad) or 'empty'}; choose from "
                             f"{', '.join(MOTIONS)} (or a comma list of them)")
        if not 10.0 <= self.synthetic_hfov <= 150.0:
            raise ValueError(f"--synthetic-hfov must be in [10, 150] degrees (got {self.synthetic_hfov})")
        if self.media_root and self.format != instruct.FORMAT:
            raise ValueError(f"--media-root is only for --format {instruct.FORMAT}")
        if not 1 <= self.frames <= instruct.MAX_FRAMES:
            raise ValueError(f"--frames must be in [1, {instruct.MAX_FRAMES}] (got {self.frames})")

    def clip_config(self) -> ClipConfig:
        return ClipConfig(clip_frames=self.clip_frames, clip_window=self.clip_window,
                          clips_per_scene=self.clips_per_scene, min_overlap=self.min_overlap,
                          max_overlap=self.max_overlap, max_corr=self.max_corr, max_corr_clip=self.max_corr_clip)

    def job_config(self, excluded: tuple[str, ...] = ()) -> stages.JobConfig:
        return stages.JobConfig(input=self.input.rstrip("/"), format=self.format, output=self.output.rstrip("/"),
                                clips=self.clip_config(), samples_per_shard=self.samples_per_shard,
                                max_side=self.max_side, val_fraction=self.val_fraction,
                                test_fraction=self.test_fraction, seed=self.seed,
                                depth_root=self.depth_root or None, excluded=excluded)


class JobError(Exception):
    """A user-facing failure: printed as one line."""


# ------------------------------------------------------------------------ checks

def _is_url(p: str) -> bool:
    return "://" in p


def check_args(args: ShardArgs) -> None:
    """Everything that can be checked before Ray starts: input, depth root, output writable."""
    for flag in ("input", "output", "depth_root"):
        v = getattr(args, flag)
        if v and not _is_url(v):
            setattr(args, flag, os.path.abspath(v))  # Ray workers may run elsewhere
    why = job.unreachable("--input", args.input)
    if why:
        raise JobError(why)
    if args.depth_root:
        if args.format != "nerfstudio":
            raise JobError("--depth-root is only for --format nerfstudio")
        dfs, dpath = open_fs(args.depth_root)
        if not dfs.exists(dpath):
            raise JobError(f"--depth-root {stages.public_url(args.depth_root)}: no such folder")
    ofs, opath = open_fs(args.output)
    probe = url_join(args.output, f".write-test-{os.getpid()}")
    try:
        if stages.is_local(ofs):
            if os.path.exists(opath) and not os.path.isdir(opath):
                raise NotADirectoryError(f"{opath} is a file")
            os.makedirs(opath, exist_ok=True)
        _, ppath = open_fs(probe)
        with ofs.open(ppath, "wb") as f:
            f.write(b"ok")
        ofs.rm(ppath)
    except Exception as e:
        raise JobError(f"--output {stages.public_url(args.output)}: not writable ({type(e).__name__}: {e}); "
                       f"choose a folder you can write to") from None


def synthetic_settings(args: ShardArgs) -> dict[str, Any]:
    """What the embedded corpus's scenes are rendered with (besides their seeds)."""
    return {"frames": args.synthetic_frames, "motion": args.synthetic_motion, "hfov": float(args.synthetic_hfov),
            "objects": bool(args.synthetic_objects)}


def default_corpus_root(args: ShardArgs) -> str:
    """runs/synthetic for the default rendering; another motion, field of view or object ids render into a
    folder of their own (runs/synthetic_<motion>_fov<deg>[_objects]), so each corpus keeps its own plan."""
    st = synthetic_settings(args)
    if (st["motion"], st["hfov"], st["objects"]) == ("walk", 70.0, False):
        return os.path.abspath(DEFAULT_SYNTHETIC)
    motion = st["motion"].replace(",", "+")
    return os.path.abspath(f"{DEFAULT_SYNTHETIC}_{motion}_fov{st['hfov']:g}{'_objects' if st['objects'] else ''}")


def scene_motion(args: ShardArgs, i: int) -> str:
    """The camera motion of embedded scene i (`--synthetic-motion`'s list, cycled)."""
    motions = args.synthetic_motion.split(",")
    return motions[i % len(motions)]


def _rendered_with(cameras: dict[str, Any]) -> dict[str, Any]:
    syn = cameras.get("synthetic") or {}
    return {"frames": len(cameras.get("frames") or ()), "motion": syn.get("motion", "walk"),
            "hfov": float(syn.get("hfov", 70.0)), "objects": "object_groups" in cameras}


def default_corpus_todo(args: ShardArgs) -> tuple[str, list[str]]:
    """The embedded default corpus (`default_corpus_root`): its root and the scenes still to render.

    A scene already there that was rendered with other settings (frames, motion, field of view, object
    ids) is refused in one line rather than reused."""
    root = default_corpus_root(args)
    want = synthetic_settings(args)
    todo = []
    for i in range(args.synthetic_scenes):
        cam = os.path.join(root, f"scene_{i:04d}", "cameras.json")  # written last
        if not os.path.exists(cam):
            todo.append(f"scene_{i:04d}")
            continue
        try:
            with open(cam) as f:
                got = _rendered_with(json.load(f))
        except (OSError, ValueError) as e:
            raise JobError(f"{cam}: unreadable ({type(e).__name__}: {e}); delete {root} (the embedded corpus is "
                           f"rendered again)") from None
        want_i = {**want, "motion": scene_motion(args, i)}
        diff = {k: (got[k], want_i[k]) for k in want_i if got[k] != want_i[k]}
        if diff:
            what = ", ".join(f"{k} {a} (asked {b})" for k, (a, b) in diff.items())
            raise JobError(f"{os.path.dirname(cam)} was rendered with {what}: delete {root} to render it again, "
                           f"or pass the --synthetic-* flags it was made with")
    return root, todo


def build_default_corpus(args: ShardArgs, root: str, todo: list[str]) -> None:
    """Render the missing synthetic scenes, one Ray task each (seed 1000 + i for scene i)."""
    from pipeline import ray_tasks

    print(f"[synthetic] rendering {len(todo)} scenes x {args.synthetic_frames} frames ({args.synthetic_motion}, "
          f"{args.synthetic_hfov:g} degrees{', object ids' if args.synthetic_objects else ''}) into {root}", flush=True)
    os.makedirs(root, exist_ok=True)
    prog = Progress("synthetic", len(todo), "scenes", args.quiet)
    st = synthetic_settings(args)
    out = ray_tasks.run_tasks(ray_tasks.synthetic_task, todo,
                              lambda n: (root, n, 1000 + int(n.split("_")[1]), st["frames"],
                                         scene_motion(args, int(n.split("_")[1])), st["hfov"],
                                         st["objects"]), prog,
                              args.retries, label=lambda n: n, name="synthetic_scene")
    bad = [r for _, r, _ in out if not r.get("ok")]
    if bad:
        raise JobError(f"could not render the embedded synthetic corpus: {bad[0].get('error')}")


def prepare(args: ShardArgs) -> tuple[stages.JobConfig, list[str], dict[str, Any] | None, list[str], list[str]]:
    """Checks and plan.json look-up, all before Ray. Raises JobError / SceneError (one line).

    Returns (config, scene URLs, plan.json of an earlier run or None, synthetic scenes to render
    first: the embedded default builds its corpus with Ray, then lists it; the scene keys
    --exclude-scenes dropped).
    """
    synthetic_todo: list[str] = []
    if not args.input:
        if args.format != "synthetic":
            raise JobError(f"--input is required with --format {args.format}")
        args.input, synthetic_todo = default_corpus_todo(args)
        os.makedirs(args.input, exist_ok=True)
    else:
        defaults = ShardArgs.__dataclass_fields__
        given = [f"--{k.replace('_', '-')}" for k in ("synthetic_scenes", "synthetic_frames", "synthetic_motion",
                                                      "synthetic_hfov", "synthetic_objects")
                 if getattr(args, k) != defaults[k].default]
        if given:
            print(f"[shard] warning: {', '.join(given)} apply to the embedded synthetic corpus only; with --input "
                  f"they are ignored", file=sys.stderr, flush=True)
    check_args(args)
    cfg = args.job_config(read_exclusions(args.exclude_scenes) if args.exclude_scenes else ())
    scenes, dropped = ([], []) if synthetic_todo else kept_scenes(list_scenes(cfg.input, cfg.format), cfg)
    plan_url = url_join(cfg.output, "plan.json")
    try:
        old_plan = stages.read_json(plan_url)
    except ValueError:
        old_plan = {"content_hash": "unreadable"}
    if old_plan is not None and (old_plan.get("content_hash") != cfg.content_hash()
                                 or old_plan.get("plan_version") != stages.PLAN_VERSION):
        why = ("plan.json was written by another version of the shard job"
               if old_plan.get("content_hash") == cfg.content_hash() else "plan.json differs")
        old_plan = _replan_or_refuse(args, cfg, f"holds shards made with different arguments ({why})")
    if old_plan is not None and not synthetic_todo:
        old_plan = check_plan_inputs(args, cfg, old_plan, scenes)
    return cfg, scenes, old_plan, synthetic_todo, dropped


def read_exclusions(path: str) -> tuple[str, ...]:
    """The scene ids of an --exclude-scenes file (one a line; blank lines and '# ...' ignored), sorted."""
    try:
        text = stages.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise JobError(f"--exclude-scenes {stages.public_url(path)}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"--exclude-scenes {stages.public_url(path)}: unreadable ({type(e).__name__}: {e})") from None
    ids = {line.split("#", 1)[0].strip() for line in text.splitlines()}
    ids.discard("")
    if not ids:
        raise JobError(f"--exclude-scenes {stages.public_url(path)}: names no scene (one scene id a line)")
    return tuple(sorted(ids))


def excluded_keys(keys: list[str], excluded: tuple[str, ...]) -> set[str]:
    """Scene keys an exclusion list names: by the key itself or its last path component (the scene id)."""
    ids = set(excluded)
    return {k for k in keys if k in ids or k.rstrip("/").rsplit("/", 1)[-1] in ids}


def kept_scenes(scenes: list[str], cfg: stages.JobConfig) -> tuple[list[str], list[str]]:
    """(scene URLs left after --exclude-scenes, the scene keys it dropped): dropped before planning, so no
    shard holds them."""
    if not cfg.excluded:
        return scenes, []
    drop = excluded_keys([stages.scene_key(u, cfg.input) for u in scenes], cfg.excluded)
    kept = [u for u in scenes if stages.scene_key(u, cfg.input) not in drop]
    if not kept:
        raise JobError(f"--exclude-scenes drops every scene of {stages.public_url(cfg.input)} ({len(scenes)})")
    print(f"[job] --exclude-scenes: {len(drop)} of {len(scenes)} scenes excluded ({len(cfg.excluded)} ids listed)",
          flush=True)
    return kept, sorted(drop)


def _replan_or_refuse(args: ShardArgs, cfg: stages.JobConfig, what: str) -> None:
    """Without --overwrite: JobError (one line). With it: remove the earlier job's files (replan)."""
    if not args.overwrite:
        raise JobError(f"{stages.public_url(cfg.output)} {what}; use another --output or pass --overwrite to replan")
    n = clear_output(cfg.output)
    print(f"[overwrite] removed {n} files of the earlier job from {stages.public_url(cfg.output)}", flush=True)
    return None


def check_plan_inputs(args: ShardArgs, cfg: stages.JobConfig, old_plan: dict[str, Any],
                      scenes: list[str]) -> dict[str, Any] | None:
    """A plan is reused only for the scene list and reader version it was made from (else refused, or
    replanned with --overwrite): added or removed scenes would otherwise be silently ignored."""
    keys = [stages.scene_key(u, cfg.input) for u in scenes]
    now = stages.inputs_record(keys, cfg.format)
    was = old_plan.get("inputs") or {}
    if was == now:
        return old_plan
    if was.get("reader") != now["reader"]:
        what = (f"holds shards read by reader {was.get('reader')}, this job reads with {now['reader']} "
                f"(its output changed)")
    else:
        before = set((old_plan.get("scan") or {}).keys())
        added, removed = sorted(set(keys) - before), sorted(before - set(keys))
        example = ", ".join((["+" + k for k in added[:2]] + ["-" + k for k in removed[:2]]))
        what = (f"holds a plan made from {was.get('scenes')} scenes; the corpus now lists {now['scenes']} "
                f"({len(added)} added, {len(removed)} removed{': ' + example if example else ''})")
    return _replan_or_refuse(args, cfg, what)


def clear_output(output: str) -> int:
    """Remove what a shard job wrote (shards, stats, plan, manifest, leftovers); returns the count."""
    fs, path = stages.fresh_fs(output)
    n = 0
    for name in sorted(stages.list_names(output)):
        if (name.endswith((".tar", ".stats.json", stages.PART_SUFFIX)) and name.startswith(("train-", "val-", ".")))\
                or name in ("plan.json", "manifest.json"):
            fs.rm(path.rstrip("/") + "/" + name)
            n += 1
    return n


# ------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    args = parse_into(ShardArgs, argv, job.PROG, "Corpora -> WebDataset shards of multi-frame clips (Ray).",
                      EPILOG)
    t_start = time.time()
    if args.format == instruct.FORMAT:  # LLaVA instruction data: its own job
        return instruct.main(args, t_start)
    try:
        cfg, scenes, old_plan, synthetic_todo, dropped = prepare(args)
    except (JobError, SceneError) as e:
        job.err(str(e))
        return 2

    return job.run_in_ray(args, lambda: run_job(args, cfg, scenes, old_plan, t_start, dropped, synthetic_todo),
                          (JobError, SceneError))


def run_job(args: ShardArgs, cfg: stages.JobConfig, scenes: list[str], old_plan: dict[str, Any] | None,
            t_start: float, dropped: list[str] | None = None, synthetic_todo: list[str] | None = None) -> int:
    import ray

    from pipeline import ray_tasks

    if synthetic_todo:
        build_default_corpus(args, cfg.input, synthetic_todo)
        scenes, dropped = kept_scenes(list_scenes(cfg.input, cfg.format), cfg)
        if old_plan is not None:
            old_plan = check_plan_inputs(args, cfg, old_plan, scenes)
    print(f"[job] input {stages.public_url(cfg.input)} ({cfg.format}, {len(scenes)} scenes) -> "
          f"{stages.public_url(cfg.output)}", flush=True)
    job.warn_if_local_output(cfg.output)
    cfg_ref = ray.put(cfg)
    times: dict[str, float] = {}

    # ---- scan + plan (a rerun reuses plan.json)
    t0 = time.time()
    shells: dict[str, Any] = {}
    plan_url = url_join(cfg.output, "plan.json")
    if old_plan is not None:
        plan = old_plan
        print(f"[plan] reusing {stages.public_url(plan_url)} ({len(plan['shards'])} shards)", flush=True)
    else:
        prog = Progress("scan", len(scenes), "scenes", args.quiet)
        out = ray_tasks.run_tasks(ray_tasks.scan_task, scenes, lambda u: (u, cfg_ref), prog, args.retries,
                                  label=lambda u: stages.scene_key(u, cfg.input), name="scan_scene", num_returns=2)
        scans = []
        for url, res, shell_ref in out:
            res.setdefault("scene", stages.scene_key(url, cfg.input))
            scans.append(res)
            if res.get("ok") and res.get("clips") and shell_ref is not None:
                shells[res["scene"]] = shell_ref
        times["scan"] = time.time() - t0
        t1 = time.time()
        plan = stages.make_plan(scans, cfg)
        plan["excluded_scenes"] = sorted(dropped or [])
        stages.write_json(plan_url, plan)
        times["plan"] = time.time() - t1
        per_split = collections.Counter(plan["scenes"].values())
        print(f"[plan] {sum(len(s['clips']) for s in plan['shards'])} clips in {len(plan['shards'])} shards; "
              f"{per_split['train']} train / {per_split['val']} val / {per_split['test']} test scenes -> "
              f"{stages.public_url(plan_url)}",
              flush=True)

    # ---- write the shards that are not done yet
    t0 = time.time()
    done, todo, folder, local = job.shards_to_write(cfg, plan)
    run_id = uuid.uuid4().hex

    def write_args(e: dict[str, Any]) -> tuple:
        refs = {k: shells[k] for k in {it["scene"] for it in e["clips"]} if k in shells}
        return e, cfg_ref, refs or None, run_id

    prog = Progress("write", len(todo), "shards", args.quiet, rate_unit="clips")
    results = ray_tasks.run_tasks(ray_tasks.write_task, todo, write_args, prog, args.retries,
                                  label=lambda e: e["name"], name="write_shard",
                                  amount=lambda r: int(r.get("samples") or 0))
    if local:
        stages.sweep_parts(folder, [e["name"] for e in plan["shards"]])
    failed = [r for _, r, _ in results if not r.get("ok")]
    written = {r["name"]: r for _, r, _ in results if r.get("ok")}
    times["write"] = time.time() - t0
    shells.clear()

    stats = {**done, **{k: {kk: vv for kk, vv in v.items() if kk != "ok"} for k, v in written.items()}}
    manifest = build_manifest(plan, stats, cfg, args, failed)
    stages.write_json(url_join(cfg.output, "manifest.json"), manifest)
    times["total"] = time.time() - t_start
    new_clips = sum(int(r.get("samples") or 0) for r in written.values())
    print_summary(manifest, times, new_clips, len(written), cfg)
    record = (lambda: record_mlflow(manifest, args, cfg, times, new_clips)) if args.mlflow else None
    code = job.record_and_report(record, failed, args.retries)
    frac = manifest["counts"]["frames_skipped_fraction"]
    if frac > args.max_broken_fraction:
        job.err(f"{frac:.1%} of all frames are broken (more than --max-broken-fraction "
                f"{args.max_broken_fraction:g}); see skipped_by_reason in manifest.json")
        code = 1
    if not failed and manifest["counts"]["clips"] == 0:
        job.err("no clip was written: no scene has a clip that passes the overlap filters "
                "(see flagged_scenes in manifest.json)")
        code = 1
    return code


# ---------------------------------------------------------------------- manifest

def build_manifest(plan: dict[str, Any], stats: dict[str, dict[str, Any]], cfg: stages.JobConfig,
                   args: ShardArgs, failed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Counts, shards (size, sha256), the dt histogram and frame step per dataset, excluded scenes,
    skipped-by-reason, per-scene self-check, flags, config.

    Built from plan.json and the shards' stats.json only, so a rerun gives the same manifest.
    """
    scan = plan.get("scan", {})
    skipped: collections.Counter = collections.Counter()
    skipped_clips: collections.Counter = collections.Counter()
    planned: collections.Counter = collections.Counter()
    for e in plan["shards"]:
        for it in e["clips"]:
            planned[it["scene"]] += 1
    agg: dict[str, dict[str, Any]] = {}
    shards = []
    dt_hist: dict[str, collections.Counter] = {}
    for e in plan["shards"]:
        st = stats.get(e["name"])
        if st is None:
            continue
        shards.append({k: st[k] for k in ("name", "split", "samples", "pairs", "frames", "bytes", "sha256")})
        skipped_clips.update(st.get("skipped_clips") or {})
        for ds, h in (st.get("dt_histogram") or {}).items():
            dt_hist.setdefault(ds, collections.Counter()).update({k: int(v) for k, v in h.items()})
        for sc, a in (st.get("scenes") or {}).items():
            acc = agg.setdefault(sc, {"clips": 0, "pairs": 0, "checked": 0, "photo_err": 0.0,
                                      "photo_err_shuffled": 0.0, "ratios": []})
            for k in ("clips", "pairs", "checked", "photo_err", "photo_err_shuffled"):
                acc[k] += a.get(k, 0)
            acc["ratios"] += a.get("ratios", [])
    scenes_info: dict[str, Any] = {}
    flagged: dict[str, str] = {}
    frames = usable = 0
    steps: dict[str, list[float]] = {}
    for key, s in sorted(scan.items()):
        frames += s.get("frames") or 0
        usable += s.get("usable") or 0
        skipped.update(s.get("skipped") or {})
        if s.get("frame_seconds"):
            steps.setdefault(str(s.get("dataset")), []).append(float(s["frame_seconds"]))
        a = agg.get(key)
        info = {"split": plan["scenes"].get(key), "dataset": s.get("dataset"), "frames": s.get("frames"),
                "usable": s.get("usable"), "skipped": s.get("skipped") or {}, "clip_yield": s.get("yield"),
                "reference_yield": s.get("reference_yield"), "candidates_tested": s.get("tested"),
                "short_clips": s.get("short_clips"), "clips_planned": planned.get(key, 0),
                "clips": a["clips"] if a else 0, "pairs": a["pairs"] if a else 0,
                "metric_depth": s.get("metric_depth"), "frame_seconds": s.get("frame_seconds")}
        if a and a["checked"]:
            info["photo_err"] = round(a["photo_err"] / a["checked"], 3)
            info["photo_err_shuffled"] = round(a["photo_err_shuffled"] / a["checked"], 3)
            info["photo_ratio_median"] = round(float(np.median(a["ratios"])), 4)
            info["pairs_failing_check"] = int(sum(r > stages.PHOTO_FLAG_RATIO for r in a["ratios"]))
        if not s.get("ok"):
            info["error"] = s.get("error")
        why = stages.scene_verdict(s, a)
        if why:
            flagged[key] = why
            info["flag"] = why
        scenes_info[key] = info
    broken = frames - usable
    counts = {"scenes": len(scan), "scenes_readable": sum(1 for s in scan.values() if s.get("ok")),
              "scenes_flagged": len(flagged), "frames": frames, "frames_usable": usable, "frames_skipped": broken,
              "frames_skipped_fraction": round(broken / frames, 4) if frames else 0.0,
              "clips": sum(s["samples"] for s in shards), "pairs": sum(s["pairs"] for s in shards),
              "frames_stored": sum(s["frames"] for s in shards),
              "clips_planned": sum(len(e["clips"]) for e in plan["shards"]),
              "clips_skipped": sum(skipped_clips.values()),
              "shards": len(shards), "shards_planned": len(plan["shards"]), "shards_failed": len(failed or []),
              "bytes": sum(s["bytes"] for s in shards)}
    for split in stages.SPLITS:
        counts[f"clips_{split}"] = sum(s["samples"] for s in shards if s["split"] == split)
        counts[f"scenes_{split}"] = sum(1 for v in plan["scenes"].values() if v == split)
    public_cfg = dict(plan["config"])
    public_cfg["output"] = stages.public_url(cfg.output)
    public_cfg["clip_frames"] = cfg.clips.clip_frames  # the most frames a clip holds (what readers size by)
    listed = set(plan["config"].get("excluded") or [])
    excluded = sorted(plan.get("excluded_scenes") or [])
    return {"version": MANIFEST_VERSION, "kind": "clips", "format_version": plan["format_version"],
            "content_hash": plan["content_hash"], "complete": len(shards) == len(plan["shards"]),
            "counts": counts, "shards": shards,
            "dt_histogram": {ds: dict(sorted(h.items(), key=lambda kv: int(kv[0]))) for ds, h in sorted(dt_hist.items())},
            "frame_seconds": {ds: round(float(np.median(v)), 6) for ds, v in sorted(steps.items())},
            "excluded_scenes": excluded, "exclude_ids": sorted(listed),
            "skipped_by_reason": dict(sorted(skipped.items())),
            "skipped_clips_by_reason": dict(sorted(skipped_clips.items())),
            "flagged_scenes": flagged,
            "splits": {sp: sorted(k for k, v in plan["scenes"].items() if v == sp) for sp in stages.SPLITS},
            "scenes": scenes_info,
            "failed_shards": sorted(r.get("name") for r in failed or []),
            "config": public_cfg}


def print_summary(m: dict[str, Any], times: dict[str, float], new_clips: int, new_shards: int,
                  cfg: stages.JobConfig) -> None:
    """The one-screen table: scenes, frames, skipped by reason, clips, pairs, dt range, shards, bytes, flags."""
    c = m["counts"]
    rows = [("scenes", f"{c['scenes']} ({c['scenes_readable']} readable; train {c['scenes_train']}, "
                       f"val {c['scenes_val']}, test {c['scenes_test']})"
                       + (f"; {len(m['excluded_scenes'])} excluded" if m.get("exclude_ids") else "")),
            ("frames", f"{c['frames']} ({c['frames_usable']} usable, {c['frames_skipped']} skipped = "
                       f"{c['frames_skipped_fraction']:.1%})")]
    reasons = sorted(m["skipped_by_reason"].items(), key=lambda x: (-x[1], x[0]))
    for reason, n in reasons[:8]:
        rows.append(("  skipped: " + reason, str(n)))
    if len(reasons) > 8:
        rows.append(("  skipped: ...", f"{len(reasons) - 8} more reasons in manifest.json"))
    rows += [("clips", f"{c['clips']} of {c['clips_planned']} planned (train {c['clips_train']}, val "
                       f"{c['clips_val']}, test {c['clips_test']}; {c['clips_skipped']} skipped: broken frame); "
                       f"{c['pairs']} supervised pairs, {c['frames_stored']} frames")]
    for ds, h in m["dt_histogram"].items():
        dts = sorted(int(k) for k in h)
        step = m["frame_seconds"].get(ds)
        rows.append((f"  dt ({ds})", f"{dts[0]}..{dts[-1]} frames over {len(dts)} distances"
                                     + (f"; {step:.3g} s a frame" if step else "")))
    rows += [("shards", f"{c['shards']} of {c['shards_planned']} ({new_shards} written now, "
                        f"{c['shards_failed']} failed)"),
             ("bytes", f"{c['bytes'] / 1e6:.1f} MB"),
             ("clips/s", f"{new_clips / max(times.get('write', 0.0), 1e-9):.1f} ({new_clips} clips written in "
                         f"{times.get('write', 0.0):.1f}s)" if new_clips else "- (nothing left to write)"),
             ("time", f"scan {times.get('scan', 0.0):.1f}s, plan {times.get('plan', 0.0):.1f}s, write "
                      f"{times.get('write', 0.0):.1f}s, total {times.get('total', 0.0):.1f}s"),
             ("flagged scenes", f"{len(m['flagged_scenes'])}")]
    flagged = sorted(m["flagged_scenes"].items())
    for sc, why in flagged[:10]:
        rows.append(("  " + sc, why))
    if len(flagged) > 10:
        rows.append(("  ...", f"{len(flagged) - 10} more in manifest.json"))
    ratios = [v["photo_ratio_median"] for v in m["scenes"].values() if "photo_ratio_median" in v]
    if ratios:
        rows.append(("self-check", f"median photo_err/shuffled {float(np.median(ratios)):.2f} over "
                                   f"{len(ratios)} scenes (flag above {stages.PHOTO_FLAG_RATIO})"))
    rows.append(("output", f"{stages.public_url(cfg.output)} (manifest.json)"))
    w = max(len(r[0]) for r in rows)
    print("\n== shard job summary " + "=" * 50)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("=" * 71, flush=True)


def record_mlflow(manifest: dict[str, Any], args: ShardArgs, cfg: stages.JobConfig, times: dict[str, float],
                  new_clips: int) -> None:
    """The job's MLflow run (`job.record_mlflow`), with clips/s and the number of flagged scenes."""
    params = flat_dict(args)
    for k in ("input", "output", "depth_root"):
        params[k] = stages.public_url(params.get(k)) or ""
    metrics = {"clips_per_s": new_clips / times["write"]} if times.get("write") else {}
    job.record_mlflow(manifest, args, times, run_name="shard-job", tags={"kind": "shard"}, params=params,
                      metrics=metrics, output=cfg.output, end_tags={"flagged_scenes": len(manifest["flagged_scenes"])})


if __name__ == "__main__":
    sys.exit(main())
