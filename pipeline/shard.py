"""The Ray shard job: video-scene corpora -> WebDataset shards of frame pairs (DESIGN §4, §7).

    python pipeline/shard.py                      # embedded default: local Ray, synthetic scenes, ./runs/shards
    python pipeline/shard.py --input ROOT --format scannet --output OUT
    ray job submit --address URL --working-dir . -- python pipeline/shard.py --input s3://... --output s3://...

Stages (each a Ray workload): scan (one task per scene) -> plan (driver, written to
plan.json) -> write (one task per shard; tar, then stats.json) -> manifest.json.
A rerun with the same arguments reuses plan.json and writes only missing shards.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python pipeline/shard.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import collections
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from data.cli import flat_dict, opt, parse_into
from data.pairs import DEFAULT_GAP_BUCKETS, PairConfig
from data.scenes import FORMATS, SceneError, list_scenes
from data.scenes.base import open_fs, url_join
from pipeline import stages

DEFAULT_ROOT = "runs"
DEFAULT_SYNTHETIC = os.path.join(DEFAULT_ROOT, "synthetic")
DEFAULT_OUTPUT = os.path.join(DEFAULT_ROOT, "shards")
MANIFEST_VERSION = 1


@dataclass
class ShardArgs:
    """Flags of pipeline/shard.py."""

    input: str = opt("", "corpus root (local path or s3://), one folder per scene; empty: build the "
                         "embedded synthetic corpus under runs/synthetic")
    format: str = opt("synthetic", "corpus layout", choices=sorted(FORMATS))
    output: str = opt(DEFAULT_OUTPUT, "output folder or s3:// prefix for shards, plan.json and manifest.json")
    pairs_per_scene: int = opt(24, "pairs drawn per scene, spread across gap buckets")
    samples_per_shard: int = opt(64, "pairs per tar shard")
    max_side: int = opt(640, "longer side of stored views in pixels (never upscaled)")
    val_fraction: float = opt(0.1, "fraction of scenes held out as the val split (split by scene)")
    seed: int = opt(0, "seed of pair sampling, split and shuffle")
    min_gap: int = opt(1, "smallest frame gap of a pair")
    max_gap: int = opt(40, "largest frame gap of a pair")
    min_overlap: float = opt(0.3, "smallest overlap (fraction of A's valid pixels visible in B)")
    max_overlap: float = opt(0.98, "largest overlap (drops near-duplicates)")
    gap_buckets: tuple[int, ...] = opt(DEFAULT_GAP_BUCKETS, "gap bucket edges in frames (comma-separated)")
    max_corr: int = opt(4096, "most correspondences stored per pair")
    depth_root: str = opt("", "nerfstudio/DL3DV only: folder of per-scene depth maps (see README)")
    overwrite: bool = opt(False, "replace an output written with different arguments")
    max_broken_fraction: float = opt(0.5, "fail (exit 1) when more than this fraction of all frames is broken")
    retries: int = opt(2, "times a failed shard task is retried by the driver")
    num_cpus: int = opt(0, "CPUs of the local in-process Ray (0: all); ignored when joining a cluster")
    synthetic_scenes: int = opt(8, "embedded default only: scenes in the synthetic corpus")
    synthetic_frames: int = opt(60, "embedded default only: frames per synthetic scene")
    mlflow: bool = opt(False, "record the job in MLflow (MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    experiment: str = opt("gasp", "MLflow experiment name")
    quiet: bool = opt(False, "less progress output")

    def __post_init__(self) -> None:
        PairConfig(min_gap=self.min_gap, max_gap=self.max_gap, min_overlap=self.min_overlap,
                   max_overlap=self.max_overlap, gap_buckets=self.gap_buckets,
                   pairs_per_scene=self.pairs_per_scene)  # raises the one-line errors
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1 (got {self.samples_per_shard})")
        if self.max_side < 16:
            raise ValueError(f"--max-side must be >= 16 (got {self.max_side})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if not 0.0 < self.max_broken_fraction <= 1.0:
            raise ValueError(f"--max-broken-fraction must be in (0, 1] (got {self.max_broken_fraction})")

    def job_config(self) -> stages.JobConfig:
        pc = PairConfig(min_gap=self.min_gap, max_gap=self.max_gap, min_overlap=self.min_overlap,
                        max_overlap=self.max_overlap, gap_buckets=self.gap_buckets,
                        pairs_per_scene=self.pairs_per_scene, max_corr=self.max_corr)
        return stages.JobConfig(input=self.input, format=self.format, output=self.output.rstrip("/"), pairs=pc,
                                samples_per_shard=self.samples_per_shard, max_side=self.max_side,
                                val_fraction=self.val_fraction, seed=self.seed,
                                depth_root=self.depth_root or None)


class JobError(Exception):
    """A user-facing failure of the job: printed as one line, exit status 1."""


# ----------------------------------------------------------------------- progress

class Progress:
    """Prints `stage done/total (rate/s, ETA)` at most every `every` seconds."""

    def __init__(self, stage: str, total: int, unit: str, quiet: bool = False, every: float = 2.0):
        self.stage, self.total, self.unit, self.quiet, self.every = stage, total, unit, quiet, every
        self.t0 = self.last = time.time()
        self.done = 0

    def step(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.time()
        if self.quiet or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"[{self.stage}] {self.done}/{self.total} {self.unit} ({rate:.2f}/s, ETA {eta:.0f}s){extra}",
              flush=True)


# ------------------------------------------------------------------------ checks

def check_args(args: ShardArgs) -> None:
    """Everything that can be checked before Ray starts: input, format, output."""
    fs, path = open_fs(args.input)
    try:
        exists = fs.exists(path)
    except Exception as e:
        raise JobError(f"--input {args.input}: cannot be reached ({type(e).__name__}: {e})") from None
    if not exists:
        raise JobError(f"--input {args.input}: no such file or folder")
    if args.format == "nerfstudio" and args.depth_root:
        dfs, dpath = open_fs(args.depth_root)
        if not dfs.exists(dpath):
            raise JobError(f"--depth-root {args.depth_root}: no such folder")
    ofs, opath = open_fs(args.output)
    probe = url_join(args.output, f".write-test-{os.getpid()}")
    try:
        if stages.is_local(ofs):
            os.makedirs(opath, exist_ok=True)
        _, ppath = open_fs(probe)
        with ofs.open(ppath, "wb") as f:
            f.write(b"ok")
        ofs.rm(ppath)
    except Exception as e:
        raise JobError(f"--output {args.output}: not writable ({type(e).__name__}: {e})") from None


def ensure_default_corpus(args: ShardArgs) -> None:
    """The embedded default: a synthetic corpus under runs/synthetic (built once)."""
    from data import synthetic
    from data.scenes.posed import list_posed_scenes

    root = DEFAULT_SYNTHETIC
    have = list_posed_scenes(root) if os.path.isdir(root) else []
    if len(have) >= args.synthetic_scenes:
        args.input = root
        return
    print(f"[synthetic] building {args.synthetic_scenes} scenes x {args.synthetic_frames} frames in {root}",
          flush=True)
    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    for i in range(args.synthetic_scenes):
        name = f"scene_{i:04d}"
        if os.path.exists(os.path.join(root, name, "cameras.json")):
            continue
        synthetic.write_scene(root, name, seed=1000 + i, n_frames=args.synthetic_frames)
        print(f"[synthetic] {i + 1}/{args.synthetic_scenes} scenes ({time.time() - t0:.0f}s)", flush=True)
    args.input = root


# ------------------------------------------------------------------------- ray

def start_ray(num_cpus: int, quiet: bool) -> str:
    """Join RAY_ADDRESS (cluster or `ray job submit`), else start Ray in-process on loopback."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=not quiet)
        return f"cluster {address}"
    # in-process: keep every Ray process on 127.0.0.1
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "_node_ip_address": "127.0.0.1",
                          "logging_level": "ERROR", "log_to_driver": not quiet}
    if num_cpus:
        kw["num_cpus"] = num_cpus
    ray.init(**kw)
    return f"local ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def run_tasks(fn, items: list[Any], cfg: stages.JobConfig, progress: Progress, retries: int,
              label: Any) -> list[dict[str, Any]]:
    """Run `fn(item, cfg)` as Ray tasks; resubmit failed statuses up to `retries` times.

    A task whose worker dies (SIGKILL, OOM) is retried by Ray itself (max_retries);
    a task that returns {"ok": False} with an unexpected error is retried here.
    """
    import ray

    remote = ray.remote(fn).options(max_retries=4, retry_exceptions=True, num_cpus=1)
    cfg_ref = ray.put(cfg)
    pending = {remote.remote(it, cfg_ref): (it, 0) for it in items}
    results: list[dict[str, Any]] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in done:
            it, tries = pending.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as e:  # retries exhausted inside Ray
                res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                       "retryable": True, "name": label(it)}
            if not res.get("ok") and res.get("retryable", "trace" in res) and tries < retries:
                pending[remote.remote(it, cfg_ref)] = (it, tries + 1)
                print(f"[retry] {label(it)}: {res.get('error')}", flush=True)
                continue
            results.append(res)
            progress.step()
    return results


# ------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    args = parse_into(ShardArgs, argv, "pipeline/shard.py", "Corpora -> WebDataset shards of frame pairs (Ray).")
    t_start = time.time()
    try:
        if not args.input:
            if args.format != "synthetic":
                raise JobError("--input is required with --format " + args.format)
            ensure_default_corpus(args)
        check_args(args)
        cfg = args.job_config()
        scenes = list_scenes(cfg.input, cfg.format)
        plan_url = url_join(cfg.output, "plan.json")
        old_plan = stages.read_json(plan_url)
        if old_plan is not None and old_plan.get("content_hash") != cfg.content_hash():
            if not args.overwrite:
                raise JobError(f"{cfg.output} holds shards made with different arguments (plan.json differs); "
                               f"use another --output or pass --overwrite")
            _clear_output(cfg.output)
            old_plan = None
    except (JobError, SceneError) as e:
        print(f"pipeline/shard.py: error: {e}", file=sys.stderr)
        return 2

    where = start_ray(args.num_cpus, args.quiet)
    print(f"[ray] {where}; input {stages._public_url(cfg.input)} ({cfg.format}, {len(scenes)} scenes) -> "
          f"{stages._public_url(cfg.output)}", flush=True)
    import ray

    try:
        # ---- scan + plan (reused on rerun)
        t0 = time.time()
        if old_plan is not None:
            plan = old_plan
            print(f"[plan] reusing {plan_url} ({len(plan['shards'])} shards)", flush=True)
        else:
            prog = Progress("scan", len(scenes), "scenes", args.quiet)
            scans = run_tasks(stages.scan_scene, scenes, cfg, prog, args.retries, label=lambda u: u)
            plan = stages.make_plan(scans, cfg)
            plan["scan"] = {s["scene"]: {k: s.get(k) for k in ("ok", "url", "frames", "usable", "skipped",
                                                               "skipped_frames", "tested", "passed", "yield",
                                                               "error", "metric_depth", "median_depth",
                                                               "by_bucket")}
                            for s in scans}
            stages.write_json(plan_url, plan)
            print(f"[plan] {sum(len(s['pairs']) for s in plan['shards'])} pairs in {len(plan['shards'])} "
                  f"shards ({time.time() - t0:.1f}s)", flush=True)
        t_scan = time.time() - t0

        # ---- write the shards that have no stats.json yet
        t0 = time.time()
        todo = [e for e in plan["shards"] if stages.read_json(_stats_url(cfg, e)) is None]
        if len(todo) < len(plan["shards"]):
            print(f"[write] {len(plan['shards']) - len(todo)} shards already done; writing {len(todo)}",
                  flush=True)
        prog = Progress("write", len(todo), "shards", args.quiet)
        results = run_tasks(stages.write_shard, todo, cfg, prog, args.retries, label=lambda e: e["name"])
        failed = [r for r in results if not r.get("ok")]
        t_write = time.time() - t0

        manifest = build_manifest(plan, cfg, args)
        stages.write_json(url_join(cfg.output, "manifest.json"), manifest)
        print_summary(manifest, t_scan, t_write, time.time() - t_start)
        if args.mlflow:
            record_mlflow(manifest, args, cfg)
        if failed:
            for r in failed:
                print(f"pipeline/shard.py: error: shard {r.get('name')} failed: {r.get('error')}", file=sys.stderr)
            return 1
        frac = manifest["counts"]["frames_broken_fraction"]
        if frac > args.max_broken_fraction:
            print(f"pipeline/shard.py: error: {frac:.0%} of all frames are broken (more than "
                  f"--max-broken-fraction {args.max_broken_fraction:.0%}); see skipped_by_reason in manifest.json",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        ray.shutdown()


def _stats_url(cfg: stages.JobConfig, entry: dict[str, Any]) -> str:
    return url_join(cfg.output, entry["name"][: -len(".tar")] + ".stats.json")


def _clear_output(output: str) -> None:
    fs, path = open_fs(output)
    for p in fs.glob(path.rstrip("/") + "/*"):
        name = p.rsplit("/", 1)[-1]
        if name.endswith((".tar", ".stats.json")) or name in ("plan.json", "manifest.json"):
            fs.rm(p)


def build_manifest(plan: dict[str, Any], cfg: stages.JobConfig, args: ShardArgs) -> dict[str, Any]:
    """Counts, shards (size, sha256), gap buckets, skipped-by-reason, flagged scenes, config."""
    scan = plan.get("scan", {})
    skipped = collections.Counter()
    frames = usable = 0
    flagged: dict[str, str] = {}
    scene_info: dict[str, Any] = {}
    for name, s in sorted(scan.items()):
        frames += s.get("frames") or 0
        usable += s.get("usable") or 0
        skipped.update(s.get("skipped") or {})
        info = {"split": plan["scenes"].get(name), "frames": s.get("frames"), "usable": s.get("usable"),
                "pair_yield": s.get("yield"), "skipped": s.get("skipped"), "metric_depth": s.get("metric_depth")}
        if not s.get("ok"):
            info["error"] = s.get("error")
            flagged[name] = "unreadable: " + str(s.get("error"))
        elif s.get("tested") and (s.get("yield") or 0) < stages.MIN_PAIR_YIELD:
            flagged[name] = f"pair yield collapsed ({s.get('passed')}/{s.get('tested')} candidates pass the overlap filter)"
        scene_info[name] = info
    shards, per_scene = [], collections.defaultdict(lambda: [0, 0.0, 0.0])
    skipped_pairs = collections.Counter()
    for e in plan["shards"]:
        st = stages.read_json(_stats_url(cfg, e))
        if st is None:
            continue
        shards.append({"name": st["name"], "split": st["split"], "samples": st["samples"], "bytes": st["bytes"],
                       "sha256": st["sha256"]})
        skipped_pairs.update(st.get("skipped_pairs") or {})
        for sc, (n, err, err_sh) in st.get("scenes", {}).items():
            acc = per_scene[sc]
            acc[0] += n
            acc[1] += err
            acc[2] += err_sh
    for sc, (n, err, err_sh) in per_scene.items():
        if n == 0:
            continue
        info = scene_info.setdefault(sc, {})
        info["photo_err"] = round(err / n, 3)
        info["photo_err_shuffled"] = round(err_sh / n, 3)
        if err / n > stages.PHOTO_FLAG_RATIO * (err_sh / n):
            flagged.setdefault(sc, f"photometric self-check failed (photo_err {err / n:.1f} vs shuffled "
                                   f"{err_sh / n:.1f}): wrong pose convention?")
    broken = frames - usable
    counts = {"scenes": len(scan), "scenes_readable": sum(1 for s in scan.values() if s.get("ok")),
              "frames": frames, "frames_usable": usable, "frames_broken": broken,
              "frames_broken_fraction": round(broken / frames, 4) if frames else 0.0,
              "pairs": sum(s["samples"] for s in shards),
              "pairs_planned": sum(len(e["pairs"]) for e in plan["shards"]),
              "shards": len(shards), "shards_planned": len(plan["shards"]),
              "bytes": sum(s["bytes"] for s in shards)}
    for split in ("train", "val"):
        counts[f"pairs_{split}"] = sum(s["samples"] for s in shards if s["split"] == split)
    cfg_public = plan["config"].copy()
    cfg_public["input"] = stages._public_url(cfg.input)
    return {"version": MANIFEST_VERSION, "format_version": plan["format_version"],
            "content_hash": plan["content_hash"], "counts": counts, "shards": shards,
            "gap_buckets": list(cfg.pairs.gap_buckets), "skipped_by_reason": dict(skipped),
            "skipped_pairs_by_reason": dict(skipped_pairs), "flagged_scenes": flagged, "scenes": scene_info,
            "config": cfg_public}


def print_summary(m: dict[str, Any], t_scan: float, t_write: float, t_total: float) -> None:
    c = m["counts"]
    rows = [("scenes", f"{c['scenes_readable']}/{c['scenes']} readable"),
            ("frames", f"{c['frames']} ({c['frames_usable']} usable, {c['frames_broken']} skipped)")]
    for reason, n in sorted(m["skipped_by_reason"].items(), key=lambda x: -x[1]):
        rows.append(("  skipped: " + reason, str(n)))
    rows += [("pairs", f"{c['pairs']} (train {c['pairs_train']}, val {c['pairs_val']})"),
             ("shards", f"{c['shards']}/{c['shards_planned']}"),
             ("bytes", f"{c['bytes'] / 1e6:.1f} MB"),
             ("pairs/s (write stage)", f"{c['pairs'] / max(t_write, 1e-9):.2f}" if t_write > 0.5 else "-"),
             ("time", f"scan+plan {t_scan:.1f}s, write {t_write:.1f}s, total {t_total:.1f}s"),
             ("flagged scenes", str(len(m["flagged_scenes"])))]
    for sc, why in sorted(m["flagged_scenes"].items()):
        rows.append(("  " + sc, why))
    w = max(len(r[0]) for r in rows)
    print("\n== shard job summary " + "=" * 40)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("=" * 61, flush=True)


def record_mlflow(manifest: dict[str, Any], args: ShardArgs, cfg: stages.JobConfig) -> None:
    import tempfile

    from data.tracking import MlflowTracker

    tr = MlflowTracker(run_name="shard-job", experiment=args.experiment, tags={"kind": "shard"})
    try:
        params = flat_dict(args)
        params["input"] = stages._public_url(cfg.input)
        params["output"] = stages._public_url(cfg.output)
        tr.log_params(params)
        tr.log_metrics({k: v for k, v in manifest["counts"].items() if isinstance(v, (int, float))})
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "manifest.json")
            with open(p, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            tr.log_artifact(p)
        tr.set_tags({"manifest_sha256": _sha(manifest)})
        print(f"[mlflow] run {tr.run_id} in experiment {args.experiment!r}", flush=True)
    finally:
        tr.end()


def _sha(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
