"""The score without the leaks: one head fitted on train, scored on all of val and on val less its leaked images
(val images with a copy or near copy in train). The val score counts a leaked image as if it were new; it is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import FeatureSet


def best_compared_head(features: Path, compare: Path | None = None) -> str | None:
    """The head ``compare`` chose as best on this file, read from its output folder ``compare`` (default: compare's
    default folder for the file), if it was run."""
    import json

    from pipeline.stage2.runs import default_compare_root

    record = Path(compare or default_compare_root(features)) / "compare.json"
    try:
        return str(json.loads(record.read_text())["best"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def leak_free_score(fs: FeatureSet, *, leaked_val_ids: set[str], head: str, device: str, seed: int) -> dict[str, Any]:
    """Val accuracy of ``head`` (its default settings) with and without the leaked val images."""
    from pipeline.stage2.heads import HeadConfig, build_head

    cfg = HeadConfig(head=head, device=device, seed=seed)
    model = build_head(cfg, num_classes=len(fs.classes), feature_dim=fs.feature_dim)
    model.fit(fs.train.features, fs.train.labels, val=(fs.val.features, fs.val.labels))
    right = model.predict_proba(fs.val.features).argmax(1) == fs.val.labels
    clean = ~np.isin(fs.val.ids, list(leaked_val_ids))
    return {
        "head": head,
        "val_accuracy": float(right.mean()),
        "n_val": int(len(right)),
        "val_accuracy_without_leaks": float(right[clean].mean()) if clean.any() else None,
        "n_val_without_leaks": int(clean.sum()),
        "leaked_val_right": int(right[~clean].sum()),
        "n_leaked_val": int((~clean).sum()),
    }
