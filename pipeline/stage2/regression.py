"""Stage two for regression targets (files made with ``extract --targets``): which task a run does, and what a
regression run refuses. The fit itself is :func:`pipeline.stage2.train.fit_and_evaluate_regression`: the same
protocol as classification (val is only reported; ``--sweep`` chooses the head's hyper-parameter, ridge's ``alpha``
or linear's and mlp's lr and weight decay, by held-out R^2 on a random 20% of train, then refits on all of train).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage2.heads import HEADS, HeadConfig
from pipeline.store import FeatureMeta, read_meta


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
