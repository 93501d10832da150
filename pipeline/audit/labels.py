"""Likely wrong labels: out-of-fold class probabilities from logistic regression on the cached features, ranked by
confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 2021), implemented here (cleanlab, the reference implementation, is AGPL).

Folds: each split is cut into K stratified folds of its own (train and val apart), and fold f's model is fitted on
every image of both splits outside fold f, so every image gets probabilities from a model that never saw it.
The model is the project's ``logreg`` head objective (L2, the mean log-loss, full-batch L-BFGS in torch on the
heads' device), at its default C, on the features projected on their first :data:`LABEL_DIM` principal directions
(both fitted on all rows, without labels); each fold starts from the previous fold's weights.

Confident learning: class j's threshold t_j is the mean probability of j over the images labelled j (its average
self-confidence). An image is counted in the confident joint under the class j, among those with p_j >= t_j, that
has the largest p_j; an image counted under a class other than its label is a label issue. Issues are ranked by
self-confidence (the probability of the given label), lowest first; ``score`` is 1 - self-confidence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.stage2.heads.fitting import fitting_threads
from pipeline.stage2.heads.lbfgs import Precondition, Problem, Solution, correlation_preconditioner, lbfgs

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
# L-BFGS iterations per fold: a ranking needs the probabilities, not the weights' last digits. On the planted digits
# (tests/test_audit.py) 25, 50, 100 and 1,000 iterations gave the same recall at 50 and out-of-fold accuracy; on
# 100,000 x 2,048 a fold on 256 directions is 0.2 s an iteration on the shared CPU.
OOF_MAX_ITER = 50
# The folds' models see the features on their first LABEL_DIM principal directions: on 100,000 x 2,048 the five fits
# on all columns took 501 s of the audit's 777 s; see docs/audit.md for what the projection keeps.
LABEL_DIM = 256


@dataclass
class OutOfFold:
    """Out-of-fold probabilities (N, C) of the rows of train then val, and the folds actually used."""

    proba: np.ndarray
    folds: int
    note: str | None = None  # said when fewer folds than asked were possible
    iterations: list[int] | None = None  # L-BFGS iterations of each fold
    # What the folds' models saw, for one more fit of the same model (the score pass, :func:`refit`): the rows'
    # design matrix (standardised, on the principal directions), the last fold's weights, the preconditioner.
    design: torch.Tensor | None = None
    theta: torch.Tensor | None = None
    precondition: Precondition | None = None


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


def fit_fold(
    Z: torch.Tensor, y: torch.Tensor, *, num_classes: int, C: float, max_iter: int, tol: float,
    theta: torch.Tensor | None = None, precondition: Precondition | None = None,
) -> Solution:  # fmt: skip
    """The logreg head's objective (L2 at ``C``, the mean log-loss; :mod:`pipeline.stage2.heads.lbfgs`) fitted on the
    standardised rows ``Z`` with labels ``y`` over all ``num_classes`` classes, by L-BFGS from ``theta`` (zeros when
    None): the folds start from the previous fold's weights, a few iterations from their own optimum."""
    problem = Problem.build(Z, y, classes=num_classes, class_weight=None)
    lam = 1.0 / (C * len(y))
    start = theta if theta is not None else torch.zeros(num_classes, Z.shape[1] + 1, dtype=Z.dtype, device=Z.device)
    sol = lbfgs(lambda t: problem.loss_grad(t, lam), start, max_iter=max_iter, tol=tol, precondition=precondition)
    if not sol.converged:
        log.info("out-of-fold logreg stopped at %d iterations (enough to rank; see OOF_MAX_ITER)", max_iter)
    return sol


def project_for_labels(X: torch.Tensor, *, dim: int = LABEL_DIM, seed: int = 0) -> torch.Tensor:
    """The folds' design matrix: ``X`` standardised (over all rows, as the logreg head standardises train), then on
    its first ``dim`` principal directions (fitted on a sample, as the neighbour search's), not rescaled: the
    subspace that carries most of the full model's input. ``X`` standardised when it has no more than ``dim``
    columns. On the planted digits (1,280 columns), recall at 50 of the moved labels: all columns standardised
    14 / 20, these 256 directions 19 / 20, 512 of them 18 / 20, 256 directions rescaled to unit variance 14 / 20."""
    from pipeline.audit.neighbours import principal_basis
    from pipeline.stage2.heads.logreg import standardise

    mean, scale = standardise(X)
    if not 0 < dim < X.shape[1]:
        return ((X - mean) / scale).contiguous()
    centre, V = principal_basis(X, dim=dim, seed=seed, prepare=lambda rows: (rows - mean) / scale)
    # ((X - mean) / scale - centre) @ V with the scaling folded into V: no standardised copy of all of X.
    V = V / scale[:, None]
    return torch.addmm(-((mean + centre[0] * scale) @ V), X, V)


@torch.inference_mode()
def out_of_fold(
    features: list[np.ndarray], labels: list[np.ndarray], *, num_classes: int, device: torch.device,
    folds: int = DEFAULT_FOLDS, seed: int = 0, C: float = 1.0, max_iter: int = OOF_MAX_ITER, tol: float = 1e-4,
    dim: int = LABEL_DIM, projected: torch.Tensor | None = None,
) -> OutOfFold:  # fmt: skip
    """Out-of-fold probabilities for the rows of every split (concatenated in the order given). The models see the
    features standardised and projected on their first ``dim`` principal directions (:func:`project_for_labels`;
    or ``projected``: those rows, already made), fitted on all rows without labels: no fold's labels reach another."""
    used, note = choose_folds(labels, folds=folds)
    fold = np.concatenate([fold_of(y, folds=used, seed=seed + s) for s, y in enumerate(labels)])
    if projected is None:
        X = torch.as_tensor(np.concatenate(features), device=device).float()
        projected = project_for_labels(X, dim=dim, seed=seed)
    Z = projected
    y = torch.as_tensor(np.concatenate(labels), device=device)
    proba = torch.zeros((len(y), num_classes), dtype=torch.float32, device=device)
    theta, iterations = None, []
    # The principal directions keep their own variances: the correlation preconditioner evens them out (computed
    # once: the folds share the rows' distribution).
    precondition = correlation_preconditioner(Z, seed=seed)
    for f in range(used):
        held = torch.as_tensor(fold == f, device=device)
        with fitting_threads(device):  # small steps: one thread was 2.8x less CPU than two on the shared CPU
            sol = fit_fold(
                Z[~held],
                y[~held],
                num_classes=num_classes,
                C=C,
                max_iter=max_iter,
                tol=tol,
                theta=theta,
                precondition=precondition,
            )
        theta = sol.theta
        iterations.append(sol.n_iter)
        W, b = theta[:, :-1], theta[:, -1]
        proba[held] = torch.softmax(torch.addmm(b, Z[held], W.t()), 1)
    log.info("out-of-fold logreg: %s L-BFGS iterations per fold", iterations)
    return OutOfFold(proba=proba.cpu().numpy(), folds=used, note=note, iterations=iterations, design=Z, theta=theta,
                     precondition=precondition)  # fmt: skip


def refit(
    oof: OutOfFold, *, rows: np.ndarray, labels: np.ndarray, num_classes: int, C: float = 1.0,
    max_iter: int = OOF_MAX_ITER, tol: float = 1e-4,
) -> tuple[Solution, Callable[[np.ndarray], np.ndarray]]:  # fmt: skip
    """The folds' model fitted once more, on the rows ``rows`` (a mask over the rows of every split) with their
    ``labels``, from the last fold's weights: ``(solution, predict)``, ``predict(mask)`` the class probabilities of
    the rows in ``mask``. The score pass's model when it is asked for this one (``--head pca-logreg``)."""
    assert oof.design is not None and oof.theta is not None
    Z = oof.design
    with torch.inference_mode():
        keep = torch.as_tensor(rows, device=Z.device)
        y = torch.as_tensor(labels, device=Z.device)
        with fitting_threads(Z.device):
            sol = fit_fold(Z[keep], y, num_classes=num_classes, C=C, max_iter=max_iter, tol=tol, theta=oof.theta,
                           precondition=oof.precondition)  # fmt: skip

    def predict(mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            W, b = sol.theta[:, :-1], sol.theta[:, -1]
            return torch.softmax(torch.addmm(b, Z[torch.as_tensor(mask, device=Z.device)], W.t()), 1).cpu().numpy()

    return sol, predict


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
