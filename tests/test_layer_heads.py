"""Heads on one stored layer (issue 17 item 1, stage two): ``read_features(layer=...)``, ``train-head --layer``,
``compare --layers``. The files are made by hand: ``features`` = the concatenation of the layers ``meta.layers``
lists, where only the ``good`` layer's columns separate the classes (the other is noise)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.train import compare, compare_layers, compare_shots, train_head
from pipeline.store import FINAL_LAYER, FeatureWriter, read_features
from tests.conftest import assert_one_line_error, run, separable_features

LAYERS = {"layer3": 12, "layer4": 16}  # file order
GOOD = "layer4"
CLASSES = 4


def write_layered_file(
    path: Path,
    *,
    layers: dict[str, int] = LAYERS,
    good: str = GOOD,
    n_train: int = 240,
    n_val: int = 120,
    meta_layers: list[dict] | None = None,
) -> Path:
    """A complete feature file as ``extract --layers`` writes it; ``good``'s columns are separable blobs, the other
    layers' columns Gaussian noise independent of the labels."""
    n = n_train + n_val
    X_good, y = separable_features(n=n, dim=layers[good], classes=CLASSES, seed=1, spread=0.3)
    rng = np.random.default_rng(2)
    blocks = [X_good if name == good else rng.normal(0, 3, (n, d)).astype(np.float32) for name, d in layers.items()]
    X = np.concatenate(blocks, axis=1)
    dim = X.shape[1]
    meta = {
        "fingerprint": "layered",
        "backbone": "synthetic",
        "weights": "none",
        "feature_dim": dim,
        "num_classes": CLASSES,
        "dataset": "synthetic",
        "layers": [{"name": k, "dim": d} for k, d in layers.items()],
    }
    names = [f"class_{i}" for i in range(CLASSES)]
    w = FeatureWriter(path, meta=meta, classes=names, sizes={"train": n_train, "val": n_val}, feature_dim=dim)
    w.append("train", X[:n_train], y[:n_train], [str(i) for i in range(n_train)], seen=n_train)
    w.append("val", X[n_train:], y[n_train:], [str(i) for i in range(n_train, n)], seen=n_val)
    w.finish()
    if meta_layers is not None:  # damaged after it was written: the writer itself only writes sound records
        with h5py.File(path, "a") as f:
            f.attrs["layers"] = json.dumps(meta_layers)
    return path


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    return write_layered_file(tmp_path / "layered.h5")


# ------------------------------------------------------------------------------------------ reading


def test_read_features_slices_one_layer(layered: Path) -> None:
    whole = read_features(layered)
    assert whole.layer is None and whole.feature_dim == 28 and whole.train.features.shape[1] == 28
    assert read_features(layered, layer="all").feature_dim == 28

    l3 = read_features(layered, layer="layer3")
    assert l3.layer == "layer3" and l3.feature_dim == 12 and l3.meta.layers == [{"name": "layer3", "dim": 12}]
    np.testing.assert_array_equal(l3.train.features, whole.train.features[:, :12])
    l4 = read_features(layered, layer="layer4")
    assert l4.feature_dim == 16 and l4.train.features.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(l4.val.features, whole.val.features[:, 12:])
    np.testing.assert_array_equal(l4.val.labels, whole.val.labels)


def test_unknown_layer_lists_the_files_layers(layered: Path) -> None:
    with pytest.raises(PipelineError, match=r"no layer 'layer9'; its layers: layer3 \(12\), layer4 \(16\)"):
        read_features(layered, layer="layer9")


def test_old_file_is_one_layer(feature_file: Path) -> None:
    """A file without ``layers`` holds one layer, 'final': all and final read it whole, any other name is refused."""
    for name in (None, "all", FINAL_LAYER):
        fs = read_features(feature_file, layer=name)
        assert fs.layer is None and fs.feature_dim == 32
    with pytest.raises(PipelineError, match="no layer 'layer4'.*final"):
        read_features(feature_file, layer="layer4")


@pytest.mark.parametrize(
    "meta_layers, fragment",
    [
        ([{"name": "layer3", "dim": 12}, {"name": "layer4", "dim": 10}], "add up to 22"),
        ([{"name": "layer3", "dim": 12}, {"name": "layer3", "dim": 16}], "'layers' attribute is damaged"),
        ([{"name": "../x", "dim": 28}], "'layers' attribute is damaged"),
        ([{"name": "layer3"}], "'layers' attribute is damaged"),
    ],
)
def test_damaged_layers_record_is_one_line(tmp_path: Path, capsys, meta_layers: list, fragment: str) -> None:
    path = write_layered_file(tmp_path / "bad.h5", meta_layers=meta_layers)
    with pytest.raises(PipelineError, match=fragment):
        read_features(path)
    code, _, err = run(["train-head", "--features", str(path), "--head", "centroid", "--out", str(tmp_path / "h")],
                       capsys)  # fmt: skip
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "h").exists()


# ------------------------------------------------------------------------------------------ train-head --layer


def test_train_head_on_one_layer(layered: Path, tmp_path: Path) -> None:
    good = train_head(layered, HeadConfig(head="centroid", layer=GOOD), out=tmp_path / "good")
    noise = train_head(layered, HeadConfig(head="centroid", layer="layer3"), out=tmp_path / "noise")
    assert good["val_accuracy"] > 0.95
    assert noise["val_accuracy"] < 0.5  # chance is 0.25
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    assert config["layer"] == GOOD and config["feature_dim"] == 16 and config["settings"]["layer"] == GOOD
    assert config["layers"] == [{"name": GOOD, "dim": 16}]
    metrics = json.loads((tmp_path / "noise" / "metrics.json").read_text())
    assert metrics["layer"] == "layer3" and metrics["feature_dim"] == 12


def test_default_folder_names_the_layer(layered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    on_layer = train_head(layered, HeadConfig(head="centroid", layer=GOOD))
    whole = train_head(layered, HeadConfig(head="centroid", layer="all"))
    assert Path(on_layer.out) == Path("artifacts/heads/layered/layer4/centroid")
    assert Path(whole.out) == Path("artifacts/heads/layered/centroid")
    assert json.loads((Path(whole.out) / "config.json").read_text())["layer"] == "all"
    result = compare(layered, heads=["centroid"], base=HeadConfig(layer="layer3"))
    assert Path(result["out"]) == Path("artifacts/heads/layered/layer3/compare") and result["feature_dim"] == 12
    shots = compare_shots(layered, heads=["centroid"], base=HeadConfig(layer=GOOD), shots=[2, None])
    assert Path(shots["out"]) == Path("artifacts/heads/layered/layer4/compare")
    assert shots["val_accuracy"]["centroid"]["all"] > 0.95 and shots["settings"]["heads"]["centroid"]["layer"] == GOOD


def test_a_head_of_another_layer_is_not_replaced_silently(layered: Path, tmp_path: Path) -> None:
    out = tmp_path / "head"
    train_head(layered, HeadConfig(head="centroid", layer="layer3"), out=out)
    with pytest.raises(PipelineError, match="layer layer3 -> layer4"):
        train_head(layered, HeadConfig(head="centroid", layer=GOOD), out=out)
    with pytest.raises(PipelineError, match="layer layer3 -> -"):
        train_head(layered, HeadConfig(head="centroid"), out=out)
    train_head(layered, HeadConfig(head="centroid", layer="layer3"), out=out)  # same settings: rewritten
    train_head(layered, HeadConfig(head="centroid", layer=GOOD), out=out, force=True)
    assert json.loads((out / "config.json").read_text())["layer"] == GOOD


def test_old_heads_compare_equal_on_the_whole_row(feature_file: Path, tmp_path: Path) -> None:
    """--layer all and --layer final on a file without layers are the default: the same settings, no refusal."""
    out = tmp_path / "head"
    train_head(feature_file, HeadConfig(head="centroid"), out=out)
    for name in ("all", FINAL_LAYER):
        metrics = train_head(feature_file, HeadConfig(head="centroid", layer=name), out=out)
        assert metrics["val_accuracy"] > 0.95 and metrics["layer"] == "all"
    assert "layer" not in json.loads((out / "config.json").read_text())["settings"]


def test_train_head_layer_cli(layered: Path, feature_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code, stdout, _ = run(["train-head", "--features", str(layered), "--head", "centroid", "--layer", GOOD,
                           "--out", str(out)], capsys)  # fmt: skip
    assert code == 0 and (out / "head.safetensors").is_file()
    code, _, err = run(["train-head", "--features", str(layered), "--layer", "layer9"], capsys)
    assert_one_line_error(code, err, "no layer 'layer9'", "layer3 (12), layer4 (16)")
    code, _, err = run(["train-head", "--features", str(feature_file), "--layer", "layer4"], capsys)
    assert_one_line_error(code, err, "no layer 'layer4'", "final (32)")
    code, _, _ = run(["train-head", "--features", str(feature_file), "--head", "centroid", "--layer", "all",
                      "--out", str(tmp_path / "old")], capsys)  # fmt: skip
    assert code == 0


# ------------------------------------------------------------------------------------------ compare --layers


def test_compare_layers_picks_the_good_layer(layered: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = compare_layers(layered, layers="all", heads=["centroid", "logreg"], base=HeadConfig(), out=out)
    rows = {r["layer"]: r for r in result["layers"]}
    assert list(rows) == ["layer3", "layer4", "all"]
    assert [rows[k]["feature_dim"] for k in rows] == [12, 16, 28]
    assert result["best_layer"] == GOOD and rows[GOOD]["val_accuracy"] > 0.95
    assert rows["layer3"]["val_accuracy"] < 0.5
    assert rows["all"]["shown"] == "all (layer3+layer4)"
    for name in rows:
        assert (out / name / "compare.json").is_file() and (out / name / "logreg" / "head.safetensors").is_file()
        assert json.loads((out / name / "logreg" / "config.json").read_text())["layer"] == name
    saved = json.loads((out / "layers.json").read_text())
    assert saved["best_layer"] == GOOD and [r["layer"] for r in saved["layers"]] == ["layer3", "layer4", "all"]
    md = (out / "layers.md").read_text()
    assert "| layer | dim | best head |" in md and md.count("per head:") == 3


def test_compare_layers_checks_every_folder_first(layered: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    compare_layers(layered, layers="layer4", heads=["centroid"], base=HeadConfig(), out=out)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["all", "layer4"]  # named, then all
    # a knn head of other settings in the concatenation's folder: refused before layer4 is trained again
    compare(layered, heads=["knn"], base=HeadConfig(k=3), out=out / "all")
    before = (out / GOOD / "centroid" / "metrics.json").stat().st_mtime_ns
    with pytest.raises(PipelineError, match="k 3 -> 10"):
        compare_layers(layered, layers="layer4", heads=["centroid", "knn"], base=HeadConfig(), out=out)
    assert (out / GOOD / "centroid" / "metrics.json").stat().st_mtime_ns == before
    assert not (out / GOOD / "knn").exists()


def test_compare_layers_cli(layered: Path, feature_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--features", str(layered), "--heads", "centroid", "--out", str(out)]
    code, stdout, _ = run([*args, "--layers", "all"], capsys)
    assert code == 0, stdout
    assert "| layer | dim | best head | val acc |" in stdout
    assert "best on val: layer layer4 with centroid" in stdout
    assert stdout.count("| head |") == 3  # each layer's table of heads
    assert (out / "layers.json").is_file() and (out / "layers.md").is_file()

    code, _, err = run([*args, "--layers", "layer3,nope", "--force"], capsys)
    assert_one_line_error(code, err, "no layer 'nope'", "layer3 (12)")
    code, _, err = run([*args, "--layers", "all", "--shots", "1,all"], capsys)
    assert code == 2 and "does not combine with --shots" in err

    old = tmp_path / "old"
    code, stdout, _ = run(["compare", "--features", str(feature_file), "--heads", "centroid", "--layers", "all",
                           "--out", str(old)], capsys)  # fmt: skip
    assert code == 0 and "best on val: layer final with centroid" in stdout
    assert [r["layer"] for r in json.loads((old / "layers.json").read_text())["layers"]] == [FINAL_LAYER]
