"""What every head shares: the :class:`Head` interface, the affine head (a head that ends as one linear layer), and
standardisation (train's mean and std, folded into the first layer afterwards so a saved head takes raw features)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.stage2.heads.config import HeadConfig, sweep_key
from pipeline.stage2.heads.registry import HeadSpec, spec

log = logging.getLogger(__name__)
Score = Callable[[np.ndarray, np.ndarray], float]  # (truth, the head's outputs) -> higher is better
ABSENT_LOGIT = -1e4  # logit of a class that train lacks: a very low score rather than a missing row


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch curves, for iterative heads
    info: dict[str, Any] = field(default_factory=dict)


class Head(ABC):
    """A head type. What can be known of it without importing it (its knobs, tasks, inputs, advice) is its
    registry entry (:attr:`spec`, :mod:`pipeline.stage2.heads.registry`); the class holds what it does."""

    name: ClassVar[str]

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        # num_classes: the outputs, i.e. the number of targets of a regression head (cfg.task == "regress")
        self.cfg, self.num_classes, self.feature_dim = cfg, num_classes, feature_dim
        self.sweep_info: dict[str, Any] = {}  # what sweep_scores wants recorded beside the grid (e.g. iterations)
        # The held-out outputs of the grid points sweep_scores fitted (by config.sweep_key): choice.guard tests the
        # chosen point against the defaults on these instead of fitting both again.
        self.held_out_logits: dict[tuple, np.ndarray] = {}
        # ... and, where the sweep kept them (mlp), the heads those outputs came from, fitted on the sweep's part of
        # train (made when asked): choice.check_refit tests the refit against the chosen one without fitting it again.
        self.held_out_fits: dict[tuple, Callable[[], Head]] = {}

    @property
    def spec(self) -> HeadSpec:
        return spec(self.name)

    @property
    def inputs(self) -> str:
        """What fit/logits take: "features" (N, D) or "activations" (the tail head)."""
        return self.spec.inputs

    @property
    def regress(self) -> bool:
        """Whether this head predicts regression targets: ``fit`` takes (N, T) floats, ``logits`` are the values."""
        return self.cfg.task == "regress"

    @abstractmethod
    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        """Train on ``X`` (N, D) float and ``y`` (N,) int; ``val`` is only for reporting curves."""

    @abstractmethod
    def logits(self, X: np.ndarray) -> np.ndarray:
        """(N, C) class scores; their softmax is :meth:`predict_proba`."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.logits(X))

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
        self,
        X: np.ndarray,
        y: np.ndarray,
        held_out: tuple[np.ndarray, np.ndarray],
        *,
        grid: list[dict[str, float]],
        score: Score,
    ) -> list[float]:
        """``score`` (the task's held-out score: accuracy, R^2, ...) of each grid point fitted on ``(X, y)``, on
        ``held_out``. Heads that can, do it in one batch."""
        scores = []
        for point in grid:
            head = type(self)(replace(self.cfg, **point), num_classes=self.num_classes, feature_dim=self.feature_dim)
            head.fit(X, y)
            logits = self.held_out_logits[sweep_key(point)] = head.logits(held_out[0])
            scores.append(score(held_out[1], logits))
        return scores

    def as_module(self) -> nn.Module:
        """The head as a torch layer on features: logits = module(features)."""
        raise PipelineError(
            f"a {self.name} head cannot become a layer of the model; export linear, logreg, centroid or mlp"
        )

    def layer_record(self) -> dict[str, Any]:
        """What, beside its tensors, rebuilds :meth:`as_module` when it is not one ``nn.Linear``: the knobs that
        shape it (export records them; :meth:`from_layer_record` takes them back). Empty for an affine head."""
        return {}

    @classmethod
    def from_layer_record(cls, record: dict[str, Any], *, in_features: int, out_features: int) -> Head:
        """A head of this type shaped as ``record`` says (its tensors loaded after, by ``load_state``)."""
        try:
            cfg = HeadConfig(head=cls.name, **record)
        except TypeError as e:
            raise PipelineError(f"head_layer of a {cls.name} head: {e}") from None
        return cls(cfg, num_classes=out_features, feature_dim=in_features)


def target_scaler(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean, std) of regression targets (N, T): linear and mlp regress standardised targets, so one
    learning rate suits targets in any unit; :func:`unscale_outputs` folds them back into the last layer."""
    return standardiser(np.asarray(Y, np.float32))


def unscale_outputs(weight: torch.Tensor, bias: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> None:
    """In place: a last layer predicting ``(y - mean) / std`` predicts ``y`` (weight (..., T, H), bias (..., T))."""
    s = torch.as_tensor(np.asarray(std), dtype=weight.dtype, device=weight.device)
    m = torch.as_tensor(np.asarray(mean), dtype=weight.dtype, device=weight.device)
    weight.mul_(s[:, None])
    bias.mul_(s).add_(m)


def softmax(z: np.ndarray) -> np.ndarray:
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


def linear_module(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


class AffineHead(Head):
    """A head that ends as one linear layer, ``weight`` (C, D) and ``bias`` (C,) in numpy."""

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        super().__init__(cfg, num_classes=num_classes, feature_dim=feature_dim)
        self.weight = np.zeros((num_classes, feature_dim), np.float32)
        self.bias = np.zeros(num_classes, np.float32)

    def logits(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.weight.T + self.bias

    def as_module(self) -> nn.Module:
        return linear_module(self.weight, self.bias)

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias = state["weight"], state["bias"]


def standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
# Above this, Adam's float32 second moment (gradient squared, gradients ~ features) overflows: measured on separable
# features, linear and mlp learn at a median std of 4e19 and fall to chance at 4e21. The margin is deliberate.
HUGE_SPREAD = 1e12


def prepare_inputs(X: np.ndarray, val: Any, *, cfg: HeadConfig) -> tuple[np.ndarray, Any, tuple | None]:
    """What a gradient-trained head (linear, mlp) trains on: ``(X, val, None)`` as given, or with ``standardize``
    both standardised by train's statistics and ``(mean, scale)`` to fold back into the first layer afterwards, so
    the saved head still takes raw features."""
    if not cfg.standardize:
        return X, val, None
    mean, scale = standardiser(X)
    X = (np.asarray(X, np.float32) - mean) / scale
    if val is not None:
        val = ((np.asarray(val[0], np.float32) - mean) / scale, val[1])
    return X, val, (mean, scale)


def prepare_targets(y: np.ndarray, val: Any, *, cfg: HeadConfig) -> tuple[np.ndarray, Any, tuple | None]:
    """Regression (``cfg.task == "regress"``): ``(y, val)`` standardised by train's target mean and std, and that
    ``(mean, std)`` to fold back into the last layer (:func:`unscale_outputs`). Labels pass through unchanged."""
    if cfg.task != "regress":
        return y, val, None
    mean, std = target_scaler(y)
    y = (np.asarray(y, np.float32) - mean) / std
    if val is not None:
        val = (val[0], (np.asarray(val[1], np.float32) - mean) / std)
    return y, val, (mean, std)


@dataclass(frozen=True)
class Scalings:
    """The scalings a gradient-trained head (linear, mlp) trained under, folded back into its layers afterwards so
    the saved head takes raw features and gives outputs in the targets' own units."""

    inputs: tuple[np.ndarray, np.ndarray] | None = None  # (mean, scale) of --standardize
    targets: tuple[np.ndarray, np.ndarray] | None = None  # (mean, std) of regression targets

    @torch.no_grad()
    def fold(self, first: Any, last: Any) -> None:
        """Into the trained layers (anything with ``weight`` and ``bias``): the standardisation into ``first``, the
        target scale into ``last`` (one and the same layer for the linear head)."""
        if self.inputs is not None:
            fold_standardiser(first.weight, first.bias, *self.inputs)
        if self.targets is not None:
            unscale_outputs(last.weight, last.bias, *self.targets)


def prepare_scaled(
    X: np.ndarray, y: np.ndarray, val: Any, *, cfg: HeadConfig
) -> tuple[np.ndarray, np.ndarray, Any, Scalings]:
    """What a gradient-trained head trains on (:func:`prepare_inputs`, :func:`prepare_targets`) and the
    :class:`Scalings` to fold back afterwards."""
    X, val, shift = prepare_inputs(X, val, cfg=cfg)
    y, val, y_scale = prepare_targets(y, val, cfg=cfg)
    return X, y, val, Scalings(shift, y_scale)


def warn_if_tiny(X: np.ndarray, cfg: HeadConfig) -> None:
    """Say so when raw features are too small or too large for a gradient-trained head to learn from (see
    TINY_SPREAD, HUGE_SPREAD)."""
    spread = float(np.median(np.std(X[:10_000], axis=0, dtype=np.float64))) if len(X) > 1 else 1.0
    if spread < TINY_SPREAD or spread > HUGE_SPREAD:
        log.warning(
            "features have a %s spread (median std %.1e): the %s head will not learn from them; pass --standardize",
            "tiny" if spread < TINY_SPREAD else "huge",
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
