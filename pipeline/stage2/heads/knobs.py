"""The knobs of the built-in heads, grouped by who reads them: each group is a frozen dataclass of ``option(...)``
fields (default, command-line help, choices written once) with a ``check`` of its own values. A head's registry
entry names the groups it reads (:mod:`pipeline.stage2.heads.registry`); ``HeadConfig`` is the run's protocol plus
every registered group, so ``train-head`` and ``compare`` generate one option per field.

Torch-free: ``--help`` builds the options from here. A new head with knobs of its own declares a group like these
(anywhere torch-free, e.g. beside its registry entry) and names it in its entry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError
from pipeline.options import option

CLASS_WEIGHTS = ("none", "balanced")
SOLVERS = ("torch", "sklearn")
DEFAULT_BATCH = 128  # rows a step when --batch-size is not given (the CUDA rule in fitting.py may grow it)


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise PipelineError(f"--{name} must be a positive number, not {value}")


def at_least_one(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")


def one_of(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in choices:
        raise PipelineError(
            f"--{name.replace('_', '-')} must be one of: {', '.join(choices)}, not {getattr(cfg, name)!r}"
        )


@dataclass(frozen=True)
class AdamKnobs:
    """Mini-batch Adam (linear, mlp, tail)."""

    lr: float = option(1e-3, "Learning rate (linear, mlp, tail).")
    epochs: int = option(15, "Passes over train (linear, mlp, tail).")
    batch_size: int | None = option(
        None,
        f"Mini-batch size (linear, mlp, tail). Default: {DEFAULT_BATCH}, grown up to 8x on CUDA on large files "
        "(lr times the square root); a given value always runs as given.",
    )
    weight_decay: float = option(0.0, "L2 weight decay (linear, mlp, tail).")

    def check(self) -> None:
        positive(self, "lr")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise PipelineError(f"--weight-decay must be 0 or more, not {self.weight_decay}")
        at_least_one(self, "epochs", "batch_size")

    @property
    def rows_per_step(self) -> int:
        """The batch size as given, else the default (before any device rule: see ``fitting.scaled_for_device``)."""
        return DEFAULT_BATCH if self.batch_size is None else self.batch_size


@dataclass(frozen=True)
class StandardizeKnobs:
    """Gradient-trained heads on raw features (linear, mlp)."""

    standardize: bool = option(
        False,
        "Train linear/mlp on features standardised by train's mean and std (folded into the saved layer, which "
        "still takes raw features). logreg always standardises.",
    )

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class ClassWeightKnobs:
    """Heads that can weight classes by inverse frequency."""

    class_weight: str = option(
        "none",
        "'balanced' weights classes by inverse frequency (linear, mlp, logreg, knn, tail).",
        choices=CLASS_WEIGHTS,
    )

    def check(self) -> None:
        one_of(self, "class_weight", CLASS_WEIGHTS)


@dataclass(frozen=True)
class MLPKnobs:
    hidden: int = option(128, "Hidden units (mlp).")  # 128 keeps `compare` within its budget (see MLPHead)
    dropout: float = option(0.5, "Dropout after the hidden layer (mlp).")

    def check(self) -> None:
        at_least_one(self, "hidden")
        if not 0 <= self.dropout < 1:
            raise PipelineError(f"--dropout must be in [0, 1), not {self.dropout}")


@dataclass(frozen=True)
class LogRegKnobs:
    C: float = option(1.0, "Inverse L2 strength (logreg): minimises mean log-loss + ||W||^2 / (2 C n), as sklearn.")
    max_iter: int = option(1000, "L-BFGS iterations at most (logreg).")
    tol: float = option(1e-4, "Stop when the largest gradient entry is below this (logreg; sklearn's gtol).")
    solver: str = option("torch", "logreg solver: 'torch' (L-BFGS where the features are), 'sklearn' (reference).",
                         choices=SOLVERS)  # fmt: skip

    def check(self) -> None:
        positive(self, "C", "tol")
        at_least_one(self, "max_iter")
        one_of(self, "solver", SOLVERS)


@dataclass(frozen=True)
class KNNKnobs:
    k: int = option(10, "Neighbours (knn).")

    def check(self) -> None:
        at_least_one(self, "k")


@dataclass(frozen=True)
class RidgeKnobs:
    alpha: float = option(1.0, "L2 strength of the ridge head (chosen on held-out train with --sweep).")

    def check(self) -> None:
        positive(self, "alpha")


@dataclass(frozen=True)
class TailKnobs:
    train_bn: bool = option(
        False,
        "tail head: BatchNorm in train mode (its running statistics move with the new data); default: eval mode, "
        "the backbone's statistics kept.",
        flag=True,
    )

    def check(self) -> None:
        pass
