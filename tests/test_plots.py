"""The PNGs people look at: written beside the JSON by train-head and compare, non-blank, readable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import plots
from tests.conftest import run


def _assert_picture(path: Path, *, min_size: tuple[int, int] = (300, 200)) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= min_size[0] and img.height >= min_size[1]
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 10  # something was drawn


def test_confusion_png_small_and_many_classes(tmp_path: Path) -> None:
    cm = [[5, 1, 0], [0, 6, 0], [2, 0, 4]]
    _assert_picture(plots.confusion_png(cm, ["cat", "dog", "bird"], tmp_path / "c3.png"))
    rng = np.random.default_rng(0)
    big = rng.integers(0, 9, (30, 30)).tolist()
    big[3] = [0] * 30  # a class with no val samples must not divide by zero
    _assert_picture(plots.confusion_png(big, [f"class_{i}" for i in range(30)], tmp_path / "c30.png"))
    # Folder names are text, not TeX: "$\\foo$" once made matplotlib raise after metrics.json was written.
    _assert_picture(plots.confusion_png(cm, ["$\\foo$", "a_b^c", "$5"], tmp_path / "dollars.png"))


def test_curves_compare_and_shots_png(tmp_path: Path) -> None:
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.2 / e,
            "train_accuracy": 1 - 0.5 / e,
            "val_accuracy": 0.9 - 0.5 / e,
        }
        for e in range(1, 6)
    ]
    _assert_picture(plots.curves_png(history, tmp_path / "curves.png"))
    rows = [{"head": h, "val_accuracy": a, "balanced_accuracy": a - 0.05} for h, a in (("linear", 0.9), ("knn", 0.8))]
    _assert_picture(plots.compare_png(rows, tmp_path / "compare.png"))
    table = {"linear": {"1": 0.3, "5": 0.6, "all": 0.9}, "knn": {"1": 0.4, "5": 0.5, "all": 0.8}}
    _assert_picture(plots.shots_png(table, ["1", "5", "all"], tmp_path / "shots.png"))


def test_train_head_and_compare_write_pngs(feature_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    head = tmp_path / "linear"
    code, out, _ = run(
        ["train-head", "--features", str(feature_file), "--out", str(head), "--epochs", "3", "--sweep"], capsys
    )
    assert code == 0 and "sweep: chose" in out and "curves.png" in out
    for name in ("confusion.png", "curves.png", "metrics.json"):
        assert (head / name).is_file(), name
    _assert_picture(head / "confusion.png")

    cmp = tmp_path / "cmp"
    code, out, _ = run(
        ["compare", "--features", str(feature_file), "--out", str(cmp), "--epochs", "2", "--hidden", "16"], capsys
    )
    assert code == 0 and all(h in out for h in ("linear", "logreg", "mlp", "knn", "centroid"))
    _assert_picture(cmp / "compare.png")
    assert (cmp / "mlp" / "curves.png").is_file() and not (cmp / "knn" / "curves.png").exists()

    code, out, _ = run(
        [
            "compare",
            "--features",
            str(feature_file),
            "--heads",
            "centroid,knn",
            "--shots",
            "1,5,all",
            "--out",
            str(cmp),
        ],
        capsys,
    )
    assert code == 0 and "| centroid |" in out and "all" in out
    _assert_picture(cmp / "shots.png")
