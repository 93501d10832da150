"""``extract --skip-bad`` that drops every image of a class keeps the class (its label is its index, shared by the
file and every head made from it), and a classifier is then refused in one line naming it, before any head trains:
``compare`` used to report that class's recall as 1.0 (of nothing) and its worst-class recall with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store import read_features
from tests.conftest import TINY_ARGS, assert_one_line_error, run, write_image_folder


def test_a_class_emptied_by_skip_bad_is_refused_before_a_classifier_trains(tmp_path: Path, capsys) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=4)
    for p in (folder / "bird").iterdir():
        p.write_bytes(b"not an image")  # every bird unreadable
    out = tmp_path / "f.h5"
    code, text, _ = run(["extract", "--dataset", str(folder), "--out", str(out), "--skip-bad", *TINY_ARGS], capsys)
    assert code == 0 and "bird/" in text
    fs = read_features(out)  # the file is sound: its features read
    assert "bird" in fs.classes and not np.any(fs.train.labels == fs.classes.index("bird"))
    for command in (["compare", "--epochs", "2"], ["train-head", "--head", "centroid"]):
        cmp = tmp_path / command[0]
        code, stdout, err = run([*command, "--features", str(out), "--device", "cpu", "--out", str(cmp)], capsys)
        assert_one_line_error(code, err, "class 'bird' has 0 training rows", "rerun extract")
        assert "1.000" not in stdout and not (cmp / "compare.json").exists()
