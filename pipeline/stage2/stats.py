"""How sure a val score is, and whether two heads really differ: 95% intervals (Wilson for accuracy, a bootstrap
for balanced accuracy, macro F1, R^2 and mAP) and paired tests on the same val rows (McNemar's mid-p test for
classification, a paired bootstrap for regression); and the classification scores themselves (confusion matrix,
per-class precision / recall / F1, log loss), as scikit-learn 1.9 defines them (tested against it). numpy and the
standard library only: importing ``sklearn.metrics`` cost every command a second, and its argument checks ~0.25 s
a head; ``scipy.stats`` cost a forked compare worker 0.7 s.

Why paired tests: two heads scored on the same 1,000 val images share most of their errors, so the difference of
their accuracies is far less noisy than either accuracy alone; McNemar's test looks only at the rows where exactly
one of the two is right, which is what can tell them apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

LEVEL = 0.95  # every interval here
ALPHA = 0.05  # a difference with a p-value below this is "significant"; otherwise the heads are tied
BOOTSTRAP = 500  # resamples of a bootstrap interval (its ends move by ~0.003 of accuracy between seeds at n=1,000)
BOOTSTRAP_MAP = 100  # mAP costs a cumulative sum per class and resample: fewer resamples (ends to ~0.005)


def wilson(correct: int, n: int, *, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (accuracy): unlike the normal one it stays in
    [0, 1] and covers at its level near 0 and 1 and on small ``n``."""
    if n <= 0:
        return (0.0, 1.0)
    z = _z(level)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def bootstrap_interval(
    metric: Callable[[np.ndarray], float], n: int, *, resamples: int = BOOTSTRAP, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of ``metric(rows)`` over ``resamples`` resamples (with replacement) of ``n`` rows."""
    if n <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = np.array([metric(rng.integers(0, n, n)) for _ in range(resamples)])
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def confusion_matrix(y: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts, row: the true class, column: the predicted one (sklearn's ``confusion_matrix``
    with ``labels=range(classes)``; a label outside that range is not counted)."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    keep = (y >= 0) & (y < classes) & (pred >= 0) & (pred < classes)
    return np.bincount(y[keep] * classes + pred[keep], minlength=classes * classes).reshape(classes, classes)


def divide_or_zero(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` as float64, 0 where ``den`` is 0 (sklearn's ``zero_division=0``)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def precision_recall_f1(
    y: np.ndarray, pred: np.ndarray, classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class: precision, recall, F1 and support (sklearn's ``precision_recall_fscore_support`` with
    ``labels=range(classes)``, ``zero_division=0``; F1 as it computes it, ``2 tp / (support + predicted)``)."""
    cm = confusion_matrix(y, pred, classes)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    return (
        divide_or_zero(tp, predicted),
        divide_or_zero(tp, support),
        divide_or_zero(2 * tp, support + predicted),
        support,
    )


def binary_scores(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of boolean decisions against boolean truth (sklearn's ``average="binary"``)."""
    p, r, f1, _ = precision_recall_f1(np.asarray(truth, np.int64), np.asarray(predicted, np.int64), 2)
    return float(p[1]), float(r[1]), float(f1[1])  # class 1: the positive one


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean ``-log`` of the probability given to the true class, clipped to ``[eps, 1 - eps]`` of ``proba``'s dtype
    (sklearn's ``log_loss`` of normalised rows with ``labels=range(classes)``)."""
    proba = np.asarray(proba)
    eps = np.finfo(proba.dtype).eps
    picked = np.clip(proba[np.arange(len(y)), np.asarray(y, np.int64)], eps, 1 - eps)
    return float(np.mean(-np.log(picked)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """Mean recall over the classes present in ``y`` (sklearn's ``balanced_accuracy_score``)."""
    _, recall, _, support = precision_recall_f1(y, pred, classes)
    return float(recall[support > 0].mean())


def macro_f1(y: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """F1 averaged over the classes present in ``y`` (as :func:`evaluate.classification_metrics` averages it)."""
    _, _, f1, support = precision_recall_f1(y, pred, classes)
    return float(f1[support > 0].mean())


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """R^2 averaged over the columns of (N, T) targets (the pipeline's ``val_r2``)."""
    y, pred = np.asarray(y, np.float64).reshape(len(y), -1), np.asarray(pred, np.float64).reshape(len(y), -1)
    sse, sst = ((y - pred) ** 2).sum(0), ((y - y.mean(0)) ** 2).sum(0)
    return float(np.mean(np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), 0.0)))


def classification_intervals(y: np.ndarray, proba: np.ndarray, *, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of a classifier's val scores: ``val_accuracy_interval`` (Wilson), and bootstrap ones for
    ``balanced_accuracy_interval``, ``macro_f1_interval`` and ``map_interval``. A resample is a count per row
    (how often it was drawn), so each metric is a weighted sum over rows sorted once: no re-sorting per resample
    (on 10,000 val rows, 10 classes, the three intervals take ~0.13 s; they took ~0.25 s before mAP's resamples ran
    at once, :meth:`LabelRanking.resampled_map`)."""
    y, proba = np.asarray(y, np.int64), np.asarray(proba, np.float64)
    pred, classes, n = proba.argmax(1), proba.shape[1], len(y)
    out = {"val_accuracy_interval": list(wilson(int((pred == y).sum()), n))}
    if n == 0:
        return out | {
            k: [math.nan, math.nan] for k in ("balanced_accuracy_interval", "macro_f1_interval", "map_interval")
        }
    cell = y * classes + pred
    present = np.unique(y)
    values: dict[str, list[float]] = {"balanced_accuracy_interval": [], "macro_f1_interval": []}
    # the first resamples' counts, for mAP's below: float32 holds them and their sums (at most n) exactly
    for_map = np.empty((n, min(BOOTSTRAP, BOOTSTRAP_MAP)), np.float32)
    for b, w in enumerate(resample_counts(n, resamples=BOOTSTRAP, seed=seed)):
        cm = np.bincount(cell, weights=w, minlength=classes * classes).reshape(classes, classes)
        tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
        seen = support > 0
        values["balanced_accuracy_interval"].append(float((tp[seen] / support[seen]).mean()))
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        values["macro_f1_interval"].append(float(f1[seen].mean()))
        if b < for_map.shape[1]:
            for_map[:, b] = w
    ranking = LabelRanking(y[:, None] == present[None], proba[:, present])  # each class present against the rest
    values["map_interval"] = list(ranking.resampled_map(for_map))
    return out | {key: interval_ends(vals) for key, vals in values.items()}


class LabelRanking:
    """Each label's rows sorted once by score, each row knowing the last row of its run of equal scores, so the AP
    of any weighting of the rows costs sums, not a sort: scikit-learn's ``average_precision_score`` (tied scores
    are one threshold), of a class against the rest for one label per image (classification's mAP interval) or of
    each label of several (the multilabel task's mAP, its interval and its paired test). A bootstrap resample is
    such a weighting (each row counted as often as it was drawn; :func:`resample_counts`), and its AP is exactly the
    AP of the resampled rows: a row drawn twice ties with itself. With all weights 1 it is the AP of the rows."""

    def __init__(self, y: np.ndarray, score: np.ndarray) -> None:
        # label-major (L, N)
        y, s = np.asarray(y).astype(bool), np.asarray(score, np.float64)
        y, s = (y[:, None], s[:, None]) if y.ndim == 1 else (y, s)  # one label's column
        y, s = np.ascontiguousarray(y.T), np.ascontiguousarray(s.T)
        n = y.shape[1]
        self.order = np.argsort(-s, axis=1, kind="mergesort")
        ranked = np.take_along_axis(s, self.order, 1)
        self.hit = np.take_along_axis(y, self.order, 1)
        last = np.ones(s.shape, bool)
        last[:, :-1] = ranked[:, 1:] != ranked[:, :-1]
        # each row's run end: the first run end at or after it (a reversed running minimum of the run ends' places)
        at = np.where(last, np.arange(n)[None], n)
        self.run_end = np.ascontiguousarray(np.minimum.accumulate(at[:, ::-1], axis=1)[:, ::-1])

    def resampled_aps(self, counts: np.ndarray) -> np.ndarray:
        """(labels, resamples): each label's AP for the rows weighted by each column of ``counts`` (rows, resamples:
        how often each row was drawn), NaN where a column gives the label no positive. All columns at once, and
        only where the precision counts: at the end of each positive's run of tied scores, the rows drawn up to
        there being the sums between those ends (one pass), not a cumulative sum over every row (100 resamples of
        10,000 rows, 10 classes: 0.03 s against 0.16 s)."""
        counts = np.asarray(counts)
        aps = np.full((len(self.order), counts.shape[1]), np.nan)
        for j, (order, hit, run_end) in enumerate(zip(self.order, self.hit, self.run_end)):
            at = np.flatnonzero(hit)  # the label's rows, in ranked order
            if not len(at):
                continue
            ends, group = np.unique(run_end[at], return_index=True)  # ascending; each end's first positive
            drawn = counts[order[: ends[-1] + 1]]
            upto = np.cumsum(np.add.reduceat(drawn, np.r_[0, ends[:-1] + 1], axis=0), axis=0, dtype=np.float64)
            mine = drawn[at].astype(np.float64)
            found = np.cumsum(mine, axis=0)[np.r_[group[1:], len(at)] - 1]  # positives drawn up to each end
            weight = np.add.reduceat(mine, group, axis=0)  # positives drawn ending there
            total = weight.sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                aps[j] = np.where(total > 0, (weight * found / np.maximum(upto, 1e-12)).sum(0) / total, np.nan)
        return aps

    def aps(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Each label's AP of the rows weighted by ``weights`` (None: 1 each); NaN for a label without a positive."""
        w = np.ones(self.order.shape[1]) if weights is None else np.asarray(weights, np.float64)
        return self.resampled_aps(w[:, None])[:, 0]

    def resampled_map(self, counts: np.ndarray) -> np.ndarray:
        """(resamples,): the mean of :meth:`resampled_aps` over the labels each resample holds a positive of (NaN
        when it holds none)."""
        aps = self.resampled_aps(counts)
        held = np.isfinite(aps)
        with np.errstate(invalid="ignore"):
            return np.where(held.any(0), np.where(held, aps, 0.0).sum(0) / held.sum(0), np.nan)

    def map(self, weights: np.ndarray | None = None) -> float:
        """The mean of :meth:`aps` over the labels with a positive (0 when none has)."""
        return self.mean(self.aps(weights))

    @staticmethod
    def mean(aps: np.ndarray) -> float:
        """mAP from per-label APs: their mean over the labels with a positive (not NaN), 0 when none has."""
        present = aps[~np.isnan(aps)]
        return float(present.mean()) if len(present) else 0.0


def interval_ends(values: Any) -> list[float]:
    """The ends of the 95% percentile interval of bootstrap ``values`` (the finite ones); NaN when none is."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return [float(x) for x in np.quantile(v, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])] if len(v) else [math.nan] * 2


def resample_counts(n: int, *, resamples: int = BOOTSTRAP, seed: int = 0) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` rows as counts per row (how often each was drawn), float64: a metric that is a
    weighted sum over rows sorted once takes them as weights (:func:`classification_intervals`, the multilabel
    intervals). The draws are :func:`bootstrap_interval`'s and :func:`paired_bootstrap`'s (the same seed resamples
    the same rows)."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)


def resample_matrix(n: int, *, resamples: int, seed: int = 0) -> np.ndarray:
    """(n, resamples) float32: :func:`resample_counts` as columns, for a metric that takes every resample at once
    (:meth:`LabelRanking.resampled_map`); whole numbers, exact in float32."""
    return np.stack(list(resample_counts(n, resamples=resamples, seed=seed)), 1).astype(np.float32)


def weighted_intervals(
    scores: Callable[[np.ndarray], dict[str, float]], n: int, *, resamples: int = BOOTSTRAP, seed: int = 0
) -> dict[str, list[float]]:
    """The bootstrap 95% interval of each score ``scores(counts)`` gives (a dict: name -> value for the rows
    weighted by their counts in one resample of ``n`` rows); NaN ends when there are no rows."""
    if n <= 0:
        return {key: [math.nan, math.nan] for key in scores(np.ones(0))}
    values: dict[str, list[float]] = {}
    for w in resample_counts(n, resamples=resamples, seed=seed):
        for key, value in scores(w).items():
            values.setdefault(key, []).append(value)
    return {key: interval_ends(vals) for key, vals in values.items()}


def two_sided(observed: float, diffs: np.ndarray) -> float:
    """The paired bootstrap's p-value: the share of resampled differences on the other side of 0 than the
    ``observed`` one (ties counted against it), doubled."""
    other_side = (diffs <= 0).mean() if observed > 0 else (diffs >= 0).mean()
    return float(min(1.0, 2 * other_side))


def regression_intervals(y: np.ndarray, pred: np.ndarray, *, seed: int = 0) -> dict[str, list[float]]:
    """``val_r2_interval``: the bootstrap 95% interval of val R^2 (averaged over the targets)."""
    y, pred = np.asarray(y, np.float64).reshape(len(y), -1), np.asarray(pred, np.float64).reshape(len(y), -1)
    return {"val_r2_interval": list(bootstrap_interval(lambda r: r2(y[r], pred[r]), len(y), seed=seed))}


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> float:
    """McNemar's mid-p test of two classifiers' right/wrong on the same rows: the two-sided p-value that the
    rows only ``a`` gets right and the rows only ``b`` gets right are equally likely (exact binomial on the
    discordant rows, minus half the observed point: the mid-p, which keeps its level without the exact test's
    conservatism). 1.0 when they never disagree."""
    a, b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    low = min(only_a, only_b)
    # Binomial(n, 1/2) probabilities of 0..low in logs: log C(n, k) by its running ratio (n - k + 1) / k
    k = np.arange(1, low + 1, dtype=np.float64)
    log_pmf = np.concatenate([[0.0], np.cumsum(np.log((n - k + 1) / k))]) - n * math.log(2)
    top = log_pmf.max()
    cdf = math.exp(top) * float(np.exp(log_pmf - top).sum())
    p = 2 * cdf - math.exp(log_pmf[-1])
    return float(min(1.0, max(0.0, p)))


def paired_bootstrap(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, resamples: int = BOOTSTRAP, seed: int = 0,
    metric: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> float:  # fmt: skip
    """Two-sided p-value that regressors ``a`` and ``b`` have the same val R^2 (or ``metric``, e.g. the mAP of
    several labels per image): the share of resamples (the same rows for both) on which the difference falls on the
    other side of 0 than it does on all rows, doubled."""
    metric = metric or r2
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    pa, pb = (np.asarray(p, np.float64).reshape(len(y), -1) for p in (pred_a, pred_b))
    observed = metric(y, pa) - metric(y, pb)
    if observed == 0 or not len(y):
        return 1.0
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for i in range(resamples):
        r = rng.integers(0, len(y), len(y))
        diffs[i] = metric(y[r], pa[r]) - metric(y[r], pb[r])
    return two_sided(observed, diffs)


def differs(y: np.ndarray, a: np.ndarray, b: np.ndarray, *, regress: bool, seed: int = 0) -> float:
    """The p-value that heads ``a`` and ``b`` score the same on these rows: ``a``/``b`` are class probabilities
    or labels (McNemar) or regression predictions (paired bootstrap)."""
    if regress:
        return paired_bootstrap(y, a, b, seed=seed)
    la = a.argmax(1) if np.ndim(a) == 2 else a
    lb = b.argmax(1) if np.ndim(b) == 2 else b
    return mcnemar(la == y, lb == y)


def ties_with_best(
    y: np.ndarray, predictions: dict[str, np.ndarray], best: str, *, regress: bool, seed: int = 0
) -> dict[str, float]:
    """The heads (name -> p-value) whose val predictions are not significantly different from ``best``'s."""
    return {
        name: p
        for name, pred in predictions.items()
        if name != best and (p := differs(y, predictions[best], pred, regress=regress, seed=seed)) >= ALPHA
    }


def beats_defaults(
    y: np.ndarray, chosen: np.ndarray, defaults: np.ndarray, *, regress: bool, seed: int = 0
) -> dict[str, Any]:
    """Whether a sweep's choice beats the defaults beyond noise on the held-out rows: it scores higher and the
    paired test says the difference is unlikely to be chance (p < ALPHA). ``{"beats": bool, "p_value": p}``."""
    score = r2 if regress else (lambda t, p: float((np.asarray(p).argmax(1) == t).mean()))
    higher = score(y, chosen) > score(y, defaults)
    p = differs(y, chosen, defaults, regress=regress, seed=seed)
    return {"beats": bool(higher and p < ALPHA), "p_value": p}


def format_interval(value: float, interval: Any, *, digits: int = 3) -> str:
    """``0.866 [0.844, 0.886]``; the value alone when there is no interval."""
    if value is None:
        return "-"
    if not interval or any(v is None or not math.isfinite(v) for v in interval):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
