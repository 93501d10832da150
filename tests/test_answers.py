"""Per-image answers: predictions.csv and errors.png from stored val predictions, no backbone run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.stage2 import answers


def test_classification_rows_hold_the_prediction_its_probability_and_the_top_k(tmp_path: Path) -> None:
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    rows = answers.classification_rows(["a.png", "b.png"], np.array([0, 1]), proba, ["cat", "dog", "fox"])
    assert rows[0]["predicted"] == "cat" and rows[0]["probability"] == 0.7
    assert rows[1]["top_k"].split() == ["fox:0.6000", "dog:0.3000", "cat:0.1000"]
    assert rows[1]["loss"] > rows[0]["loss"]  # b's true class got 0.3
    answers.write_predictions(tmp_path / "p.csv", rows)
    back = answers.read_predictions(tmp_path / "p.csv")
    assert [r["id"] for r in back] == ["a.png", "b.png"] and back[1]["predicted"] == "fox"


def test_regression_rows_hold_true_and_predicted_values() -> None:
    rows = answers.regression_rows(["x"], np.array([[1.0, 2.0]]), np.array([[1.5, 2.0]]), ["h", "w"])
    assert rows[0] == {"id": "x", "true_h": 1.0, "predicted_h": 1.5, "true_w": 2.0, "predicted_w": 2.0, "loss": 0.25}


def test_errors_png_draws_the_worst_and_names_the_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(4):
        (root / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "c" / f"{i}.png")
    (root / "c" / "3.png").unlink()  # gone since extraction
    y = np.zeros(4, np.int64)
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    rows = answers.classification_rows([f"c/{i}.png" for i in range(4)], y, proba, ["c", "d"])
    note = answers.write_errors_png(tmp_path / "errors.png", rows, identity={"kind": "folder", "root": str(root)})
    assert note is not None and "1 of 4" in note and "c/3.png" in note
    assert Image.open(tmp_path / "errors.png").size[0] > 100


def test_multi_label_errors_png_captions_label_sets_from_a_tables_files(tmp_path: Path) -> None:
    """errors.png of several labels per image: the highest-loss images, read back from a table dataset's files
    (``kind: table``, ids relative to its root), captioned with the true and decided label sets."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(root / f"{i}.png")
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    proba = np.array([[0.9, 0.2, 0.8], [0.7, 0.1, 0.1], [0.6, 0.9, 0.2]])
    rows = answers.multilabel_rows([f"{i}.png" for i in range(3)], y, proba, ["a", "b", "c"], thresholds=[0.5] * 3)
    assert [r["predicted"] for r in rows] == ["a;c", "a", "a;b"] and rows[1]["true"] == "b"
    caption, _ = answers.CAPTIONS["label sets"]
    assert caption(rows[1]).splitlines()[:2] == ["true b", "pred a"]
    assert caption({**rows[1], "true": ""}).startswith("true (none)")
    identity = {"kind": "table", "root": str(root)}
    note = answers.write_errors_png(tmp_path / "e.png", rows, identity=identity, captions="label sets")
    assert note is None and Image.open(tmp_path / "e.png").size[0] > 100
    (root / "1.png").unlink()  # the worst image (b missed, a said) is gone: named, the rest drawn
    note = answers.write_errors_png(tmp_path / "e.png", rows, identity=identity, captions="label sets")
    assert note is not None and "1 of 3" in note and "1.png" in note


def test_small_images_hint_at_extract() -> None:
    from pipeline.stage1.datasets import Source, array_split
    from pipeline.stage1.extract import small_images_hint

    def source(px: int) -> Source:
        arrays = np.zeros((10, px, px), np.uint8)
        return Source(name="s", classes=["a"], splits={"train": array_split(arrays, np.zeros(10, np.int64))})

    hint = small_images_hint(source(28), crop=224, resize="crop")
    assert hint and "28 px" in hint and "--resize full" in hint
    assert small_images_hint(source(28), crop=224, resize="full") is None
    assert small_images_hint(source(200), crop=224, resize="crop") is None


def test_positive_curves_are_of_that_class_with_the_threshold_and_its_confusion(tmp_path: Path) -> None:
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.training import train_head
    from tests.conftest import write_feature_file

    features = write_feature_file(tmp_path / "f.h5", classes=4)
    cfg = HeadConfig(head="logreg", positive="class_2", target_recall=0.9, device="cpu")
    metrics = train_head(features, cfg, out=tmp_path / "h")
    assert list(metrics.curves.per_class) == ["class_2"]  # not all 4 classes
    for name in ("pr_roc.png", "confusion_threshold.png", "confusion.png", "predictions.csv"):
        assert (tmp_path / "h" / name).is_file(), name


def test_errors_grid_keeps_the_order_and_scales_small_images_up_without_smoothing() -> None:
    """errors.png's grid (PIL, no matplotlib axes): row by row in loss order, each image fitted into its cell, an
    8 x 8 image's pixels as sharp 20 x 20 blocks (blurred, the worst images of a 28 px dataset would be unreadable)."""
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 255)]  # not grey: the captions' anti-aliasing is
    images = [Image.fromarray(np.tile(np.array(c, np.uint8), (8, 8, 1))) for c in colours]
    images[0].putpixel((0, 0), (255, 0, 0))
    picture = np.asarray(answers.image_grid(images, ["3 -> 9\n(0.65)"] * 3, title="worst first", columns=2))
    red = np.all(picture == (255, 0, 0), axis=2)
    assert red.sum() == (answers.CELL // 8) ** 2  # one pixel, one block, not smeared into its neighbours
    first, second, third = (np.argwhere(np.all(picture == c, axis=2)) for c in colours)
    assert len(first) + red.sum() == len(second) == len(third) == answers.CELL**2  # the whole cell, one block red
    assert second[:, 1].min() > picture.shape[1] // 2 > first[:, 1].max()  # the second image: right of the first
    assert third[:, 0].min() > first[:, 0].max()  # the third: the next row
