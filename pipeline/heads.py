"""Stage-two heads trained on cached features. Adding a head type is one entry in ``HEADS``.

A head is fitted on ``(X, y)`` arrays, gives class logits and probabilities, and round-trips through a dict of
plain arrays (saved as safetensors: loading a head never unpickles, so it never runs code). Heads that are a
function of the features a torch layer can compute (``linear``, ``logreg``, ``centroid``, ``mlp``) also turn
into an ``nn.Module`` (``as_module``), which is what ``export`` puts on top of the backbone.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from torch import nn

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write, write_json

log = logging.getLogger(__name__)
HEAD_FILE = "head.safetensors"
CLASS_WEIGHTS = ("none", "balanced")
ABSENT_LOGIT = -1e4  # logit of a class that train lacks: a very low score rather than a missing row


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of every head; each head reads the ones it uses."""

    head: str = "linear"
    lr: float = 1e-3
    epochs: int = 15
    batch_size: int = 128
    weight_decay: float = 0.0
    C: float = 1.0
    max_iter: int = 1000
    hidden: int = 128  # mlp; 128 keeps `compare` within its budget (see MLPHead)
    dropout: float = 0.5  # mlp
    standardize: bool = False  # linear, mlp: train on (x - mean) / std of train, folded into the first layer after
    k: int = 10  # knn
    class_weight: str = "none"  # "balanced": weight classes by inverse frequency (heads that can use it)
    sweep: bool = False  # choose lr/weight decay/C/k on a held-out part of train (see train.sweep)
    shots: int | None = None  # train on this many examples per class (few-shot), drawn with ``seed``
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise PipelineError(f"unknown head {self.head!r}; choose one of: {', '.join(HEADS)}")
        for name in ("lr", "C"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise PipelineError(f"--{name} must be a positive number, not {value}")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise PipelineError(f"--weight-decay must be 0 or more, not {self.weight_decay}")
        for name in ("epochs", "batch_size", "max_iter", "hidden", "k"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise PipelineError(f"--dropout must be in [0, 1), not {self.dropout}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise PipelineError(f"--class-weight must be one of: {', '.join(CLASS_WEIGHTS)}, not {self.class_weight!r}")
        if self.shots is not None and self.shots < 1:
            raise PipelineError(f"--shots must be at least 1, not {self.shots}")


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch curves, for iterative heads
    info: dict[str, Any] = field(default_factory=dict)


class Head(ABC):
    name: ClassVar[str]
    uses_class_weight: ClassVar[bool] = False
    uses_standardize: ClassVar[bool] = False  # trained by gradient on the features as given, unless --standardize

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        self.cfg, self.num_classes, self.feature_dim = cfg, num_classes, feature_dim

    @abstractmethod
    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        """Train on ``X`` (N, D) float and ``y`` (N,) int; ``val`` is only for reporting curves."""

    @abstractmethod
    def logits(self, X: np.ndarray) -> np.ndarray:
        """(N, C) class scores; their softmax is :meth:`predict_proba`."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(X))

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """The fitted head as named arrays."""

    @abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...

    def train_predictions(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
        """``(labels, probabilities, note)`` that train metrics are computed from: every train row by default.
        A head for which that is meaningless or too costly (k-NN) scores something else and says what in ``note``."""
        return y, self.predict_proba(X), None

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        """The HeadConfig values ``--sweep`` chooses among (empty: nothing to choose)."""
        return []

    def sweep_scores(
        self, X: np.ndarray, y: np.ndarray, held_out: tuple[np.ndarray, np.ndarray], *, grid: list[dict[str, float]]
    ) -> list[float]:
        """Held-out accuracy of each grid point fitted on ``(X, y)``. Heads that can, do it in one batch."""
        scores = []
        for point in grid:
            head = type(self)(replace(self.cfg, **point), num_classes=self.num_classes, feature_dim=self.feature_dim)
            head.fit(X, y)
            scores.append(float((head.logits(held_out[0]).argmax(1) == held_out[1]).mean()))
        return scores

    def as_module(self) -> nn.Module:
        """The head as a torch layer on features: logits = module(features)."""
        raise PipelineError(
            f"a {self.name} head cannot become a layer of the model; export linear, logreg, centroid or mlp"
        )


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def balanced_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """sklearn's "balanced": n / (classes present * count); 0 for a class train lacks."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w.astype(np.float32)


def _linear_module(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


# ------------------------------------------------------------------------------------------ torch training


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


class _Single(nn.Module):
    """Wraps a (N, D) -> (N, C) module as a grid of one."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[None]


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

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

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

    @classmethod
    def build(
        cls, X: np.ndarray, y: np.ndarray, *, val: Any, cfg: HeadConfig, num_classes: int, device: torch.device
    ) -> TorchData:
        # The whole matrix lives on the device: no DataLoader, no per-batch host->device copies.
        def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

        weight = t(balanced_weights(y, num_classes), torch.float32) if cfg.class_weight == "balanced" else None
        v = None if val is None or not len(val[1]) else (t(val[0], torch.float32), t(val[1], torch.long))
        return cls(t(X, torch.float32), t(y, torch.long), v, weight, num_classes)


@torch.no_grad()
def _evaluate_grid(model: nn.Module, X: torch.Tensor, y: torch.Tensor, weight: Any) -> tuple[list[float], list[float]]:
    model.eval()
    logits = model(X)
    loss = _grid_loss(logits, y, weight).tolist()
    acc = (logits.argmax(2) == y[None]).float().mean(1).tolist()
    model.train()
    return loss, acc


def train_grid(
    model: nn.Module, param_groups: list[dict[str, Any]], data: TorchData, *, cfg: HeadConfig
) -> list[list[dict[str, float]]]:
    """Adam on mini-batches for every member of ``model`` (output (G, N, C)) at once, by autograd; per-member
    histories. The reference that the heads' analytic-gradient training (:func:`train_epochs`) is tested against."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    opt = Adam(param_groups)
    n, histories = len(data.X), None
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(data.X.device)
        total, correct = 0.0, 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            logits = model(data.X[idx])
            losses = _grid_loss(logits, data.y[idx], data.weight)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            total = total + losses.detach() * len(idx)
            correct = correct + (logits.detach().argmax(2) == data.y[idx][None]).sum(1)
        rows = [
            {"epoch": epoch, "train_loss": float(total[g]) / n, "train_accuracy": float(correct[g]) / n}
            for g in range(len(total))
        ]
        if data.val is not None:
            loss, acc = _evaluate_grid(model, *data.val, data.weight)
            for g, row in enumerate(rows):
                row["val_loss"], row["val_accuracy"] = loss[g], acc[g]
        histories = [[] for _ in rows] if histories is None else histories
        for g, row in enumerate(rows):
            histories[g].append(row)
        log.debug("epoch %d %s", epoch, rows[0])
    model.eval()
    return histories or []


# A step: (x batch, each row's share of its batch loss, the one-hot targets times that share, out) -> the batch's
# (G * C, B) logits written to ``out``, taken before the update it makes.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def train_epochs(
    data: TorchData, *, groups: int, cfg: HeadConfig, step: Step, evaluate: Callable[[torch.Tensor], torch.Tensor]
) -> list[list[dict[str, float]]]:
    """The mini-batch loop of the analytic-gradient heads: the same batches and per-epoch history as
    :func:`train_grid`, with nothing waiting on the device until the end of the epoch.

    ``step`` does one batch's forward, gradient and update; ``evaluate`` gives (G, N, C) logits for val. The
    softmax cross-entropy gradient is ``(softmax(z) - onehot(y)) * w_y / sum(w)`` per row, so the driver hands each
    step the rows' shares ``w_y / sum(w)`` and ``onehot(y) * share``. The epoch's logits are kept (transposed,
    (G * C, N)) so that train loss and accuracy are computed once per epoch from the same pre-update logits a
    per-step tally would see.
    """
    dev, n, B, C = data.X.device, len(data.X), cfg.batch_size, data.classes
    row_weight = data.weight[data.y] if data.weight is not None else torch.ones(n, device=dev)
    batch_of = torch.arange(n, device=dev) // B
    batch_size = torch.bincount(batch_of).float()
    logits = torch.empty(groups * C, n, device=dev)
    xb = torch.empty(min(B, n), data.X.shape[1], device=dev)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    histories: list[list[dict[str, float]]] = [[] for _ in range(groups)]
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(dev)
        y, w = data.y[perm], row_weight[perm]
        share = w / torch.zeros(len(batch_size), device=dev).index_add_(0, batch_of, w)[batch_of]
        target = nn.functional.one_hot(y, C).t().float().mul_(share).repeat(groups, 1)  # (G * C, n)
        batches = zip(perm.split(B), share.split(B), target.split(B, 1), logits.split(B, 1))  # views, made at once
        for idx, share_b, target_b, out in batches:
            x = torch.index_select(data.X, 0, idx, out=xb[: len(idx)])  # faster than X[idx]
            step(x, share_b, target_b, out)
        logits3 = logits.view(groups, C, n)
        nll = -torch.log_softmax(logits3, 1).gather(1, y[None, None].expand(groups, 1, n))[:, 0]  # (G, n)
        stats = [
            (nll * share * batch_size[batch_of]).sum(1) / n,  # mean over batches of each batch's loss
            (logits3.transpose(1, 2).contiguous().argmax(2) == y).float().mean(1),  # 4x faster than argmax(1)
        ]
        if data.val is not None:
            val_logits = evaluate(data.val[0])
            stats += [
                _grid_loss(val_logits, data.val[1], data.weight),
                (val_logits.argmax(2) == data.val[1]).float().mean(1),
            ]
        values = torch.stack(stats).tolist()  # the epoch's one wait on the device
        keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")[: len(values)]
        for g, history in enumerate(histories):
            history.append({"epoch": epoch, **{k: float(v[g]) for k, v in zip(keys, values)}})
        log.debug("epoch %d %s", epoch, histories[0][-1])
    return histories


def _softmax_grad(z: torch.Tensor, groups: int, share: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d(batch loss)/dz for (G * C, B) logits z: (softmax(z) - onehot) * share."""
    return torch.softmax(z.view(groups, -1, z.shape[1]), 1).view(z.shape).mul_(share).sub_(target)


def train_linear_grid(
    model: LinearGrid, data: TorchData, *, lr: list[float], weight_decay: list[float], cfg: HeadConfig
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

    def step(x: torch.Tensor, share: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(bias, weight, x.t(), out=out)
        dz = _softmax_grad(z, G, share, target)
        torch.mm(dz, x, out=grad_weight)
        torch.sum(dz, 1, keepdim=True, out=grad_bias)
        opt.step(grads)
        return z

    return train_epochs(data, groups=G, cfg=cfg, step=step, evaluate=model)


def train_mlp(module: nn.Sequential, data: TorchData, *, cfg: HeadConfig) -> list[list[dict[str, float]]]:
    """Mini-batch Adam for ``Linear -> ReLU -> Dropout -> Linear`` with the backward pass written out, like
    :func:`train_linear_grid`: autograd, ``bernoulli_`` dropout masks and one Adam update per parameter cost
    2-3 ms a step on this CPU, 4x the matmuls themselves. Same loss, update and history as :func:`train_grid`.

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

    def step(x: torch.Tensor, share: torch.Tensor, target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a = torch.addmm(b1, x, w1.t())
        gate = (a > 0).to(a.dtype)  # d relu(a) / da, times the dropout mask and its 1 / (1 - p) scale
        if p:
            gate.mul_(torch.rand_like(a).ge_(p)).mul_(1 / (1 - p))
        h = a.mul_(gate)
        z = torch.addmm(b2_col, w2, h.t())
        out.copy_(z)
        dz = _softmax_grad(z, 1, share, target)
        torch.mm(dz, h, out=g_w2)
        torch.sum(dz, 1, out=g_b2)
        da = torch.mm(dz.t(), w2).mul_(gate)
        torch.mm(da.t(), x, out=g_w1)
        torch.sum(da, 0, out=g_b1)
        opt.step([grad])
        return z

    def evaluate(X: torch.Tensor) -> torch.Tensor:
        return torch.addmm(b2, torch.addmm(b1, X, w1.t()).relu_(), w2.t())[None]

    histories = train_epochs(data, groups=1, cfg=cfg, step=step, evaluate=evaluate)
    with torch.no_grad():
        for t, v in zip(params, flat.split(sizes)):
            t.copy_(v.view_as(t))
    return histories


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


# ------------------------------------------------------------------------------------------ the heads


class _AffineHead(Head):
    """A head that ends as one linear layer, ``weight`` (C, D) and ``bias`` (C,) in numpy."""

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        super().__init__(cfg, num_classes=num_classes, feature_dim=feature_dim)
        self.weight = np.zeros((num_classes, feature_dim), np.float32)
        self.bias = np.zeros(num_classes, np.float32)

    def logits(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.weight.T + self.bias

    def as_module(self) -> nn.Module:
        return _linear_module(self.weight, self.bias)

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias = state["weight"], state["bias"]


class LinearHead(_AffineHead):
    """The reference recipe: ``nn.Linear(D, C)``, cross-entropy, Adam, mini-batches over the in-memory matrix."""

    name = "linear"
    uses_class_weight = True
    uses_standardize = True

    def _fit_grid(
        self, X: np.ndarray, y: np.ndarray, *, grid: list[dict[str, float]], val: Any = None
    ) -> tuple[LinearGrid, list[list[dict[str, float]]]]:
        device = resolve_device(self.cfg.device)
        X, val, shift = prepare_inputs(X, val, cfg=self.cfg)
        data = TorchData.build(X, y, val=val, cfg=self.cfg, num_classes=self.num_classes, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            model = LinearGrid(len(grid), self.feature_dim, self.num_classes).to(device)
        lr = [p.get("lr", self.cfg.lr) for p in grid]
        weight_decay = [p.get("weight_decay", self.cfg.weight_decay) for p in grid]
        with fitting_threads(device):
            histories = train_linear_grid(model, data, lr=lr, weight_decay=weight_decay, cfg=self.cfg)
        if shift is not None:
            with torch.no_grad():
                fold_standardiser(model.weight, model.bias, *shift)
        return model, histories

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        model, histories = self._fit_grid(X, y, grid=[{}], val=val)
        self.weight = model.weight[0].cpu().numpy().copy()
        self.bias = model.bias[0].cpu().numpy().copy()
        return FitResult(history=histories[0])

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"lr": lr, "weight_decay": wd} for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2) for wd in (0.0, 1e-4, 1e-3)]

    def sweep_scores(
        self, X: np.ndarray, y: np.ndarray, held_out: tuple[np.ndarray, np.ndarray], *, grid: list[dict[str, float]]
    ) -> list[float]:
        """The whole grid in one pass over the features: one (G, C, D) weight stack, one param group each."""
        model, _ = self._fit_grid(X, y, grid=grid)
        device = model.weight.device
        with torch.no_grad():
            pred = model(torch.as_tensor(held_out[0], dtype=torch.float32, device=device)).argmax(2).cpu().numpy()
        return [float(a) for a in (pred == held_out[1][None]).mean(1)]


class LogRegHead(Head):
    """scikit-learn ``LogisticRegression`` (multinomial, lbfgs) on standardised features.

    Standardising matters: unscaled CNN features make lbfgs take 5-10x longer or stop unconverged.
    The fitted model is stored as a linear layer plus the scaler's mean/scale.
    """

    name = "logreg"
    uses_class_weight = True

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        if len(np.unique(y)) < 2:
            raise PipelineError("logreg needs at least 2 classes in train; this train split has one")
        mean, scale = _standardiser(X)
        clf = LogisticRegression(
            C=self.cfg.C,
            max_iter=self.cfg.max_iter,
            random_state=self.cfg.seed,
            class_weight="balanced" if self.cfg.class_weight == "balanced" else None,
        )
        # One BLAS/OpenMP thread, for the reason fitting_threads gives: on 50,000 x 512 this fit took 4-25 s with
        # the default 2 threads in bench runs on a shared 2-core box, and 0.7 s with 1 (0.9 s with 2) when quiet.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit((np.asarray(X, np.float32) - mean) / scale, y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not converged:
            log.warning("logreg did not converge in %d iterations; raise --max-iter", self.cfg.max_iter)
        self._set(clf, mean, scale, classes_seen=clf.classes_)
        return FitResult(info={"converged": converged, "n_iter": int(np.max(clf.n_iter_))})

    def _set(self, clf: Any, mean: np.ndarray, scale: np.ndarray, *, classes_seen: np.ndarray) -> None:
        coef, intercept = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
        if coef.shape[0] == 1:  # binary: sklearn keeps one row for the positive class
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]], np.float32)
        self.weight = np.zeros((self.num_classes, self.feature_dim), np.float32)
        self.bias = np.full(self.num_classes, ABSENT_LOGIT, np.float32)
        self.weight[classes_seen] = coef
        self.bias[classes_seen] = intercept
        self.mean, self.scale = mean, scale

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"C": c} for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)]

    def logits(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, np.float32) - self.mean) / self.scale
        return Z @ self.weight.T + self.bias

    def as_module(self) -> nn.Module:
        layer = _linear_module(self.weight, self.bias)  # the standardisation folds into the one linear layer
        with torch.no_grad():
            fold_standardiser(layer.weight, layer.bias, self.mean, self.scale)
        return layer

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias, self.mean, self.scale = (state[k] for k in ("weight", "bias", "mean", "scale"))


def _standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean, scale) as sklearn's ``StandardScaler`` computes them (float64 sums, a constant feature's scale
    set to 1), in a tenth of its time on 50,000 x 512."""
    mean, var = np.mean(X, axis=0, dtype=np.float64), np.var(X, axis=0, dtype=np.float64)
    scale = np.sqrt(var)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


# Below this median per-feature standard deviation, Adam at the usual learning rates cannot move the logits in
# any number of epochs (the steps are ~lr per weight, times features of this size): a random-init MobileNetV2 gives
# features of ~1e-9. ImageNet-pretrained backbones give 0.1-1.
TINY_SPREAD = 1e-3


def prepare_inputs(X: np.ndarray, val: Any, *, cfg: HeadConfig) -> tuple[np.ndarray, Any, tuple | None]:
    """What a gradient-trained head (linear, mlp) trains on: ``(X, val, None)`` as given, or with ``standardize``
    both standardised by train's statistics and ``(mean, scale)`` to fold back into the first layer afterwards, so
    the saved head still takes raw features."""
    if not cfg.standardize:
        return X, val, None
    mean, scale = _standardiser(X)
    X = (np.asarray(X, np.float32) - mean) / scale
    if val is not None:
        val = ((np.asarray(val[0], np.float32) - mean) / scale, val[1])
    return X, val, (mean, scale)


def warn_if_tiny(X: np.ndarray, cfg: HeadConfig) -> None:
    """Say so when raw features are too small for a gradient-trained head to learn from (see TINY_SPREAD)."""
    spread = float(np.median(np.std(X[:10_000], axis=0))) if len(X) > 1 else 1.0
    if spread < TINY_SPREAD:
        log.warning(
            "features have a tiny spread (median std %.1e): the %s head will not learn from them; pass --standardize",
            spread,
            cfg.head,
        )


def fold_standardiser(weight: torch.Tensor, bias: torch.Tensor, mean: np.ndarray, scale: np.ndarray) -> None:
    """In place: a layer ``W z + b`` on ``z = (x - mean) / scale`` becomes ``(W / scale) x + (b - (W / scale) mean)``,
    in float64 and then stored in the layer's dtype (the new bias from the stored weight). ``weight`` is (..., D),
    ``bias`` its leading shape."""

    def f64(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, np.float64), device=weight.device)

    weight.copy_(weight.double() / f64(scale))
    bias.copy_(bias.double() - weight.double() @ f64(mean))


class MLPHead(Head):
    """One hidden layer: Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, C), trained like ``linear``."""

    name = "mlp"
    uses_class_weight = True
    uses_standardize = True

    def _module(self) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(self.feature_dim, self.cfg.hidden),
            nn.ReLU(),
            nn.Dropout(self.cfg.dropout),
            nn.Linear(self.cfg.hidden, self.num_classes),
        )

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        device = resolve_device(self.cfg.device)
        X, val, shift = prepare_inputs(X, val, cfg=self.cfg)
        data = TorchData.build(X, y, val=val, cfg=self.cfg, num_classes=self.num_classes, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)  # init and dropout masks
            self.module = self._module().to(device)
            with fitting_threads(device):
                histories = train_mlp(self.module, data, cfg=self.cfg)
        self.module = self.module.cpu().eval()
        if shift is not None:
            with torch.no_grad():
                fold_standardiser(self.module[0].weight, self.module[0].bias, *shift)
        return FitResult(history=histories[0])

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"lr": lr, "weight_decay": wd} for lr in (3e-4, 1e-3, 3e-3) for wd in (0.0, 1e-3)]

    @torch.no_grad()
    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.module(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy()

    def as_module(self) -> nn.Module:
        return self.module

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.module = self._module().eval()
        try:
            self.module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        except RuntimeError as e:
            raise PipelineError(f"saved mlp head does not fit its config: {str(e).splitlines()[0]}") from None


class CentroidHead(_AffineHead):
    """Nearest class mean (Euclidean). ``-|x - m_c|^2 / T`` differs from ``(2 m_c.x - |m_c|^2) / T`` only by a
    term shared by all classes, so the head is a linear layer; the temperature T is fitted on train."""

    name = "centroid"

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        X = np.asarray(X, np.float64)
        present = np.bincount(y, minlength=self.num_classes) > 0
        means = np.zeros((self.num_classes, self.feature_dim))
        np.add.at(means, y, X)
        means[present] /= np.bincount(y, minlength=self.num_classes)[present, None]
        w, b = 2 * means, -(means**2).sum(1)
        b[~present] = ABSENT_LOGIT
        z = X @ w.T + b
        temperature = _fit_temperature(z, y)
        self.weight = (w / temperature).astype(np.float32)
        self.bias = np.where(present, b / temperature, ABSENT_LOGIT).astype(np.float32)
        return FitResult(info={"temperature": temperature})


def _fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The T (log-spaced grid around the logit spread) with the lowest train log-loss of softmax(z / T)."""
    spread = float(np.std(z - z.mean(1, keepdims=True))) or 1.0
    best, best_loss = spread, math.inf
    for t in spread * np.logspace(-3, 1, 25):
        p = _softmax(z / t)
        loss = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()
        if loss < best_loss:
            best, best_loss = float(t), loss
    return best


class KNNHead(Head):
    """k nearest neighbours by cosine similarity on L2-normalised features; votes weighted by exp(sim / 0.07)
    (dinov2's k-NN evaluation), and by inverse class frequency with ``--class-weight balanced``."""

    name = "knn"
    uses_class_weight = True
    TEMPERATURE = 0.07
    CHUNK_ELEMENTS = 1 << 24  # similarity entries per block (64 MB of float32), whatever the size of train
    TRAIN_METRIC_ROWS = 2000  # train rows scored (leave-one-out) for the train metrics: +-1% on accuracy

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        self.train_features = _l2_normalise(X)
        self.train_labels = np.asarray(y, np.int64)
        return FitResult(info={"k": min(self.cfg.k, len(y))})

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        return [{"k": k} for k in (1, 3, 5, 10, 20, 50)]

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self._log_votes(X)

    def train_predictions(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, str | None]:
        """Leave-one-out on a seeded sample of train rows: scoring every train row would cost an N x N similarity
        pass, and each row would count itself among its own neighbours (k=1 would always be right)."""
        n = len(self.train_labels)
        if n < 2:
            return y, self.predict_proba(X), None
        rows = np.sort(np.random.default_rng(self.cfg.seed).permutation(n)[: self.TRAIN_METRIC_ROWS])
        proba = _softmax(self._log_votes(np.asarray(X)[rows], exclude=rows))
        note = f"leave-one-out on {len(rows)} of {n} train rows (seeded sample; a row is not its own neighbour)"
        return np.asarray(y)[rows], proba, note

    @torch.no_grad()
    def _log_votes(self, X: np.ndarray, *, exclude: np.ndarray | None = None) -> np.ndarray:
        """Log of each class's share of the weighted votes; ``exclude[i]``: a train row query i may not vote for."""
        train = torch.as_tensor(self.train_features)
        labels = torch.as_tensor(self.train_labels)
        class_w = torch.ones(self.num_classes)
        if self.cfg.class_weight == "balanced":
            class_w = torch.as_tensor(balanced_weights(self.train_labels, self.num_classes))
        k = min(self.cfg.k, len(labels) - (exclude is not None))
        chunk = max(1, self.CHUNK_ELEMENTS // max(1, len(labels)))  # bounds the similarity block's memory
        out = []
        for start in range(0, len(X), chunk):
            q = torch.as_tensor(_l2_normalise(X[start : start + chunk]))
            sim = q @ train.T
            if exclude is not None:
                sim[torch.arange(len(q)), torch.as_tensor(exclude[start : start + chunk])] = -math.inf
            sim, idx = sim.topk(k, dim=1)
            nb = labels[idx]
            weights = (sim / self.TEMPERATURE).exp() * class_w[nb]
            votes = torch.zeros(len(q), self.num_classes).scatter_add_(1, nb, weights)
            out.append(torch.log(votes / votes.sum(1, keepdim=True) + 1e-6))
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"train_features": self.train_features, "train_labels": self.train_labels}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.train_features, self.train_labels = state["train_features"], state["train_labels"]


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


HEADS: dict[str, type[Head]] = {
    LinearHead.name: LinearHead,
    LogRegHead.name: LogRegHead,
    MLPHead.name: MLPHead,
    KNNHead.name: KNNHead,
    CentroidHead.name: CentroidHead,
}


def build_head(cfg: HeadConfig, *, num_classes: int, feature_dim: int) -> Head:
    return HEADS[cfg.head](cfg, num_classes=num_classes, feature_dim=feature_dim)


# ------------------------------------------------------------------------------------------ persistence


def save_head(head: Head, out_dir: Path, *, config: dict[str, Any]) -> None:
    """``head.safetensors`` (arrays only) + ``config.json`` (what produced it)."""
    state = {k: np.ascontiguousarray(v) for k, v in head.state().items()}
    atomic_write(out_dir / HEAD_FILE, lambda p: save_file(state, str(p)))
    write_json(out_dir / "config.json", config)


def load_head(head_dir: Path) -> tuple[Head, dict[str, Any]]:
    """Load a saved head and its config; refuses anything that is not plain arrays in safetensors."""
    head_dir = Path(head_dir)
    cfg_path, tensors = head_dir / "config.json", head_dir / HEAD_FILE
    if not cfg_path.is_file() or not tensors.is_file():
        raise PipelineError(f"{head_dir} is not a trained head folder (needs config.json and {HEAD_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
        head_cfg = HeadConfig(**config["head_config"])
        head = build_head(head_cfg, num_classes=len(config["classes"]), feature_dim=int(config["feature_dim"]))
        state = load_file(str(tensors))
    except (SafetensorError, ValueError, KeyError, TypeError, OSError) as e:
        raise PipelineError(f"cannot load head from {head_dir}: {type(e).__name__}: {e}") from None
    weight = state.get("weight")
    if weight is not None and weight.shape != (head.num_classes, head.feature_dim):
        raise PipelineError(
            f"{tensors} holds a {weight.shape[1]}-d head for {weight.shape[0]} classes; its config says "
            f"{head.feature_dim}-d, {head.num_classes} classes"
        )
    try:
        head.load_state(state)
    except KeyError as e:
        raise PipelineError(f"{tensors} lacks the array {e} that a {head.name} head needs") from None
    return head, config


def config_dict(cfg: HeadConfig) -> dict[str, Any]:
    return asdict(cfg)
