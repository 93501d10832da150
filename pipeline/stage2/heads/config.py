"""``HeadConfig``: the hyper-parameters of every head. Each field carries its command-line help (and choices) as
metadata, so ``train-head`` and ``compare`` build their options from this one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.devices import DEVICES
from pipeline.errors import PipelineError
from pipeline.options import option

CLASS_WEIGHTS = ("none", "balanced")
SOLVERS = ("torch", "sklearn")
TASKS = ("auto", "classify", "regress")
DEFAULT_BATCH = 128  # rows a step when --batch-size is not given (the CUDA rule in fitting.py may grow it)


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of every head; each head reads the ones it uses."""

    head: str = option("linear", "Head type.", cli=False)  # the commands take --head / --heads themselves
    lr: float = option(1e-3, "Learning rate (linear, mlp).")
    epochs: int = option(15, "Passes over train (linear, mlp).")
    batch_size: int | None = option(
        None,
        f"Mini-batch size (linear, mlp, tail). Default: {DEFAULT_BATCH}, grown up to 8x on CUDA on large files "
        "(lr times the square root); a given value always runs as given.",
    )
    weight_decay: float = option(0.0, "L2 weight decay (linear, mlp).")
    C: float = option(1.0, "Inverse L2 strength (logreg): minimises mean log-loss + ||W||^2 / (2 C n), as sklearn.")
    max_iter: int = option(1000, "L-BFGS iterations at most (logreg).")
    tol: float = option(1e-4, "Stop when the largest gradient entry is below this (logreg; sklearn's gtol).")
    solver: str = option("torch", "logreg solver: 'torch' (L-BFGS where the features are), 'sklearn' (reference).",
                         choices=SOLVERS)  # fmt: skip
    hidden: int = option(128, "Hidden units (mlp).")  # 128 keeps `compare` within its budget (see MLPHead)
    dropout: float = option(0.5, "Dropout after the hidden layer (mlp).")
    standardize: bool = option(
        False,
        "Train linear/mlp on features standardised by train's mean and std (folded into the saved layer, which "
        "still takes raw features). logreg always standardises.",
    )
    k: int = option(10, "Neighbours (knn).")
    class_weight: str = option(
        "none", "'balanced' weights classes by inverse frequency (linear, mlp, logreg, knn).", choices=CLASS_WEIGHTS
    )
    sweep: bool = option(
        False,
        "Choose lr/weight decay (linear, mlp), C (logreg, 45 values) or k (knn) on a held-out 20% of train, then "
        "refit on all of train; val is only reported.",
        flag=True,
    )
    positive: str | None = option(
        None,
        "The class that matters: choose a probability threshold for it (with --target-recall or "
        "--target-precision) on a held-out 20% of train; val is only reported. Curves are of this class.",
    )
    target_recall: float | None = option(None, "Recall of --positive the threshold must reach, in (0, 1].")
    target_precision: float | None = option(None, "Precision of --positive the threshold must reach, in (0, 1].")
    layer: str | None = option(
        None,
        "Which stored layer to train on (files made with extract --layers): a layer name, or 'all' (default: "
        "all, their concatenation).",
    )
    task: str = option(
        "auto",
        "classify (labels) or regress (the file's --targets); auto = regress when the file has targets.",
        choices=TASKS,
    )
    alpha: float = option(1.0, "L2 strength of the ridge head (chosen on held-out train with --sweep).")
    shots: int | None = option(None, "Train on K examples per class (seeded sample).", cli=False)
    seed: int = option(0, "Seed of initialisation, batches and samples.")
    device: str = option("auto", "Where torch heads train.", choices=DEVICES)
    train_bn: bool = option(
        False,
        "tail head: BatchNorm in train mode (its running statistics move with the new data); default: eval mode, "
        "the backbone's statistics kept.",
        flag=True,
    )

    def __post_init__(self) -> None:
        from pipeline.stage2.heads import HEADS  # the registry imports the heads, which import this module

        if self.head not in HEADS:
            raise PipelineError(f"unknown head {self.head!r}; choose one of: {', '.join(HEADS)}")
        for name in ("lr", "C", "tol", "alpha"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise PipelineError(f"--{name} must be a positive number, not {value}")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise PipelineError(f"--weight-decay must be 0 or more, not {self.weight_decay}")
        for name in ("epochs", "batch_size", "max_iter", "hidden", "k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise PipelineError(f"--dropout must be in [0, 1), not {self.dropout}")
        for name, choices in (("class_weight", CLASS_WEIGHTS), ("solver", SOLVERS), ("task", TASKS)):
            if getattr(self, name) not in choices:
                raise PipelineError(
                    f"--{name.replace('_', '-')} must be one of: {', '.join(choices)}, not {getattr(self, name)!r}"
                )
        self._check_threshold()
        if self.shots is not None and self.shots < 1:
            raise PipelineError(f"--shots must be at least 1, not {self.shots}")

    def _check_threshold(self) -> None:
        targets = [n for n in ("target_recall", "target_precision") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise PipelineError("give --target-recall or --target-precision, not both")
        for name in targets:
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be in (0, 1], not {value}")
        if targets and not self.positive:
            raise PipelineError(f"--{targets[0].replace('_', '-')} needs --positive CLASS: the class it is about")
        # --positive alone is allowed: its curves (two classes) are drawn, and no threshold is chosen

    @property
    def rows_per_step(self) -> int:
        """The batch size as given, else the default (before any device rule: see ``fitting.scaled_for_device``)."""
        return DEFAULT_BATCH if self.batch_size is None else self.batch_size

    @property
    def threshold_target(self) -> dict[str, float] | None:
        """``{"target_recall": R}`` or ``{"target_precision": P}`` when a threshold is asked for, else None."""
        for name in ("target_recall", "target_precision"):
            if getattr(self, name) is not None:
                return {name: getattr(self, name)}
        return None
