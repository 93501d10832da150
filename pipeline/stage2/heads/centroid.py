"""Nearest class mean, as a linear layer with a fitted temperature."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.stage2.heads.base import ABSENT_LOGIT, AffineHead, FitResult
from pipeline.stage2.heads.fitting import fitting_threads

LOG_FLOOR = math.log(1e-12)  # a row's log-probability counts as at least this (as the clip of p at 1e-12 before)


class CentroidHead(AffineHead):
    """Nearest class mean (Euclidean). ``-|x - m_c|^2 / T`` differs from ``(2 m_c.x - |m_c|^2) / T`` only by a
    term shared by all classes, so the head is a linear layer; the temperature T is fitted on train."""

    name = "centroid"

    @torch.no_grad()
    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        # Two float32 matmuls in torch (the class sums, then the logits), float64 for the rest: a float64 copy of X
        # and numpy's matmuls were 2.5 s of a 2.6 s fit on 50,000 x 1,280 (0.2 s now); the class sums in float32
        # are within ~2e-6 relative of float64 ones.
        Xt, yt = torch.as_tensor(np.asarray(X, np.float32)), torch.as_tensor(np.asarray(y, np.int64))
        counts = torch.bincount(yt, minlength=self.num_classes).double()
        present = counts > 0
        means = (torch.nn.functional.one_hot(yt, self.num_classes).t().float() @ Xt).double()
        means[present] /= counts[present, None]
        w, b = 2 * means, -(means**2).sum(1)
        b[~present] = ABSENT_LOGIT
        z = (Xt @ w.t().float()).double() + b
        with fitting_threads(torch.device("cpu")):  # ~1 ms ops: a second thread on a busy CPU made them 10x slower
            temperature = _fit_temperature(z, yt)
        self.weight = (w / temperature).float().numpy()
        self.bias = torch.where(present, b / temperature, ABSENT_LOGIT).float().numpy()
        return FitResult(info={"temperature": temperature})


def _fit_temperature(z: torch.Tensor, y: torch.Tensor) -> float:
    """The T (log-spaced grid around the logit spread) with the lowest train log-loss of softmax(z / T); the
    first of equal losses."""
    spread = float((z - z.mean(1, keepdim=True)).std(unbiased=False)) or 1.0
    grid = spread * torch.logspace(-3, 1, 25, dtype=torch.float64)
    zy = z.gather(1, y[:, None])[:, 0]
    losses = torch.stack([(torch.logsumexp(z / t, 1) - zy / t).clamp_max(-LOG_FLOOR).mean() for t in grid])
    return float(grid[int(torch.argmin(losses))])
