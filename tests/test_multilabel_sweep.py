"""The sweep's guard on several labels per image: a choice other than the defaults is tested by a paired bootstrap
of held-out mAP (the McNemar test of single labels took argmax of (N, L) logits and crashed)."""

from __future__ import annotations

import numpy as np

from pipeline.stage2.choice import guard
from pipeline.stage2.heads import HeadConfig, build_head


def test_guard_tests_a_multi_label_choice_by_held_out_map() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    Y = (X[:, :4] + rng.normal(size=(300, 4)) > 0.5).astype(np.float32)
    head = build_head(HeadConfig(head="logreg", task="multilabel", device="cpu"), num_classes=4, feature_dim=8)
    grid = [{"C": 1.0}, {"C": 1e-6}]  # C=1e-6 "scored higher": the test must say it does not beat the defaults
    best, record = guard(head, X, Y, held=np.arange(240, 300), grid=grid, scores=[0.5, 0.9], own=0)
    assert best == 0 and record["kept_defaults"] and 0 <= record["p_value_vs_defaults"] <= 1
    assert "paired bootstrap" in record["note"]
