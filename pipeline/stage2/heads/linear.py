"""The linear head: ``nn.Linear(D, C)`` trained by mini-batch Adam, a grid of settings in one pass."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.stage2.heads.base import (
    AffineHead,
    FitResult,
    Score,
    prepare_scaled,
)
from pipeline.stage2.heads.config import HeadConfig
from pipeline.stage2.heads.fitting import (
    EpochScores,
    LinearGrid,
    TorchData,
    fitting_threads,
    grid_runs,
    ran_with,
    scaled_for_device,
    train_linear_grid,
    with_epochs,
)


class LinearHead(AffineHead):
    """The reference recipe: ``nn.Linear(D, C)``, cross-entropy, Adam, mini-batches over the in-memory matrix."""

    name = "linear"

    def _fit_grid(
        self, X: np.ndarray, y: np.ndarray, *, grid: list[dict[str, float]], val: Any = None, score: Score | None = None
    ) -> tuple[LinearGrid, list[list[dict[str, float]]], EpochScores | None]:
        """Every point of ``grid`` (settings other than epochs) trained in one pass; with ``score``, ``val`` is
        scored after every epoch of every point (a sweep's held-out rows)."""
        device = resolve_device(self.cfg.device)
        cfg, lr_factor = scaled_for_device(self.cfg, n=len(y), device=device)
        raw_val_y = None if val is None else val[1]
        X, y, val, scalings = prepare_scaled(X, y, val, cfg=cfg)
        watch = None if score is None else EpochScores(raw_val_y, score, scalings.targets)
        data = TorchData.build(X, y, val=val, cfg=cfg, num_classes=self.num_classes, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = LinearGrid(len(grid), self.feature_dim, self.num_classes).to(device)
        lr = [p.get("lr", self.cfg.lr) * lr_factor for p in grid]
        weight_decay = [p.get("weight_decay", cfg.weight_decay) for p in grid]
        with fitting_threads(device):
            histories = train_linear_grid(model, data, lr=lr, weight_decay=weight_decay, cfg=cfg, watch=watch)
        scalings.fold(model, model)
        return model, histories, watch

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        model, histories, _ = self._fit_grid(X, y, grid=[{}], val=val)
        self.weight = model.weight[0].cpu().numpy().copy()
        self.bias = model.bias[0].cpu().numpy().copy()
        return FitResult(history=histories[0], info=ran_with(self.cfg, device=model.weight.device, n=len(y)))

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        points = [{"lr": lr, "weight_decay": wd} for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2) for wd in (0.0, 1e-4, 1e-3)]
        return with_epochs(points, cfg.epochs)  # every epoch count up to --epochs: one run scores them all

    def sweep_scores(
        self,
        X: np.ndarray,
        y: np.ndarray,
        held_out: tuple[np.ndarray, np.ndarray],
        *,
        grid: list[dict[str, float]],
        score: Score,
    ) -> list[float]:
        """The whole grid in one pass over the features: one (G, C, D) weight stack, one param group each, scored
        on ``held_out`` after every epoch (a point's epoch count says which)."""
        runs, epochs = grid_runs(grid, epochs=self.cfg.epochs)
        cfg = replace(self.cfg, epochs=epochs)
        longest = type(self)(cfg, num_classes=self.num_classes, feature_dim=self.feature_dim)
        _, _, watch = longest._fit_grid(X, y, grid=runs, val=held_out, score=score)
        self.held_out_logits.update(watch.kept(grid, runs, epochs=self.cfg.epochs))
        return watch.of(grid, runs, epochs=self.cfg.epochs)
