"""A ``--sweep`` that cannot lose: the head's own settings are a point of every grid, and a grid point that scores
higher on the held-out part of train replaces them only when it beats them beyond noise (a paired test on the same
held-out rows: McNemar's for labels, a paired bootstrap for regression targets).

Why: taking the highest of 15-45 held-out scores picks noise as readily as signal. On 5,000 real train images a
sweep's lr 3e-3 scored highest on the held-out 1,000 rows by chance and handed back a linear head 5 points below
its defaults on val (0.866 -> 0.817). A choice that does not clear the test keeps the defaults and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.stage2 import stats
from pipeline.stage2.heads.config import sweep_key

if TYPE_CHECKING:
    from pipeline.stage2.heads.base import FitResult, Head

log = logging.getLogger(__name__)


def with_own_point(head: Head, grid: list[dict[str, float]]) -> tuple[list[dict[str, float]], int]:
    """``grid`` with the head's own settings (its defaults, or what the user gave) as one of its points, and that
    point's index (appended when no point already has those values)."""
    if not grid:
        return grid, -1
    own = {key: getattr(head.cfg, key) for key in grid[0]}
    for i, point in enumerate(grid):
        if all(point.get(k) == v for k, v in own.items()):
            return grid, i
    return [*grid, own], len(grid)


def held_out_predictions(
    head: Head, point: dict[str, float], X: np.ndarray, y: np.ndarray, held: np.ndarray
) -> np.ndarray:
    """A head of ``point``'s settings fitted on ``X`` less the ``held`` rows, and its outputs on those rows."""
    fit = np.setdiff1d(np.arange(len(y)), held)
    other = type(head)(replace(head.cfg, **point), num_classes=head.num_classes, feature_dim=head.feature_dim)
    other.fit(X[fit], y[fit])
    return other.logits(X[held])


def _held_out(head: Head, point: dict[str, float], X: np.ndarray, y: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``point``'s outputs on the ``held`` rows: those its sweep computed when it kept them (the very outputs its
    score came from; every head's sweep keeps them, linear's and mlp's within fitting.KEEP_BYTES; logreg's path or
    mlp, 1,280-d: two fits of ~10 s each saved), else of a head fitted again."""
    kept = head.held_out_logits.get(sweep_key(point))
    if kept is not None and len(kept) == len(held):
        return kept
    return held_out_predictions(head, point, X, y, held)


def guard(
    head: Head,
    X: np.ndarray,
    y: np.ndarray,
    *,
    held: np.ndarray,
    grid: list[dict[str, float]],
    scores: list[float],
    own: int,
) -> tuple[int, dict[str, Any]]:
    """The grid point to refit with, and what the sweep record says about the defaults: the highest-scoring
    point when it beats the head's own point ``own`` beyond noise on the ``held`` rows, else ``own``."""
    best = int(np.argmax(scores))
    if scores[own] >= scores[best]:
        best = own  # a tie goes to the defaults
    record: dict[str, Any] = {"defaults": grid[own], "defaults_score": scores[own]}
    if best == own:
        note = "the defaults scored highest on held-out train (a tie goes to the defaults)"
        return own, {**record, "kept_defaults": True, "note": note}
    chosen, defaults = (_held_out(head, grid[i], X, y, held) for i in (best, own))
    if head.cfg.task == "multilabel":  # (N, L) truth: a paired bootstrap of held-out mAP
        from pipeline.stage2.multilabel import map_p_value, mean_average_precision

        p = map_p_value(y[held], chosen, defaults, seed=head.cfg.seed, resamples=stats.BOOTSTRAP)
        higher = mean_average_precision(y[held], chosen) > mean_average_precision(y[held], defaults)
        verdict = {"beats": bool(higher and p < stats.ALPHA), "p_value": p}
    else:
        verdict = stats.beats_defaults(y[held], chosen, defaults, regress=head.regress, seed=head.cfg.seed)
    test = "paired bootstrap" if head.regress or head.cfg.task == "multilabel" else "McNemar"
    record["p_value_vs_defaults"] = verdict["p_value"]
    if verdict["beats"]:
        note = f"beats the defaults ({test} p={verdict['p_value']:.3g})"
        return best, {**record, "kept_defaults": False, "note": note}
    note = (
        f"{_point(grid[best])} scored {scores[best]:.4f} on held-out train against the defaults' {scores[own]:.4f}, "
        f"not beyond noise ({test} p={verdict['p_value']:.2f}): the defaults are kept"
    )
    log.info("sweep %s: %s", head.cfg.head, note)
    return own, {**record, "kept_defaults": True, "not_chosen": grid[best], "note": note}


def _point(point: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def check_refit(
    refit: Head,
    result: FitResult,
    X: np.ndarray,
    y: np.ndarray,
    *,
    rows: np.ndarray,
    val: Any,
    scored: Callable[[], Head] | None = None,
) -> tuple[Head, FitResult, dict[str, Any]]:
    """The head to keep after a sweep's refit on all of train, and what the sweep record says about it.

    The held-out score was measured on a head fitted on ``rows`` (the 80%); the refit on all of train is a new
    training run whose last epoch nobody scored, and a gradient-trained head can land on a bad one. So the head of
    the chosen settings is fitted on ``rows`` again and both are compared on ``rows``, which both trained on: the
    refit is kept unless the 80% head beats it beyond noise there (the same paired test as :func:`guard`). A sound
    refit fits its own training rows about as well; one that bounced fits them worse. scikit-learn's
    ``GridSearchCV(refit=True)`` and dinov2 refit without a check: that is right for a convex fit that converges
    (logreg, ridge), not for a fixed number of Adam epochs, so only heads trained for ``--epochs`` are checked.
    Not checked for several labels per image (the paired test is of one label per row).

    ``scored``: the head the sweep fitted on ``rows`` with the chosen settings, where it kept it
    (``Head.held_out_fits``, mlp: to the bit the head fitted here); it is tested instead of fitting one again
    (mlp, 48,000 x 1,280: ~10 s), and fitted again only if it wins, for its curves on ``val``."""
    if not refit.spec.uses("epochs") or refit.cfg.task == "multilabel":
        return refit, result, {}

    def fitted() -> tuple[Head, FitResult]:
        model = type(refit)(refit.cfg, num_classes=refit.num_classes, feature_dim=refit.feature_dim)
        return model, model.fit(X[rows], y[rows], val=val)

    held_model, held_result = (scored(), None) if scored is not None else fitted()
    verdict = stats.beats_defaults(
        y[rows], held_model.logits(X[rows]), refit.logits(X[rows]), regress=refit.regress, seed=refit.cfg.seed
    )
    test = "paired bootstrap" if refit.regress else "McNemar"
    if verdict["beats"]:
        if held_result is None:  # the sweep's head has no curves on val: the same fit again, for its record
            held_model, held_result = fitted()
        note = (
            f"the refit on all of train fitted the {len(rows)} rows the choice was scored from worse than the head "
            f"fitted on them ({test} p={verdict['p_value']:.3g}): that head is kept"
        )
        log.warning("sweep %s: %s", refit.cfg.head, note)
        return held_model, held_result, {"refit": "kept the held-out fit", "refit_p_value": verdict["p_value"],
                                         "refit_note": note}  # fmt: skip
    return refit, result, {"refit": "checked", "refit_p_value": verdict["p_value"]}
