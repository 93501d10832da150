"""Multinomial logistic regression in torch, full-batch L-BFGS on the device the features are on.

The objective is scikit-learn 1.9's ``LogisticRegression`` (lbfgs, multinomial; ``_logistic.py`` sets
``l2_reg_strength = 1 / (C * sw_sum)`` and ``_linear_loss.py`` takes the weighted *mean* of the log-loss)::

    f(W, b) = sum_i s_i * CE(W z_i + b, y_i) / sum_i s_i  +  ||W||^2 / (2 C sum_i s_i)

with ``s_i`` the class weight of row i (1 without class weights) and the intercept ``b`` not penalised. The
stopping rule is scipy's L-BFGS-B one that sklearn uses: the largest gradient entry at most ``tol``.

Each evaluation of ``f`` is two matmuls over the (N, D) matrix; the only waits on the device are the ones L-BFGS
needs: one read of three scalars per function evaluation (the loss, the slope, the largest gradient entry).
A path of C values (strong to weak) starts each fit where the previous one ended (:func:`fit_path`).

L-BFGS starts each iteration's inverse-Hessian estimate from ``gamma * P`` rather than ``gamma * I``, with
``P = (Sigma + RIDGE I)^-1`` and ``Sigma`` the features' correlation matrix estimated on a sample of rows
(:func:`correlation_preconditioner`): the data term's Hessian is ``Sigma`` times a class matrix, so ``P`` undoes
the correlation of the features that standardising leaves. Measured on real MobileNetV2 features (50,000 x 1,280,
C=1): 86 iterations -> 31, for a 0.3 s set-up; on PCA features (already uncorrelated) 38 -> 30.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pipeline.stage2.heads.fitting import in_pieces

log = logging.getLogger(__name__)

HISTORY = 10  # scipy's default number of correction pairs (maxcor)
# ... and on big problems on a CPU (see :func:`history_for`). Measured (torch L-BFGS as below, tol 1e-4, one core) on
# real MobileNetV2 / random-init ResNet18 features of the bench, C = 0.1, 1 and 10: 60,000 x 1,280 102 / 131 / 192
# iterations with 10 pairs, 81 / 103 / 172 with 30; 50,000 x 512 (PCA) 36 / 57 / 91 -> 33 / 54 / 64; 50,000 x 512
# (random init) 43 / 77 / 130 -> 40 / 81 / 105: 15% fewer in all (859 -> 733), at ~0.1 s an iteration on 1,280-d.
# On the demo (1,438 x 1,280, 13-26 iterations) 30 pairs took 0-5 more, so small problems keep 10; on a GPU a pair
# costs ~8 kernel launches beside an evaluation of ~1 ms, so it keeps 10 too.
LONG_HISTORY = 30
ARMIJO = 1e-4
# Ridge added to the correlation matrix (unit diagonal) before inverting it: 0.3 and 1 both took 31 iterations on
# the real features above, 0.01 took 36 and 3 took 40; the ridge keeps P well-conditioned when rows < D.
RIDGE = 1.0
PRECONDITIONER_ROWS = 8192  # rows sampled for Sigma: 0.3 s on 1,280-d on one CPU core; P needs no precision
Precondition = Callable[[torch.Tensor], torch.Tensor]


# From this many feature entries (N x D) on a CPU, each of an evaluation's two big matmuls runs in pieces, one per
# core (fitting.in_pieces): slices of the output's columns or rows, never of a sum, so the result is the same to
# the bit as one call (tested); torch's own 2 threads would split the gradient's sum differently. On a quiet 2-core
# CPU an evaluation takes about half the time; on a busy one, what it took with one thread.
SPLIT_ENTRIES = 1 << 22


def _big(Z: torch.Tensor) -> bool:
    return Z.device.type == "cpu" and Z.numel() >= SPLIT_ENTRIES


def history_for(Z: torch.Tensor) -> int:
    """How many correction pairs L-BFGS keeps on the features ``Z``: LONG_HISTORY on a big problem on a CPU, else
    HISTORY (see LONG_HISTORY for the measurements)."""
    return LONG_HISTORY if _big(Z) else HISTORY


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
        Z, big = self.Z, _big(self.Z)
        z = torch.empty(len(Z), len(b), dtype=Z.dtype, device=Z.device)
        in_pieces(lambda rows: torch.addmm(b, Z[rows], W.t(), out=z[rows]), len(Z), big=big)
        logp = torch.log_softmax(z, 1)
        # Sums in float64: near the optimum the decrease a step makes is below float32's resolution of the loss.
        f = -(self.target * logp).sum(dtype=torch.float64) + 0.5 * lam * (W * W).sum(dtype=torch.float64)
        r = logp.exp_().mul_(self.share[:, None]).sub_(self.target)  # d f / d logits, (N, K)
        grad = torch.empty_like(theta)
        in_pieces(lambda cols: torch.mm(r.t(), Z[:, cols], out=grad[:, cols]), Z.shape[1], big=big)
        grad[:, :-1].add_(W, alpha=lam)
        grad[:, -1] = r.sum(0)
        return f, grad


# Z's transposed copy is kept (TransposedProblem) up to this size: it doubles the features' memory.
TRANSPOSED_BYTES = 2 << 30
# ... and from this many features: on 512-d the logits' matmul gains only 21% (0.022 -> 0.018 s for 50,000 rows), a
# tenth of an evaluation, while the other rounding moved the iterations of two bench fits by +12% and +26%
# (57 -> 72, 76 -> 85): L-BFGS's iteration count is that sensitive to rounding, so the gain must be larger than that.
TRANSPOSED_MIN_DIM = 1024


@dataclass
class TransposedProblem(Problem):
    """The same loss as :class:`Problem`, with the logits computed as ``W @ Z^T`` from a transposed copy of ``Z``
    (D, N): on a CPU core that matmul with K ~ 10 outputs takes 0.046 s for 50,000 x 1,280 against 0.069 s for
    ``Z @ W^T`` (the gradient's ``r^T Z`` is fast in ``Z``'s own layout), a quarter of each function evaluation
    (126 iterations: 21.2 -> 16.8 CPU s). The logits and residuals are (K, N). The sums run in another order than
    :class:`Problem`'s, so the iterates differ by rounding; the stopping rule is the same."""

    Zt: torch.Tensor | None = None  # (D, N), contiguous; Z is its transposed view
    target_t: torch.Tensor | None = None  # (K, N), contiguous

    @staticmethod
    def wanted(Z: torch.Tensor) -> bool:
        """On a CPU, from TRANSPOSED_MIN_DIM features and while the copy fits TRANSPOSED_BYTES."""
        return (
            Z.device.type == "cpu"
            and Z.shape[1] >= TRANSPOSED_MIN_DIM
            and Z.numel() * Z.element_size() <= TRANSPOSED_BYTES
        )

    @classmethod
    def of(cls, problem: Problem) -> Problem:
        """``problem`` with the transposed copies where :meth:`wanted`; else as it is. Only the transposed copy is
        kept: ``Z`` becomes its transposed view (the gradient's ``r Z`` takes it as fast, and to the bit the same),
        so a ``Z`` given as such a view (:func:`pipeline.stage2.heads.logreg.logreg_problem`) is not copied at all."""
        Z = problem.Z
        if type(problem) is not Problem or not cls.wanted(Z):
            return problem
        Zt = Z.t().contiguous()
        return cls(Zt.t(), problem.target, problem.share, Zt, problem.target.t().contiguous())

    def loss_grad(self, theta: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        W, b = theta[:, :-1], theta[:, -1]
        Z, Zt, big = self.Z, self.Zt, _big(self.Z)
        z = torch.empty(len(b), len(Z), dtype=Z.dtype, device=Z.device)
        in_pieces(lambda rows: torch.addmm(b[:, None], W, Zt[:, rows], out=z[:, rows]), len(Z), big=big)
        logp = torch.log_softmax(z, 0)  # (K, N)
        f = -(self.target_t * logp).sum(dtype=torch.float64) + 0.5 * lam * (W * W).sum(dtype=torch.float64)
        r = logp.exp_().mul_(self.share[None, :]).sub_(self.target_t)  # d f / d logits, (K, N)
        grad = torch.empty_like(theta)
        in_pieces(lambda cols: torch.mm(r, Z[:, cols], out=grad[:, cols]), Z.shape[1], big=big)
        grad[:, :-1].add_(W, alpha=lam)
        grad[:, -1] = r.sum(1)
        return f, grad


@dataclass
class OneVsRestProblem(Problem):
    """Several labels per image, one binary logistic regression per label (one-vs-rest), all solved at once as one
    (L, D + 1) parameter: ``target`` is the (N, L) 0/1 matrix and the loss ``sum_i share_i sum_l BCE(z_il, y_il)``.
    The labels share no parameter, so the sum's minimum is each label's own minimum of scikit-learn's binary
    objective (mean log-loss + ``||w_l||^2 / (2 C n)``), and the stopping rule on the largest gradient entry holds
    for every label; one L-BFGS pays one pair of (N, D) x (D, L) matmuls per step for all of them."""

    @classmethod
    def build_multi(cls, Z: torch.Tensor, Y: torch.Tensor) -> OneVsRestProblem:
        share = torch.full((len(Y),), 1.0 / max(1, len(Y)), dtype=Z.dtype, device=Z.device)
        return cls(Z, Y.to(Z.dtype), share)

    def loss_grad(self, theta: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        W, b = theta[:, :-1], theta[:, -1]
        z = torch.addmm(b, self.Z, W.t())
        bce = torch.nn.functional.softplus(z).sub_(self.target * z)  # -log sigmoid(+-z), stable for any z
        f = (bce * self.share[:, None]).sum(dtype=torch.float64) + 0.5 * lam * (W * W).sum(dtype=torch.float64)
        r = torch.sigmoid(z).sub_(self.target).mul_(self.share[:, None])  # d f / d logits, (N, L)
        grad = torch.empty_like(theta)
        torch.mm(r.t(), self.Z, out=grad[:, :-1])
        grad[:, :-1].add_(W, alpha=lam)
        grad[:, -1] = r.sum(0)
        return f, grad


def correlation_preconditioner(Z: torch.Tensor, *, seed: int = 0) -> Precondition:
    """``q -> q P`` on the weight columns of a (K, D + 1) tensor (the intercept column as is), with
    ``P = (Z_s^T Z_s / n_s + RIDGE I)^-1`` from up to PRECONDITIONER_ROWS seeded rows ``Z_s`` of the standardised
    features. Symmetric positive definite, so L-BFGS with it stays a descent method."""
    n, D = Z.shape
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:PRECONDITIONER_ROWS].to(Z.device)
    sample = Z[rows]
    sigma = (sample.t() @ sample).double() / max(1, len(rows))
    sigma.diagonal().add_(RIDGE)
    P = torch.cholesky_inverse(torch.linalg.cholesky(sigma)).to(Z.dtype)

    def precondition(q: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        torch.mm(q[:, :-1], P, out=out[:, :-1])
        out[:, -1] = q[:, -1]
        return out

    return precondition


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
    precondition: Precondition | None = None,
    history: int = HISTORY,
) -> Solution:
    """Minimise a smooth convex ``fg`` (value, gradient) from ``theta``: L-BFGS with a backtracking line search
    (Armijo, or where the loss no longer resolves the decrease, the approximate Wolfe test of Hager and Zhang on
    the slope). ``pairs`` (s, y, 1 / s.y), updated in place, are the curvature memory; a path passes them on.
    ``precondition`` (symmetric positive definite, e.g. :func:`correlation_preconditioner`) is the initial inverse
    Hessian up to scale; the identity when None. ``history``: how many pairs are kept."""
    f, g = fg(theta)
    f_host, gmax = (float(v) for v in torch.stack([f, g.abs().max().double()]).tolist())
    pairs = [] if pairs is None else pairs
    it = 0
    while gmax > tol and it < max_iter:
        it += 1
        d = -_two_loop(g, pairs, precondition)
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
        del pairs[:-history]
        theta, f_host, g, gmax = theta + s, f_new_host, g_new, gmax_new
    return Solution(theta, it, gmax <= tol, f_host)


def _two_loop(
    g: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    precondition: Precondition | None = None,
) -> torch.Tensor:
    """The L-BFGS approximation of H^-1 g, from H0^-1 = P * s.y / y.P.y; all on the device (no reads of the
    scalars)."""
    P = precondition or (lambda t: t.clone())
    q, alphas = g.clone(), []
    for s, y, rho in reversed(pairs):
        a = rho * (s * q).sum()
        q.sub_(a * y)
        alphas.append(a)
    q = P(q)
    if pairs:
        s, y, rho = pairs[-1]
        gamma = rho * (y * P(y)).sum()  # 1 / gamma = y.P.y / s.y, the initial Hessian's scale
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
    precondition = correlation_preconditioner(problem.Z)
    previous = None
    for lam in lams:
        if previous is not None and pairs:
            pairs[:] = [_shift(s, y, lam - previous) for s, y, _ in pairs]
        sol = lbfgs(
            lambda t, lam=lam: problem.loss_grad(t, lam),
            theta,
            max_iter=max_iter,
            tol=tol,
            pairs=pairs,
            precondition=precondition,
            history=history_for(problem.Z),
        )
        theta, previous = sol.theta, lam
        yield sol


def _shift(s: torch.Tensor, y: torch.Tensor, dlam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = y.clone()
    y[:, :-1].add_(s[:, :-1], alpha=dlam)  # the intercept column is not penalised
    sy = (s * y).sum()
    return s, y, torch.where(sy > 0, 1.0 / sy, torch.zeros_like(sy))
