"""Two models side by side: the paper-style table of `evaluate.py --compare A B`.

Each side is what evaluate.py wrote: a results file (results.json, results-<version>.json),
an output folder holding one, a folder of such output folders (one per benchmark), or
several of these joined by commas. Rows: the paper's three headline sub-scores first
(All-Angles camera pose, VSI-Bench object counting, BLINK multi-view: the GASP paper's
+18.2, +29.0, +15.0 against its SFT baseline), then every score of every benchmark
either side has, with B - A. Values are the results' fractions; the table prints points
(x100) as papers do. Two sides scored under different reference versions of a benchmark
are refused unless the caller allows it (`--allow-mixed-references`): a version change
alone moves scores (docs/evaluate.md).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

from launch.benchmarks import BENCHMARKS, get
from launch.benchmarks.references import DEFAULTS

ORDER = ("all-angles", "vsi-bench", "blink-multiview")
"""Benchmarks in the order of the paper's headline claims."""


class CompareError(Exception):
    """A results file that cannot be compared; one line."""


def _read(path: str, side: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"--compare {side}: cannot read {path} ({e})") from None
    if not isinstance(res, dict):
        raise CompareError(f"--compare {side}: {path} is not an evaluate.py results file (not a JSON object)")
    for key, kind in (("benchmark", str), ("model", str), ("scores", dict)):
        if not isinstance(res.get(key), kind):
            raise CompareError(f"--compare {side}: {path} is not an evaluate.py results file (field {key!r} "
                               f"missing or not a {kind.__name__})")
    if res["benchmark"] not in BENCHMARKS:
        raise CompareError(f"--compare {side}: {path}: unknown benchmark {res['benchmark']!r} (field 'benchmark')")
    for k, v in res["scores"].items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise CompareError(f"--compare {side}: {path}: scores.{k} is not a number ({v!r})")
    return res


def _files(spec: str, side: str) -> list[str]:
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "results*.json")))
        return found or sorted(glob.glob(os.path.join(spec, "*", "results*.json")))
    raise CompareError(f"--compare {side}: {spec}: no such file or folder (give a results.json, an evaluate.py "
                       "output folder, or a folder of them)")


def load_side(spec: str, side: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """{benchmark: (path, results)} of one side; CompareError when a benchmark occurs twice or nothing is found."""
    parts = [spec] if os.path.exists(spec) else [p for p in spec.split(",") if p]
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for part in parts:
        files = _files(part, side)
        if not files:
            raise CompareError(f"--compare {side}: no results*.json in {part} or its subfolders")
        for path in files:
            res = _read(path, side)
            b = res["benchmark"]
            if b in out:
                raise CompareError(f"--compare {side}: two results of {b} ({out[b][0]}, {path}); name the file to use")
            out[b] = (path, res)
    return out


def reference_of(res: dict[str, Any]) -> str:
    """The reference version a results file was scored under (files from before versions were named: the
    benchmark's default, what the tool computed then)."""
    return res.get("reference_version") or DEFAULTS[res["benchmark"]]


def _subscores(res: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in res["scores"].items()}
    if res.get("macro_category_mean") is not None:
        out["macro_category_mean"] = float(res["macro_category_mean"])
    pairs = res.get("pairs")
    if isinstance(pairs, dict) and pairs.get("n_pairs") and pairs.get("pair_consistency") is not None:
        out["pair_consistency"] = float(pairs["pair_consistency"])
    return out


def _count(res: dict[str, Any], key: str) -> int | None:
    counts = res.get("counts") or {}
    if key in counts:
        return counts[key]
    for suffix in ("_accuracy", "_MRA:.5:.95:.05"):
        if key.endswith(suffix) and key[: -len(suffix)] in counts:
            return counts[key[: -len(suffix)]]
    return res.get("n_answered")


def compare(a: dict[str, tuple[str, dict]], b: dict[str, tuple[str, dict]], *,
            allow_mixed_references: bool = False) -> dict[str, Any]:
    """The comparison as data: {"a", "b", "benchmarks", "rows", "notes"}; rows carry fractions and b - a."""
    benches = [x for x in ORDER if x in a or x in b]
    notes: list[str] = []
    refs = {}
    for bench in benches:
        ra = reference_of(a[bench][1]) if bench in a else None
        rb = reference_of(b[bench][1]) if bench in b else None
        refs[bench] = {"a": ra, "b": rb}
        if ra and rb and ra != rb:
            if not allow_mixed_references:
                raise CompareError(f"--compare: {bench} of A was scored under {ra}, of B under {rb}; rescore one "
                                   f"(rerun its evaluate.py command with --reference {ra} or {rb}: the saved "
                                   "predictions are reused) or pass --allow-mixed-references")
            notes.append(f"{bench}: A scored under {ra}, B under {rb} (--allow-mixed-references)")
        for side, got in (("A", a), ("B", b)):
            if bench in got and not got[bench][1].get("complete", True):
                notes.append(f"{bench}: {side} is incomplete ({got[bench][1].get('incomplete_reason') or 'partial'})")
        if bench in a and bench in b:
            sa, sb = (a[bench][1].get("annotations_sha256"), b[bench][1].get("annotations_sha256"))
            na, nb = a[bench][1].get("n_questions"), b[bench][1].get("n_questions")
            if (sa and sb and sa != sb) or (na is not None and nb is not None and na != nb):
                notes.append(f"{bench}: A and B answered different question sets ({na} vs {nb} questions"
                             f"{', other annotation files' if sa and sb and sa != sb else ''})")
    rows = []

    def row(bench: str, key: str, headline: bool) -> dict[str, Any]:
        va = _subscores(a[bench][1]).get(key) if bench in a else None
        vb = _subscores(b[bench][1]).get(key) if bench in b else None
        mod = get(bench)
        return {"benchmark": bench, "label": mod.LABEL, "score": key, "headline": headline,
                "a": va, "b": vb, "diff": (vb - va) if va is not None and vb is not None else None,
                "n_a": _count(a[bench][1], key) if bench in a else None,
                "n_b": _count(b[bench][1], key) if bench in b else None}

    for bench in benches:
        rows.append(row(bench, get(bench).HEADLINE, True))
    for bench in benches:
        keys = list(_subscores(a[bench][1])) if bench in a else []
        keys += [k for k in (_subscores(b[bench][1]) if bench in b else {}) if k not in keys]
        rows += [row(bench, k, False) for k in keys]
    side = lambda got: {"models": sorted({r["model"] for _, r in got.values()}),  # noqa: E731
                        "files": {bench: p for bench, (p, _) in got.items()}}
    return {"a": side(a), "b": side(b), "benchmarks": benches, "references": refs, "rows": rows, "notes": notes}


def _pts(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def render(cmp: dict[str, Any]) -> str:
    """The terminal table (points, x100)."""
    ma, mb = ", ".join(cmp["a"]["models"]), ", ".join(cmp["b"]["models"])
    rows = cmp["rows"]
    lw = max([len(r["label"]) for r in rows] + [9])
    sw = max([len(r["score"]) for r in rows] + [9])
    cw = max(len(ma), len(mb), 6)
    head = f"{'benchmark':<{lw}}  {'sub-score':<{sw}}  {'A':>{cw}}  {'B':>{cw}}  {'B - A':>7}"
    lines = [f"A = {ma}    B = {mb}    (points, x100)", head, "-" * len(head)]
    last_headline = True
    for r in rows:
        if last_headline and not r["headline"]:
            lines.append("-" * len(head))
        last_headline = r["headline"]
        lines.append(f"{r['label']:<{lw}}  {r['score']:<{sw}}  {_pts(r['a']):>{cw}}  {_pts(r['b']):>{cw}}  "
                     f"{_pts(r['diff'], sign=True):>7}")
    refs = "; ".join(f"{b}: {v['a'] or '-'} / {v['b'] or '-'}" for b, v in cmp["references"].items())
    lines.append(f"reference versions (A / B): {refs}")
    lines += [f"note: {n}" for n in cmp["notes"]]
    return "\n".join(lines)


def metrics(cmp: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: A/<benchmark>/<score>, B/..., diff/... (fractions, as results.json)."""
    out = {}
    for r in cmp["rows"]:
        for k in ("a", "b", "diff"):
            if r[k] is not None:
                out[f"{'diff' if k == 'diff' else k.upper()}/{r['benchmark']}/{r['score']}"] = float(r[k])
    return out
