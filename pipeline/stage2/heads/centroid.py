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
        if self.cfg.task == "multilabel":
            return self._fit_labels(X, y)
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

    def _fit_labels(self, X: np.ndarray, Y: np.ndarray) -> FitResult:
        """Several labels per image: label j scores a row by how much nearer it is to the mean of the train rows
        with j than to the mean of those without, ``|x - m-|^2 - |x - m+|^2 = 2 (m+ - m-).x + |m-|^2 - |m+|^2``
        (linear in x, so the head stays one layer), and a per-label Platt scaling (:func:`platt`, fitted on train)
        turns that score into the label's probability. A label on every train row or on none gets a constant
        very high or very low logit."""
        Xt = torch.as_tensor(np.asarray(X, np.float32))
        Yt = torch.as_tensor(np.asarray(Y)) > 0.5
        pos, neg = label_centroids(Xt, Yt)
        w, b = 2 * (pos - neg), (neg**2).sum(1) - (pos**2).sum(1)
        with fitting_threads(torch.device("cpu")):  # small ops, as in fit
            a, c = platt((Xt @ w.t().float()).double() + b, Yt)
        weight, bias = a[:, None] * w, a * b + c
        counts = Yt.sum(0)
        constant = (counts == 0) | (counts == len(Yt))
        weight[constant] = 0.0
        bias[counts == 0], bias[counts == len(Yt)] = ABSENT_LOGIT, -ABSENT_LOGIT
        self.weight, self.bias = weight.float().numpy(), bias.float().numpy()
        return FitResult(info={"calibration": "Platt scaling per label, on train"})


def _fit_temperature(z: torch.Tensor, y: torch.Tensor) -> float:
    """The T (log-spaced grid around the logit spread) with the lowest train log-loss of softmax(z / T); the
    first of equal losses."""
    spread = float((z - z.mean(1, keepdim=True)).std(unbiased=False)) or 1.0
    grid = spread * torch.logspace(-3, 1, 25, dtype=torch.float64)
    zy = z.gather(1, y[:, None])[:, 0]
    losses = torch.stack([(torch.logsumexp(z / t, 1) - zy / t).clamp_max(-LOG_FLOOR).mean() for t in grid])
    return float(grid[int(torch.argmin(losses))])


# ------------------------------------------------------------------------------------------ several labels per image

PLATT_STEPS = 50  # Newton steps of the per-label Platt fit: ~10 reach float64's resolution on the mosaics


def label_centroids(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label, the mean of the train rows that have it and of those that lack it: two (L, D) float64 tensors."""
    Yf = Y.double()
    Xd = X.double()
    pos_n, neg_n = Yf.sum(0), (1 - Yf).sum(0)
    pos = (Yf.t() @ Xd) / pos_n.clamp_min(1)[:, None]
    neg = (Xd.sum(0)[None] - Yf.t() @ Xd) / neg_n.clamp_min(1)[:, None]
    return pos, neg


def platt(s: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label j, ``(a_j, c_j)`` minimising the log-loss of ``sigmoid(a_j s_ij + c_j)`` against Platt's (1999)
    smoothed targets ``(n+ + 1) / (n+ + 2)`` and ``1 / (n- + 2)``, which keep a label its scores separate finite.
    Newton's method, all labels at once, each step halved until the label's loss does not rise."""
    Yf = Y.double()
    pos = Yf.sum(0)
    t = torch.where(Y.bool(), (pos + 1) / (pos + 2), 1 / (len(Y) - pos + 2))
    a = torch.zeros(s.shape[1], dtype=torch.float64)
    c = torch.log((pos + 1) / (len(Y) - pos + 1))

    def loss(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = a * s + c
        return (torch.nn.functional.softplus(z) - t * z).mean(0)

    current = loss(a, c)
    for _ in range(PLATT_STEPS):
        p = torch.sigmoid(a * s + c)
        r, w = p - t, p * (1 - p) + 1e-12
        g = torch.stack([(r * s).mean(0), r.mean(0)])  # (2, L)
        h = torch.stack([(w * s * s).mean(0), (w * s).mean(0), w.mean(0)])
        det = (h[0] * h[2] - h[1] ** 2).clamp_min(1e-300)
        da, dc = -(h[2] * g[0] - h[1] * g[1]) / det, -(h[0] * g[1] - h[1] * g[0]) / det
        step = torch.ones_like(a)
        for _ in range(30):
            trial = loss(a + step * da, c + step * dc)
            worse = trial > current
            if not worse.any():
                break
            step = torch.where(worse, step / 2, step)
        step = torch.where(trial > current, 0.0, step)  # a label no step improved is where it was
        a, c = a + step * da, c + step * dc
        current = loss(a, c)
    return a, c
