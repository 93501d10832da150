"""Likely wrong labels: out-of-fold class probabilities from logistic regression on the cached features, ranked by
confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 2021), implemented here (cleanlab, the reference implementation, is AGPL).

Folds: each split is cut into K stratified folds of its own (train and val apart), and fold f's model is fitted on
every image of both splits outside fold f, so every image gets probabilities from a model that never saw it.
The model is the project's ``logreg`` head objective (standardised features, L2, full-batch L-BFGS in torch on the
heads' device), at its default C.

Confident learning: class j's threshold t_j is the mean probability of j over the images labelled j (its average
self-confidence). An image is counted in the confident joint under the class j, among those with p_j >= t_j, that
has the largest p_j; an image counted under a class other than its label is a label issue. Issues are ranked by
self-confidence (the probability of the given label), lowest first; ``score`` is 1 - self-confidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
# L-BFGS iterations per fold: a ranking needs the probabilities, not the weights' last digits. On the planted digits
# (tests/test_audit.py) 25, 50, 100 and 1,000 iterations gave the same recall at 50 and out-of-fold accuracy.
OOF_MAX_ITER = 100


@dataclass
class OutOfFold:
    """Out-of-fold probabilities (N, C) of the rows of train then val, and the folds actually used."""

    proba: np.ndarray
    folds: int
    note: str | None = None  # said when fewer folds than asked were possible


def fold_of(labels: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """A stratified fold number for every row: each class's rows shuffled and dealt round-robin."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), np.int64)
    start = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        out[idx] = (np.arange(len(idx)) + start) % folds
        start += len(idx)  # the next class continues the deal: small classes do not all land in fold 0
    return out


def choose_folds(labels_by_split: list[np.ndarray], *, folds: int) -> tuple[int, str | None]:
    """``folds``, or fewer when a class has fewer images than that in a split (at least 2); the note says why."""
    counts = [np.bincount(y) for y in labels_by_split if len(y)]
    smallest = min(int(c[c > 0].min()) for c in counts)
    if smallest >= folds:
        return folds, None
    used = max(2, smallest)
    return used, f"{used} folds instead of {folds}: a class has only {smallest} image(s) in a split"


def fit_proba(
    X_fit: torch.Tensor,
    y_fit: np.ndarray,
    X_out: torch.Tensor,
    *,
    num_classes: int,
    C: float,
    max_iter: int,
    tol: float,
) -> np.ndarray:
    """Class probabilities of ``X_out`` from the logreg head's objective fitted on ``(X_fit, y_fit)``; classes absent
    from ``y_fit`` get probability 0."""
    from pipeline.stage2.heads.lbfgs import fit_path
    from pipeline.stage2.heads.logreg import logreg_problem

    problem, present, (mean, scale), total = logreg_problem(X_fit, y_fit, class_weight="none", num_classes=num_classes)
    (sol,) = fit_path(problem, [1.0 / (C * total)], max_iter=max_iter, tol=tol)
    if not sol.converged:
        log.info("out-of-fold logreg stopped at %d iterations (enough to rank; see OOF_MAX_ITER)", max_iter)
    Z = (X_out - mean) / scale
    p = torch.softmax(torch.addmm(sol.theta[:, -1], Z, sol.theta[:, :-1].t()), 1).cpu().numpy()
    out = np.zeros((len(p), num_classes), np.float32)
    out[:, present] = p
    return out


@torch.inference_mode()
def out_of_fold(
    features: list[np.ndarray], labels: list[np.ndarray], *, num_classes: int, device: torch.device,
    folds: int = DEFAULT_FOLDS, seed: int = 0, C: float = 1.0, max_iter: int = OOF_MAX_ITER, tol: float = 1e-4,
) -> OutOfFold:  # fmt: skip
    """Out-of-fold probabilities for the rows of every split (concatenated in the order given)."""
    from pipeline.stage2.heads.fitting import fitting_threads

    used, note = choose_folds(labels, folds=folds)
    fold = np.concatenate([fold_of(y, folds=used, seed=seed + s) for s, y in enumerate(labels)])
    X = torch.as_tensor(np.concatenate(features), device=device).float()
    y = np.concatenate(labels)
    proba = np.zeros((len(y), num_classes), np.float32)
    with fitting_threads(device):
        for f in range(used):
            held = fold == f
            keep = torch.as_tensor(~held, device=device)
            out = torch.as_tensor(held, device=device)
            proba[held] = fit_proba(X[keep], y[~held], X[out], num_classes=num_classes, C=C, max_iter=max_iter, tol=tol)
    return OutOfFold(proba=proba, folds=used, note=note)


def confident_issues(proba: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confident learning's label issues: ``(rows, suggested class, score)``, ranked most likely wrong first."""
    n, num_classes = proba.shape
    thresholds = np.full(num_classes, np.inf)
    for j in np.unique(labels):
        thresholds[j] = proba[labels == j, j].mean()
    above = proba >= thresholds[None, :] - 1e-12
    masked = np.where(above, proba, -1.0)
    confident = masked.argmax(1)
    has = above.any(1)
    rows = np.flatnonzero(has & (confident != labels))
    self_conf = proba[rows, labels[rows]]
    order = np.argsort(self_conf, kind="stable")
    rows = rows[order]
    return rows, confident[rows], 1.0 - self_conf[order]
