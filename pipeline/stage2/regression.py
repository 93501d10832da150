"""Stage two for regression targets (files made with ``extract --targets``): which task a run does, and the fit,
sweep and metrics of a head that predicts numbers.

Same protocol as classification (:mod:`pipeline.stage2.train`): val is only reported; ``--sweep`` chooses the
head's hyper-parameter (ridge: ``alpha``; linear, mlp: lr and weight decay) by held-out R^2 on a random 20% of
train, then refits on all of train.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage2.evaluate import RegressionMetrics, regression_metrics, summarize_regression
from pipeline.stage2.heads import HEADS, Head, HeadConfig, build_head, warn_if_tiny
from pipeline.store import FeatureMeta, FeatureSet, read_meta

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 0.2  # share of train that --sweep scores the grid on (as for classification)


def resolve_task(asked: str, meta: FeatureMeta) -> str:
    """``--task`` as run: auto = regress when the file holds targets, else classify."""
    has = bool(meta.targets)
    if asked == "auto":
        return "regress" if has else "classify"
    if asked == "regress" and not has:
        raise PipelineError("--task regress: this feature file holds no targets; extract it with --targets FILE.csv")
    return asked


def feature_task(path: Path, asked: str) -> str:
    """The task a run on the feature file ``path`` does (reads only its metadata)."""
    return resolve_task(asked, read_meta(path))


def regressing_heads() -> list[str]:
    return [name for name, cls in HEADS.items() if "regress" in cls.tasks]


def with_task(cfg: HeadConfig, meta: FeatureMeta) -> HeadConfig:
    """``cfg`` with its task resolved (recorded as "regress" only; classification configs stay as they were), and
    the options that make no sense for regression refused in one line."""
    if resolve_task(cfg.task, meta) != "regress":
        return cfg
    if "regress" not in HEADS[cfg.head].tasks:
        raise PipelineError(
            f"the {cfg.head} head classifies labels only; for the regression targets of this file use "
            f"{', '.join(regressing_heads())} (or --task classify to predict the labels)"
        )
    if cfg.shots:
        raise PipelineError("--shots draws K examples per class: not for regression targets (or --task classify)")
    if cfg.positive:
        raise PipelineError("--positive chooses a class threshold: not for regression targets (or --task classify)")
    return replace(cfg, task="regress")


def random_holdout(n: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices: a seeded random ``fraction`` held out (none when fewer than 5 rows)."""
    rows = np.random.default_rng(seed).permutation(n)
    n_held = 0 if n < 5 else max(1, round(fraction * n))
    return np.sort(rows[n_held:]), np.sort(rows[:n_held])


def sweep_regression(head: Head, X: np.ndarray, Y: np.ndarray) -> tuple[HeadConfig, dict[str, Any]]:
    """Choose the head's hyper-parameter by held-out R^2; the config to refit with + a record."""
    cfg = head.cfg
    grid = type(head).sweep_grid(cfg)
    if not grid:
        return cfg, {"grid": [], "note": f"{cfg.head} has no hyper-parameter to choose"}
    fit, held = random_holdout(len(Y), fraction=HELD_OUT_FRACTION, seed=cfg.seed)
    if not len(held):
        log.warning("--sweep skipped for %s: too few training rows to hold some out", cfg.head)
        return cfg, {"grid": grid, "skipped": "too few training rows to hold some out"}
    t0 = time.perf_counter()
    scores = head.sweep_scores(X[fit], Y[fit], (X[held], Y[held]), grid=grid)
    best = int(np.nanargmax(scores))  # the first of equal scores, in grid order
    tied = [point for point, score in zip(grid, scores) if score == scores[best]]
    record = {
        "grid": grid,
        "metric": "R^2",
        "held_out_r2": scores,
        "chosen": grid[best],
        "chosen_score": scores[best],
        "tied": tied if len(tied) > 1 else [],
        "held_out_fraction": HELD_OUT_FRACTION,
        "n_fit": len(fit),
        "n_held_out": len(held),
        "seconds": time.perf_counter() - t0,
    }
    log.info("sweep %s: chose %s (held-out R^2 %.4f)", cfg.head, grid[best], scores[best])
    return replace(cfg, **grid[best]), record


def fit_and_evaluate_regression(
    fs: FeatureSet, cfg: HeadConfig
) -> tuple[Head, RegressionMetrics, list[dict[str, float]]]:
    """Fit one head on train's targets; MSE, RMSE, MAE and R^2 on train and val (val never chooses anything)."""
    names = list(fs.meta.targets["names"])
    X, Y = fs.train.features, fs.train.targets
    dims = {"num_classes": len(names), "feature_dim": fs.feature_dim}
    t0 = time.perf_counter()
    sweep_record = None
    if cfg.sweep:
        cfg, sweep_record = sweep_regression(build_head(cfg, **dims), X, Y)
    head = build_head(cfg, **dims)
    if type(head).uses_standardize and not cfg.standardize:
        warn_if_tiny(X, cfg)
    fit = head.fit(X, Y, val=(fs.val.features, fs.val.targets))
    fit_seconds = time.perf_counter() - t0
    train_m = regression_metrics(Y, head.logits(X), names)
    val_m = regression_metrics(fs.val.targets, head.logits(fs.val.features), names)
    extra = {
        "head": cfg.head,
        "targets": names,
        "targets_source": fs.meta.targets.get("source"),
        "standardize": cfg.standardize if type(head).uses_standardize else "n/a",
        "n_train_used": len(Y),
        **fit.info,
    }
    if sweep_record is not None:
        extra["sweep"] = sweep_record
    return head, summarize_regression(train=train_m, val=val_m, fit_seconds=fit_seconds, extra=extra), fit.history
