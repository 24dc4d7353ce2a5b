"""PNG plots of training curves and evaluation summaries (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], panels: dict[str, list[str]], out: Path, title: str) -> Path | None:
    """One panel per entry of `panels` (title -> log keys), x = training step.

    Keys missing from the history are skipped; returns None when nothing was logged.
    """
    series = {}
    for panel, keys in panels.items():
        lines = {}
        for key in keys:
            points = [(row["step"], row[key]) for row in history if key in row and _finite(row[key])]
            if points:
                lines[key] = points
        if lines:
            series[panel] = lines
    if not series:
        return None
    cols = min(2, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, series.items()):
        for key, points in lines.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=key)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_eval_summary(results: dict[str, dict], metrics: list[str], out: Path, title: str) -> Path:
    """Bar charts, one per metric, one bar per checkpoint (base, sft, ppo)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    names = list(results)
    for ax, metric in zip(axes.flat, metrics):
        values = [results[n].get(metric) for n in names]
        bars = ax.bar(
            names, [v if _finite(v) else 0.0 for v in values], color=["#888", "#4a7", "#c63", "#47c"][: len(names)]
        )
        ax.bar_label(bars, labels=[f"{v:.3g}" if _finite(v) else "n/a" for v in values], fontsize="small")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(metric, fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_length_histogram(lengths: dict[str, list[int]], out: Path, title: str) -> Path:
    """Overlaid response-length histograms per checkpoint: length inflation is visible here."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = range(0, top + 2, max(1, (top + 1) // 20))
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
