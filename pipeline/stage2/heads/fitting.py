"""The fitting machinery of the torch heads: the optimiser (:class:`Adam`), the data held on the device
(:class:`TorchData`) and the mini-batch loops with hand-written gradients (:func:`train_linear_grid`, the batched grid
trainer that is the way to train a linear head; :func:`train_mlp`). Head classes live in their own modules."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.stage2.heads.base import Score, balanced_weights
from pipeline.stage2.heads.config import HeadConfig, sweep_key

log = logging.getLogger(__name__)


class LinearGrid(nn.Module):
    """G independent linear layers evaluated as one matmul: (N, D) -> (G, N, C).

    The members live in one (G, C, D) weight and one (G, C) bias, so a grid of learning rates and weight decays
    trains in one pass over the features with one matmul and one Adam update per step (dinov2's linear evaluation
    trains its grid in one pass the same way).
    """

    def __init__(self, groups: int, feature_dim: int, num_classes: int):
        super().__init__()
        # Each member drawn as nn.Linear draws it, in turn: member 0 of any grid starts where a lone head starts.
        layers = [nn.Linear(feature_dim, num_classes) for _ in range(groups)]
        # Buffers, not parameters: trained by hand (analytic gradient, train_linear_grid), never by autograd.
        self.register_buffer("weight", torch.stack([m.weight.detach() for m in layers]))
        self.register_buffer("bias", torch.stack([m.bias.detach() for m in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, C = self.bias.shape
        return torch.addmm(self.bias.view(-1), x, self.weight.view(G * C, -1).t()).view(len(x), G, C).permute(1, 0, 2)


def _grid_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-member mean cross-entropy, (G,). Summing them trains the members independently."""
    G = logits.shape[0]
    per = nn.functional.cross_entropy(
        logits.permute(1, 2, 0), y[:, None].expand(-1, G), weight=weight, reduction="none"
    )  # (N, G)
    denom = weight[y].sum() if weight is not None else torch.tensor(float(len(y)), device=y.device)
    return per.sum(0) / denom


class Adam:
    """``torch.optim.Adam`` (L2 weight decay added to the gradient) with per-group lr and weight decay.

    Why not torch.optim: its first construction imports ``torch._dynamo``, seconds of start-up on a CPU that would
    dwarf fitting a head on cached features. Each parameter is updated by torch's fused Adam kernel (the one behind
    ``torch.optim.Adam(fused=True)``, on CPU and CUDA): one op a step where the written-out update (kept as the
    fallback) is seven, which on small heads is most of a step. Tested against ``torch.optim.Adam``.
    ``step`` uses ``p.grad``, or ``grads`` (one per parameter, in order).
    """

    FUSED = hasattr(torch, "_fused_adam_")

    def __init__(self, groups: list[dict[str, Any]], *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.groups = [{**g, "params": list(g["params"])} for g in groups]
        self.betas, self.eps, self.steps = betas, eps, 0
        # Moments made up front, so that a step is one kernel call per group and no Python bookkeeping: at a few
        # microseconds per kernel, the bookkeeping was most of the optimizer's time on a small head.
        for g in self.groups:
            g["m"], g["v"] = ([torch.zeros_like(p) for p in g["params"]] for _ in range(2))
        device = self.groups[0]["params"][0].device if self.groups and self.groups[0]["params"] else None
        self.step_tensor = torch.zeros(
            (), device=device
        )  # the fused kernel's step count (all parameters step together)
        self.one = torch.ones((), device=device)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor] | None = None) -> None:
        self.steps += 1
        self.step_tensor.add_(self.one)  # on the device: the kernel reads it there, so no wait on the host
        b1, b2 = self.betas
        start = 0
        for g in self.groups:
            params, end = g["params"], start + len(g["params"])
            given = grads[start:end] if grads is not None else [p.grad for p in params]
            start = end
            m, v = g["m"], g["v"]
            if any(grad is None for grad in given):
                keep = [i for i, grad in enumerate(given) if grad is not None]
                params, given, m, v = ([t[i] for i in keep] for t in (params, given, m, v))
            if not params:
                continue
            lr, wd = float(g["lr"]), float(g["weight_decay"])
            if self.FUSED:
                torch._fused_adam_(
                    params, given, m, v, [], [self.step_tensor] * len(params), lr=lr, beta1=b1, beta2=b2,
                    weight_decay=wd, eps=self.eps, amsgrad=False, maximize=False,
                )  # fmt: skip
            else:
                self._update(params, given, m, v, lr=lr, weight_decay=wd)

    def _update(self, params: list, grads: list, m: list, v: list, *, lr: float, weight_decay: float) -> None:
        """The written-out update (torch's single-tensor Adam), where the fused kernel is missing."""
        b1, b2 = self.betas
        correction1, root_correction2 = 1 - b1**self.steps, math.sqrt(1 - b2**self.steps)
        for p, grad, m_p, v_p in zip(params, grads, m, v):
            grad = grad.add(p, alpha=weight_decay) if weight_decay else grad
            m_p.lerp_(grad, 1 - b1)
            v_p.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            p.addcdiv_(m_p, (v_p.sqrt() / root_correction2).add_(self.eps), value=-lr / correction1)


@dataclass
class TorchData:
    X: torch.Tensor
    y: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor] | None
    weight: torch.Tensor | None
    classes: int
    multilabel: bool = False  # y (N, L) 0/1: per-label sigmoid + binary cross-entropy

    @classmethod
    def build(
        cls, X: np.ndarray, y: np.ndarray, *, val: Any, cfg: HeadConfig, num_classes: int, device: torch.device
    ) -> TorchData:
        # The whole matrix lives on the device: no DataLoader, no per-batch host->device copies.
        def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

        if cfg.task == "multilabel":  # y: (N, L) 0/1; no class weights
            v = None if val is None or not len(val[1]) else (t(val[0], torch.float32), t(val[1], torch.float32))
            return cls(t(X, torch.float32), t(y, torch.float32), v, None, num_classes, multilabel=True)
        if cfg.task == "regress":  # y: (N, T) float targets; squared error, no class weights
            v = None if val is None or not len(val[1]) else (t(val[0], torch.float32), t(val[1], torch.float32))
            return cls(t(X, torch.float32), t(y, torch.float32), v, None, num_classes)
        weight = t(balanced_weights(y, num_classes), torch.float32) if cfg.class_weight == "balanced" else None
        v = None if val is None or not len(val[1]) else (t(val[0], torch.float32), t(val[1], torch.long))
        return cls(t(X, torch.float32), t(y, torch.long), v, weight, num_classes)

    @property
    def regress(self) -> bool:
        return self.y.is_floating_point() and not self.multilabel


# A step: (x batch, each row's share of its batch loss, the one-hot targets times that share, out) -> the batch's
# (G * C, B) logits written to ``out``, taken before the update it makes.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def train_epochs(
    data: TorchData,
    *,
    groups: int,
    cfg: HeadConfig,
    step: Step,
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    opt: Adam,
    watch: Callable[[torch.Tensor], None] | None = None,
) -> list[list[dict[str, float]]]:
    """The mini-batch loop of the analytic-gradient heads, with nothing waiting on the device until the end of
    the epoch. Tested against the same loop written with autograd and ``torch.optim.Adam`` (tests/test_heads.py).

    ``step`` does one batch's forward, gradient and update; ``evaluate`` gives (G, N, C) logits for val. The
    softmax cross-entropy gradient is ``(softmax(z) - onehot(y)) * w_y / sum(w)`` per row, so the driver hands each
    step the rows' shares ``w_y / sum(w)`` and ``onehot(y) * share``. The epoch's logits are kept (transposed,
    (G * C, N)) so that train loss and accuracy are computed once per epoch from the same pre-update logits a
    per-step tally would see.

    ``watch``, when given, is handed each epoch's (G, N, C) outputs on ``data.val``: what a sweep scores every
    epoch of every grid member by (see :func:`epoch_scores`).

    The learning rate is constant, so the first E epochs of a longer run are exactly a run of E epochs (the same
    seeded shuffles, the same updates): a sweep can score every epoch count in one run, and the refit with the
    chosen count is the model it scored. Why not a schedule that ends small: measured on real MobileNetV2 features
    (the demo digits and 5,000 of the 32 px bench digits), annealing over the last third cost the defaults 0.3-1.4
    points (these heads still learn at 15 epochs), over the last tenth 0.1-0.3; choosing the epoch count on held-out
    train costs the defaults nothing (their run is unchanged) and skips a last epoch that dropped.
    """
    dev, n, B, C = data.X.device, len(data.X), cfg.batch_size, data.classes
    row_weight = data.weight[data.y] if data.weight is not None else torch.ones(n, device=dev)
    batch_of = torch.arange(n, device=dev) // B
    batch_size = torch.bincount(batch_of).float()
    logits = torch.empty(groups * C, n, device=dev)
    xb = torch.empty(min(B, n), data.X.shape[1], device=dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)  # shuffled where the rows are: no copy per epoch
    histories: list[list[dict[str, float]]] = [[] for _ in range(groups)]
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen, device=dev)
        y, w = data.y[perm], row_weight[perm]
        share = w / torch.zeros(len(batch_size), device=dev).index_add_(0, batch_of, w)[batch_of]
        floats = data.y.is_floating_point()  # regression targets or several labels per image: y as it is
        target = (y.t() if floats else nn.functional.one_hot(y, C).t().float()).mul(share).repeat(groups, 1)
        batches = zip(perm.split(B), share.split(B), target.split(B, 1), logits.split(B, 1))  # views, made at once
        for idx, share_b, target_b, out in batches:
            x = torch.index_select(data.X, 0, idx, out=xb[: len(idx)])  # faster than X[idx]
            step(x, share_b, target_b, out)
        logits3 = logits.view(groups, C, n)
        val_out = evaluate(data.val[0]) if data.val is not None else None  # (G, N_val, C)
        if watch is not None and val_out is not None:
            watch(val_out)
        if data.multilabel:
            stats = _multilabel_stats(logits3, y)
            if val_out is not None:
                stats += _multilabel_stats(val_out.transpose(1, 2), data.val[1])
            keys: tuple[str, ...] = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
        elif data.regress:
            stats = _regression_stats(logits3, y)
            if val_out is not None:
                stats += _regression_stats(val_out.transpose(1, 2), data.val[1])
            keys = ("train_loss", "train_r2", "val_loss", "val_r2")
        else:
            nll = -torch.log_softmax(logits3, 1).gather(1, y[None, None].expand(groups, 1, n))[:, 0]  # (G, n)
            stats = [
                (nll * share * batch_size[batch_of]).sum(1) / n,  # mean over batches of each batch's loss
                (logits3.transpose(1, 2).contiguous().argmax(2) == y).float().mean(1),  # 4x faster than argmax(1)
            ]
            if val_out is not None:
                stats += [
                    _grid_loss(val_out, data.val[1], data.weight),
                    (val_out.argmax(2) == data.val[1]).float().mean(1),
                ]
            keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
        values = torch.stack(stats).tolist()  # the epoch's one wait on the device
        keys = keys[: len(values)]
        for g, history in enumerate(histories):
            history.append({"epoch": epoch, **{k: float(v[g]) for k, v in zip(keys, values)}})
        log.debug("epoch %d %s", epoch, histories[0][-1])
    return histories


def with_epochs(points: list[dict[str, float]], epochs: int) -> list[dict[str, Any]]:
    """A sweep grid of ``points`` x every epoch count 1 .. ``epochs`` (epochs innermost): one run per point scores
    them all (see :func:`train_epochs`)."""
    return [{**point, "epochs": e} for point in points for e in range(1, epochs + 1)]


def grid_runs(grid: list[dict[str, Any]], *, epochs: int) -> tuple[list[dict[str, Any]], int]:
    """The distinct settings of ``grid`` other than ``epochs``, in order (one training run each), and the most
    epochs a point asks for (``epochs`` where points do not name it)."""
    runs: list[dict[str, Any]] = []
    for point in grid:
        run = _setting(point)
        if run not in runs:
            runs.append(run)
    return runs, max(int(point.get("epochs", epochs)) for point in grid)


# A sweep keeps every run's held-out outputs after every epoch up to this many bytes (15 linear runs x 15 epochs x
# 12,000 held-out rows x 10 classes: 108 MB), so that choice.guard tests the points it chose between on the outputs
# their scores came from instead of training both again (mlp on 48,000 x 1,280: two fits of ~10 s). Beyond it, the
# epochs not kept are fitted again when the guard needs them.
KEEP_BYTES = 1 << 28


@dataclass
class EpochScores:
    """The held-out score of every run after every epoch (a ``watch`` of :func:`train_epochs`), and the outputs
    scored, while they fit :data:`KEEP_BYTES`. ``targets``: the (mean, std) regression outputs were standardised
    by, undone before scoring."""

    y: np.ndarray
    score: Score
    targets: tuple[np.ndarray, np.ndarray] | None = None
    rows: list[list[float]] = field(default_factory=list)  # [epoch][run]
    outputs: list[list[np.ndarray]] = field(default_factory=list)  # [epoch][run] (N, C): the first epochs that fit
    keep_bytes: int = KEEP_BYTES
    # Set by a trainer that can say it (train_mlp): its parameters now, a copy; kept beside each epoch's outputs
    # (``states``, [epoch]), so that the head a point was scored from need not be trained again (choice.check_refit).
    state: Callable[[], torch.Tensor] | None = None
    states: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, out: torch.Tensor) -> None:
        z = out.float().cpu().numpy()
        if self.targets is not None:
            z = z * self.targets[1] + self.targets[0]
        self.rows.append([self.score(self.y, z_run) for z_run in z])
        if len(self.outputs) < len(self.rows) - 1:  # an earlier epoch did not fit: neither does this one
            return
        state = None if self.state is None else self.state()
        size = z.nbytes + (0 if state is None else state.numel() * state.element_size())
        if size <= self.keep_bytes:
            self.outputs.append(list(np.array(z, np.float32)))  # a copy: the caller's buffer is not ours
            if state is not None:
                self.states.append(state)
            self.keep_bytes -= size

    def of(self, grid: list[dict[str, Any]], runs: list[dict[str, Any]], *, epochs: int) -> list[float]:
        """Each grid point's score: its run's, after its epoch count."""

        return [self.rows[e][r] for e, r in (_cell(p, runs, epochs) for p in grid)]

    def kept(self, grid: list[dict[str, Any]], runs: list[dict[str, Any]], *, epochs: int) -> dict[tuple, np.ndarray]:
        """The held-out outputs each grid point was scored by, by :func:`sweep_key` (the points whose epoch was
        kept): what ``Head.held_out_logits`` holds for choice.guard."""
        cells = {sweep_key(p): _cell(p, runs, epochs) for p in grid}
        return {key: self.outputs[e][r] for key, (e, r) in cells.items() if e < len(self.outputs)}


def _cell(point: dict[str, Any], runs: list[dict[str, Any]], epochs: int) -> tuple[int, int]:
    """Where a grid point's score and outputs are: (its epoch count - 1, its run's index)."""
    return int(point.get("epochs", epochs)) - 1, runs.index(_setting(point))


def _setting(point: dict[str, Any]) -> dict[str, Any]:
    """A grid point less its epoch count: the training run that scores it (:func:`grid_runs`)."""
    return {k: v for k, v in point.items() if k != "epochs"}


def _softmax_grad(z: torch.Tensor, groups: int, share: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d(batch loss)/dz for (G * C, B) logits z: (softmax(z) - onehot) * share."""
    return torch.softmax(z.view(groups, -1, z.shape[1]), 1).view(z.shape).mul_(share).sub_(target)


def _squared_error_grad(z: torch.Tensor, groups: int, share: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d(batch loss)/dz for (G * T, B) outputs z and the loss sum_t (z_t - y_t)^2 / 2 per row: (z - y) * share
    (``target`` is y * share, as the one-hot is for the softmax)."""
    return z.mul(share).sub_(target)


def _sigmoid_grad(z: torch.Tensor, groups: int, share: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d(batch loss)/dz for (G * L, B) logits z and the loss sum_l BCE(sigmoid(z_l), y_l) per row (several labels
    per image): (sigmoid(z) - y) * share."""
    return torch.sigmoid(z).mul_(share).sub_(target)


def _multilabel_stats(z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per member, for (G, L, n) logits of (n, L) 0/1 labels: the loss (binary cross-entropy summed over the labels,
    averaged over rows) and the label accuracy at 0.5 (1 - Hamming loss)."""
    yt = y.t()[None]
    bce = nn.functional.binary_cross_entropy_with_logits(z, yt.expand_as(z), reduction="none")
    return [bce.sum(1).mean(1), ((z > 0).float() == yt).float().mean((1, 2))]


def output_grad(data: TorchData) -> Callable[..., torch.Tensor]:
    """The loss gradient of the task: squared error for regression targets, softmax cross-entropy for labels,
    per-label sigmoid cross-entropy for several labels per image."""
    if data.multilabel:
        return _sigmoid_grad
    return _squared_error_grad if data.regress else _softmax_grad


def _regression_stats(pred: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per member, for (G, T, n) predictions of (n, T) targets: mean squared error and R^2 (averaged over targets)."""
    yt = y.t()[None]
    se = (pred - yt).pow(2)
    sst = (yt - yt.mean(2, keepdim=True)).pow(2).sum(2).clamp_min(1e-12)
    return [se.mean((1, 2)), (1 - se.sum(2) / sst).mean(1)]


def train_linear_grid(
    model: LinearGrid,
    data: TorchData,
    *,
    lr: list[float],
    weight_decay: list[float],
    cfg: HeadConfig,
    watch: Callable[[torch.Tensor], None] | None = None,
) -> list[list[dict[str, float]]]:
    """Mini-batch Adam for every member of ``model`` at once, without autograd; per-member histories.

    A step is one gather, two matmuls, a softmax and one fused Adam update of the weight and bias.
    Logits are computed transposed, W @ x.T: 2-3x faster than x @ W.T for these skinny shapes on MKL.
    """
    G, C, D = model.weight.shape
    weight, bias = model.weight.view(G * C, D), model.bias.view(G * C, 1)
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(bias)
    # Member g is rows g * C ... (g + 1) * C: its own Adam group (lr, weight decay), updated in place.
    rows = [slice(g * C, (g + 1) * C) for g in range(G)]
    opt = Adam(
        [{"params": [weight[r], bias[r]], "lr": lr[g], "weight_decay": weight_decay[g]} for g, r in enumerate(rows)]
    )
    grads = [t[r] for r in rows for t in (grad_weight, grad_bias)]
    grad_of = output_grad(data)

    def step(x: torch.Tensor, share: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(bias, weight, x.t(), out=out)
        dz = grad_of(z, G, share, target)
        torch.mm(dz, x, out=grad_weight)
        torch.sum(dz, 1, keepdim=True, out=grad_bias)
        opt.step(grads)
        return z

    return train_epochs(data, groups=G, cfg=cfg, step=step, evaluate=model, opt=opt, watch=watch)


def train_mlp(
    module: nn.Sequential,
    data: TorchData,
    *,
    cfg: HeadConfig,
    watch: Callable[[torch.Tensor], None] | None = None,
) -> list[list[dict[str, float]]]:
    """Mini-batch Adam for ``Linear -> ReLU -> Dropout -> Linear`` with the backward pass written out, like
    :func:`train_linear_grid`: autograd, ``bernoulli_`` dropout masks and one Adam update per parameter cost
    2-3 ms a step on this CPU, 4x the matmuls themselves. Same loss, update and history as the autograd loop.

    The four parameters are trained in one flat tensor (one Adam update a step) and copied back at the end.
    Dropout draws its mask with ``torch.rand`` from the default generator (the caller seeds it).
    """
    params = [module[0].weight, module[0].bias, module[3].weight, module[3].bias]
    sizes, p = [t.numel() for t in params], module[2].p
    flat = torch.cat([t.detach().reshape(-1) for t in params])
    grad = torch.empty_like(flat)
    w1, b1, w2, b2 = (v.view_as(t) for v, t in zip(flat.split(sizes), params))
    g_w1, g_b1, g_w2, g_b2 = (v.view_as(t) for v, t in zip(grad.split(sizes), params))
    b2_col = b2[:, None]
    opt = Adam([{"params": [flat], "lr": cfg.lr, "weight_decay": cfg.weight_decay}])
    grad_of = output_grad(data)
    if isinstance(watch, EpochScores):  # a sweep: the parameters after each epoch, as MLPHead.from_flat takes them
        watch.state = flat.clone

    def step(x: torch.Tensor, share: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = torch.addmm(b1, x, w1.t())
        gate = (a > 0).to(a.dtype)  # d relu(a) / da, times the dropout mask and its 1 / (1 - p) scale
        if p:
            gate.mul_(torch.rand_like(a).ge_(p)).mul_(1 / (1 - p))
        h = a.mul_(gate)
        z = torch.addmm(b2_col, w2, h.t())
        out.copy_(z)
        dz = grad_of(z, 1, share, target)
        torch.mm(dz, h, out=g_w2)
        torch.sum(dz, 1, out=g_b2)
        da = torch.mm(dz.t(), w2).mul_(gate)
        torch.mm(da.t(), x, out=g_w1)
        torch.sum(da, 0, out=g_b1)
        opt.step([grad])
        return z

    def evaluate(X: torch.Tensor) -> torch.Tensor:
        return torch.addmm(b2, torch.addmm(b1, X, w1.t()).relu_(), w2.t())[None]

    histories = train_epochs(data, groups=1, cfg=cfg, step=step, evaluate=evaluate, opt=opt, watch=watch)
    with torch.no_grad():
        for t, v in zip(params, flat.split(sizes)):
            t.copy_(v.view_as(t))
    return histories


# On CUDA a step of these small heads costs its kernel launches and Python, not its arithmetic: 5,865 steps of 128
# rows took ~3 s on an H200, 2x the CPU. So there, the default batch grows up to 8x (as long as an epoch keeps
# MIN_STEPS steps) with the learning rate times sqrt(factor), Adam's usual rule. Checked on the CPU on real
# features (50,000 x 1,280 MobileNetV2, 15 epochs): batch 1,024 at lr 2.8e-3 gave val 0.9103 (linear) and 0.9191
# (mlp) against 0.9117 and 0.9197 at 128 and 1e-3. On the CPU nothing changes: a step there is its arithmetic.
CUDA_BATCH_FACTOR = 8
MIN_STEPS = 48


def launch_scale(cfg: HeadConfig, *, n: int, device: torch.device) -> int:
    """How many times the default batch one step takes: 1 except on CUDA when no batch size was given (``None``;
    an explicit value, 128 included, always runs as given)."""
    if device.type != "cuda" or cfg.batch_size is not None:
        return 1
    return max(1, min(CUDA_BATCH_FACTOR, n // (cfg.rows_per_step * MIN_STEPS)))


def scaled_for_device(cfg: HeadConfig, *, n: int, device: torch.device) -> tuple[HeadConfig, float]:
    """``(cfg with the batch size that runs, never None, the factor its learning rates take)``."""
    f = launch_scale(cfg, n=n, device=device)
    if f == 1:
        return replace(cfg, batch_size=cfg.rows_per_step), 1.0
    log.info("on %s: %d rows a step, lr x %.3g (the default batch, scaled)", device, f * cfg.rows_per_step, f**0.5)
    return replace(cfg, batch_size=f * cfg.rows_per_step, lr=cfg.lr * f**0.5), f**0.5


def ran_with(cfg: HeadConfig, *, n: int, device: torch.device) -> dict[str, Any]:
    """What a fit's metrics record of a scaled batch (nothing when the given or default one ran)."""
    ran, factor = scaled_for_device(cfg, n=n, device=device)
    return {} if factor == 1.0 else {"batch_size_run": ran.batch_size, "lr_factor_run": factor}


@contextmanager
def fitting_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread while a head trains on the CPU, restored after.

    Why: the steps are small (128 x 512 matmuls), and on a shared CPU torch's default OpenMP threads spin-wait for
    each other: with another process holding a core, 2 threads made the same 15 epochs up to 30x slower, and 1
    thread is as fast when the machine is idle. The big one-off matmuls (k-NN, logreg) are not run in here.
    """
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_POOL: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process id, threads): a forked child makes its own


def close_pools() -> None:
    """Shut down this process's :func:`in_pieces` threads (idle between calls), as an exit would."""
    for pool in _POOL.values():
        pool.shutdown(wait=True)


def _ways() -> int:
    from pipeline.workers import share_of_cores

    return max(1, min(share_of_cores(), 4))


def in_pieces(run: Callable[[slice], object], length: int, *, big: bool) -> None:
    """``run(part)`` for consecutive slices covering ``range(length)``: when ``big``, one per core (up to 4), each in
    a Python thread with one torch thread. Unlike torch's own OpenMP threads, a thread waiting for the other sleeps
    instead of spinning, so on a shared CPU a busy core costs its share and no more (see :func:`fitting_threads`);
    and the caller chooses what is split (slices of an output, never of a sum: the same result to the bit)."""
    ways = _ways() if big else 1
    if ways < 2 or length < 2 * ways:
        run(slice(0, length))
        return
    pool = _POOL.get((os.getpid(), ways))
    if pool is None:
        pool = ThreadPoolExecutor(ways, thread_name_prefix="pieces", initializer=torch.set_num_threads, initargs=(1,))
        _POOL[os.getpid(), ways] = pool
    # Grad and inference mode are thread-local: each piece runs under the caller's, or an in-place write into a
    # tensor made under torch.inference_mode (the audit's folds) is refused in the worker thread.
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def piece(part: slice) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            run(part)

    step = -(-length // ways)
    for job in [pool.submit(piece, slice(i, min(i + step, length))) for i in range(0, length, step)]:
        job.result()
