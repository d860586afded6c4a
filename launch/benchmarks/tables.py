"""Reading annotation files: parquet, JSON (a list of records) or JSONL, as plain dicts."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from data.cli import one_line
from launch.benchmarks import BenchmarkError

TABLE_EXTS = (".parquet", ".jsonl", ".json")


def _plain(v: Any) -> Any:
    """numpy / pyarrow values -> Python (arrays -> lists, NaN -> None)."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def read_records(path: str, what: str) -> list[dict[str, Any]]:
    """The records of a .parquet, .json or .jsonl file; BenchmarkError (one line) otherwise.

    what: the benchmark name, for messages.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_EXTS:
        raise BenchmarkError(f"{what}: {path}: annotations must be .parquet, .json or .jsonl")
    try:
        if ext == ".parquet":
            import pandas as pd

            df = pd.read_parquet(path)
            return [{k: _plain(v) for k, v in rec.items()} for rec in df.to_dict(orient="records")]
        with open(path, encoding="utf-8") as f:
            if ext == ".jsonl":
                out = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append(json.loads(line))
                        except ValueError as e:
                            raise BenchmarkError(f"{what}: {path} line {n} is not JSON ({e})") from None
                records = out
            else:
                records = json.load(f)
    except BenchmarkError:
        raise
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"{what}: cannot read {path}: {one_line(e)}") from None
    except Exception as e:  # pyarrow errors (not a parquet file, ...)
        raise BenchmarkError(f"{what}: cannot read {path}: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(records, dict):
        for key in ("data", "questions", "test"):
            if isinstance(records.get(key), list):
                records = records[key]
                break
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BenchmarkError(f"{what}: {path} must hold a list of question records (objects)")
    if not records:
        raise BenchmarkError(f"{what}: {path} holds no questions")
    return records


def require_fields(records: list[dict[str, Any]], fields: tuple[str, ...], path: str, what: str,
                   expected: str) -> None:
    """BenchmarkError naming the first record that lacks one of `fields`."""
    for n, r in enumerate(records):
        missing = [k for k in fields if k not in r]
        if missing:
            raise BenchmarkError(f"{what}: {path}: record {n} lacks {', '.join(missing)}; expected {expected}")
