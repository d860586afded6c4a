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


PROJ_X = -1.6
"""Where the projector row (the LM's input at the vision tokens, the probe's `projector`) is drawn: left of layer 0."""


def _layer_axis(ax, n_layers: int, with_projector: bool) -> None:
    """Integer layer ticks; with the projector row, a tick 'proj' at PROJ_X."""
    ticks = [int(t) for t in matplotlib.ticker.MaxNLocator(integer=True).tick_values(0, max(0, n_layers - 1))
             if 0 <= t <= max(0, n_layers - 1)]
    if with_projector:
        ax.set_xticks([PROJ_X] + ticks, ["proj"] + [str(t) for t in ticks])
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _projector(run: dict[str, Any]) -> dict[str, Any] | None:
    """A run's projector row when it has a scored one (probe.json `projector`)."""
    p = run.get("projector")
    return p if p and p.get("pck2patch") is not None else None


def pck_by_layer(results: dict[str, dict[str, Any]], path: str, title: str = "PCK@2patch by layer") -> str:
    """results: {"raw": MatchMetrics.compute(), "head": ..., "projector": the probe's projector row} (any
    may be missing) -> PNG at path: PCK@2patch (solid) and PCK@1 (faint) of each kind by layer, the
    projector row at x = PROJ_X ('proj'), chance and the same-cell baseline."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ref = None
    proj = _projector(results)
    if proj is not None:
        ax.plot([PROJ_X], [proj["pck2patch"]], "D", color="tab:purple", label="projector output PCK@2patch")
        ax.plot([PROJ_X], [_nan(proj["pck1"])], "D", color="tab:purple", alpha=0.35, label="projector output PCK@1")
    for name, style in (("raw", "o--"), ("head", "s-")):
        res = results.get(name)
        if not res or not res.get("layers"):
            continue
        layers = [d["layer"] for d in res["layers"]]
        ax.plot(layers, [_nan(d["pck2patch"]) for d in res["layers"]], style, label=f"{name} PCK@2patch")
        ax.plot(layers, [_nan(d["pck1"]) for d in res["layers"]], style, alpha=0.35, label=f"{name} PCK@1")
        ref = res
    _baselines(ax, ref)
    _layer_axis(ax, len((ref or {}).get("layers") or []), proj is not None)
    return _save(fig, ax, path, title, "language-model layer", "fraction of anchors")


def _nan(x):
    return float("nan") if x is None else x


def _baselines(ax, res: dict[str, Any] | None) -> None:
    if not res:
        return
    if res.get("chance2") is not None:
        ax.axhline(res["chance2"], color="grey", lw=1, ls=":", label="chance (PCK@2patch)")
    same = (res.get("same_cell") or {}).get("pck2patch")
    if same is not None:
        ax.axhline(same, color="tab:red", lw=1, ls="-.", alpha=0.7, label="same-cell baseline")


def _primary(run: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The result a run is drawn by: its heads when it has them, else its raw features."""
    if run.get("head") and run["head"].get("layers"):
        return "head", run["head"]
    return "raw", run.get("raw")


def three_panels(runs: dict[str, dict[str, Any]], path: str, title: str = "", layer: dict[str, int] | None = None,
                 robustness_dt: int | None = None) -> str:
    """The paper's three panels for one run or overlaid for several (DESIGN §6).

    runs: {label: {"head": MatchMetrics.compute() | None, "raw": ..., "projector": the probe's projector
    row (optional)}} (drawn by the heads when a run has them). (a) PCK@2patch by layer as bars, with
    chance and the same-cell baseline; (b) the confidence-accuracy correlation by layer; (c) normalised
    PCK@2patch by frame distance, per dataset, at each run's layer (`layer` {label: l}, default its best
    layer on these data), with a line at `robustness_dt` (default: the metrics' ROBUSTNESS_DT). A run's
    projector row (raw, the LM's input) is drawn at x = PROJ_X ('proj') in (a) and (b), and dashed in (c).
    """
    import numpy as np

    if robustness_dt is None:
        from losses.metrics import ROBUSTNESS_DT as robustness_dt

    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.0), dpi=110)
    n = max(1, len(runs))
    width = 0.8 / n
    ref = None
    any_proj = False
    for r, (label, run) in enumerate(runs.items()):
        kind, res = _primary(run)
        if not res or not res.get("layers"):
            continue
        ref = ref or res
        proj = _projector(run)
        if proj is not None:
            any_proj = True
            axes[0].bar([PROJ_X - 0.4 + width * (r + 0.5)], [proj["pck2patch"]], width, hatch="//", alpha=0.6,
                        color=f"C{r}", label=f"{label} (projector output, raw)")
            axes[1].plot([PROJ_X], [_nan(proj["conf_acc_corr"])], "D", color=f"C{r}",
                         label=f"{label} (projector output, raw)")
            for name, curve in proj["temporal"].items():
                pts = [(d, v) for d, v in zip(curve["dt"], curve["normalised"]) if v is not None]
                if pts:
                    xs, ys = zip(*pts)
                    axes[2].plot(xs, ys, "--", ms=3, color=f"C{r}", alpha=0.7, label=f"{label}, {name} (projector)")
        layers = np.array([d["layer"] for d in res["layers"]])
        axes[0].bar(layers - 0.4 + width * (r + 0.5), [_nan(d["pck2patch"]) for d in res["layers"]], width,
                    label=f"{label} ({kind})", color=f"C{r}")
        axes[1].plot(layers, [_nan(d["conf_acc_corr"]) for d in res["layers"]], "o-", label=f"{label} ({kind})",
                     color=f"C{r}")
        chosen = (layer or {}).get(label, res.get("best_layer"))
        if chosen is None:
            continue
        for name, curve in res["layers"][chosen]["temporal"].items():
            pts = [(d, v) for d, v in zip(curve["dt"], curve["normalised"]) if v is not None]
            if pts:
                xs, ys = zip(*pts)
                axes[2].plot(xs, ys, "o-", ms=3, label=f"{label}, {name} (layer {chosen})")
    _baselines(axes[0], ref)
    axes[0].set_ylim(0, 1)
    axes[0].set(xlabel="language-model layer", ylabel="PCK@2patch", title="(a) PCK@2patch by layer")
    axes[1].axhline(0.0, color="grey", lw=1)
    axes[1].set_ylim(-1, 1)
    axes[1].set(xlabel="language-model layer", ylabel="Pearson r", title="(b) confidence vs correctness")
    axes[2].axhline(1.0, color="grey", lw=1, ls=":")
    axes[2].axvline(robustness_dt, color="grey", lw=1, ls="--")
    axes[2].set_ylim(0, 1.3)
    axes[2].set(xlabel="frame distance dt", ylabel="PCK@2patch(dt) / PCK@2patch(dt min)",
                title="(c) normalised PCK by frame distance")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    n_layers = len((ref or {}).get("layers") or [])
    _layer_axis(axes[0], n_layers, any_proj)
    _layer_axis(axes[1], n_layers, any_proj)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confidence_vs_accuracy(max_prob, correct, path: str, layer: int, n_bins: int = 10) -> str:
    """Reliability diagram of one layer: mean PCK@2patch correctness per bin of max softmax probability."""
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
    ax.set_ylabel("PCK@2patch (fraction correct)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"confidence vs accuracy, layer {layer}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
