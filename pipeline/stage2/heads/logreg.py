"""Multinomial logistic regression with L2 on standardised features: scikit-learn's objective, solved in torch
(full-batch L-BFGS, :mod:`pipeline.stage2.heads.lbfgs`) where the features are, or by scikit-learn
(``--solver sklearn``, the reference)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import pages
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.stage2.heads.base import (
    ABSENT_LOGIT,
    FitResult,
    Head,
    Score,
    balanced_weights,
    fold_standardiser,
    linear_module,
)
from pipeline.stage2.heads.config import HeadConfig, sweep_key
from pipeline.stage2.heads.fitting import fitting_threads
from pipeline.stage2.heads.lbfgs import OneVsRestProblem, Problem, TransposedProblem, fit_path

log = logging.getLogger(__name__)

# The regularisation grid of ssl-transfer (Ericsson et al. 2021) and dinov2's linear probes: 45 L2 strengths
# log-spaced from 1e-6 to 1e5, i.e. C = 1 / strength, solved from strong to weak.
SWEEP_STRENGTHS = np.logspace(5, -6, 45)
PATH_TOL_FACTOR = 10.0
LOGIT_ROWS = 4096


STANDARDISE_ROWS = 2048  # rows of a float64 block (21 MB at 1,280-d): no float64 copy of the whole matrix


def standardise(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) as sklearn's ``StandardScaler`` computes them (float64 sums, a constant feature's scale set to
    1), on the device ``X`` is on; returned in ``X``'s dtype. Float32 ``X`` is summed a block of rows at a time
    through one float64 buffer: ``X.mean(dtype=float64)`` alone made a float64 copy of the whole matrix (614 MB at
    60,000 x 1,280), and a new float64 block per step faulted its pages in anew; the two took 1.36 s, 0.3 s now."""
    if X.dtype == torch.float64:
        mean, var = X.mean(0), X.var(0, unbiased=False)
    else:
        buffer = torch.empty(max(1, min(STANDARDISE_ROWS, len(X))), X.shape[1], dtype=torch.float64, device=X.device)
        total = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
        for rows, block in _row_blocks(X, buffer):
            total += block.copy_(X[rows]).sum(0)
        mean = total / len(X)
        var = torch.zeros_like(mean)
        for rows, block in _row_blocks(X, buffer):
            var += block.copy_(X[rows]).sub_(mean).square_().sum(0)
        var = var / len(X)
    scale = var.sqrt()
    scale[scale < 10 * torch.finfo(torch.float64).eps] = 1.0
    return mean.to(X.dtype), scale.to(X.dtype)


def standardised_transposed(X: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``((X - mean) / scale)^T``, (D, N) contiguous, standardised a block of rows at a time: the same values as the
    whole matrix at once, without a (N, D) copy beside the transposed one."""
    Zt = pages.tensor((X.shape[1], len(X)), X.dtype, device=X.device)
    buffer = torch.empty(max(1, min(STANDARDISE_ROWS, len(X))), X.shape[1], dtype=X.dtype, device=X.device)
    for rows, block in _row_blocks(X, buffer):
        Zt[:, rows].copy_(torch.sub(X[rows], mean, out=block).div_(scale).t())
    return Zt


def _row_blocks(X: torch.Tensor, buffer: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Consecutive slices of ``X``'s rows, each with as many rows of ``buffer`` to work in: one allocation for
    the whole pass (a new block per step faulted its pages in anew)."""
    for start in range(0, len(X), len(buffer)):
        rows = slice(start, min(start + len(buffer), len(X)))
        yield rows, buffer[: rows.stop - start]


def logreg_problem(
    X: torch.Tensor, y: np.ndarray, *, class_weight: str, num_classes: int
) -> tuple[Problem, np.ndarray, tuple[torch.Tensor, torch.Tensor], float]:
    """The L-BFGS problem on standardised ``X`` over the classes present in ``y`` (as sklearn fits only those):
    ``(problem, classes present, (mean, scale), sum of the row weights)``."""
    present = np.flatnonzero(np.bincount(y, minlength=num_classes))
    if len(present) < 2:
        raise PipelineError("logreg needs at least 2 classes in train; this train split has one")
    mean, scale = standardise(X)
    if TransposedProblem.wanted(X):  # standardised straight into the transposed layout: one copy of X, not two
        Z = standardised_transposed(X, mean, scale).t()
    else:
        Z = torch.sub(X, mean, out=torch.empty_like(X)).div_(scale)  # one copy, not two
    remap = np.zeros(num_classes, np.int64)
    remap[present] = np.arange(len(present))
    yt = torch.as_tensor(remap[y], device=X.device)
    weight = None
    if class_weight == "balanced":  # sklearn's "balanced", computed over the classes present
        weight = torch.as_tensor(balanced_weights(y, num_classes)[present], dtype=X.dtype, device=X.device)
    total = float(len(y)) if weight is None else float(weight[yt].sum())
    problem = TransposedProblem.of(Problem.build(Z, yt, classes=len(present), class_weight=weight))
    return problem, present, (mean, scale), total


class LogRegHead(Head):
    """Multinomial logistic regression (scikit-learn's objective) on standardised features.

    Standardising matters: unscaled CNN features make lbfgs take 5-10x longer or stop unconverged.
    The fitted model is stored as a linear layer plus the scaler's mean/scale.
    """

    name = "logreg"
    DTYPE = torch.float32  # float64 for the checks against scikit-learn (tests)

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        if self.cfg.task == "multilabel":
            return self._fit_one_vs_rest(X, y)
        if self.cfg.solver == "sklearn":
            return self._fit_sklearn(X, y)
        device = resolve_device(self.cfg.device)
        Xd = torch.as_tensor(np.asarray(X), device=device).to(self.DTYPE)
        with fitting_threads(device):
            problem, present, (mean, scale), total = logreg_problem(
                Xd, np.asarray(y), class_weight=self.cfg.class_weight, num_classes=self.num_classes
            )
            (sol,) = fit_path(problem, [1.0 / (self.cfg.C * total)], max_iter=self.cfg.max_iter, tol=self.cfg.tol)
        self._warn_unless(sol.converged)
        theta = sol.theta.cpu().numpy()
        self._set(theta[:, :-1], theta[:, -1], mean.cpu().numpy(), scale.cpu().numpy(), classes_seen=present)
        return FitResult(info={"converged": sol.converged, "n_iter": sol.n_iter, "solver": "torch"})

    def _fit_sklearn(self, X: np.ndarray, y: np.ndarray) -> FitResult:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        if len(np.unique(y)) < 2:
            raise PipelineError("logreg needs at least 2 classes in train; this train split has one")
        mean, scale = (t.numpy() for t in standardise(torch.as_tensor(np.asarray(X, np.float32))))
        clf = LogisticRegression(
            C=self.cfg.C,
            max_iter=self.cfg.max_iter,
            tol=self.cfg.tol,
            random_state=self.cfg.seed,
            class_weight="balanced" if self.cfg.class_weight == "balanced" else None,
        )
        # One BLAS/OpenMP thread, for the reason fitting_threads gives: on 50,000 x 512 this fit took 4-25 s with
        # the default 2 threads in bench runs on a shared 2-core box, and 0.7 s with 1 (0.9 s with 2) when quiet.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit((np.asarray(X, np.float32) - mean) / scale, y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self._warn_unless(converged)
        coef, intercept = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:  # binary: sklearn keeps one row for the positive class
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
        self._set(coef, intercept, mean, scale, classes_seen=clf.classes_)
        return FitResult(info={"converged": converged, "n_iter": int(np.max(clf.n_iter_)), "solver": "sklearn"})

    def _warn_unless(self, converged: bool) -> None:
        if not converged:
            log.warning("logreg did not converge in %d iterations; raise --max-iter", self.cfg.max_iter)

    def _set(self, coef: Any, intercept: Any, mean: Any, scale: Any, *, classes_seen: np.ndarray) -> None:
        self.weight = np.zeros((self.num_classes, self.feature_dim), np.float32)
        self.bias = np.full(self.num_classes, ABSENT_LOGIT, np.float32)
        self.weight[classes_seen] = coef
        self.bias[classes_seen] = intercept
        self.mean, self.scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"C": float(1.0 / s)} for s in SWEEP_STRENGTHS]

    def sweep_scores(
        self,
        X: np.ndarray,
        y: np.ndarray,
        held_out: tuple[np.ndarray, np.ndarray],
        *,
        grid: list[dict[str, float]],
        score: Score,
    ) -> list[float]:
        """The whole grid along one regularisation path (strong to weak), each fit warm-started from the last; each
        point's held-out logits kept (``held_out_logits``) and scored by ``score``, so what choice.guard tests is
        what was scored."""
        if self.cfg.solver == "sklearn":
            return super().sweep_scores(X, y, held_out, grid=grid, score=score)
        if self.cfg.task == "multilabel":
            return self._sweep_one_vs_rest(X, y, held_out, grid=grid, score=score)
        device = resolve_device(self.cfg.device)
        Xd = torch.as_tensor(np.asarray(X), device=device).to(self.DTYPE)
        with fitting_threads(device):
            problem, present, (mean, scale), total = logreg_problem(
                Xd, np.asarray(y), class_weight=self.cfg.class_weight, num_classes=self.num_classes
            )
            Zh = (torch.as_tensor(np.asarray(held_out[0]), device=device).to(self.DTYPE) - mean) / scale
            lams = [1.0 / (p["C"] * total) for p in grid]
            scores, iters = [], 0
            # 10x looser along the path: a held-out accuracy needs the predictions, not W's last digits; this
            # keeps the 45 fits at 1-2x the iterations of one (measured on real MobileNetV2 features, 50,000 x 512).
            paths = fit_path(problem, lams, max_iter=self.cfg.max_iter, tol=PATH_TOL_FACTOR * self.cfg.tol)
            for point, sol in zip(grid, paths):
                z = self.held_out_logits[sweep_key(point)] = np.full((len(Zh), self.num_classes), ABSENT_LOGIT,
                                                                     np.float32)  # fmt: skip
                z[:, present] = torch.addmm(sol.theta[:, -1], Zh, sol.theta[:, :-1].t()).cpu().numpy()  # as _set
                scores.append(score(held_out[1], z))
                iters += sol.n_iter
        self.sweep_info = {"iterations": iters, "path_tol": PATH_TOL_FACTOR * self.cfg.tol, "solver": "torch"}
        log.info("logreg sweep: %d L-BFGS iterations along the path of %d values", iters, len(grid))
        return scores

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Standardised a block of rows at a time: a whole standardised copy of 50,000 x 1,280 cost ~1 s in
        page faults, 10x the matmul."""
        out = np.empty((len(X), self.num_classes), np.float32)
        for start in range(0, len(X), LOGIT_ROWS):
            Z = (np.asarray(X[start : start + LOGIT_ROWS], np.float32) - self.mean) / self.scale
            out[start : start + LOGIT_ROWS] = Z @ self.weight.T + self.bias
        return out

    def as_module(self) -> nn.Module:
        layer = linear_module(self.weight, self.bias)  # the standardisation folds into the one linear layer
        with torch.no_grad():
            fold_standardiser(layer.weight, layer.bias, self.mean, self.scale)
        return layer

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias, self.mean, self.scale = (state[k] for k in ("weight", "bias", "mean", "scale"))

    # ---- several labels per image: one-vs-rest, one L-BFGS over all labels (lbfgs.OneVsRestProblem)

    def _fit_one_vs_rest(self, X: np.ndarray, Y: np.ndarray) -> FitResult:
        if self.cfg.solver == "sklearn":
            return self._fit_one_vs_rest_sklearn(X, Y)
        device = resolve_device(self.cfg.device)
        Xd = torch.as_tensor(np.asarray(X), device=device).to(self.DTYPE)
        with fitting_threads(device):
            problem, varying, (mean, scale) = one_vs_rest_problem(Xd, np.asarray(Y))
            (sol,) = fit_path(problem, [1.0 / (self.cfg.C * len(Y))], max_iter=self.cfg.max_iter, tol=self.cfg.tol)
        self._warn_unless(sol.converged)
        theta = sol.theta.cpu().numpy()
        self._set_labels(theta[:, :-1], theta[:, -1], mean.cpu().numpy(), scale.cpu().numpy(), Y=Y, varying=varying)
        return FitResult(info={"converged": sol.converged, "n_iter": sol.n_iter, "solver": "torch"})

    def _fit_one_vs_rest_sklearn(self, X: np.ndarray, Y: np.ndarray) -> FitResult:
        """The reference: scikit-learn's binary ``LogisticRegression`` once per label (what ``OneVsRestClassifier``
        does), on the same standardised features."""
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        Y = np.asarray(Y)
        varying = _varying_labels(Y)
        mean, scale = (t.numpy() for t in standardise(torch.as_tensor(np.asarray(X, np.float32))))
        Z = (np.asarray(X, np.float32) - mean) / scale
        coef, intercept, iters = [], [], []
        with threadpool_limits(limits=1):  # one thread: see _fit_sklearn
            for j in varying:
                clf = LogisticRegression(C=self.cfg.C, max_iter=self.cfg.max_iter, tol=self.cfg.tol,
                                         random_state=self.cfg.seed).fit(Z, Y[:, j])  # fmt: skip
                coef.append(clf.coef_[0])
                intercept.append(clf.intercept_[0])
                iters.append(int(clf.n_iter_[0]))
        self._set_labels(np.array(coef), np.array(intercept), mean, scale, Y=Y, varying=varying)
        converged = max(iters) < self.cfg.max_iter
        self._warn_unless(converged)
        return FitResult(info={"converged": converged, "n_iter": max(iters), "solver": "sklearn"})

    def _set_labels(self, coef: Any, intercept: Any, mean: Any, scale: Any, *, Y: np.ndarray,
                    varying: np.ndarray) -> None:  # fmt: skip
        """As :meth:`_set`, then a label every train row has gets a very high logit (one no row has: very low)."""
        self._set(coef, intercept, mean, scale, classes_seen=varying)
        self.bias[np.asarray(Y).astype(bool).all(0)] = -ABSENT_LOGIT

    def _sweep_one_vs_rest(
        self, X: np.ndarray, Y: np.ndarray, held_out: tuple[np.ndarray, np.ndarray], *, grid: list[dict[str, float]],
        score: Score,
    ) -> list[float]:  # fmt: skip
        """The grid along one regularisation path, as for classes; each point scored by ``score`` (held-out mAP)
        on the logits of every label (a label constant in train at its constant logit)."""
        device = resolve_device(self.cfg.device)
        Xd = torch.as_tensor(np.asarray(X), device=device).to(self.DTYPE)
        constant = np.where(np.asarray(Y).astype(bool).all(0), -ABSENT_LOGIT, ABSENT_LOGIT).astype(np.float32)
        scores, iters = [], 0
        with fitting_threads(device):
            problem, varying, (mean, scale) = one_vs_rest_problem(Xd, np.asarray(Y))
            Zh = (torch.as_tensor(np.asarray(held_out[0]), device=device).to(self.DTYPE) - mean) / scale
            lams = [1.0 / (p["C"] * len(Y)) for p in grid]
            paths = fit_path(problem, lams, max_iter=self.cfg.max_iter, tol=PATH_TOL_FACTOR * self.cfg.tol)
            for point, sol in zip(grid, paths):
                z = self.held_out_logits[sweep_key(point)] = np.tile(constant, (len(Zh), 1))
                z[:, varying] = torch.addmm(sol.theta[:, -1], Zh, sol.theta[:, :-1].t()).cpu().numpy()
                scores.append(score(held_out[1], z))
                iters += sol.n_iter
        self.sweep_info = {"iterations": iters, "path_tol": PATH_TOL_FACTOR * self.cfg.tol, "solver": "torch"}
        return scores


def _varying_labels(Y: np.ndarray) -> np.ndarray:
    """The labels train has both with and without (one-vs-rest fits only these); none is one line."""
    Y = np.asarray(Y).astype(bool)
    varying = np.flatnonzero(Y.any(0) & ~Y.all(0))
    if not len(varying):
        raise PipelineError("logreg needs a label that some train images have and some lack; every label here is "
                            "on all train images or on none")  # fmt: skip
    return varying


def one_vs_rest_problem(
    X: torch.Tensor, Y: np.ndarray
) -> tuple[OneVsRestProblem, np.ndarray, tuple[torch.Tensor, torch.Tensor]]:
    """The one-vs-rest L-BFGS problem on standardised ``X`` over the labels train has both with and without:
    ``(problem, those labels, (mean, scale))``."""
    varying = _varying_labels(Y)
    mean, scale = standardise(X)
    Yt = torch.as_tensor(np.asarray(Y)[:, varying], device=X.device)
    return OneVsRestProblem.build_multi((X - mean) / scale, Yt), varying, (mean, scale)
