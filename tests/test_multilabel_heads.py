"""Several labels per image, the parts that need no images: the label-stratified held-out split, one-vs-rest logreg
against scikit-learn's binary LogisticRegression per label, the multi-label centroid's Platt scaling against
scikit-learn, and labels that train has on every row or on none."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stage2.heads import HeadConfig, build_head
from pipeline.stage2.multilabel import mean_average_precision, sigmoid, stratified_multilabel_holdout
from pipeline.stage2.protocol import random_holdout


def _rare_labels(seed: int, n: int = 300) -> np.ndarray:
    """(n, 40) multi-hot: 20 rare labels (0.1-2% of rows, many with 2-6 positives) and 20 common ones."""
    rng = np.random.default_rng(seed)
    freq = np.r_[rng.uniform(0.001, 0.02, 20), rng.uniform(0.05, 0.5, 20)]
    return (rng.random((n, len(freq))) < freq).astype(np.uint8)


def _missing_a_side(y: np.ndarray, fit: np.ndarray, held: np.ndarray) -> list[int]:
    """Labels with 2+ positives that have none in one of the parts."""
    return [j for j in range(y.shape[1]) if y[:, j].sum() >= 2 and not (y[fit, j].any() and y[held, j].any())]


def test_stratified_holdout_puts_each_label_with_two_positives_on_both_sides() -> None:
    random_missing = 0
    for seed in range(20):
        y = _rare_labels(seed)
        fit, held = stratified_multilabel_holdout(y, fraction=0.2, seed=seed)
        assert np.array_equal(np.sort(np.r_[fit, held]), np.arange(len(y)))  # a partition of the rows
        assert abs(len(held) - 0.2 * len(y)) <= 0.05 * len(y)
        assert _missing_a_side(y, fit, held) == []
        random_missing += len(_missing_a_side(y, *random_holdout(len(y), fraction=0.2, seed=seed)))
        # the common labels keep their share in the held-out part
        common = slice(20, 40)
        share = y[held, common].sum(0) / np.maximum(1, y[:, common].sum(0))
        assert np.abs(share - 0.2).max() < 0.1, share
    assert random_missing > 50  # what the random part did on the same data (330 labels over the 20 draws)
    again = stratified_multilabel_holdout(y, fraction=0.2, seed=19)
    assert all(np.array_equal(a, b) for a, b in zip(again, (fit, held)))  # seeded


def test_stratified_holdout_edge_cases() -> None:
    y = np.zeros((4, 3), np.uint8)
    assert [len(p) for p in stratified_multilabel_holdout(y, fraction=0.2, seed=0)] == [4, 0]  # under 5 rows
    y = np.zeros((50, 3), np.uint8)  # no labels at all: rows still split by count
    fit, held = stratified_multilabel_holdout(y, fraction=0.2, seed=0)
    assert len(held) == 10 and len(fit) == 40
    # three labels on three rows, each pair sharing one: no two parts separate all three; it still partitions
    y = np.zeros((30, 3), np.uint8)
    y[0, [0, 1]] = y[1, [1, 2]] = y[2, [0, 2]] = 1
    fit, held = stratified_multilabel_holdout(y, fraction=0.2, seed=0)
    assert np.array_equal(np.sort(np.r_[fit, held]), np.arange(30)) and len(_missing_a_side(y, fit, held)) <= 1


def _separable(seed: int = 0, n: int = 500, d: int = 16, labels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + 2).astype(np.float32)
    Y = ((X - 2) @ rng.normal(size=(d, labels)) + rng.normal(size=(n, labels)) * 2 > 1).astype(np.float32)
    return X, Y


def test_one_vs_rest_logreg_matches_scikit_learn_per_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """One L-BFGS over the (L, D + 1) parameter = scikit-learn's binary LogisticRegression on each label: in float64
    with a tight tolerance, coefficients within 1e-3 relative; the --solver sklearn path gives the same."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from pipeline.stage2.heads.logreg import LogRegHead

    X, Y = _separable()
    cfg = HeadConfig(head="logreg", task="multilabel", C=0.1, tol=1e-9, max_iter=5000, device="cpu")
    monkeypatch.setattr(LogRegHead, "DTYPE", torch.float64)
    ours = build_head(cfg, num_classes=Y.shape[1], feature_dim=X.shape[1])
    info = ours.fit(X, Y).info
    assert info["converged"] and info["solver"] == "torch"
    Xd = X.astype(np.float64)
    Z = (Xd - Xd.mean(0)) / Xd.std(0)
    for j in range(Y.shape[1]):
        ref = LogisticRegression(C=cfg.C, tol=1e-10, max_iter=10_000).fit(Z, Y[:, j])
        rel = np.abs(ours.weight[j] - ref.coef_[0]).max() / np.abs(ref.coef_).max()
        assert rel < 1e-3, (j, rel)
        assert ours.bias[j] == pytest.approx(ref.intercept_[0], abs=1e-3 * max(1, abs(ref.intercept_[0])))
    sk = build_head(replace(cfg, solver="sklearn"), num_classes=Y.shape[1], feature_dim=X.shape[1])
    assert sk.fit(X, Y).info["solver"] == "sklearn"
    np.testing.assert_allclose(sk.logits(X), ours.logits(X), atol=1e-2 * np.abs(ours.logits(X)).max())


def test_one_vs_rest_sweep_path_scores_as_separate_fits() -> None:
    """The C path (warm-started, 10x looser) scores each point's held-out mAP as a fresh fit at that C does."""
    from pipeline.stage2.heads.logreg import LogRegHead

    X, Y = _separable(seed=1)
    cfg = HeadConfig(head="logreg", task="multilabel", device="cpu")
    head = build_head(cfg, num_classes=Y.shape[1], feature_dim=X.shape[1])
    grid = LogRegHead.sweep_grid(cfg)[::4]
    scores = head.sweep_scores(X[:400], Y[:400], (X[400:], Y[400:]), grid=grid, score=mean_average_precision)
    assert len(scores) == len(grid) and head.sweep_info["iterations"] > 0
    for point, got in list(zip(grid, scores))[::3]:
        fresh = build_head(replace(cfg, **point), num_classes=Y.shape[1], feature_dim=X.shape[1])
        fresh.fit(X[:400], Y[:400])
        assert got == pytest.approx(mean_average_precision(Y[400:], fresh.logits(X[400:])), abs=0.01), point
    assert max(scores) > scores[0]  # the path moves: the strongest L2 (C = 1e-5) ranks worse than the best C


def test_centroid_platt_scaling_matches_scikit_learn() -> None:
    """Each label's (a, c) is the logistic fit of the centroid score to Platt's smoothed targets, as scikit-learn
    finds it unregularised (targets as two weighted rows per sample)."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from pipeline.stage2.heads.centroid import label_centroids, platt

    X, Y = _separable(seed=2)
    Xt, Yt = torch.as_tensor(X), torch.as_tensor(Y) > 0.5
    pos, neg = label_centroids(Xt, Yt)
    np.testing.assert_allclose(pos[0].numpy(), X[Y[:, 0] > 0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(neg[0].numpy(), X[Y[:, 0] == 0].mean(0), rtol=1e-5)
    s = Xt.double() @ (2 * (pos - neg)).t() + ((neg**2).sum(1) - (pos**2).sum(1))
    a, c = platt(s, Yt)
    n = len(Y)
    for j in range(Y.shape[1]):
        k = Y[:, j].sum()
        t = np.where(Y[:, j] > 0, (k + 1) / (k + 2), 1 / (n - k + 2))
        S = s[:, j].numpy()[:, None]
        ref = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000)
        ref.fit(np.r_[S, S], np.r_[np.ones(n), np.zeros(n)], sample_weight=np.r_[t, 1 - t])
        assert float(a[j]) == pytest.approx(ref.coef_[0, 0], rel=1e-4)
        assert float(c[j]) == pytest.approx(ref.intercept_[0], abs=1e-4)


@pytest.mark.parametrize("name", ["logreg", "centroid"])
def test_labels_on_every_row_or_none(name: str) -> None:
    X, Y = _separable(seed=3)
    Y[:, 1], Y[:, 3] = 0, 1
    head = build_head(HeadConfig(head=name, task="multilabel", device="cpu"), num_classes=5, feature_dim=16)
    head.fit(X[:400], Y[:400])
    p = sigmoid(head.logits(X[400:]))
    assert (p[:, 1] < 1e-6).all() and (p[:, 3] > 1 - 1e-6).all()
    assert mean_average_precision(Y[400:, [0, 2, 4]], p[:, [0, 2, 4]]) > 0.8  # the others still learned
    Y[:, :] = 0
    if name == "logreg":
        with pytest.raises(PipelineError, match="some train images have and some lack") as e:
            head.fit(X, Y)
        assert "\n" not in str(e.value)


def test_mosaics_rewritten_the_same_keep_their_files(tmp_path: Path) -> None:
    """``python -m pipeline.bench.mosaics`` run again leaves unchanged files alone, so extract reuses its features
    (their identity covers the files' times); another seed rewrites them."""
    from pipeline.bench.mosaics import write_mosaics

    first = write_mosaics(tmp_path, n=6)
    labels = (tmp_path / "labels.csv").read_text()
    times = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert write_mosaics(tmp_path, n=6) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == times
    assert write_mosaics(tmp_path, n=6, seed=1) != first and (tmp_path / "labels.csv").read_text() != labels
