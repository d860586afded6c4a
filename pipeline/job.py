"""What the two shard jobs share around their stages: `pipeline/shard.py` (scenes -> clips) and
`pipeline/instruct.py` (LLaVA instruction data, `--format llava-json`).

The one-line error, the Ray session (start or join, say where, shut down what this job
started), the write stage's bookkeeping (shards already done, part files of killed attempts),
the MLflow record and the failures that make the exit status 1. Nothing here imports Ray or
mlflow at module level.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

from data.storage import open_fs, public_url
from pipeline import stages

PROG = "pipeline/shard.py"


def err(msg: str) -> None:
    """`pipeline/shard.py: error: ...`, one line, on stderr."""
    print(f"{PROG}: error: {stages.one_line(msg, 400)}", file=sys.stderr, flush=True)


def unreachable(flag: str, url: str, folder: bool = False) -> str | None:
    """Why `flag`'s `url` cannot be read (one line: cannot be reached, no such ...), or None when it exists
    (and, with `folder`, is a folder)."""
    try:
        fs, path = open_fs(url)
        ok = fs.isdir(path) if folder else fs.exists(path)
    except Exception as e:
        return f"{flag} {public_url(url)}: cannot be reached ({type(e).__name__}: {e})"
    return None if ok else f"{flag} {public_url(url)}: no such {'folder' if folder else 'file or folder'}"


def run_in_ray(args: Any, job: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """Start or join Ray (`ray_tasks.start_ray`, args.num_cpus / args.quiet), say where, return `job()`.

    A user-facing error of `errors` raised inside is one line and exit status 1; a Ray this call
    started is shut down whatever happens.
    """
    from pipeline import ray_tasks

    where, started = ray_tasks.start_ray(args.num_cpus, args.quiet)
    try:
        print(f"[ray] {where}", flush=True)
        return job()
    except errors as e:
        err(str(e))
        return 1
    finally:
        if started:
            import ray

            ray.shutdown()


def warn_if_local_output(output: str) -> None:
    """On a cluster of several nodes a local --output must be a shared file system: say so."""
    import ray

    if len(ray.nodes()) > 1 and stages.is_local(open_fs(output)[0]):
        print(f"[warning] {len(ray.nodes())} Ray nodes write to the local path {output}: it must be a "
              f"shared file system (else use s3://)", flush=True)


def shards_to_write(cfg: Any, plan: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], str, bool]:
    """(done {name: stats}, todo [plan entries], part folder, whether it is local) of the write stage.

    Says how many shards a rerun finds done, and removes the part files killed attempts left
    locally (no task of this job runs yet). `cfg` needs `.output` (stages.done_shards)."""
    done = stages.done_shards(cfg, plan)
    todo = [e for e in plan["shards"] if e["name"] not in done]
    if done:
        print(f"[write] {len(done)} of {len(plan['shards'])} shards already done; writing {len(todo)}", flush=True)
    folder, local = stages.part_dir(cfg.output)
    if local:
        stages.sweep_parts(folder, [e["name"] for e in todo])
    return done, todo, folder, local


def record_and_report(record: Callable[[], None] | None, failed: list[dict[str, Any]], retries: int) -> int:
    """Run `record()` (the MLflow record, None without --mlflow) and name the failed shards (the first 5):
    1 when either went wrong, else 0. The shards written are fine either way."""
    code = 0
    if record is not None:
        try:
            record()
        except Exception as e:  # the shards are fine; say what went wrong with the record
            err(f"--mlflow: could not record the job ({type(e).__name__}: {e})")
            code = 1
    for r in failed[:5]:
        err(f"shard {r.get('name')} failed after {retries} retries: {r.get('error')}")
        code = 1
    if len(failed) > 5:
        err(f"{len(failed) - 5} more shards failed (failed_shards in manifest.json); rerun to retry them")
    return code


def record_mlflow(manifest: dict[str, Any], args: Any, times: dict[str, float], *, run_name: str,
                  tags: dict[str, Any], params: dict[str, Any], metrics: dict[str, float], output: str,
                  end_tags: dict[str, Any] | None = None) -> None:
    """One MLflow run of a job: `params` (credentials scrubbed by the tracker) with the manifest's
    content_hash; its numeric counts, skipped media/frames by reason, `metrics` and the stage timings
    as metrics; manifest.json as an artifact; tags output (no credentials), complete, `end_tags`."""
    from data.tracking import MlflowTracker, mlflow_key

    tr = MlflowTracker(run_name=run_name, experiment=args.experiment, tags=tags)
    try:
        tr.log_params({**params, "content_hash": manifest["content_hash"]})
        values = {k: v for k, v in manifest["counts"].items() if isinstance(v, (int, float))}
        values.update({f"skipped.{k}": v for k, v in manifest["skipped_by_reason"].items()})
        values.update(metrics)
        values.update({f"seconds.{k}": round(v, 3) for k, v in times.items()})
        tr.log_metrics({mlflow_key(k): v for k, v in values.items()})
        tr.log_text(json.dumps(manifest, indent=1, sort_keys=True), "manifest.json")
        tr.set_tags({"output": public_url(output), "complete": manifest["complete"], **(end_tags or {})})
        print(f"[mlflow] run {tr.run_id} in experiment {args.experiment!r}", flush=True)
    finally:
        tr.end()
