"""Multinomial logistic regression in torch, full-batch L-BFGS on the device the features are on.

The objective is scikit-learn 1.9's ``LogisticRegression`` (lbfgs, multinomial; ``_logistic.py`` sets
``l2_reg_strength = 1 / (C * sw_sum)`` and ``_linear_loss.py`` takes the weighted *mean* of the log-loss)::

    f(W, b) = sum_i s_i * CE(W z_i + b, y_i) / sum_i s_i  +  ||W||^2 / (2 C sum_i s_i)

with ``s_i`` the class weight of row i (1 without class weights) and the intercept ``b`` not penalised. The
stopping rule is scipy's L-BFGS-B one that sklearn uses: the largest gradient entry at most ``tol``.

Each evaluation of ``f`` is two matmuls over the (N, D) matrix; the only waits on the device are the ones L-BFGS
needs: one read of three scalars per function evaluation (the loss, the slope, the largest gradient entry).
A path of C values (strong to weak) starts each fit where the previous one ended (:func:`fit_path`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

HISTORY = 10  # scipy's default number of correction pairs (maxcor)
ARMIJO = 1e-4


@dataclass
class Problem:
    """Standardised features ``Z`` (N, D), the targets scaled by each row's share ``s_i / sum(s)`` (N, K), and
    each row's share (N,): the loss is ``-sum(target * log_softmax(Z W^T + b))``."""

    Z: torch.Tensor
    target: torch.Tensor
    share: torch.Tensor

    @classmethod
    def build(cls, Z: torch.Tensor, y: torch.Tensor, *, classes: int, class_weight: torch.Tensor | None) -> Problem:
        w = class_weight[y] if class_weight is not None else torch.ones(len(y), dtype=Z.dtype, device=Z.device)
        share = (w / w.sum()).to(Z.dtype)
        target = torch.nn.functional.one_hot(y, classes).to(Z.dtype) * share[:, None]
        return cls(Z, target, share)

    def loss_grad(self, theta: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, grad)`` at ``theta`` = [W | b], (K, D + 1); ``lam = 1 / (C sum(s))`` as a share of the mean."""
        W, b = theta[:, :-1], theta[:, -1]
        logp = torch.log_softmax(torch.addmm(b, self.Z, W.t()), 1)
        # Sums in float64: near the optimum the decrease a step makes is below float32's resolution of the loss.
        f = -(self.target * logp).sum(dtype=torch.float64) + 0.5 * lam * (W * W).sum(dtype=torch.float64)
        r = logp.exp_().mul_(self.share[:, None]).sub_(self.target)  # d f / d logits, (N, K)
        grad = torch.empty_like(theta)
        torch.mm(r.t(), self.Z, out=grad[:, :-1])
        grad[:, :-1].add_(W, alpha=lam)
        grad[:, -1] = r.sum(0)
        return f, grad


@dataclass
class Solution:
    theta: torch.Tensor  # (K, D + 1): weight and bias
    n_iter: int
    converged: bool
    loss: float


def lbfgs(
    fg: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> Solution:
    """Minimise a smooth convex ``fg`` (value, gradient) from ``theta``: L-BFGS with a backtracking line search
    (Armijo, or where the loss no longer resolves the decrease, the approximate Wolfe test of Hager and Zhang on
    the slope). ``pairs`` (s, y, 1 / s.y), updated in place, are the curvature memory; a path passes them on."""
    f, g = fg(theta)
    f_host, gmax = (float(v) for v in torch.stack([f, g.abs().max().double()]).tolist())
    pairs = [] if pairs is None else pairs
    it = 0
    while gmax > tol and it < max_iter:
        it += 1
        d = -_two_loop(g, pairs)
        gd = (g * d).sum()
        t = 1.0 if pairs else min(1.0, 1.0 / float(g.abs().sum()))  # first step: as torch.optim.LBFGS
        for _ in range(30):
            f_new, g_new = fg(theta + t * d)
            values = torch.stack([f_new, gd.double(), (g_new * d).sum().double(), g_new.abs().max().double()])
            f_new_host, slope, slope_new, gmax_new = values.tolist()
            if f_new_host <= f_host + ARMIJO * t * slope:
                break
            if f_new_host <= f_host + 1e-12 * abs(f_host) and slope_new <= -0.8 * slope:  # approximate Wolfe
                break
            t *= 0.5
        else:
            log.debug("line search failed at iteration %d", it)
            break
        s, y = t * d, g_new - g
        sy = (s * y).sum()
        # rho = 1 / s.y; a pair with s.y <= 0 (rounding, near the optimum) gets rho = 0 and drops out of _two_loop
        pairs.append((s, y, torch.where(sy > 0, 1.0 / sy, torch.zeros_like(sy))))
        del pairs[:-HISTORY]
        theta, f_host, g, gmax = theta + s, f_new_host, g_new, gmax_new
    return Solution(theta, it, gmax <= tol, f_host)


def _two_loop(g: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The L-BFGS approximation of H^-1 g; all on the device (no reads of the scalars)."""
    q, alphas = g.clone(), []
    for s, y, rho in reversed(pairs):
        a = rho * (s * q).sum()
        q.sub_(a * y)
        alphas.append(a)
    if pairs:
        s, y, rho = pairs[-1]
        gamma = rho * (y * y).sum()  # 1 / gamma = y.y / s.y, the initial Hessian's scale
        q.mul_(torch.where(gamma > 0, 1.0 / gamma, torch.ones_like(gamma)))
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        q.add_(s * (a - rho * (y * q).sum()))
    return q


def fit_path(problem: Problem, lams: list[float], *, max_iter: int, tol: float) -> Iterator[Solution]:
    """One solution per L2 strength in ``lams`` (strong to weak), each started from the previous one and with its
    curvature memory: the Hessians differ only by ``(lam' - lam) I`` on the weights, so each pair's ``y`` is
    corrected by that times ``s`` and stays exact for the data term."""
    K, D = problem.target.shape[1], problem.Z.shape[1]
    theta = torch.zeros(K, D + 1, dtype=problem.Z.dtype, device=problem.Z.device)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    previous = None
    for lam in lams:
        if previous is not None and pairs:
            pairs[:] = [_shift(s, y, lam - previous) for s, y, _ in pairs]
        sol = lbfgs(lambda t, lam=lam: problem.loss_grad(t, lam), theta, max_iter=max_iter, tol=tol, pairs=pairs)
        theta, previous = sol.theta, lam
        yield sol


def _shift(s: torch.Tensor, y: torch.Tensor, dlam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = y.clone()
    y[:, :-1].add_(s[:, :-1], alpha=dlam)  # the intercept column is not penalised
    sy = (s * y).sum()
    return s, y, torch.where(sy > 0, 1.0 / sy, torch.zeros_like(sy))
