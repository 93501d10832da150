"""Decisions beyond argmax, and the figures that judge them: a probability threshold for the class that matters
(chosen on held-out train for a target recall or precision), the precision-recall and ROC curves, and a word when
the classes are imbalanced.

Protocol: the threshold is chosen on the held-out 20% of train (the same stratified split ``--sweep`` uses), scored
by a head fitted on the other 80%; the head that is kept is then refitted on all of train, as after a sweep, and
applies that threshold. Val is only reported: it never moves the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage2.stats import binary_scores, confusion_matrix, divide_or_zero

IMBALANCE_RATIO = 3.0  # largest train class more than this many times the smallest: say so, lead with recall
CURVE_POINTS = 201  # points of each curve kept in metrics.json (AP and AUC are computed on the full curve)


class ThresholdOptionError(PipelineError):
    """A --positive that names no class of the feature file: a usage error (exit 2), found once the file is read."""

    exit_code = 2


# ------------------------------------------------------------------------------------------ choosing


def positive_index(positive: str, classes: list[str]) -> int:
    if positive not in classes:
        shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
        raise ThresholdOptionError(f"--positive {positive!r} is not a class of the feature file; its classes: {shown}")
    return classes.index(positive)


def choose_threshold(
    is_positive: np.ndarray,
    score: np.ndarray,
    *,
    target_recall: float | None = None,
    target_precision: float | None = None,
) -> dict[str, Any]:
    """The probability threshold (predict positive when ``score >= threshold``) that meets the target on these
    rows: for a recall target the highest threshold whose recall reaches it (the most precise such rule); for a
    precision target the lowest threshold whose precision reaches it (the most recall). ``reached`` is False when
    no threshold meets the target; then the nearest is taken (recall: the lowest score; precision: the most
    precise threshold)."""
    precision, recall, thresholds = precision_recall_curve(is_positive, score)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    if target_recall is not None:
        ok = np.flatnonzero(recall >= target_recall)
        i = int(ok.max()) if len(ok) else 0  # thresholds ascend: the last that still reaches the recall
    else:
        ok = np.flatnonzero(precision >= target_precision)
        i = int(ok.min()) if len(ok) else int(np.argmax(precision))
    return {
        "threshold": float(thresholds[i]),
        "reached": bool(len(ok)),
        "held_out_precision": float(precision[i]),
        "held_out_recall": float(recall[i]),
    }


def thresholded_predictions(proba: np.ndarray, *, positive: int, threshold: float) -> np.ndarray:
    """The positive class where its probability reaches ``threshold``; elsewhere the most probable other class."""
    others = proba.copy()
    others[:, positive] = -np.inf
    return np.where(proba[:, positive] >= threshold, positive, others.argmax(axis=1))


def _binary_scores(y: np.ndarray, pred: np.ndarray, positive: int) -> dict[str, float]:
    p, r, f1 = binary_scores(y == positive, pred == positive)
    return {"precision": p, "recall": r, "f1": f1}


def threshold_report(
    y: np.ndarray, proba: np.ndarray, *, positive: int, choice: dict[str, Any], num_classes: int
) -> dict[str, Any]:
    """The positive class's precision, recall and F1 on ``(y, proba)`` at the chosen threshold and at argmax,
    and the confusion matrix of the thresholded decisions."""
    pred = thresholded_predictions(proba, positive=positive, threshold=choice["threshold"])
    return {
        **choice,
        "at_threshold": _binary_scores(y, pred, positive),
        "at_argmax": _binary_scores(y, proba.argmax(axis=1), positive),
        "confusion_matrix": confusion_matrix(y, pred, num_classes).tolist(),
    }


def threshold_line(record: dict[str, Any]) -> str:
    """One line under a head's figures: the threshold, what it was chosen for, and val at it beside argmax."""
    target = (
        f"recall {record['target_recall']:g}"
        if record.get("target_recall")
        else (f"precision {record['target_precision']:g}")
    )
    missed = "" if record["reached"] else " (not reached on held-out train: the nearest was taken)"
    t, a = record["at_threshold"], record["at_argmax"]
    return (
        f"threshold {record['threshold']:.4f} for {record['positive']!r}, chosen for {target} on "
        f"{record['n_held_out']} held-out train rows{missed}: val precision / recall / F1 "
        f"{t['precision']:.4f} / {t['recall']:.4f} / {t['f1']:.4f} (argmax {a['precision']:.4f} / "
        f"{a['recall']:.4f} / {a['f1']:.4f})"
    )


# ------------------------------------------------------------------------------------------ curves


def _counts_at_thresholds(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(false positives, true positives, threshold)`` at each distinct score, highest first: the rows scoring at
    least the threshold called positive (sklearn's ``confusion_matrix_at_thresholds``)."""
    truth, score = np.asarray(truth, bool), np.asarray(score)
    order = np.argsort(-score, kind="stable")
    score, hits = score[order], truth[order].astype(np.float64)
    last = np.concatenate([np.flatnonzero(np.diff(score)), [len(score) - 1]])  # the last row of each score
    tps = np.cumsum(hits)[last]
    return 1 + last.astype(np.float64) - tps, tps, score[last]


def precision_recall_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at each threshold, thresholds ascending, ending at (precision 1, recall 0); as
    sklearn's ``precision_recall_curve`` (truth must hold a positive)."""
    fps, tps, thresholds = _counts_at_thresholds(truth, score)
    precision = divide_or_zero(tps, tps + fps)
    recall = tps / tps[-1]
    return np.concatenate([precision[::-1], [1.0]]), np.concatenate([recall[::-1], [0.0]]), thresholds[::-1]


def roc_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates, thresholds descending from +inf, the points on straight stretches dropped; as
    sklearn's ``roc_curve`` (truth must hold a positive and a negative)."""
    fps, tps, thresholds = _counts_at_thresholds(truth, score)
    if len(fps) > 2:
        keep = np.flatnonzero(np.concatenate([[True], (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), [True]]))
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.concatenate([[0.0], fps]), np.concatenate([[0.0], tps])
    thresholds = np.concatenate([[np.inf], thresholds.astype(np.float64)])
    return fps / fps[-1], tps / tps[-1], thresholds


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """The trapezoidal area under ``y(x)``, ``x`` monotonic (sklearn's ``auc``)."""
    dx = np.diff(x)
    direction = -1.0 if np.any(dx < 0) and np.all(dx <= 0) else 1.0
    return float(direction * np.trapezoid(y, x))


def _thin(*arrays: np.ndarray) -> list[list[float]]:
    idx = np.unique(np.linspace(0, len(arrays[0]) - 1, min(len(arrays[0]), CURVE_POINTS)).round().astype(int))
    return [[round(float(v), 6) for v in a[idx]] for a in arrays]


@dataclass(frozen=True)
class Curves:
    """Val precision-recall and ROC curves: ``per_class`` maps a class to its ``average_precision``, ``roc_auc``,
    ``pr`` (recall, precision) and ``roc`` (fpr, tpr) points; ``positive`` is ``--positive`` when given."""

    per_class: dict[str, dict[str, Any]]
    positive: str | None = None
    mean_average_precision: float | None = None
    macro_roc_auc: float | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"per_class": self.per_class}
        if self.positive is not None:
            d["positive"] = self.positive
        if self.per_class:
            d |= {"mean_average_precision": self.mean_average_precision, "macro_roc_auc": self.macro_roc_auc}
        return d


def curves(y: np.ndarray, proba: np.ndarray, classes: list[str], *, positive: int | None = None) -> Curves:
    """Precision-recall (with average precision) and ROC (with AUC) curves on ``(y, proba)``: of the positive
    class for two classes (``positive`` or the second class), else one-vs-rest of each class that the split holds
    with negatives beside it (``positive`` among them; it is recorded). The curves are thinned to CURVE_POINTS
    points; AP and AUC are sklearn's, on the full curves."""
    if len(classes) == 2:
        which = [1 if positive is None else positive]
    elif positive is not None:  # --positive: the curves are of that class (as --help says)
        which = [positive]
    else:
        which = [c for c in range(len(classes)) if 0 < (y == c).sum() < len(y)]
    per_class = {}
    for c in which:
        truth, score = y == c, proba[:, c]
        if truth.all() or not truth.any():
            continue
        precision, recall, _ = precision_recall_curve(truth, score)
        fpr, tpr, _ = roc_curve(truth, score)
        pr_recall, pr_precision = _thin(recall, precision)
        roc_fpr, roc_tpr = _thin(fpr, tpr)
        per_class[classes[c]] = {
            "average_precision": average_precision_of(precision, recall),
            "roc_auc": float(auc(fpr, tpr)),
            "pr": {"recall": pr_recall, "precision": pr_precision},
            "roc": {"fpr": roc_fpr, "tpr": roc_tpr},
        }
    means = {}
    if per_class:
        means["mean_average_precision"] = float(np.mean([v["average_precision"] for v in per_class.values()]))
        means["macro_roc_auc"] = float(np.mean([v["roc_auc"] for v in per_class.values()]))
    return Curves(per_class, None if positive is None else classes[positive], **means)


def average_precision_of(precision: np.ndarray, recall: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` of a binary split, from the ``precision_recall_curve`` it would
    compute again: the step integral of precision over recall (the curve's last precision is 1). Likewise
    ``roc_auc_score`` is ``auc`` of the ``roc_curve``: the curves once per class, not twice (both equal to the bit,
    tested)."""
    return float(max(0.0, -np.sum(np.diff(recall) * np.asarray(precision)[:-1])))


def curves_line(record: Curves) -> str:
    """AP and ROC AUC on val: of ``--positive`` when given, and their means over the classes when there are more
    than two."""
    per_class = record.per_class
    if len(per_class) == 1:
        ((name, c),) = per_class.items()
        return f"val {name!r} vs rest: average precision {c['average_precision']:.4f}, ROC AUC {c['roc_auc']:.4f}"
    overall = (
        f"one-vs-rest over {len(per_class)} classes: mean average precision {record.mean_average_precision:.4f}, "
        f"macro ROC AUC {record.macro_roc_auc:.4f}"
    )
    c = per_class.get(record.positive or "")
    if c is None:
        return f"val {overall}"
    return (
        f"val {record.positive!r} vs rest: average precision {c['average_precision']:.4f}, ROC AUC "
        f"{c['roc_auc']:.4f}; {overall}"
    )


# ------------------------------------------------------------------------------------------ imbalance


def imbalance(labels: np.ndarray, classes: list[str]) -> dict[str, Any] | None:
    """The train class counts when the largest is more than IMBALANCE_RATIO times the smallest, else None."""
    counts = np.bincount(labels, minlength=len(classes))
    largest, smallest = int(counts.argmax()), int(counts.argmin())
    if counts[largest] <= IMBALANCE_RATIO * counts[smallest]:
        return None
    ratio = float(counts[largest] / counts[smallest]) if counts[smallest] else float("inf")
    return {
        "ratio": ratio,
        "largest": classes[largest],
        "largest_count": int(counts[largest]),
        "smallest": classes[smallest],
        "smallest_count": int(counts[smallest]),
    }


def imbalance_line(record: dict[str, Any]) -> str:
    return (
        f"imbalanced classes: train's largest class {record['largest']!r} has {record['largest_count']} rows, "
        f"{record['ratio']:.1f} times its smallest {record['smallest']!r} ({record['smallest_count']}): accuracy "
        "flatters; read balanced accuracy and the worst class's recall"
    )
