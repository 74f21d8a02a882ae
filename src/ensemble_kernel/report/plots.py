"""Figures as matplotlib `Figure` objects (no pyplot: no global backend state)."""

from __future__ import annotations

import textwrap

from matplotlib.figure import Figure

from ..analysis._sweep import SweepResult

__all__ = ["plot_sweep", "plot_threshold"]

_LABELS = {"single": "single model", "ensemble": "ensemble average", "weighted": "weighted vote"}


def plot_sweep(result: SweepResult, title: str = "") -> Figure:
    """Accuracy (%) against the number of runs, log-scale x, mean and min-max band."""
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    metrics = list(dict.fromkeys(row.metric for row in result.rows))
    for metric in metrics:
        rows = sorted((r for r in result.rows if r.metric == metric), key=lambda r: r.n_models)
        xs = [r.n_models for r in rows]
        label = _LABELS.get(metric, metric.replace("knn_k", "kernel k-NN, k="))
        style = {"single": ":", "ensemble": "--"}.get(metric, "-")
        line, = ax.plot(xs, [100 * r.mean for r in rows], style, marker="o", ms=3, label=label)
        ax.fill_between(xs, [100 * r.min for r in rows], [100 * r.max for r in rows],
                        color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    counts = sorted({r.n_models for r in result.rows})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set_xlabel("number of runs")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_threshold(top1_values, threshold: float, method: str) -> Figure:
    """Histogram of every test example's top-1 kernel value, the threshold marked."""
    fig = Figure(figsize=(7, 3.6), dpi=120)
    ax = fig.add_subplot()
    values = [float(v) for v in top1_values]
    ax.hist(values, bins=80, color="#4c72b0", alpha=0.85)
    ax.axvline(threshold, color="#c44e52", linestyle="--",
               label=f"threshold {threshold:.4f}: {sum(v >= threshold for v in values)} pairs")
    ax.set_yscale("log")
    ax.set_xlabel("kernel value of the most similar training example")
    ax.set_ylabel("test examples")
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(method, 110), fontsize=7)
    fig.tight_layout()
    return fig
