"""pipeline.stage2.stats: intervals that cover at their level, tests that tell paired predictions apart."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score

from pipeline.stage2 import stats


@pytest.mark.parametrize(("rate", "n"), [(0.87, 1000), (0.6, 80), (0.97, 300)])
def test_wilson_interval_covers_a_known_rate_about_95_percent_of_the_time(rate: float, n: int) -> None:
    rng = np.random.default_rng(0)
    trials = 4000
    correct = rng.binomial(n, rate, size=trials)
    covered = np.mean([lo <= rate <= hi for lo, hi in (stats.wilson(int(c), n) for c in correct)])
    assert 0.93 <= covered <= 0.97, covered


def test_bootstrap_interval_of_balanced_accuracy_covers_its_true_value() -> None:
    """A classifier right with probability 0.9 on class 0 and 0.7 on class 1: balanced accuracy 0.8."""
    rng = np.random.default_rng(1)
    hits = 0
    trials = 200
    for t in range(trials):
        y = rng.integers(0, 2, 400)
        right = rng.random(400) < np.where(y == 0, 0.9, 0.7)
        pred = np.where(right, y, 1 - y)
        lo, hi = stats.bootstrap_interval(
            lambda r, y=y, pred=pred: stats.balanced_accuracy(y[r], pred[r], 2), len(y), resamples=300, seed=t
        )
        hits += lo <= 0.8 <= hi
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 500)
    proba = rng.dirichlet(np.ones(4), 500) + np.eye(4)[y] * 0.3
    pred = proba.argmax(1)
    assert stats.balanced_accuracy(y, pred, 4) == pytest.approx(balanced_accuracy_score(y, pred))
    assert stats.macro_f1(y, pred, 4) == pytest.approx(f1_score(y, pred, average="macro"))
    want = np.mean([average_precision_score(y == c, proba[:, c]) for c in range(4)])
    assert stats.LabelRanking(y[:, None] == np.arange(4), proba).map() == pytest.approx(want)
    intervals = stats.classification_intervals(y, proba)
    acc = (pred == y).mean()
    lo, hi = intervals["val_accuracy_interval"]
    assert lo < acc < hi and hi - lo < 0.1
    for key in ("balanced_accuracy_interval", "macro_f1_interval", "map_interval"):
        assert intervals[key][0] < intervals[key][1]


def test_each_resampled_map_is_scikit_learns_on_the_rows_drawn() -> None:
    """The bootstrap of mAP, all resamples at once from counts: each resample's value is scikit-learn's mean
    average precision over the classes it holds, on its rows repeated as often as they were drawn, tied scores
    included (k-NN's probabilities tie on every row whose neighbours agree; a class's AP then differs by ~0.02
    between scikit-learn's one threshold per score and an order that breaks the ties by row)."""
    rng = np.random.default_rng(3)
    n, classes = 300, 5
    y = rng.integers(0, classes, n)
    y[y == 4] = 3  # a class never present
    proba = rng.dirichlet(np.ones(classes), n) + np.eye(classes)[y] * 0.2
    for scores in (proba, np.round(proba * 4) / 4):  # distinct scores, then runs of ties
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(8)], 1).astype(np.float32)
        present = np.unique(y)
        ranking = stats.LabelRanking(y[:, None] == present[None], scores[:, present])
        got = ranking.resampled_map(counts)
        for b in range(counts.shape[1]):
            rows = np.repeat(np.arange(n), counts[:, b].astype(int))
            held = [c for c in present if (y[rows] == c).any()]
            want = np.mean([average_precision_score(y[rows] == c, scores[rows, c]) for c in held])
            assert got[b] == pytest.approx(want, rel=1e-12), b
            assert ranking.map(counts[:, b]) == pytest.approx(want, rel=1e-12)
        want = np.mean([average_precision_score(y == c, scores[:, c]) for c in present])
        assert ranking.map() == pytest.approx(want, rel=1e-12)


def test_mcnemar_tells_a_real_difference_from_noise() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(1000) < 0.85
    same_rate = np.where(rng.random(1000) < 0.05, ~truth, truth)  # flips both ways: same accuracy on average
    assert stats.mcnemar(truth, truth) == 1.0
    better = truth | (rng.random(1000) < 0.5)  # right on half the rows truth gets wrong
    assert stats.mcnemar(better, truth) < 1e-6
    # under the null (two heads equally good, disagreeing at random) p < 0.05 about 5% of the time
    rejections = 0
    for t in range(400):
        g = np.random.default_rng(100 + t)
        base = g.random(500) < 0.8
        a = np.where(g.random(500) < 0.1, g.random(500) < 0.8, base)
        b = np.where(g.random(500) < 0.1, g.random(500) < 0.8, base)
        rejections += stats.mcnemar(a, b) < stats.ALPHA
    assert rejections / 400 < 0.08
    assert 0 <= stats.mcnemar(same_rate, truth) <= 1


def test_paired_bootstrap_and_ties_with_best() -> None:
    rng = np.random.default_rng(4)
    y = rng.normal(size=(600, 2))
    good = y + 0.3 * rng.normal(size=y.shape)
    also_good = y + 0.3 * rng.normal(size=y.shape)
    bad = y + 1.0 * rng.normal(size=y.shape)
    assert stats.paired_bootstrap(y, good, bad) < 0.01
    assert stats.paired_bootstrap(y, good, also_good) > 0.05
    ties = stats.ties_with_best(y, {"good": good, "also": also_good, "bad": bad}, "good", regress=True)
    assert set(ties) == {"also"}
    lo, hi = stats.regression_intervals(y, good)["val_r2_interval"]
    assert lo < stats.r2(y, good) < hi


def test_beats_defaults_needs_more_than_noise() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 300)
    defaults = np.eye(3)[np.where(rng.random(300) < 0.8, y, (y + 1) % 3)]
    one_more = defaults.copy()
    wrong = np.flatnonzero(defaults.argmax(1) != y)[:2]
    one_more[wrong] = np.eye(3)[y[wrong]]  # two more rows right: higher, but not beyond noise
    assert not stats.beats_defaults(y, one_more, defaults, regress=False)["beats"]
    much_better = np.eye(3)[np.where(rng.random(300) < 0.97, y, (y + 1) % 3)]
    assert stats.beats_defaults(y, much_better, defaults, regress=False)["beats"]


def test_stats_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, pipeline.stage2.stats; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_scikit_learns(seed: int) -> None:
    """Confusion matrix, per-class precision / recall / F1 / support, binary scores and log loss: scikit-learn's
    (``zero_division=0``), on predictions that miss a class, never predict another and tie scores."""
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    classes = 5
    y = rng.integers(0, classes - 1, 400)  # the last class is in no row
    proba = rng.dirichlet(np.ones(classes), 400).astype(np.float32)
    proba[:, 2] = 0  # never predicted
    proba[:10] = 1 / classes  # ties: argmax takes the first
    proba /= proba.sum(1, keepdims=True)
    pred = proba.argmax(1)
    labels = np.arange(classes)
    np.testing.assert_array_equal(stats.confusion_matrix(y, pred, classes), confusion_matrix(y, pred, labels=labels))
    got = stats.precision_recall_f1(y, pred, classes)
    want = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for c in range(classes):
        want_binary = precision_recall_fscore_support(y == c, pred == c, average="binary", zero_division=0)[:3]
        assert stats.binary_scores(y == c, pred == c) == tuple(float(v) for v in want_binary)
    assert stats.log_loss(y, proba) == pytest.approx(log_loss(y, proba, labels=labels), rel=1e-6)
    assert stats.balanced_accuracy(y, pred, classes) == pytest.approx(balanced_accuracy_score(y, pred))


def test_mcnemar_and_z_equal_scipys() -> None:
    from scipy.stats import binom, norm

    assert stats._z(0.95) == pytest.approx(float(norm.ppf(0.975)), rel=1e-12)
    rng = np.random.default_rng(4)
    for n_only_a, n_only_b in [(0, 1), (3, 9), (40, 41), (120, 30), (2500, 2600), (9000, 1)]:
        a = np.r_[np.ones(n_only_a, bool), np.zeros(n_only_b, bool), rng.random(50) < 0.5]
        b = np.r_[np.zeros(n_only_a, bool), np.ones(n_only_b, bool), a[n_only_a + n_only_b :]]
        n, low = n_only_a + n_only_b, min(n_only_a, n_only_b)
        want = min(1.0, max(0.0, 2 * binom.cdf(low, n, 0.5) - binom.pmf(low, n, 0.5)))
        assert stats.mcnemar(a, b) == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_stats_and_evaluation_import_neither_scikit_learn_nor_scipy() -> None:
    """A second of every command's start-up (and 0.7 s of each compare worker's) was these imports."""
    import subprocess
    import sys

    code = ("import sys, pipeline.stage2.evaluate, pipeline.stage2.thresholds, pipeline.stage2.comparing\n"
            "bad = [m for m in ('sklearn', 'scipy') if m in sys.modules]\nassert not bad, bad")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-1000:]
