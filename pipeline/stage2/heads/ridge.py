"""The ridge head: closed-form least squares with an L2 penalty, for regression targets (and, as scikit-learn's
``RidgeClassifier``, for labels coded +1/-1).

On features standardised by train's mean and std and centred targets it minimises
``||Y - Z W||^2 + alpha ||W||^2`` (scikit-learn's ``Ridge`` objective: ``alpha`` is on the sum, not the mean, of the
squared errors). It is solved in float64 on the heads' device from one eigendecomposition of the Gram matrix
``Z^T Z = V diag(l) V^T``: ``W(alpha) = V diag(1 / (l + alpha)) V^T Z^T Y``, so every ``alpha`` of the ``--sweep``
grid costs two small matmuls after it. The standardisation is then folded into the weight, so the saved layer takes
raw features like every other affine head.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.stage2.heads.base import AffineHead, FitResult, Score
from pipeline.stage2.heads.config import HeadConfig, sweep_key
from pipeline.stage2.heads.fitting import fitting_threads

# --sweep: alpha from 1e-2 to 1e6, half a decade apart (17 values; on standardised features alpha ~ n shrinks a lot)
ALPHAS = tuple(float(10**e) for e in np.arange(-2.0, 6.01, 0.5))


class RidgeSolver:
    """One eigendecomposition of standardised ``X``'s Gram matrix; :meth:`solve` for any ``alpha`` after it."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, *, device: torch.device):
        x = torch.as_tensor(np.asarray(X), dtype=torch.float64, device=device)
        y = torch.as_tensor(np.asarray(Y), dtype=torch.float64, device=device)
        self.mean = x.mean(0)
        scale = x.std(0, unbiased=False)
        self.scale = torch.where(scale > 10 * torch.finfo(torch.float64).eps, scale, torch.ones_like(scale))
        z = (x - self.mean) / self.scale
        self.y_mean = y.mean(0)
        self.evals, self.V = torch.linalg.eigh(z.T @ z)
        self.evals.clamp_(min=0)  # rounding can make a zero eigenvalue slightly negative
        self.proj = self.V.T @ (z.T @ (y - self.y_mean))  # (D, T)

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(weight (T, D), bias (T,)) on raw features, float32."""
        w = self.V @ (self.proj / (self.evals + alpha)[:, None])  # (D, T), on standardised features
        w_raw = w / self.scale[:, None]
        bias = self.y_mean - self.mean @ w_raw
        return w_raw.T.float().cpu().numpy(), bias.float().cpu().numpy()


class RidgeHead(AffineHead):
    """Closed-form ridge regression on standardised features; ``alpha`` chosen with ``--sweep``."""

    name = "ridge"

    def _targets(self, y: np.ndarray) -> np.ndarray:
        if self.regress:
            return np.asarray(y, np.float64).reshape(len(y), -1)
        return np.where(np.arange(self.num_classes)[None] == np.asarray(y)[:, None], 1.0, -1.0)  # RidgeClassifier

    def _solver(self, X: np.ndarray, y: np.ndarray) -> RidgeSolver:
        device = resolve_device(self.cfg.device)
        # One thread on the CPU: on this shared 2-core machine (load ~8) the solve of 1,438 x 1,280 real features
        # took 1.1 s with one thread and 8.1 s with two (the eigendecomposition alone 0.8 against 2.8 s).
        with fitting_threads(device):
            return RidgeSolver(X, self._targets(y), device=device)

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        self.weight, self.bias = self._solver(X, y).solve(self.cfg.alpha)
        return FitResult(info={"alpha": self.cfg.alpha})

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"alpha": a} for a in ALPHAS]

    def sweep_scores(
        self,
        X: np.ndarray,
        y: np.ndarray,
        held_out: tuple[np.ndarray, np.ndarray],
        *,
        grid: list[dict[str, float]],
        score: Score,
    ) -> list[float]:
        """Every alpha from one eigendecomposition: held-out R^2 (averaged over targets), or accuracy for labels."""
        solver = self._solver(X, y)
        scores = []
        for point in grid:
            weight, bias = solver.solve(point["alpha"])
            pred = self.held_out_logits[sweep_key(point)] = np.asarray(held_out[0], np.float32) @ weight.T + bias
            scores.append(score(held_out[1], pred))
        return scores
