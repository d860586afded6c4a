"""The probe's reporting half: layer choice, summaries, the three-panel figure, MLflow, the table.

`launch/probe_lib.py` scores clips and calls these on the metrics of `losses/metrics.py`
(`MatchMetrics.compute()`, which already carries every null and its reason).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from data.tracking import mlflow_key
from losses.metrics import NO_ANCHORS, ROBUSTNESS_DT, flatten_metrics, temporal_series, unscored_layer

SCHEMA = "gasp-probe/2"
SVD_NOTE = ("untrained heads: the SVD initialisation of each layer's query projection (no --heads); "
            "head columns are a baseline, not a trained result")


class ReportError(Exception):
    """A --compare or --layer-from file that cannot be used; one line."""


# ----------------------------------------------------------------------- layers

def read_probe(path: str, flag: str) -> dict[str, Any]:
    """A probe.json written by this probe (schema gasp-probe/2); ReportError (one line) otherwise."""
    if os.path.isdir(path):
        path = os.path.join(path, "probe.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"{flag} {path}: not a readable probe.json ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ReportError(f"{flag} {path}: schema {doc.get('schema') if isinstance(doc, dict) else None!r} is not "
                          f"{SCHEMA} (rerun that probe with this release)")
    return doc


def choose_layers(result: dict[str, Any], layer_from: dict[str, Any] | None, path: str | None) -> dict[str, Any]:
    """The reported layer of each kind: the best layer of another split's probe (`--layer-from`), else
    this split's own best (labelled so: a best layer picked on the reported split flatters it)."""
    out = {}
    for kind in ("raw", "head"):
        res = result.get(kind)
        if res is None:
            out[kind] = None
            continue
        if layer_from is not None and (layer_from.get("selected") or {}).get(kind):
            other = layer_from["selected"][kind]
            layer = other.get("best_layer_here", other.get("layer"))
            out[kind] = {"layer": layer, "chosen_on": f"{path} ({layer_from.get('shards', {}).get('split')} split)"}
        else:
            out[kind] = {"layer": res["best_layer"], "chosen_on": "this split"}
        out[kind]["best_layer_here"] = res["best_layer"]
    return out


def summary(res: dict[str, Any] | None, layer: int | None) -> dict[str, Any] | None:
    """The numbers of one layer for the top of the JSON and the table."""
    if res is None:
        return None
    if layer is None or not res["layers"] or layer >= len(res["layers"]):
        return {"layer": None, **unscored_layer()}
    d = res["layers"][layer]
    la = res.get("lookalike")
    return {"layer": layer, "pck0": d["pck0"], "pck1": d["pck1"], "pck2patch": d["pck2patch"],
            "lookalike": None if not la else {"n_anchors": la["n_anchors"], "of_anchors": la["of_anchors"],
                                              "pck2patch": la["pck2patch"][layer], "chance2": la["chance2"],
                                              "same_cell_pck2patch": la["same_cell_pck2patch"]},
            "conf_acc_corr": d["conf_acc_corr"], "conf_acc_corr_null_reason": d["conf_acc_corr_null_reason"],
            "temporal": {name: {"robustness": c["robustness"], "robustness_dt": c["robustness_dt"],
                                "robustness_null_reason": c["robustness_null_reason"],
                                "dt": c["dt"], "normalised": c["normalised"], "n": c["n"]}
                         for name, c in d["temporal"].items()}}


# ------------------------------------------------------------------------ plots

def make_plots(result: dict[str, Any], head_raw: dict[str, Any] | None, raw_raw: dict[str, Any] | None,
               compare: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """The three panels (this run, overlaid with every --compare run), PCK by layer (raw and head),
    and the reliability diagram of the reported head (else raw) layer."""
    from launch import plots

    paths: dict[str, str] = {}
    if not result["raw"]["n_anchors"]:
        return paths
    kind = result["heads"]["kind"]
    label = {"trained": "trained heads", "svd_init": "heads: untrained SVD init", "none": "raw only"}[kind]
    runs = {result["name"]: {"head": result["head"], "raw": result["raw"], "projector": result.get("projector")}}
    layers = {result["name"]: (result["selected"]["head"] or result["selected"]["raw"])["layer"]}
    for other in compare:
        runs[other["name"]] = {"head": other.get("head"), "raw": other.get("raw"), "projector": other.get("projector")}
        sel = other.get("selected") or {}
        layers[other["name"]] = ((sel.get("head") or sel.get("raw")) or {}).get("layer")
    paths["three_panels"] = plots.three_panels(runs, os.path.join(out_dir, "three_panels.png"), layer=layers,
                                               title=f"GASP diagnostic: {', '.join(runs)}")
    curves = {"raw": result["raw"]} if result["head"] is None else {"raw": result["raw"], "head": result["head"]}
    if result.get("projector"):
        curves["projector"] = result["projector"]
    paths["pck_by_layer"] = plots.pck_by_layer(curves, os.path.join(out_dir, "pck_by_layer.png"),
                                               title=f"PCK by layer: {result['name']} ({label})")
    primary, stats = ("head", head_raw) if result["head"] is not None else ("raw", raw_raw)
    layer = (result["selected"][primary] or {}).get("layer")
    if stats is not None and layer is not None and layer < stats["max_prob"].shape[0]:
        paths["conf_vs_acc"] = plots.confidence_vs_accuracy(stats["max_prob"][layer].numpy(),
                                                            stats["near2"][layer].numpy(),
                                                            os.path.join(out_dir, "conf_vs_acc.png"), layer=layer)
    return paths


# ------------------------------------------------------------------------ MLflow

def track(tracker, result: dict[str, Any], paths: dict[str, str], json_path: str, table: str) -> None:
    """Params (flags, model and heads provenance), per-layer metrics and series, the temporal curves as
    series over the frame distance, the plots, probe.json and the table."""
    params = dict(result["config"])
    params.update({"model.source": result["model"]["source"], "model.family": result["model"]["family"],
                   "model.num_layers": result["model"]["num_layers"],
                   "model.hidden_size": result["model"]["hidden_size"], "model.device": result["model"]["device"],
                   "model.dtype": result["model"]["dtype"], "heads.kind": result["heads"]["kind"],
                   "heads.head": result["heads"]["head"] or "", "heads.file": result["heads"]["file"] or "",
                   "heads.sha256": result["heads"]["sha256"] or "",
                   "heads.meta": json.dumps(result["heads"]["meta"], sort_keys=True) if result["heads"]["meta"] else "",
                   "tau.raw": result["tau"]["raw"], "tau.head": result["tau"]["head"]})
    tracker.log_params(params)
    tags = {f"manifest_sha256_{i}": s["manifest_sha256"] for i, s in enumerate(result["shards"]["sources"])
            if s["manifest_sha256"]}
    if tags:
        tracker.set_tags(tags)
    metrics = {"probe/clips": float(result["data"]["clips"]), "probe/pairs": float(result["data"]["pairs"]),
               "probe/anchors": float(result["data"]["anchors"])}
    if result["timing"]["clips_per_s"] is not None:
        metrics["probe/clips_per_s"] = float(result["timing"]["clips_per_s"])
    lm = result.get("lm_retention")
    if lm and lm["tokens"]:
        metrics.update({"probe/lm/loss": float(lm["loss"]), "probe/lm/accuracy": float(lm["accuracy"]),
                        "probe/lm/tokens": float(lm["tokens"])})
    proj = result.get("projector")
    if proj is not None:
        metrics["probe/projector/n_anchors"] = float(proj["n_anchors"])
        for key in ("pck0", "pck1", "pck2patch", "conf_acc_corr"):
            if proj[key] is not None and math.isfinite(proj[key]):
                metrics[f"probe/projector/{key}"] = float(proj[key])
        for name, t in proj["temporal"].items():
            if t["robustness"] is not None:
                metrics[f"probe/projector/temporal_robustness/{mlflow_key(name)}"] = float(t["robustness"])
    for name in ("raw", "head"):
        if result[name] is not None:
            metrics.update(flatten_metrics(result[name], f"probe/{name}"))
            sel = (result["selected"][name] or {}).get("layer")
            if sel is not None:
                metrics[f"probe/{name}/selected_layer"] = float(sel)
    tracker.log_metrics(metrics, step=0)
    # the per-layer values as series over the layer index (MLflow then draws PCK against depth) and the
    # temporal curves of the reported layer as series over the frame distance
    for name in ("raw", "head"):
        res = result[name]
        if res is None:
            continue
        for d in res["layers"]:
            series = {f"probe/{name}/{k}_by_layer": d[k] for k in ("pck0", "pck1", "pck2patch", "conf_acc_corr")
                      if d[k] is not None and math.isfinite(d[k])}
            tracker.log_metrics(series, step=d["layer"])
        for key, pts in temporal_series(res, f"probe/{name}", (result["selected"][name] or {}).get("layer")).items():
            for dt, v in pts:
                tracker.log_metrics({key: v}, step=dt)
    for p in paths.values():
        tracker.log_artifact(p, "plots")
    tracker.log_artifact(json_path)
    tracker.log_text(table + "\n", "probe_table.txt")


# ------------------------------------------------------------------------ the table

def _f(x: float | None, w: int = 0) -> str:
    s = "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"
    return s.rjust(w) if w else s


def _fs(x: float | None, w: int = 0) -> str:
    s = "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.3f}"
    return s.rjust(w) if w else s


def format_table(result: dict[str, Any]) -> str:
    """The terminal report: one row per layer, then chance and the same-cell baseline, the reported
    layers (and where they were chosen), temporal robustness per dataset and the curve."""
    raw, head = result["raw"], result["head"]
    m, h, sh = result["model"], result["heads"], result["shards"]
    lines = []
    src = f"preset {m['source']}" if m["kind"] == "preset" else m["source"]
    lines.append(f"GASP probe {result['name']}: {src} ({m['family']}, L={m['num_layers']}, D={m['hidden_size']}, "
                 f"{m['dtype']} on {m['device']})")
    if h["kind"] == "trained":
        meta = h["meta"] or {}
        extra = ", ".join(f"{k} {meta[k]}" for k in ("model", "step") if meta.get(k) is not None)
        lines.append(f"heads: {h['file']} ({h['head']}, d={h['head_dim']}{', ' + extra if extra else ''})")
    elif h["kind"] == "svd_init":
        lines.append(f"heads: UNTRAINED ({h['head']}), {SVD_NOTE.split(': ', 1)[1]}")
    else:
        lines.append("heads: none (--no-head): raw features only")
    d = result["data"]
    lines.append(f"shards ({sh['split']}): {', '.join(s['spec'] for s in sh['sources'])}: {d['clips']} clips, "
                 f"{d['pairs']} pairs, {d['anchors']} anchors" + (f" (--max-clips {d['max_clips']})"
                                                                  if d["max_clips"] else ""))
    lm = result.get("lm_retention")
    if lm:
        lines.append(f"LM retention ({lm['split']}): {', '.join(lm['sources'])}: loss {_f(lm['loss'])}, next-token "
                     f"accuracy {_f(lm['accuracy'])} over {lm['tokens']} answer tokens of {lm['samples']} conversations")
    lines.append("")
    cols = ["layer", "raw PCK@0", "raw PCK@1", "raw PCK@2p", "raw corr"]
    if head is not None:
        cols += ["head PCK@0", "head PCK@1", "head PCK@2p", "head corr"]
    widths = [max(len(c), 6) for c in cols]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    sel = {n: (result["selected"][n] or {}).get("layer") for n in ("raw", "head")}
    proj = result.get("projector")
    if proj is not None:
        cells = ["proj", _f(proj["pck0"]), _f(proj["pck1"]), _f(proj["pck2patch"]), _fs(proj["conf_acc_corr"])]
        if head is not None:
            cells += ["-"] * 4  # no head reads the LM's input
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    for l, r in enumerate(raw["layers"]):
        cells = [f"{l:d}", _f(r["pck0"]), _f(r["pck1"]), _f(r["pck2patch"]), _fs(r["conf_acc_corr"])]
        if head is not None:
            hh = head["layers"][l]
            cells += [_f(hh["pck0"]), _f(hh["pck1"]), _f(hh["pck2patch"]), _fs(hh["conf_acc_corr"])]
        row = "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        marks = [n for n in ("raw", "head") if sel[n] == l]
        lines.append(row + (f"   <- reported {' & '.join(marks)}" if marks else ""))
    if not raw["layers"]:
        lines.append(f"({NO_ANCHORS})")
    if proj is not None:
        lines.append("proj: the LM's input at the vision tokens (the projector's output, before layer 0's norm); "
                     "raw only, no head")
    lines.append("")
    c = result["chance"]
    lines.append(f"chance:  PCK@0 {_f(c['pck0'])}   PCK@1 {_f(c['pck1'])}   PCK@2patch {_f(c['pck2patch'])}")
    sc = result["baselines"]["same_cell"]
    lines.append(f"same-cell baseline (the anchor's own position, no motion):  PCK@0 {_f(sc['pck0'])}   "
                 f"PCK@1 {_f(sc['pck1'])}   PCK@2patch {_f(sc['pck2patch'])}")
    for n in ("head", "raw"):
        b = result["best"][n]
        if b is None:
            continue
        chosen = (result["selected"][n] or {}).get("chosen_on")
        corr = _fs(b["conf_acc_corr"]) + (f" ({b['conf_acc_corr_null_reason']})" if b["conf_acc_corr"] is None
                                          else "")
        lines.append(f"reported layer ({n}): {b['layer'] if b['layer'] is not None else 'n/a'} (chosen on "
                     f"{chosen})   PCK@2patch {_f(b['pck2patch'])}   PCK@1 {_f(b['pck1'])}   corr {corr}")
    for n in ("head", "raw"):
        b = result["best"][n]
        la = (b or {}).get("lookalike")
        if la:
            head_line = (f"look-alike subset ({n}, layer {b['layer']}; anchors whose B shows a look-alike of their "
                         f"object at another depth): ")
            lines.append(head_line + (f"{la['n_anchors']} of {la['of_anchors']} anchors with object ids   PCK@2patch "
                                      f"{_f(la['pck2patch'])}   chance {_f(la['chance2'])}   same-cell "
                                      f"{_f(la['same_cell_pck2patch'])}" if la["n_anchors"] else
                                      f"none among the {la['of_anchors']} anchors with object ids"))
    for n in ("head", "raw"):
        b = result["best"][n]
        if b is None:
            continue
        for ds, t in b["temporal"].items():
            tr = t["robustness"]
            at = f"dt {t['robustness_dt']}" if t["robustness_dt"] is not None else f"dt {ROBUSTNESS_DT}"
            why = "" if tr is not None else f" ({t['robustness_null_reason']})"
            lines.append(f"temporal robustness ({n}, {ds}; PCK@2patch at {at} / at the smallest dt): "
                         f"{'null' if tr is None else f'{tr:.3f}'}{why}")
    primary = "head" if head is not None else "raw"
    b = result["best"][primary]
    if b and b["layer"] is not None:
        for ds, t in b["temporal"].items():
            pts = [f"{dt}: {_f(v)}" for dt, v in zip(t["dt"], t["normalised"])]
            shown = pts if len(pts) <= 16 else pts[:8] + ["..."] + pts[-7:]
            lines.append(f"normalised PCK@2patch by dt ({primary}, layer {b['layer']}, {ds}): " + "  ".join(shown))
    return "\n".join(lines)
