"""The protocol of stage two (CLIP appendix A.3, dinov2 ``log_regression.py``): ``val`` is only ever reported.

With ``--sweep`` a head's hyper-parameter is chosen on a held-out part of ``train`` (the task says which part and
how it is scored: a stratified 20% by accuracy for labels, a random 20% by R^2 for targets); the head is then
refitted on all of ``train`` with the chosen value. ``--positive`` with a target recall or precision chooses a
threshold the same way. With ``--shots K`` a head trains on K examples per class drawn from the cached ``train``
split with ``--seed``, so few-shot curves need no re-extraction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage2 import thresholds
from pipeline.stage2.choice import check_refit, guard, with_own_point
from pipeline.stage2.heads import HeadConfig, build_head
from pipeline.stage2.heads.base import warn_if_tiny
from pipeline.stage2.heads.config import sweep_key
from pipeline.store import FeatureSet, SplitFeatures

if TYPE_CHECKING:
    from pipeline.stage2.heads.base import FitResult, Head

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 0.2  # share of train that --sweep and --positive's threshold score on


class Task(Protocol):
    """What the protocol asks of the run's task (:class:`pipeline.stage2.tasks.Task` is one)."""

    score_name: str

    def holdout(self, y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]: ...

    def held_out_score(self, y: np.ndarray, pred: np.ndarray) -> float: ...

    def sweep_scores_record(self, scores: list[float]) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------------ held-out parts of train


def stratified_holdout(y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices: ``fraction`` of each class that has 2+ rows is held out (at least one)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_held = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.append(rows[:n_held])
        fit.append(rows[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def random_holdout(n: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices: a seeded random ``fraction`` held out (none when fewer than 5 rows)."""
    rows = np.random.default_rng(seed).permutation(n)
    n_held = 0 if n < 5 else max(1, round(fraction * n))
    return np.sort(rows[n_held:]), np.sort(rows[:n_held])


# ------------------------------------------------------------------------------------------ shots


def few_shot(split: SplitFeatures, *, shots: int, seed: int) -> SplitFeatures:
    """``shots`` rows per class (all of a class that has fewer), drawn with ``seed``, in file order."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(split.labels == c))[:shots] for c in np.unique(split.labels)]
    idx = np.sort(np.concatenate(keep))
    return SplitFeatures(features=split.features[idx], labels=split.labels[idx], ids=split.ids[idx])


def shots_short(fs: FeatureSet, *, shots: int) -> dict[str, int]:
    """The classes that have fewer than ``shots`` train rows, with how many they have (all of which were used)."""
    counts = np.bincount(fs.train.labels, minlength=len(fs.classes))
    return {fs.classes[c]: int(n) for c, n in enumerate(counts) if n < shots}


def parse_shots(spec: str) -> list[int | None]:
    """``"1,5,10,all"`` -> ``[1, 5, 10, None]`` (None: every training example)."""
    values: list[int | None] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "all":
            values.append(None)
        elif part.isdigit() and int(part) > 0:
            values.append(int(part))
        else:
            raise PipelineError(f"--shots takes positive integers or 'all', comma-separated, not {part!r}")
    if not values:
        raise PipelineError("--shots names no value")
    return values


# ------------------------------------------------------------------------------------------ sweep, threshold, fit


def sweep(head: Head, X: np.ndarray, y: np.ndarray, *, task: Task) -> tuple[HeadConfig, dict[str, Any]]:
    """Choose the head's hyper-parameter on a held-out part of ``(X, y)`` (``task.holdout``, scored by
    ``task.held_out_score``); the config to refit with + a record."""
    cfg = head.cfg
    grid = type(head).sweep_grid(cfg)
    if not grid:
        return cfg, {"grid": [], "note": f"{cfg.head} has no hyper-parameter to choose"}
    fit, held, too_few = task.holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
    if too_few:
        # under --shots the few-shot comparison says it once for all its runs (compare_shots)
        (log.info if cfg.shots else log.warning)("--sweep skipped for %s: %s to hold some out", cfg.head, too_few)
        return cfg, {"grid": grid, "skipped": f"{too_few} to hold some out"}
    t0 = time.perf_counter()
    grid, own = with_own_point(head, grid)  # the defaults are a point of every grid
    scores = head.sweep_scores(X[fit], y[fit], (X[held], y[held]), grid=grid, score=task.held_out_score)
    # the highest score replaces the defaults only when it beats them beyond noise on the same held-out rows
    best, guarded = guard(head, X, y, held=held, grid=grid, scores=scores, own=own)
    tied = [point for point, score in zip(grid, scores) if score == scores[best]]
    record = {
        "grid": grid,
        **task.sweep_scores_record(scores),
        "chosen": grid[best],
        "chosen_score": scores[best],
        "tied": tied if len(tied) > 1 else [],  # grid points that scored as well as the chosen one
        "held_out_fraction": HELD_OUT_FRACTION,
        "n_fit": len(fit),
        "n_held_out": len(held),
        "seconds": time.perf_counter() - t0,
        **head.sweep_info,
        **guarded,
    }
    log.info("sweep %s: chose %s (held-out %s %.4f)", cfg.head, grid[best], task.score_name, scores[best])
    return replace(cfg, **grid[best]), record


def choose_threshold(
    X: np.ndarray, y: np.ndarray, *, cfg: HeadConfig, dims: dict[str, int], positive: int
) -> dict[str, Any]:
    """The threshold for class ``positive`` that meets ``cfg``'s target on a stratified held-out 20% of train,
    scored by a head fitted on the other 80% (its probabilities are those of a head that has not seen the rows,
    as the refitted head's are on new data; scoring train rows the head was fitted on would flatter them)."""
    fit, held = stratified_holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
    if not (y[held] == positive).any():
        raise PipelineError(
            f"--positive {cfg.positive!r}: too few train rows of that class to hold some out and choose a threshold"
        )
    head = build_head(cfg, **dims)
    head.fit(X[fit], y[fit])
    score = head.predict_proba(X[held])[:, positive]
    choice = thresholds.choose_threshold(y[held] == positive, score, **cfg.threshold_target)
    return {**choice, "held_out_fraction": HELD_OUT_FRACTION, "n_held_out": len(held)}


@dataclass(frozen=True)
class Fitted:
    """One head fitted by the protocol: the head, its fit's record, the config it was fitted with (after any
    sweep), the sweep's record, the seconds all that took, and the train rows it was fitted on."""

    head: Head
    fit: FitResult
    cfg: HeadConfig
    sweep: dict[str, Any] | None
    seconds: float
    X: Any
    y: np.ndarray
    dims: dict[str, int]


def fit(cfg: HeadConfig, X: Any, y: np.ndarray, *, val: tuple[Any, np.ndarray], dims: dict[str, int],
        task: Task) -> Fitted:  # fmt: skip
    """The one fit of every task: the --sweep's choice (held-out train) if asked, then the head on all of ``X``
    (after a sweep, checked against the same settings fitted on the part the choice was scored from:
    :func:`~pipeline.stage2.choice.check_refit`)."""
    t0 = time.perf_counter()
    sweep_record, sweeping = None, None
    if cfg.sweep:
        sweeping = build_head(cfg, **dims)
        cfg, sweep_record = sweep(sweeping, X, y, task=task)
    head = build_head(cfg, **dims)
    if head.spec.uses("standardize") and not cfg.standardize:
        warn_if_tiny(X, cfg)
    result = head.fit(X, y, val=val)
    if sweep_record is not None and "chosen" in sweep_record:  # the refit is checked against the held-out choice
        rows, _, _ = task.holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
        scored = sweeping.held_out_fits.get(sweep_key(sweep_record["chosen"])) if sweeping is not None else None
        head, result, checked = check_refit(head, result, X, y, rows=rows, val=val, scored=scored)
        sweep_record = {**sweep_record, **checked}
    return Fitted(head, result, cfg, sweep_record, time.perf_counter() - t0, X, y, dims)
