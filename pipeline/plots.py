"""PNG figures written beside the JSON: confusion matrix, training curves, head comparison, accuracy vs shots.

matplotlib is imported inside each function (with the non-interactive Agg backend), so importing this module
costs nothing and no display is ever needed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fileio import atomic_write

MAX_ANNOTATED_CLASSES = 20  # above this the cells are too small for numbers


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # class names are text: a folder named "$x$" is not TeX
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=120))
    finally:
        _pyplot().close(fig)
    return path


def confusion_png(cm: list[list[int]], classes: list[str], path: Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix (each row: where that true class went), class names on both axes."""
    plt = _pyplot()
    counts = np.asarray(cm, dtype=float)
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    size = min(14.0, max(4.5, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), classes, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    return _save(fig, path)


def curves_png(history: list[dict[str, float]], path: Path, *, title: str = "") -> Path:
    """Train and val loss (left) and accuracy (right) per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-"), ("val", "--")):
            key = f"{split}_{metric}"
            if all(key in row for row in history):
                ax.plot(epochs, [row[key] for row in history], style, marker="o", markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "training curves")
    return _save(fig, path)


def compare_png(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Grouped bars per head: val accuracy and balanced accuracy, values written on the bars."""
    plt = _pyplot()
    names = [r["head"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4))
    for offset, key, label in ((-0.2, "val_accuracy", "val accuracy"), (0.2, "balanced_accuracy", "balanced acc")):
        values = [r[key] for r in rows]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.18)  # head-room for the legend above the bars
    ax.set_ylabel("score on val")
    ax.legend(loc="upper center", ncol=2)
    ax.set_title(title or "heads compared")
    return _save(fig, path)


def shots_png(table: dict[str, dict[str, float]], shots: list[str], path: Path, *, title: str = "") -> Path:
    """Val accuracy against examples per class, one line per head (``table[head][shots]``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(shots))
    markers = itertools.cycle("osD^vx*+")  # different markers tell apart lines that coincide
    for (head, scores), marker in zip(table.items(), markers):
        ax.plot(x, [scores.get(s, np.nan) for s in shots], marker=marker, alpha=0.8, label=head)
    ax.set_xticks(x, shots)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("val accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "accuracy vs shots")
    return _save(fig, path)
