"""The score without the leaks: one head fitted on train, scored on all of val and on val less its leaked images
(val images with a copy or near copy in train). The val score counts a leaked image as if it were new; it is not.

Which head (``--head``): by default :data:`PCA_LOGREG`, the label pass's own model fitted once more on train (no
new design matrix, a few iterations from the last fold's weights); a head of the registry by name, or ``best`` (the
best of ``compare``'s table), is loaded as ``compare`` or ``train-head`` saved it on this file when it is there,
and fitted with its default settings otherwise. On 100,000 x 2,048 the logreg head's fit from zeros was 22 s of
the audit's 76 (docs/audit.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.config import PCA_LOGREG
from pipeline.store import FeatureSet


def best_compared_head(features: Path, compare: Path | None = None) -> str | None:
    """The head ``compare`` chose as best on this file, read from its output folder ``compare`` (default: compare's
    default folder for the file), if it was run."""
    from pipeline.stage2.runs import default_compare_root

    record = Path(compare or default_compare_root(features)) / "compare.json"
    try:
        return str(json.loads(record.read_text())["best"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_head_dir(features: Path, fs: FeatureSet, *, head: str, compare: Path | None = None) -> Path | None:
    """The folder of ``head`` as ``compare`` (its folder ``compare``, or its default one) or ``train-head`` saved it
    after training on all of this file's train split: same fingerprint, every column, no ``--exclude``, as many
    train and val rows. None when there is none."""
    from pipeline.stage2.runs import default_compare_root, default_head_root

    for root in (Path(compare) if compare else default_compare_root(features), default_head_root(features)):
        try:
            config = json.loads((root / head / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(config, dict)
            and config.get("features_fingerprint") == fs.meta.fingerprint
            and config.get("layer", "all") in ("all", None)
            and not (config.get("settings") or {}).get("exclude")
            and (config.get("n_train"), config.get("n_val")) == (len(fs.train), len(fs.val))
        ):
            return root / head
    return None


def val_predictions(fs: FeatureSet, *, head: str, device: str, seed: int, oof: Any = None,
                    saved: Path | None = None) -> tuple[np.ndarray, str, dict[str, Any]]:  # fmt: skip
    """``(predicted class of each val row, what the head is, its fit)``: :data:`PCA_LOGREG` from the label pass's
    ``oof``, a saved head from ``saved``, else ``head`` fitted with its default settings."""
    if head == PCA_LOGREG:
        from pipeline.audit.labels import LABEL_DIM, refit

        split = np.concatenate([np.full(len(s), name) for name, s in fs.splits.items()])
        sol, predict = refit(oof, rows=split == "train", labels=fs.train.labels, num_classes=len(fs.classes))
        what = (f"the label pass's model (the logreg objective at C = 1 on the first {LABEL_DIM} principal "
                f"directions) fitted on train, {sol.n_iter} L-BFGS iterations from its last fold")  # fmt: skip
        return predict(split == "val").argmax(1), what, {"n_iter": sol.n_iter, "converged": sol.converged}
    if saved is not None:
        from pipeline.stage2.heads import load_head

        model, _ = load_head(saved)
        return model.predict_proba(fs.val.features).argmax(1), f"{head} as saved in {saved} (not refitted)", {}
    from pipeline.stage2.heads import HeadConfig, build_head

    model = build_head(HeadConfig(head=head, device=device, seed=seed), num_classes=len(fs.classes),
                       feature_dim=fs.feature_dim)  # fmt: skip
    fit = model.fit(fs.train.features, fs.train.labels, val=(fs.val.features, fs.val.labels))
    what = f"{head} with its default settings, fitted on train"
    return model.predict_proba(fs.val.features).argmax(1), what, fit.info


def leak_free_score(fs: FeatureSet, *, leaked_val_ids: set[str], head: str, device: str, seed: int, oof: Any = None,
                    saved: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Val accuracy of ``head`` (see :func:`val_predictions`) with and without the leaked val images."""
    pred, what, fit = val_predictions(fs, head=head, device=device, seed=seed, oof=oof, saved=saved)
    right = pred == fs.val.labels
    clean = ~np.isin(fs.val.ids, list(leaked_val_ids))
    return {
        "head": head,
        "head_is": what,
        "fit": fit,
        "val_accuracy": float(right.mean()),
        "n_val": int(len(right)),
        "val_accuracy_without_leaks": float(right[clean].mean()) if clean.any() else None,
        "n_val_without_leaks": int(clean.sum()),
        "leaked_val_right": int(right[~clean].sum()),
        "n_leaked_val": int((~clean).sum()),
    }
