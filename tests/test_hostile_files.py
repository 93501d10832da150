"""Issue 24 items 1 and 7: a feature file reads nothing outside itself, and a class list that cannot train is
refused when the file is read, each in one line."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.store import FeatureWriter, check_classes_have_rows, read_activations, read_features, read_meta
from tests.conftest import assert_one_line_error, run, write_feature_file


def _replace(path: Path, name: str, make) -> None:
    with h5py.File(path, "a") as f:
        del f[name]
        make(f)


def _external_storage(path: Path, outside: Path) -> None:
    with h5py.File(path, "r") as f:
        shape = f["train/features"].shape
    nbytes = int(np.prod(shape)) * 4
    outside.write_bytes(b"secret-bytes " * (nbytes // 13 + 1))
    _replace(path, "train/features", lambda f: f.create_dataset(
        "train/features", shape=shape, dtype="float32", external=[(str(outside), 0, nbytes)]))  # fmt: skip


def _external_link(path: Path, outside: Path) -> None:
    write_feature_file(outside, seed=1)
    _replace(path, "train", lambda f: f.__setitem__("train", h5py.ExternalLink(str(outside), "/train")))


def _virtual_of_another_file(path: Path, outside: Path) -> None:
    write_feature_file(outside, seed=1)
    with h5py.File(path, "r") as f:
        shape = f["train/features"].shape

    def make(f: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=shape, dtype="float32")
        layout[:] = h5py.VirtualSource(str(outside), "/train/features", shape=shape)
        f.create_virtual_dataset("train/features", layout)

    _replace(path, "train/features", make)


def _dangling_soft_link(path: Path, outside: Path) -> None:
    with h5py.File(path, "a") as f:
        f["train/extra"] = h5py.SoftLink("/nowhere/at/all")


ATTACKS = {
    "external storage": (_external_storage, "/train/features", "external file"),
    "external link": (_external_link, "/train", "external link"),
    "virtual dataset of another file": (_virtual_of_another_file, "/train/features", "virtual dataset"),
    "dangling soft link": (_dangling_soft_link, "/train/extra", "soft link"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_file_that_reads_outside_itself_is_refused_on_open(attack: str, tmp_path: Path) -> None:
    make, name, what = ATTACKS[attack]
    path = write_feature_file(tmp_path / "f.h5", n_train=40, n_val=20, dim=8)
    make(path, tmp_path / "outside.bin")
    for read in (read_meta, read_features, lambda p: read_activations(p, "train")):
        with pytest.raises(PipelineError) as e:
            read(path)
        message = str(e.value)
        assert "\n" not in message and name in message and what in message and "outside itself" in message


def test_train_head_refuses_external_storage_in_one_line(tmp_path: Path, capsys) -> None:
    path = write_feature_file(tmp_path / "f.h5", n_train=40, n_val=20, dim=8)
    _external_storage(path, tmp_path / "passwd")
    args = ["train-head", "--features", str(path), "--head", "knn", "--out", str(tmp_path / "head")]
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, "/train/features", "outside itself")
    assert not (tmp_path / "head" / "head.safetensors").exists()


def test_the_files_own_layer_views_stay_readable(tmp_path: Path) -> None:
    path = tmp_path / "layers.h5"
    meta = {"fingerprint": "fp", "backbone": "b", "weights": "none", "feature_dim": 6, "num_classes": 2,
            "dataset": "d", "layers": [{"name": "a", "dim": 2}, {"name": "b", "dim": 4}]}  # fmt: skip
    w = FeatureWriter(path, meta=meta, classes=["x", "y"], sizes={"train": 4, "val": 2}, feature_dim=6)
    rng = np.random.default_rng(0)
    w.append("train", rng.normal(size=(4, 6)).astype("float32"), np.array([0, 1, 0, 1]), list("abcd"), seen=4)
    w.append("val", rng.normal(size=(2, 6)).astype("float32"), np.array([0, 1]), list("ef"), seen=2)
    w.finish()
    with h5py.File(path, "r") as f:
        assert f["train/layers/b"].is_virtual  # the views the check must let through
    fs = read_features(path, layer="b")
    assert fs.feature_dim == 4 and fs.train.features.shape == (4, 4)


def _classes(path: Path, names: list[str]) -> None:
    _replace(path, "classes", lambda f: f.create_dataset("classes", data=names, dtype=h5py.string_dtype()))


def test_duplicate_class_names_are_refused_on_read(tmp_path: Path) -> None:
    path = write_feature_file(tmp_path / "f.h5", n_train=40, n_val=20, dim=8, classes=3)
    _classes(path, ["cat", "dog", "cat"])
    with pytest.raises(PipelineError, match="duplicate class name 'cat'"):
        read_features(path)


def test_a_class_without_training_rows_is_refused_naming_it(tmp_path: Path) -> None:
    """Refused before a classifier trains (its recall would read 1.0 of nothing); the file itself still reads."""
    path = write_feature_file(tmp_path / "f.h5", n_train=40, n_val=20, dim=8, classes=3)
    with h5py.File(path, "a") as f:
        labels = f["train/labels"][()]
        labels[labels == 2] = 0  # as if --skip-bad had dropped every image of class_2
        f["train/labels"][...] = labels
    fs = read_features(path)
    with pytest.raises(PipelineError) as e:
        check_classes_have_rows(fs)
    assert "class_2" in str(e.value) and "0 training rows" in str(e.value) and "\n" not in str(e.value)
