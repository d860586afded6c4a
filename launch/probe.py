"""Layer-wise correspondence probe of any supported VLM (DESIGN §6, §7).

    python launch/probe.py [--preset NAME | --model PATH] [--heads PATH | --no-head] --shards URL [...]

Thin entry point: parse the flags (`ProbeArgs`), run `launch.probe_lib.run_probe`
(checks -> model -> every clip once -> probe.json, PNG plots, MLflow run), print the
table (`launch.probe_report`). A problem the user can fix (flags, an unsupported checkpoint, heads of another
shape, missing shards) ends in ONE line on stderr and exit status 2, before the model
is built wherever it can be checked earlier. See docs/probe.md.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python launch/probe.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging

from data.cli import parse_into
from launch.probe_lib import ProbeArgs, ProbeError

PROG = "launch/probe.py"
DESCRIPTION = ("Layer-wise correspondence probe (PCK@0/@1/@2patch raw and through the heads, chance and the "
               "same-cell baseline, confidence-accuracy correlation, the per-dataset temporal curve and temporal "
               "robustness, the paper's three panels) of a VLM on held-out clips.")
EPILOG = ("Without --heads the heads are the untrained SVD initialisation (a baseline; the output says so); "
          "--no-head scores the raw features only. Outputs: the table on stdout, OUTPUT/probe.json, "
          "OUTPUT/*.png, and an MLflow run (--no-mlflow to skip).")


def main(argv: list[str] | None = None) -> int:
    args = parse_into(ProbeArgs, argv, PROG, DESCRIPTION, EPILOG)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from launch.probe_lib import run_probe
    from launch.probe_report import format_table

    try:
        result = run_probe(args)
    except ProbeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(format_table(result), flush=True)
    where = result["output"]
    print(f"\nwrote {os.path.join(where, 'probe.json')} and {len(result['plots'])} plot(s) in {where}"
          + (f"; MLflow run {result['mlflow']['run_id']} (experiment {result['mlflow']['experiment']})"
             if result["mlflow"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
