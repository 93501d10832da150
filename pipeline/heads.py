"""Stage-two heads trained on cached features. Adding a head type is one entry in ``HEADS``.

A head is fitted on ``(X, y)`` arrays, predicts class probabilities, and round-trips through a dict of
plain arrays (saved as safetensors: loading a head never unpickles, so it never runs code).
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
HEAD_FILE = "head.safetensors"


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
        for name in ("epochs", "batch_size", "max_iter"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch curves, for iterative heads
    info: dict[str, Any] = field(default_factory=dict)


class Head(ABC):
    name: ClassVar[str]

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        self.cfg, self.num_classes, self.feature_dim = cfg, num_classes, feature_dim

    @abstractmethod
    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        """Train on ``X`` (N, D) float and ``y`` (N,) int; ``val`` is only for reporting curves."""

    @abstractmethod
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, C) class probabilities."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """The fitted head as named arrays."""

    @abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def head_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class LinearHead(Head):
    """The reference recipe: ``nn.Linear(D, C)``, cross-entropy, Adam, mini-batches over the in-memory matrix."""

    name = "linear"

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        super().__init__(cfg, num_classes=num_classes, feature_dim=feature_dim)
        self.weight = np.zeros((num_classes, feature_dim), np.float32)
        self.bias = np.zeros(num_classes, np.float32)

    @torch.no_grad()
    def _evaluate(self, layer: nn.Linear, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        logits = layer(X)
        loss = nn.functional.cross_entropy(logits, y).item()
        return loss, (logits.argmax(1) == y).float().mean().item()

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        cfg, device = self.cfg, head_device(self.cfg.device)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        layer = nn.Linear(self.feature_dim, self.num_classes).to(device)
        opt = torch.optim.Adam(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # The whole matrix lives on the device: no DataLoader, no per-batch host->device copies.
        Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
        yt = torch.as_tensor(y, dtype=torch.long, device=device)
        Xv, yv = (
            (None, None)
            if val is None
            else (
                torch.as_tensor(val[0], dtype=torch.float32, device=device),
                torch.as_tensor(val[1], dtype=torch.long, device=device),
            )
        )
        history, n = [], len(Xt)
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=gen).to(device)
            total_loss, correct = 0.0, 0
            for start in range(0, n, cfg.batch_size):
                idx = perm[start : start + cfg.batch_size]
                logits = layer(Xt[idx])
                loss = nn.functional.cross_entropy(logits, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total_loss += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == yt[idx]).sum()
            row = {"epoch": epoch, "train_loss": float(total_loss) / n, "train_accuracy": float(correct) / n}
            if Xv is not None and len(Xv):
                row["val_loss"], row["val_accuracy"] = self._evaluate(layer, Xv, yv)
            history.append(row)
            log.debug("epoch %d %s", epoch, row)
        self.weight = layer.weight.detach().cpu().numpy()
        self.bias = layer.bias.detach().cpu().numpy()
        return FitResult(history=history)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _softmax(np.asarray(X, np.float32) @ self.weight.T + self.bias)

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias = state["weight"], state["bias"]


class LogRegHead(Head):
    """scikit-learn ``LogisticRegression`` (multinomial, lbfgs) on standardised features.

    Standardising matters: unscaled CNN features make lbfgs take 5-10x longer or stop unconverged.
    The fitted model is stored as a linear layer plus the scaler's mean/scale.
    """

    name = "logreg"

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        clf = LogisticRegression(C=self.cfg.C, max_iter=self.cfg.max_iter, random_state=self.cfg.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(scaler.transform(X).astype(np.float32), y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not converged:
            log.warning("logreg did not converge in %d iterations; raise --max-iter", self.cfg.max_iter)
        self._set(clf, scaler, classes_seen=clf.classes_)
        return FitResult(info={"converged": converged, "n_iter": int(np.max(clf.n_iter_))})

    def _set(self, clf: Any, scaler: Any, *, classes_seen: np.ndarray) -> None:
        coef, intercept = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
        if coef.shape[0] == 1:  # binary: sklearn keeps one row for the positive class
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]], np.float32)
        # Classes absent from train get a very low logit rather than a missing row.
        self.weight = np.zeros((self.num_classes, self.feature_dim), np.float32)
        self.bias = np.full(self.num_classes, -1e4, np.float32)
        self.weight[classes_seen] = coef
        self.bias[classes_seen] = intercept
        self.mean = scaler.mean_.astype(np.float32)
        self.scale = scaler.scale_.astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, np.float32) - self.mean) / self.scale
        return _softmax(Z @ self.weight.T + self.bias)

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias, self.mean, self.scale = (state[k] for k in ("weight", "bias", "mean", "scale"))


HEADS: dict[str, type[Head]] = {
    LinearHead.name: LinearHead,
    LogRegHead.name: LogRegHead,
}


def build_head(cfg: HeadConfig, *, num_classes: int, feature_dim: int) -> Head:
    return HEADS[cfg.head](cfg, num_classes=num_classes, feature_dim=feature_dim)


# ------------------------------------------------------------------------------------------ persistence


def save_head(head: Head, out_dir: Path, *, config: dict[str, Any]) -> None:
    """``head.safetensors`` (arrays only) + ``config.json`` (what produced it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in head.state().items()}, str(out_dir / HEAD_FILE))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")


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
    head.load_state(state)
    return head, config


def config_dict(cfg: HeadConfig) -> dict[str, Any]:
    return asdict(cfg)
