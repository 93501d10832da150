"""Metrics of several labels per image (the ``multilabel`` task): per-label average precision and its macro mean
(mAP, the held-out score and the compare ranking), micro and macro F1 at each label's threshold, per-label
precision / recall / F1 / support, subset accuracy and Hamming loss. numpy only (no torch); tested against
scikit-learn's ``average_precision_score`` and ``f1_score``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.stage2 import stats
from pipeline.stage2.evaluate import OVERFIT_GAP, MetricsRecord, report_notes
from pipeline.stage2.stats import LabelRanking

DEFAULT_THRESHOLD = 0.5


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Each label's probability from its logit (the heads train per-label sigmoid + binary cross-entropy)."""
    z = np.asarray(z, np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def mean_average_precision(y: np.ndarray, proba: np.ndarray) -> float:
    """mAP: the mean of the per-label AP over the labels with at least one positive row (0 when none has)."""
    return LabelRanking(y, proba).map()


def decide(proba: np.ndarray, thresholds: np.ndarray | list[float]) -> np.ndarray:
    """The labels decided: (N, L) 0/1, label j on where its probability is at least its threshold."""
    return (np.asarray(proba) >= np.asarray(thresholds, np.float64)[None]).astype(np.uint8)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)


def multilabel_metrics(
    y: np.ndarray, proba: np.ndarray, labels: list[str], *, thresholds: np.ndarray | list[float]
) -> dict[str, Any]:
    """Every figure of (N, L) probabilities against (N, L) 0/1 truth, the decisions at ``thresholds``."""
    y = np.asarray(y).astype(bool)
    pred = decide(proba, thresholds).astype(bool)
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    f1 = _f1(tp, fp, fn)
    aps = LabelRanking(y, proba).aps()  # each label's, sorted once: the mAP below is their mean
    per_label = [
        {"label": name, "ap": None if np.isnan(aps[j]) else float(aps[j]), "precision": float(precision[j]),
         "recall": float(recall[j]), "f1": float(f1[j]), "support": int(y[:, j].sum()),
         "threshold": float(np.asarray(thresholds)[j])}
        for j, name in enumerate(labels)
    ]  # fmt: skip
    return {
        "map": LabelRanking.mean(aps),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "subset_accuracy": float((pred == y).all(1).mean()) if len(y) else 0.0,
        "hamming_loss": float((pred != y).mean()) if y.size else 0.0,
        "per_label": per_label,
    }


def resampled_f1(y: np.ndarray, decided: np.ndarray) -> Callable[[np.ndarray], dict[str, float]]:
    """Micro and macro F1 of fixed decisions (N, L) for the rows weighted by a resample's counts (keyed by the names
    of their intervals): each label's true/false positives and false negatives are weighted sums over rows."""
    y, decided = np.asarray(y).astype(bool), np.asarray(decided).astype(bool)
    tp, fp, fn = ((a & b).astype(np.float64) for a, b in ((decided, y), (decided, ~y), (~decided, y)))

    def scores(w: np.ndarray) -> dict[str, float]:
        t, f, n = w @ tp, w @ fp, w @ fn
        macro = float(_f1(t, f, n).mean()) if len(t) else 0.0
        return {"val_micro_f1_interval": float(_f1(t.sum(), f.sum(), n.sum())), "val_macro_f1_interval": macro}

    return scores


def multilabel_intervals(
    y: np.ndarray, proba: np.ndarray, thresholds: np.ndarray | list[float], *, seed: int = 0
) -> dict[str, list[float]]:
    """Bootstrap 95% intervals (images resampled) of val mAP (``val_map_interval``; :data:`stats.BOOTSTRAP_MAP`
    resamples, as for a classifier's mAP) and of micro and macro F1 at ``thresholds`` (``val_micro_f1_interval``,
    ``val_macro_f1_interval``; :data:`stats.BOOTSTRAP`). On 10,000 val images and 80 labels: ~2.2 s."""
    f1 = stats.weighted_intervals(resampled_f1(y, decide(proba, thresholds)), len(y), seed=seed)
    if not len(y):
        return {"val_map_interval": [np.nan, np.nan]} | f1
    counts = stats.resample_matrix(len(y), resamples=stats.BOOTSTRAP_MAP, seed=seed)
    return {"val_map_interval": stats.interval_ends(LabelRanking(y, proba).resampled_map(counts))} | f1


def map_p_value(
    y: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray, *, seed: int = 0, resamples: int = stats.BOOTSTRAP_MAP
) -> float:
    """Two-sided p-value that two heads' mAP on these images are the same: a paired bootstrap over images
    (:data:`stats.BOOTSTRAP_MAP` resamples by default; each resample scores both heads on the same images). The
    p-value of ``stats.paired_bootstrap(..., metric=mean_average_precision)`` with the same resamples, every
    resample at once and without a sort per resample (:meth:`stats.LabelRanking.resampled_map`)."""
    a, b = LabelRanking(y, proba_a), LabelRanking(y, proba_b)
    observed = a.map() - b.map() if len(y) else 0.0
    if observed == 0:
        return 1.0
    counts = stats.resample_matrix(len(y), resamples=resamples, seed=seed)
    return stats.two_sided(observed, a.resampled_map(counts) - b.resampled_map(counts))


def choose_thresholds(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per label, the threshold among held-out probabilities that maximises that label's F1 (ties: the highest
    threshold); :data:`DEFAULT_THRESHOLD` for a label with no positive held out."""
    y = np.asarray(y).astype(bool)
    out = np.full(y.shape[1], DEFAULT_THRESHOLD)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            continue
        candidates = np.unique(proba[:, j])
        pred = proba[:, j][None] >= candidates[:, None]
        tp, fp = (pred & y[:, j]).sum(1), (pred & ~y[:, j]).sum(1)
        fn = y[:, j].sum() - tp
        f1 = _f1(tp, fp, fn)
        out[j] = float(candidates[np.flatnonzero(f1 == f1.max())[-1]])
    return out


@dataclass(frozen=True)
class MultiLabelMetrics(MetricsRecord):
    """A multi-label head's results (``metrics.json``): val mAP (the score), micro/macro F1, subset accuracy and
    Hamming loss at each label's threshold, train mAP and the train - val mAP gap, and per label in ``per_label``."""

    val_map: float
    val_micro_f1: float
    val_macro_f1: float
    val_subset_accuracy: float
    val_hamming_loss: float
    train_map: float
    train_micro_f1: float
    train_val_gap: float  # train mAP - val mAP
    overfitting: bool
    fit_seconds: float
    per_label: list[dict[str, Any]]
    thresholds: list[float]
    threshold_source: str  # "default 0.5" or "max F1 on held-out train"
    task: str = "multilabel"
    head: str = ""
    n_train_used: int | None = None
    sweep: dict[str, Any] | None = None
    history: list[dict[str, float]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    out: str | None = None

    def overfit_words(self) -> str:
        return f"train mAP exceeds val mAP by {self.train_val_gap:.3f} (more than {OVERFIT_GAP:g})"

    def report(self, *, title: str = "") -> str:
        m = self
        lines = [title] if title else []
        lines += [
            f"  val   mAP {m.val_map:.4f}   micro F1 {m.val_micro_f1:.4f}   macro F1 {m.val_macro_f1:.4f}   "
            f"subset acc {m.val_subset_accuracy:.4f}   Hamming loss {m.val_hamming_loss:.4f}",
        ]
        said = [(name, m.details[f"{key}_interval"])
                for name, key in (("mAP", "val_map"), ("micro F1", "val_micro_f1"), ("macro F1", "val_macro_f1"))
                if m.details.get(f"{key}_interval")]  # fmt: skip
        if said:  # the values are on the line above
            shown = "   ".join(f"{name} [{lo:.4f}, {hi:.4f}]" for name, (lo, hi) in said)
            lines.append(f"  val 95% intervals (bootstrap over images): {shown}")
        lines += [
            f"  train mAP {m.train_map:.4f}   micro F1 {m.train_micro_f1:.4f}   train - val mAP gap "
            f"{m.train_val_gap:+.4f}",
            f"  thresholds: {m.threshold_source}",
            "",
        ]
        width = max(5, *(len(str(p["label"])) for p in m.per_label)) if m.per_label else 5
        lines.append(f"  {'label':<{width}}  AP      precision  recall  f1      support  threshold")
        for p in m.per_label[:MAX_LABELS_SHOWN]:
            ap = "  n/a " if p["ap"] is None else f"{p['ap']:.4f}"
            lines.append(
                f"  {p['label']:<{width}}  {ap}  {p['precision']:.4f}     {p['recall']:.4f}  {p['f1']:.4f}  "
                f"{p['support']:<7}  {p['threshold']:.3f}"
            )
        if len(m.per_label) > MAX_LABELS_SHOWN:
            lines.append(f"  ... {len(m.per_label) - MAX_LABELS_SHOWN} more labels in metrics.json")
        notes = report_notes(m)
        if notes:
            lines += ["", *(f"  {note}" for note in notes)]
        return "\n".join(lines)


MAX_LABELS_SHOWN = 30


def summarize_multilabel(
    *, train: dict[str, Any], val: dict[str, Any], thresholds: np.ndarray, threshold_source: str,
    fit_seconds: float, extra: dict[str, Any],
) -> MultiLabelMetrics:  # fmt: skip
    gap = train["map"] - val["map"]
    typed = {k: extra.pop(k) for k in ("head", "n_train_used", "sweep", "history") if k in extra}
    return MultiLabelMetrics(
        val_map=val["map"],
        val_micro_f1=val["micro_f1"],
        val_macro_f1=val["macro_f1"],
        val_subset_accuracy=val["subset_accuracy"],
        val_hamming_loss=val["hamming_loss"],
        train_map=train["map"],
        train_micro_f1=train["micro_f1"],
        train_val_gap=gap,
        overfitting=bool(gap > OVERFIT_GAP),
        fit_seconds=fit_seconds,
        per_label=val["per_label"],
        thresholds=[float(t) for t in thresholds],
        threshold_source=threshold_source,
        **typed,
        details=extra,
    )


def stratified_multilabel_holdout(y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices of a multi-hot ``y`` (N, L), each label's positives split in proportion:
    iterative stratification (Sechidis, Tsoumakas and Vlahavas 2011, as scikit-multilearn's
    ``IterativeStratification``) for two parts. The rarest label still to place goes first; each of its rows goes to
    the part that lacks most of that label (then the part that lacks most rows; then a seeded coin), and counts
    against every label it carries. Each label with 2+ positives wants at least one in each part, and a repair pass
    moves a row where the greedy pass left a part without one; the exception is a set of labels whose rows no two
    parts can separate (three labels on three rows, each pair sharing one), where a label may stay on one side.
    None held out when fewer than 5 rows."""
    y = np.asarray(y).astype(bool)
    n = len(y)
    if n < 5:
        return np.arange(n), np.arange(0)
    rng = np.random.default_rng(seed)
    n_held = max(1, round(fraction * n))
    counts = y.sum(0).astype(np.float64)
    held_want = np.where(counts >= 2, np.clip(np.round(fraction * counts), 1, counts - 1), fraction * counts)
    want_rows = np.array([n - n_held, n_held], np.float64)  # part 0: fit, part 1: held out
    want = np.stack([counts - held_want, held_want])  # (2, L)
    part = np.full(n, -1)
    left = y.copy()  # positives of rows not yet placed
    remaining = counts.copy()  # per label, its positives not yet placed
    while remaining.any():
        label = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))  # the rarest; the first of equals
        for row in rng.permutation(np.flatnonzero(left[:, label])):
            key = [(want[q, label], want_rows[q], rng.random()) for q in (0, 1)]
            p = int(key[1] > key[0])
            part[row], left[row] = p, False
            want[p] -= y[row]
            want_rows[p] -= 1
            remaining -= y[row]
    unlabelled = np.flatnonzero(part < 0)  # rows with no label: whichever part lacks rows
    for row in rng.permutation(unlabelled):
        p = int(want_rows[1] > want_rows[0])
        part[row] = p
        want_rows[p] -= 1
    _repair(y, part, counts)
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1)


def _repair(y: np.ndarray, part: np.ndarray, counts: np.ndarray) -> None:
    """In place: for each label with 2+ positives and none in one part, move one of its rows there when that leaves
    every label of the row with a positive in the part it leaves (if it had 2+ there)."""
    for label in np.flatnonzero(counts >= 2):
        for p in (0, 1):
            if (y[:, label] & (part == p)).any():
                continue
            per_part = np.stack([(y & (part == q)[:, None]).sum(0) for q in (0, 1)])  # (2, L)
            for row in np.flatnonzero(y[:, label] & (part == 1 - p)):
                if (per_part[1 - p, y[row] & (counts >= 2)] >= 2).all():
                    part[row] = p
                    break
