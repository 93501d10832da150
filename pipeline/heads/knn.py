"""k nearest neighbours by cosine similarity (dinov2's k-NN evaluation)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.heads.base import FitResult, Head, balanced_weights, softmax
from pipeline.heads.config import HeadConfig


class KNNHead(Head):
    """k nearest neighbours by cosine similarity on L2-normalised features; votes weighted by exp(sim / 0.07)
    (dinov2's k-NN evaluation), and by inverse class frequency with ``--class-weight balanced``."""

    name = "knn"
    settings = ("k", "class_weight", "seed", "device")
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
        proba = softmax(self._log_votes(np.asarray(X)[rows], exclude=rows))
        note = f"leave-one-out on {len(rows)} of {n} train rows (seeded sample; a row is not its own neighbour)"
        return np.asarray(y)[rows], proba, note

    @torch.no_grad()
    def _log_votes(self, X: np.ndarray, *, exclude: np.ndarray | None = None) -> np.ndarray:
        """Log of each class's share of the weighted votes; ``exclude[i]``: a train row query i may not vote for.
        On the head's device (a GPU when there is one), one block of queries at a time: never the N x N matrix."""
        dev = resolve_device(self.cfg.device)
        train = torch.as_tensor(self.train_features, device=dev)
        labels = torch.as_tensor(self.train_labels, device=dev)
        class_w = torch.ones(self.num_classes, device=dev)
        if self.cfg.class_weight == "balanced":
            class_w = torch.as_tensor(balanced_weights(self.train_labels, self.num_classes), device=dev)
        k = min(self.cfg.k, len(labels) - (exclude is not None))
        chunk = max(1, self.CHUNK_ELEMENTS // max(1, len(labels)))  # bounds the similarity block's memory
        out = []
        for start in range(0, len(X), chunk):
            q = torch.as_tensor(_l2_normalise(X[start : start + chunk]), device=dev)
            sim = q @ train.T
            if exclude is not None:
                sim[
                    torch.arange(len(q), device=dev), torch.as_tensor(exclude[start : start + chunk], device=dev)
                ] = -math.inf
            sim, idx = sim.topk(k, dim=1)
            nb = labels[idx]
            weights = (sim / self.TEMPERATURE).exp() * class_w[nb]
            votes = torch.zeros(len(q), self.num_classes, device=dev).scatter_add_(1, nb, weights)
            out.append(torch.log(votes / votes.sum(1, keepdim=True) + 1e-6))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.num_classes), np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"train_features": self.train_features, "train_labels": self.train_labels}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.train_features, self.train_labels = state["train_features"], state["train_labels"]


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
