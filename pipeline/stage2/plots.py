"""PNG figures written beside the JSON: confusion matrix, training curves, head comparison, accuracy vs shots,
predicted-vs-true and residuals of regression targets.

matplotlib is imported inside each function (with the non-interactive Agg backend), so importing this module
costs nothing and no display is ever needed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.fileio import atomic_write

if TYPE_CHECKING:
    from pipeline.stage2.thresholds import Curves

MAX_ANNOTATED_CLASSES = 20  # above this the cells are too small for numbers


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # class names are text: a folder named "$x$" is not TeX
    import matplotlib.pyplot as plt

    return plt


DPI = 120
PNG_LEVEL = 1  # zlib's fastest: 27 against 42 ms (level 6, PIL's default) for a PR/ROC figure, 3% larger
STAMPED = "stamped"  # the gid of unrotated texts that _save draws with PIL (the cells of a confusion matrix)


def _save(fig: Any, path: Path) -> Path:
    """Write a figure the builders below laid out (``tight_layout``, or fixed margins) and close it."""
    try:
        atomic_write(path, lambda p: _write_png(fig, p))
    finally:
        pyplot().close(fig)
    return path


def _write_png(fig: Any, path: Path) -> None:
    """``fig.savefig(path, dpi=DPI)``, except that the texts marked :data:`STAMPED` are drawn onto the picture by PIL
    in the same font, size, colour and place: matplotlib spent ~2 ms a text laying out and rendering them (0.23 s of
    the 0.46 s a 10-class confusion matrix took), PIL ~0.03 ms."""
    stamped = [t for ax in fig.axes for t in ax.texts if t.get_gid() == STAMPED and t.get_visible()
               and t.get_rotation() == 0]  # fmt: skip
    if not stamped:
        fig.savefig(path, dpi=DPI, pil_kwargs={"compress_level": PNG_LEVEL})
        return
    from matplotlib import colors, font_manager
    from PIL import Image, ImageDraw, ImageFont

    for t in stamped:
        t.set_visible(False)
    fig.set_dpi(DPI)  # what savefig(dpi=DPI) does for its draw
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height(physical=True)
    picture = Image.frombuffer("RGBA", (width, height), fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1).copy()
    draw = ImageDraw.Draw(picture)
    fonts: dict[tuple[str, float], Any] = {}
    for t in stamped:
        size = t.get_fontsize() * DPI / 72  # points to pixels
        file = font_manager.findfont(t.get_fontproperties())
        font = fonts.get((file, size)) or fonts.setdefault((file, size), ImageFont.truetype(file, size))
        x, y = t.get_transform().transform(t.get_position())
        colour = tuple(round(255 * c) for c in colors.to_rgba(t.get_color()))
        # PIL puts lines its "A"'s height plus ``spacing`` apart; matplotlib's "normal" spacing is the font's ascent
        # plus descent
        spacing = sum(font.getmetrics()) - font.getbbox("A")[3]
        draw.multiline_text((x, height - y), t.get_text(), fill=colour, font=font, anchor="mm", align="center",
                            spacing=spacing)  # fmt: skip
        t.set_visible(True)
    picture.save(path, format="PNG", dpi=(DPI, DPI), compress_level=PNG_LEVEL)


def confusion_figure(cm: list[list[int]], classes: list[str], *, title: str = "") -> Any:
    """Row-normalised confusion matrix (each row: where that true class went), class names on both axes, each
    cell's share of its true class above its count."""
    plt = pyplot()
    counts = np.asarray(cm, dtype=float)
    rows = counts.sum(1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    size = min(14.0, max(4.5, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), classes, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    text = f"{norm[i, j]:.2f}\n({int(counts[i, j])})"
                    cell = ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=7 if n > 10 else 8,
                                   gid=STAMPED)  # fmt: skip
                    cell.set_in_layout(False)  # inside the axes: tight_layout need not measure 100 texts
    fig.text(0.01, 0.01, "cells: share of the true class (count of val images)", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def confusion_png(cm: list[list[int]], classes: list[str], path: Path, *, title: str = "") -> Path:
    return _save(confusion_figure(cm, classes, title=title), path)


# The margins of the two-panel figures (fractions of a 10-inch-wide figure), whose tick labels are short numbers
# (PR/ROC: 0 to 1; curves: loss, accuracy, R^2): fixed, where tight_layout measured every text of the figure first,
# 60-80 ms of the 170-340 ms each took to write.
TWO_PANELS = {"left": 0.08, "right": 0.98, "top": 0.9, "wspace": 0.2}


def curves_figure(history: list[dict[str, float]], *, title: str = "", note: str = "") -> Any:
    """Train and val loss (left) and accuracy (right; R^2 for regression) per epoch; ``note`` (how they were
    measured) below."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    second = "r2" if history and "train_r2" in history[0] else "accuracy"
    for ax, metric in zip(axes, ("loss", second)):
        for split, style in (("train", "-"), ("val", "--")):
            key = f"{split}_{metric}"
            if all(key in row for row in history):
                ax.plot(epochs, [row[key] for row in history], style, marker="o", markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend().set_in_layout(False)  # inside the axes: tight_layout need not measure it
    fig.suptitle(title or "training curves", fontsize=10)
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=8, color="0.3")
    fig.subplots_adjust(**TWO_PANELS, bottom=0.175 if note else 0.135)
    return fig


def curves_png(history: list[dict[str, float]], path: Path, *, title: str = "", note: str = "") -> Path:
    return _save(curves_figure(history, title=title, note=note), path)


CLASSIFY_BARS = (("val_accuracy", "val accuracy"), ("balanced_accuracy", "balanced acc"))
REGRESS_BARS = (("val_r2", "val R^2"), ("train_r2", "train R^2"))


def compare_figure(rows: list[dict[str, Any]], *, title: str = "", bars: tuple = CLASSIFY_BARS) -> Any:
    """Grouped bars per head: val accuracy and balanced accuracy (``REGRESS_BARS``: val and train R^2), values
    written on the bars, and a bar's 95% interval as an error bar where the row has one (``<key>_interval``). The
    axis starts at 0 (or below, for a negative R^2), so that 0.961 and 0.981 look as close as they are; the labels
    give the difference."""
    plt = pyplot()
    names = [r["head"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4))
    lowest, with_intervals = 0.0, False
    for offset, (key, label) in zip((-0.2, 0.2), bars):
        values = [r[key] if r.get(key) is not None else np.nan for r in rows]
        lowest = min(lowest, np.nanmin(values) if not np.isnan(values).all() else 0.0)
        spans = [r.get(f"{key}_interval") for r in rows]
        yerr = None
        if any(spans):  # asymmetric: [below, above] each value
            with_intervals = True
            yerr = np.array([[max(0.0, v - s[0]), max(0.0, s[1] - v)] if s and not np.isnan(v) else [0.0, 0.0]
                             for v, s in zip(values, spans)]).T  # fmt: skip
        bar = ax.bar(x + offset, values, width=0.4, label=label, yerr=yerr, ecolor="0.3", capsize=3)
        # inside the bar, so the error bar's cap above it does not cover the value
        ax.bar_label(bar, labels=[f"{v:.3f}" for v in values], fontsize=8, label_type="center", color="white")
    ax.set_xticks(x, names)
    ax.set_ylim(max(lowest * 1.1, -1.0) if lowest < 0 else 0, 1.18)  # head-room for the legend above the bars
    ax.set_ylabel("score on val" + (" (error bars: 95% interval)" if with_intervals else ""))
    ax.legend(loc="upper center", ncol=2)
    ax.set_title(title or "heads compared", fontsize=10)
    fig.tight_layout()
    return fig


def compare_png(rows: list[dict[str, Any]], path: Path, *, title: str = "", bars: tuple = CLASSIFY_BARS) -> Path:
    return _save(compare_figure(rows, title=title, bars=bars), path)


MAX_TARGETS_PLOTTED = 4


def regression_figure(y_true: np.ndarray, pred: np.ndarray, names: list[str], *, title: str = "") -> Any:
    """Per target (the first few): predicted against true with the y = x line (left), and a histogram of the
    residuals, predicted - true (right)."""
    plt = pyplot()
    shown = min(len(names), MAX_TARGETS_PLOTTED)
    fig, axes = plt.subplots(shown, 2, figsize=(10, 3.8 * shown), squeeze=False)
    for t, (scatter, hist) in enumerate(axes):
        y, p = y_true[:, t], pred[:, t]
        scatter.scatter(y, p, s=8, alpha=0.5)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        scatter.plot([lo, hi], [lo, hi], "--", color="0.3", linewidth=1, label="y = x")
        scatter.set_xlabel(f"true {names[t]}")
        scatter.set_ylabel(f"predicted {names[t]}")
        scatter.legend(loc="upper left", fontsize=8)
        scatter.grid(alpha=0.3)
        hist.hist(p - y, bins=40, color="tab:orange", alpha=0.8)
        hist.axvline(0, color="0.3", linestyle="--", linewidth=1)
        hist.set_xlabel(f"residual (predicted - true) {names[t]}")
        hist.set_ylabel("val samples")
        hist.grid(alpha=0.3)
    if len(names) > shown:
        fig.text(0.01, 0.005, f"first {shown} of {len(names)} targets", fontsize=8, color="0.3")
    fig.suptitle(title or "predicted vs true (val)", fontsize=10)
    fig.tight_layout()
    return fig


def regression_png(y_true: np.ndarray, pred: np.ndarray, names: list[str], path: Path, *, title: str = "") -> Path:
    return _save(regression_figure(y_true, pred, names, title=title), path)


SHOTS_STYLES = ("-", "--", "-.", ":")
SHOTS_OFFSET = 0.06  # of the distance between two x ticks, between neighbouring heads


def shots_figure(table: dict[str, dict[str, float]], shots: list[str], *, title: str = "") -> Any:
    """Val accuracy against examples per class, one line per head (``table[head][shots]``). Lines that coincide
    stay visible: each head has its own marker and line style and is shifted a little sideways."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(shots))
    styles = zip(itertools.cycle("osD^vx*+"), itertools.cycle(SHOTS_STYLES))
    centre = (len(table) - 1) / 2
    for i, ((head, scores), (marker, line)) in enumerate(zip(table.items(), styles)):
        ax.plot(
            x + (i - centre) * SHOTS_OFFSET, [scores.get(s, np.nan) for s in shots], linestyle=line, marker=marker,
            alpha=0.85, label=head,
        )  # fmt: skip
    ax.set_xticks(x, shots)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("val accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "accuracy vs shots", fontsize=10)
    fig.tight_layout()
    return fig


def shots_png(table: dict[str, dict[str, float]], shots: list[str], path: Path, *, title: str = "") -> Path:
    return _save(shots_figure(table, shots, title=title), path)


MAX_CURVES_LABELLED = 12  # above this the legend hides the curves


def pr_roc_figure(curves: Curves, *, title: str = "", mark: dict[str, Any] | None = None) -> Any:
    """Precision-recall (left, with average precision) and ROC (right, with AUC) of each class that
    ``curves.per_class`` holds (one-vs-rest; the positive class alone for two classes)."""
    plt = pyplot()
    fig, (pr, roc) = plt.subplots(1, 2, figsize=(10, 4.6))
    per_class = curves.per_class
    for name, c in per_class.items():
        pr.plot(c["pr"]["recall"], c["pr"]["precision"], label=f"{name} (AP {c['average_precision']:.3f})")
        roc.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"{name} (AUC {c['roc_auc']:.3f})")
    roc.plot([0, 1], [0, 1], ":", color="0.5")
    if mark:  # --positive's chosen threshold: its val recall and precision
        t = mark["at_threshold"]
        pr.plot([t["recall"]], [t["precision"]], "o", color="black", label=f"threshold {mark['threshold']:.3f}")
    for ax, (x, y) in ((pr, ("recall", "precision")), (roc, ("false positive rate", "true positive rate"))):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(per_class) <= MAX_CURVES_LABELLED:  # inside the axes: tight_layout need not measure it
            ax.legend(fontsize=7, loc="lower left" if ax is pr else "lower right").set_in_layout(False)
    fig.suptitle(title or "precision-recall and ROC", fontsize=10)
    fig.subplots_adjust(**TWO_PANELS, bottom=0.13)
    return fig


def pr_roc_png(curves: Curves, path: Path, *, title: str = "", mark: dict[str, Any] | None = None) -> Path:
    return _save(pr_roc_figure(curves, title=title, mark=mark), path)
