"""Export and predict for regression heads (extract --targets): the exported model's outputs on images equal the
head's predictions on the cached features of the same images; predict writes one column per target and scores
them against a targets CSV; a damaged regression MODEL.json is one line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipeline.deploy.export import IDENTITY_KEY, export_model
from pipeline.deploy.predict import load_classifier, model_outputs, read_image
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.evaluate import regression_metrics
from pipeline.stage2.heads import HeadConfig, load_head
from pipeline.stage2.train import train_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT, assert_one_line_error, run, write_image_folder

HEADS = {  # head -> its settings (linear and mlp regress standardised targets, folded back into the last layer)
    "ridge": {"alpha": 1.0},
    "linear": {"epochs": 20, "lr": 1e-2, "standardize": True},
    "mlp": {"epochs": 5, "hidden": 16, "standardize": True},
}


def _targets(ids: list[str]) -> dict[str, tuple[float, float]]:
    """Two targets in different units: the image's rank, and a large offset number (so units matter)."""
    return {i: (float(k), 1000.0 + 50.0 * (k % 5)) for k, i in enumerate(ids)}


def _write_csv(path: Path, values: dict[str, tuple[float, ...]], header: str = "id,ink,size") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{','.join(map(str, v))}\n" for i, v in values.items()))
    return path


@pytest.fixture(scope="module")
def regress(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny image folder with a targets CSV, its features (resnet18, random init, 32 px) and one exported model
    per regressing head."""
    root = tmp_path_factory.mktemp("export_regress")
    images = write_image_folder(root / "images", per_class=6)
    values = _targets(sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png")))
    table = _write_csv(root / "t.csv", values)
    feats = root / "f.h5"
    extract(ExtractConfig(dataset=str(images), out=str(feats), targets=str(table), **TINY_EXTRACT))
    paths: dict[str, Any] = {"root": root, "images": images, "features": feats, "csv": table, "values": values}
    for name, settings in HEADS.items():
        head_dir = root / "heads" / name
        train_head(feats, HeadConfig(head=name, device="cpu", seed=0, **settings), out=head_dir)
        result = export_model(head_dir, root / f"{name}.pt2")
        assert result.targets == ["ink", "size"] and result.classes == []
        assert result.max_abs_diff < 1e-3  # the exported program against the eager model
        paths[name] = {"head": head_dir, "model": result.program}
    return paths


@pytest.mark.parametrize("name", list(HEADS))
def test_exported_values_equal_head_on_cached_features(regress: dict[str, Any], name: str) -> None:
    head, config = load_head(regress[name]["head"])
    assert head.regress and config["targets"] == ["ink", "size"]
    clf = load_classifier(regress[name]["model"], device="cpu")
    assert clf.targets == ["ink", "size"] and clf.classes == []
    fs = read_features(regress["features"])
    for split in (fs.train, fs.val):
        exported = model_outputs(clf, [read_image(regress["images"] / i, clf.preprocess) for i in split.ids]).numpy()
        cached = head.logits(split.features)
        assert exported.shape == cached.shape == (len(split.ids), 2)
        scale = np.abs(cached).max(0)  # per target: the two are in different units
        np.testing.assert_allclose(exported, cached, rtol=1e-4, atol=1e-4 * scale.max())
    if name == "ridge":  # the closed form fits these few train images closely: the outputs are in the targets' units
        np.testing.assert_allclose(head.logits(fs.train.features), fs.train.targets, rtol=0.01, atol=0.5)


def test_model_json_records_the_task_and_targets(regress: dict[str, Any]) -> None:
    model = regress["ridge"]["model"]
    meta = json.loads(model.with_suffix(".json").read_text())
    assert meta["task"] == "regress" and meta["targets"] == ["ink", "size"]
    assert "classes" not in meta and "decision" not in meta and "(N, 2)" in meta["output"]
    assert meta["state_dict_loads_into"] == "torchvision.models.get_model('resnet18', num_classes=2)"
    with safe_open(model.with_suffix(".safetensors"), framework="pt") as f:
        identity = json.loads(f.metadata()[IDENTITY_KEY])
    assert identity["task"] == "regress" and identity["targets"] == ["ink", "size"]


def test_a_classifier_on_the_same_file_keeps_its_model_json(regress: dict[str, Any], tmp_path: Path, capsys) -> None:
    """--task classify on a file with targets: the classification MODEL.json, no task or targets; and --targets
    (scoring regression) refused for it in one line."""
    train_head(regress["features"], HeadConfig(head="ridge", task="classify", device="cpu"), out=tmp_path / "c")
    result = export_model(tmp_path / "c", tmp_path / "c.pt2")
    meta = json.loads(result.meta.read_text())
    assert meta["classes"] == ["bird", "cat", "dog"] and "task" not in meta and "targets" not in meta
    with safe_open(result.state_dict, framework="pt") as f:
        assert set(json.loads(f.metadata()[IDENTITY_KEY])) == {"backbone", "classifier_path", "preprocessing",
                                                               "head_layer"}  # fmt: skip
    args = ["predict", "--model", str(result.program), str(regress["images"]), "--out", str(tmp_path / "p.csv")]
    code, _, err = run([*args, "--targets", str(regress["csv"])], capsys)
    assert_one_line_error(code, err, "--targets scores a regression model; this one classifies")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("name", ["knn", "logreg"])
def test_classifying_heads_refuse_the_targets(regress: dict[str, Any], tmp_path: Path, capsys, name: str) -> None:
    code, _, err = run(["train-head", "--features", str(regress["features"]), "--head", name, "--out",
                        str(tmp_path / name)], capsys)  # fmt: skip
    assert_one_line_error(code, err, f"the {name} head classifies labels only")
    assert not (tmp_path / name / "config.json").exists()


def test_export_and_predict_commands(regress: dict[str, Any], tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.pt2"
    code, out, err = run(["export", "--head", str(regress["linear"]["head"]), "--out", str(model)], capsys)
    assert code == 0, err
    assert "(targets, preprocessing); regression of ink, size" in out

    images = tmp_path / "images"
    shutil.copytree(regress["images"], images)
    (images / "cat" / "broken.png").write_bytes(b"not an image")  # reported in its row, never fatal
    missing = "dog/005.png"
    values = {k: v for k, v in regress["values"].items() if k != missing}  # one image without a row
    table = _write_csv(tmp_path / "truth.csv", values)
    preds = tmp_path / "preds.csv"
    code, out, err = run(["predict", "--model", str(model), str(images), "--out", str(preds), "--targets",
                          str(table), "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader(preds.open()))
    assert list(rows[0]) == ["path", "ink", "size", "error"] and len(rows) == 19
    assert [r["path"] for r in rows if r["error"]] == [str(images / "cat" / "broken.png")]
    good = {Path(r["path"]).relative_to(images).as_posix(): r for r in rows if not r["error"]}

    # the CSV's values are the head's predictions on the cached features of the same images
    head, _ = load_head(regress["linear"]["head"])
    fs = read_features(regress["features"])
    for split in (fs.train, fs.val):
        written = np.array([[float(good[i]["ink"]), float(good[i]["size"])] for i in split.ids])
        cached = head.logits(split.features)
        np.testing.assert_allclose(written, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())

    scored = sorted(set(good) - {missing})
    pred = np.array([[float(good[i]["ink"]), float(good[i]["size"])] for i in scored])
    m = regression_metrics(np.array([values[i] for i in scored]), pred, ["ink", "size"])
    assert f"R^2 {m['r2']:.4f}   RMSE {m['rmse']:.4g}" in out and "on 17 images (true values from truth.csv)" in out
    size = m["per_target"][1]
    assert f"  size    {size['r2']:<8.4f}  {size['rmse']:<10.4g}  {size['mae']:<10.4g}  {size['mse']:.4g}" in out
    assert f"1 images have no row in truth.csv, not scored: {images / missing}" in out
    assert "wrote" in out and "(path, then the predicted ink, size)" in out and "1 could not be read" in out
    assert "accuracy" not in out


def test_predict_without_targets_writes_values_only(regress: dict[str, Any], tmp_path: Path, capsys) -> None:
    out_csv = tmp_path / "p.csv"
    code, out, err = run(["predict", "--model", str(regress["ridge"]["model"]), str(regress["images"] / "cat"),
                          "--out", str(out_csv), "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6 and all(r["error"] == "" and float(r["size"]) > 100 for r in rows)  # size is ~1,000
    assert "ink" in out and "mean" in out and "R^2" not in out


@pytest.mark.parametrize(
    ("csv_text", "fragment"),
    [
        ("id,ink\ncat/000.png,1\n", "t.csv has no column size (it has ink); the model predicts ink, size"),
        ("id,ink,size\nnowhere.png,1,2\n", "no image matches an id of t.csv"),
        ("id,ink,size\ncat/000.png,1,abc\n", "t.csv"),  # extract's own checks: a value that is not a number
    ],
)
def test_a_bad_targets_csv_is_one_line_before_any_image(
    regress: dict[str, Any], tmp_path: Path, capsys, csv_text: str, fragment: str, monkeypatch
) -> None:
    table = tmp_path / "t.csv"
    table.write_text(csv_text)
    monkeypatch.setattr("pipeline.deploy.predict.read_image", _no_image)
    out = tmp_path / "p.csv"
    code, _, err = run(["predict", "--model", str(regress["ridge"]["model"]), str(regress["images"]), "--out",
                        str(out), "--targets", str(table)], capsys)  # fmt: skip
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def _no_image(*_: Any) -> None:
    raise AssertionError("an image was read before the targets CSV was checked")


def _edit(key: str, value: Any) -> Any:
    def edit(meta: dict[str, Any]) -> None:
        if value is _DROP:
            meta.pop(key)
        else:
            meta[key] = value

    return edit


_DROP = object()
DAMAGE = {
    "no targets": (_edit("targets", _DROP), "no targets entry"),
    "no task": (_edit("task", _DROP), "no classes entry"),  # read as a classifier, which needs class names
    "an unknown task": (_edit("task", "regression"), "task must be 'classify' or 'regress'"),
    "renamed targets": (
        _edit("targets", ["ink", "weight"]),
        "targets ['ink', 'weight'], but model.safetensors was exported with ['ink', 'size']",
    ),  # fmt: skip
    "a target too many": (_edit("targets", ["ink", "size", "age"]), "3 target names for a head with 2 outputs"),
    "a repeated target": (_edit("targets", ["ink", "ink"]), "targets must be a non-empty list of distinct names"),
    "targets not a list": (_edit("targets", "ink,size"), "targets must be a list"),
    "a decision threshold": (
        _edit("decision", {"positive": "ink", "threshold": 0.5}),
        "a regression model (targets) has no classes and no decision threshold",
    ),
    "classes as well": (_edit("classes", ["a", "b"]), "has no classes"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_regression_model_json_is_one_line(
    regress: dict[str, Any], tmp_path: Path, capsys, damage: str
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for suffix in (".pt2", ".safetensors", ".json"):
        shutil.copy(regress["ridge"]["model"].with_suffix(suffix), folder / f"model{suffix}")
    model = folder / "model.pt2"
    meta = json.loads(model.with_suffix(".json").read_text())
    edit, fragment = DAMAGE[damage]
    edit(meta)
    model.with_suffix(".json").write_text(json.dumps(meta))
    out = tmp_path / "p.csv"
    code, _, err = run(["predict", "--model", str(model), str(regress["images"]), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "cannot load model", fragment)
    assert not out.exists()


def test_the_rebuilt_model_equals_the_exported_program(regress: dict[str, Any]) -> None:
    """predict's model (MODEL.json + MODEL.safetensors) gives the .pt2 program's values (our own file, trusted)."""
    clf = load_classifier(regress["mlp"]["model"], device="cpu")
    program = torch.export.load(regress["mlp"]["model"]).module()
    images = [read_image(p, clf.preprocess) for p in sorted(regress["images"].rglob("*.png"))]
    with torch.inference_mode():
        exported = program(clf.preprocess.normalize(torch.stack(images)))
    scale = float(exported.abs().max())
    torch.testing.assert_close(model_outputs(clf, images), exported, rtol=1e-5, atol=1e-5 * scale)
