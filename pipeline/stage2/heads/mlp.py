"""The mlp head: one hidden layer, trained like the linear head."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.stage2.heads.base import (
    FitResult,
    Head,
    Scalings,
    Score,
    prepare_scaled,
)
from pipeline.stage2.heads.config import HeadConfig, sweep_key
from pipeline.stage2.heads.fitting import (
    KEEP_BYTES,
    EpochScores,
    TorchData,
    fitting_threads,
    grid_runs,
    ran_with,
    scaled_for_device,
    train_mlp,
    with_epochs,
)


class MLPHead(Head):
    """One hidden layer: Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, C), trained like ``linear``."""

    name = "mlp"

    def _module(self) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(self.feature_dim, self.cfg.hidden),
            nn.ReLU(),
            nn.Dropout(self.cfg.dropout),
            nn.Linear(self.cfg.hidden, self.num_classes),
        )

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: tuple[np.ndarray, np.ndarray] | None = None) -> FitResult:
        return self._fit(X, y, val=val)[0]

    def _fit(
        self, X: np.ndarray, y: np.ndarray, *, val: Any = None, score: Score | None = None, keep_bytes: int = KEEP_BYTES
    ) -> tuple[FitResult, Any, Scalings]:
        """The fit; with ``score``, ``val`` scored after every epoch (:class:`EpochScores`, a sweep's held-out rows,
        keeping the outputs scored and the parameters after each epoch up to ``keep_bytes``); the scalings folded
        into the layers at the end."""
        device = resolve_device(self.cfg.device)
        cfg, _ = scaled_for_device(self.cfg, n=len(y), device=device)
        raw_val_y = None if val is None else val[1]
        X, y, val, scalings = prepare_scaled(X, y, val, cfg=cfg)
        watch = None if score is None else EpochScores(raw_val_y, score, scalings.targets, keep_bytes=keep_bytes)
        data = TorchData.build(X, y, val=val, cfg=cfg, num_classes=self.num_classes, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # init and dropout masks
            self.module = self._module().to(device)
            with fitting_threads(device):
                histories = train_mlp(self.module, data, cfg=cfg, watch=watch)
        self.module = self.module.cpu().eval()
        scalings.fold(self.module[0], self.module[3])
        return FitResult(history=histories[0], info=ran_with(self.cfg, device=device, n=len(y))), watch, scalings

    def _layers(self) -> list[torch.Tensor]:
        """The parameters in train_mlp's order (its flat tensor's)."""
        return [self.module[0].weight, self.module[0].bias, self.module[3].weight, self.module[3].bias]

    def from_flat(self, cfg: HeadConfig, flat: torch.Tensor, scalings: Scalings) -> MLPHead:
        """A head of ``cfg`` holding ``flat`` (train_mlp's parameters, kept by a sweep after an epoch), folded as
        :meth:`_fit` folds its own: to the bit the head that fitting ``cfg`` on the sweep's rows gives (tested)."""
        head = type(self)(cfg, num_classes=self.num_classes, feature_dim=self.feature_dim)
        with torch.random.fork_rng(devices=[]):  # the layers' initial draws, overwritten: not from the caller's stream
            head.module = head._module().eval()
        layers = head._layers()
        with torch.no_grad():
            for t, v in zip(layers, flat.cpu().split([t.numel() for t in layers])):
                t.copy_(v.view_as(t))
        scalings.fold(head.module[0], head.module[3])
        return head

    @classmethod
    def sweep_grid(cls, cfg: HeadConfig) -> list[dict[str, float]]:
        points = [{"lr": lr, "weight_decay": wd} for lr in (3e-4, 1e-3, 3e-3) for wd in (0.0, 1e-3)]
        return with_epochs(points, cfg.epochs)  # every epoch count up to --epochs: one run per point scores them

    def sweep_scores(
        self,
        X: np.ndarray,
        y: np.ndarray,
        held_out: tuple[np.ndarray, np.ndarray],
        *,
        grid: list[dict[str, float]],
        score: Score,
    ) -> list[float]:
        """One run per setting, for the most epochs any point asks, scored on ``held_out`` after every epoch; the
        outputs scored and the parameters after each epoch kept (``held_out_logits``, ``held_out_fits``)."""
        runs, epochs = grid_runs(grid, epochs=self.cfg.epochs)
        per_run = []
        for run in runs:
            head = type(self)(replace(self.cfg, **run, epochs=epochs), num_classes=self.num_classes,
                              feature_dim=self.feature_dim)  # fmt: skip
            _, run_watch, scalings = head._fit(X, y, val=held_out, score=score, keep_bytes=KEEP_BYTES // len(runs))
            per_run.append(run_watch)
            for e, flat in enumerate(run_watch.states):
                cfg = replace(self.cfg, **run, epochs=e + 1)
                self.held_out_fits[sweep_key({**run, "epochs": e + 1})] = partial(self.from_flat, cfg, flat, scalings)
        watch = EpochScores(held_out[1], score, rows=[[r.rows[e][0] for r in per_run] for e in range(epochs)])
        kept = min(len(r.outputs) for r in per_run)  # the epochs every run kept
        watch.outputs = [[r.outputs[e][0] for r in per_run] for e in range(kept)]
        self.held_out_logits.update(watch.kept(grid, runs, epochs=self.cfg.epochs))
        return watch.of(grid, runs, epochs=self.cfg.epochs)

    @torch.no_grad()
    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.module(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy()

    def as_module(self) -> nn.Module:
        return self.module

    def layer_record(self) -> dict[str, Any]:
        return {"hidden": self.cfg.hidden, "dropout": self.cfg.dropout}

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.module = self._module().eval()
        try:
            self.module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        except RuntimeError as e:
            raise PipelineError(f"saved mlp head does not fit its config: {str(e).splitlines()[0]}") from None
