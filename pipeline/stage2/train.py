"""Stage two's public entry points, gathered from the modules that hold them (import from either):

- :mod:`~pipeline.stage2.runs`: run folders (default roots, what a run records, ``check_replace``, locking);
- :mod:`~pipeline.stage2.protocol`: held-out parts of train, ``--sweep``, ``--positive`` thresholds, ``--shots``;
- :mod:`~pipeline.stage2.tasks`: what differs between classification and regression (one :class:`Task` each);
- :mod:`~pipeline.stage2.training`: fit + evaluate + write one head (``train-head``);
- :mod:`~pipeline.stage2.comparing`: ``compare``, ``compare --layers``, ``compare --shots`` and their tables.
"""

from __future__ import annotations

from pipeline.stage2.comparing import (
    compare,
    compare_layers,
    compare_shots,
    compare_table,
    layers_report,
    parse_heads,
    parse_layers,
    shots_table,
    usable_heads,
)
from pipeline.stage2.protocol import (
    HELD_OUT_FRACTION,
    choose_threshold,
    few_shot,
    parse_shots,
    random_holdout,
    shots_short,
    stratified_holdout,
    sweep,
)
from pipeline.stage2.runs import (
    check_replace,
    default_compare_root,
    default_head_root,
    features_label,
    run_settings,
    used_settings,
    weights_label,
    with_layer,
    writing,
)
from pipeline.stage2.tasks import TASKS, Task, feature_task, resolve_task, with_task
from pipeline.stage2.training import fit_and_evaluate, head_config, train_head, train_one

__all__ = [
    "HELD_OUT_FRACTION", "TASKS", "Task", "check_replace", "choose_threshold", "compare", "compare_layers",
    "compare_shots", "compare_table", "default_compare_root", "default_head_root", "feature_task",
    "features_label", "few_shot", "fit_and_evaluate", "head_config", "layers_report", "parse_heads",
    "parse_layers", "parse_shots", "random_holdout", "resolve_task", "run_settings", "shots_short",
    "shots_table", "stratified_holdout", "sweep", "train_head", "train_one", "usable_heads", "used_settings",
    "weights_label", "with_layer", "with_task", "writing",
]  # fmt: skip
