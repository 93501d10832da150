"""Outliers: images far from every other image, by the mean cosine distance to their ``k`` nearest neighbours on
the normalised features (all splits together)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.audit.neighbours import Neighbours

OUTLIER_K = 5


def outlier_scores(nb: Neighbours, *, k: int = OUTLIER_K) -> np.ndarray:
    """Mean ``1 - cosine`` to the ``k`` nearest other rows (higher: further from everything)."""
    sim = nb.sim[:, : min(k, nb.sim.shape[1])].astype(np.float64)
    valid = sim > -1.5  # candidate slots never filled (files of fewer than k + 1 rows)
    return np.where(valid, 1.0 - sim, 0.0).sum(1) / np.maximum(valid.sum(1), 1)


def ranked_outliers(scores: np.ndarray, ids: np.ndarray, split: np.ndarray, *, top: int) -> list[dict[str, Any]]:
    """The ``top`` highest scores, highest first, as audit.json lists them."""
    order = np.argsort(-scores, kind="stable")[:top]
    return [
        {"id": str(ids[i]), "split": str(split[i]), "score": round(float(scores[i]), 4), "row": int(i)} for i in order
    ]
