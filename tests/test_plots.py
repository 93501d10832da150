"""The PNGs people look at: written beside the JSON by train-head and compare, non-blank, readable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.stage2 import plots
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


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]


def test_confusion_cells_show_counts_beside_shares() -> None:
    fig = plots.confusion_figure([[5, 1, 0], [0, 6, 0], [2, 0, 4]], ["cat", "dog", "bird"], title="knn on digits")
    texts = _texts(fig)
    assert "0.83\n(5)" in texts and "0.17\n(1)" in texts and "1.00\n(6)" in texts
    assert fig.axes[0].get_title() == "knn on digits" and any("count" in t for t in texts)


def test_curves_say_how_they_were_measured() -> None:
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.training import curves_note

    note = curves_note(HeadConfig(head="mlp", dropout=0.5))
    assert "dropout 0.5 on" in note and "dropout off" in note
    assert "dropout" not in curves_note(HeadConfig(head="linear"))
    history = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 1 - 1 / (e + 1)} for e in range(1, 4)]
    assert note in _texts(plots.curves_figure(history, title="t", note=note))


def test_compare_axis_starts_at_zero_with_values_written() -> None:
    rows = [{"head": h, "val_accuracy": a, "balanced_accuracy": a} for h, a in (("linear", 0.961), ("logreg", 0.981))]
    fig = plots.compare_figure(rows, title="heads on val: digits")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and {"0.961", "0.981"} <= set(_texts(fig))


def test_compare_bars_carry_their_95_percent_interval() -> None:
    """A row's ``<key>_interval`` is drawn as that bar's error bar, from its low to its high end."""
    rows = [
        {"head": h, "val_accuracy": v, "val_accuracy_interval": span, "balanced_accuracy": v}
        for h, v, span in (("linear", 0.90, [0.85, 0.93]), ("logreg", 0.95, [0.92, 0.97]))
    ]
    ax = plots.compare_figure(rows).axes[0]
    (bars_with_errors,) = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    segments = bars_with_errors.errorbar.lines[2][0].get_segments()
    assert [(round(float(s[0][1]), 3), round(float(s[1][1]), 3)) for s in segments] == [(0.85, 0.93), (0.92, 0.97)]


def test_coinciding_shots_lines_stay_apart() -> None:
    same = {"1": 0.5, "5": 0.8, "all": 0.9}
    fig = plots.shots_figure({"linear": same, "logreg": dict(same), "knn": dict(same)}, ["1", "5", "all"])
    lines = fig.axes[0].get_lines()
    assert len({tuple(line.get_xdata()) for line in lines}) == 3  # shifted sideways
    assert len({line.get_linestyle() for line in lines}) == 3 and len({line.get_marker() for line in lines}) == 3


def test_confusion_cells_drawn_by_pil_where_matplotlib_draws_them(tmp_path: Path) -> None:
    """The cells' numbers are stamped by PIL (plots._write_png), in matplotlib's place, size and colour: the picture
    is far closer to matplotlib's own rendering of them than to the same matrix without them."""
    cm = [[50, 3, 0, 1], [2, 61, 5, 0], [0, 4, 38, 9], [7, 0, 2, 44]]
    names = ["cat", "dog", "bird", "fish"]

    def picture(name: str, *, gid: str | None) -> np.ndarray:
        """The picture's grey levels, averaged over 8 x 8 pixel blocks: a text a pixel or two off still matches."""
        fig = plots.confusion_figure(cm, names, title="t")
        for t in fig.axes[0].texts:
            t.set_gid(gid) if gid is not None else t.set_visible(False)
        plots._save(fig, tmp_path / name)
        with Image.open(tmp_path / name) as img:
            grey = np.asarray(img.convert("L"), dtype=float)
        h, w = grey.shape[0] // 8 * 8, grey.shape[1] // 8 * 8
        return grey[:h, :w].reshape(h // 8, 8, w // 8, 8).mean((1, 3))

    stamped = picture("stamped.png", gid=plots.STAMPED)
    by_matplotlib = picture("matplotlib.png", gid="")
    without = picture("without.png", gid=None)
    assert stamped.shape == by_matplotlib.shape == without.shape
    assert np.abs(stamped - by_matplotlib).mean() < np.abs(without - by_matplotlib).mean() / 2
