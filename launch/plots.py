"""PNG plots of the layer-wise metrics (training validation and the probe). matplotlib, Agg."""
from __future__ import annotations

from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, ax, path: str, title: str, xlabel: str, ylabel: str) -> str:
    """The finish every plot here shares: labels, [0, 1] y range, grid, legend, PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pck_by_layer(results: dict[str, dict[str, Any]], path: str, title: str = "PCK@1 by layer") -> str:
    """results: {"raw": MatchMetrics.compute(), "head": ...} (either may be missing) -> PNG at path."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    chance = None
    for name, style in (("raw", "o--"), ("head", "s-")):
        res = results.get(name)
        if not res or not res.get("layers"):
            continue
        layers = [d["layer"] for d in res["layers"]]
        ax.plot(layers, [d["pck1"] for d in res["layers"]], style, label=f"{name} PCK@1")
        ax.plot(layers, [d["pck0"] for d in res["layers"]], style, alpha=0.35, label=f"{name} PCK@0")
        chance = res.get("chance1")
    if chance is not None:
        ax.axhline(chance, color="grey", lw=1, ls=":", label="chance (PCK@1)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return _save(fig, ax, path, title, "language-model layer", "fraction of anchors")


def pck_by_gap(result: dict[str, Any], path: str, layers: list[int] | None = None,
               title: str = "PCK@1 by frame gap") -> str:
    """One line per layer (default: the best and the last): PCK@1 over the gap buckets."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    labels = result["gap_buckets"]["labels"]
    if layers is None:
        layers = sorted({result["best_layer"], len(result["layers"]) - 1} - {None})
    for l in layers:
        ys = result["layers"][l]["pck1_by_gap"]
        ax.plot(range(len(labels)), [y if y is not None else float("nan") for y in ys], "o-", label=f"layer {l}")
    ch = result["gap_buckets"].get("chance1") or []
    if ch:
        ax.plot(range(len(labels)), [c if c is not None else float("nan") for c in ch], ":", color="grey",
                label="chance")
    ax.set_xticks(range(len(labels)), [f"{l}\n(n={n})" for l, n in zip(labels, result["gap_buckets"]["counts"])])
    return _save(fig, ax, path, title, "frame gap bucket", "PCK@1")


def confidence_vs_accuracy(max_prob, correct, path: str, layer: int, n_bins: int = 10) -> str:
    """Reliability diagram of one layer: mean PCK@1 per bin of max softmax probability."""
    import numpy as np

    p = np.asarray(max_prob, dtype=float)
    c = np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, n_bins - 1)
    centers, acc, counts = [], [], []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            centers.append(p[m].mean())
            acc.append(c[m].mean())
            counts.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(4.8, 4.0), dpi=110)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.scatter(centers, acc, s=[10 + 40 * n / max(counts) for n in counts] if counts else 10)
    ax.plot(centers, acc, "-", alpha=0.6)
    ax.set_xlabel("max softmax probability")
    ax.set_ylabel("PCK@1 (fraction correct)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"confidence vs accuracy, layer {layer}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
