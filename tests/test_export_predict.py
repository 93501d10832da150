"""Export and predict: the exported classifier's logits on images equal the head's logits on the cached
features of the same images; predict writes one CSV row per image and survives a corrupt one."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from pipeline.errors import PipelineError
from pipeline.export import export_model
from pipeline.extract import ExtractConfig, extract
from pipeline.heads import HeadConfig, load_head
from pipeline.predict import Classifier, load_classifier, predict, predict_batch, read_image
from pipeline.store import read_features
from pipeline.train import train_head
from tests.conftest import TINY_EXTRACT, run, write_image_folder


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny image folder, its features from two backbones (``fc`` and ``classifier.1`` classifiers), and
    two exported models: a logreg head (standardisation folded in) on resnet18, an mlp head on mobilenet_v2."""
    root = tmp_path_factory.mktemp("export")
    images = write_image_folder(root / "images", per_class=6)
    paths = {"root": root, "images": images}
    for backbone, head in (("resnet18", "logreg"), ("mobilenet_v2", "mlp")):
        feats = root / f"{backbone}.h5"
        extract(ExtractConfig(dataset=str(images), out=str(feats), **{**TINY_EXTRACT, "backbone": backbone}))
        head_dir = root / "heads" / f"{backbone}-{head}"
        train_head(feats, HeadConfig(head=head, epochs=3, hidden=16, device="cpu"), out=head_dir)
        paths |= {backbone: feats, f"{backbone}-head": head_dir, f"{backbone}-model": root / f"{backbone}-{head}.pt2"}
        result = export_model(head_dir, paths[f"{backbone}-model"])
        assert result.max_abs_diff < 1e-4  # the exported program against the eager model
        paths[f"{backbone}-clf"] = load_classifier(result.program)  # loading a program is slow: once per module
    return paths


def _exported_vs_cached(clf: Classifier, head_dir: Path, features: Path, images: Path) -> tuple[np.ndarray, np.ndarray]:
    head, _ = load_head(head_dir)
    fs = read_features(features)
    batch = [read_image(images / rel, clf.preprocess) for rel in fs.train.ids]
    with torch.inference_mode():
        exported = clf.module(clf.preprocess.normalize(torch.stack(batch))).numpy()
    return exported, head.logits(fs.train.features)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_exported_logits_equal_head_on_cached_features(extracted: dict[str, Any], backbone: str) -> None:
    program = extracted[f"{backbone}-model"]
    assert program.is_file() and program.with_suffix(".pth").is_file() and program.with_suffix(".json").is_file()
    clf = extracted[f"{backbone}-clf"]
    exported, cached = _exported_vs_cached(clf, extracted[f"{backbone}-head"], extracted[backbone], extracted["images"])
    assert exported.shape == cached.shape == (15, 3)
    scale = np.abs(cached).max()
    np.testing.assert_allclose(exported, cached, rtol=1e-4, atol=1e-4 * scale)


def test_state_dict_loads_into_plain_torchvision_model(extracted: dict[str, Any]) -> None:
    program = extracted["resnet18-model"]
    plain = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()
    plain.load_state_dict(torch.load(program.with_suffix(".pth"), weights_only=True))  # strict: every key fits
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(plain(x), extracted["resnet18-clf"].module(x), rtol=1e-4, atol=1e-4)
    meta = json.loads(program.with_suffix(".json").read_text())
    assert meta["classes"] == ["bird", "cat", "dog"] and meta["preprocessing"]["crop_size"] == 32
    assert meta["head"] == "logreg" and "num_classes=3" in meta["state_dict_loads_into"]


def test_centroid_head_is_a_linear_layer(extracted: dict[str, Any], tmp_path: Path) -> None:
    train_head(extracted["resnet18"], HeadConfig(head="centroid"), out=tmp_path / "c")
    head, _ = load_head(tmp_path / "c")
    X = read_features(extracted["resnet18"]).val.features
    with torch.no_grad():
        module_logits = head.as_module()(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(module_logits, head.logits(X), rtol=1e-5, atol=1e-5 * np.abs(module_logits).max())


def test_knn_and_synthetic_heads_refuse_export(extracted: dict[str, Any], feature_file: Path, tmp_path: Path) -> None:
    train_head(extracted["resnet18"], HeadConfig(head="knn", k=3), out=tmp_path / "knn")
    with pytest.raises(PipelineError, match="knn head cannot"):
        export_model(tmp_path / "knn", tmp_path / "knn.pt2")
    train_head(feature_file, HeadConfig(head="centroid"), out=tmp_path / "synthetic")
    with pytest.raises(PipelineError, match="not trained on features from `pipeline extract`"):
        export_model(tmp_path / "synthetic", tmp_path / "s.pt2")
    with pytest.raises(PipelineError, match=r"must end in \.pt2"):
        export_model(tmp_path / "synthetic", tmp_path / "s.onnx")


def test_export_and_predict_commands(extracted: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    head_dir = tmp_path / "head"
    train_head(extracted["resnet18"], HeadConfig(head="linear", epochs=30, lr=1e-2), out=head_dir)
    model = tmp_path / "model" / "clf.pt2"

    code, out, _ = run(["export", "--head", str(head_dir), "--out", str(model)], capsys)
    assert code == 0 and str(model) in out and model.with_suffix(".json").is_file()

    unseen = write_image_folder(tmp_path / "new", per_class=2, seed=7)
    (unseen / "cat" / "broken.png").write_bytes(b"not an image")
    preds = tmp_path / "preds.csv"
    code, out, err = run(["predict", "--model", str(model), str(unseen), "--out", str(preds), "--top-k", "2"], capsys)
    assert code == 0 and "1 could not be read" in out and "broken.png" in out
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 7
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2", "error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all(0 < float(r["probability"]) <= 1 for r in good)
    assert sum(r["class"] == Path(r["path"]).parent.name for r in good) >= 5  # colours separate the classes
    assert [r["path"] for r in rows if r["error"]] == [str(unseen / "cat" / "broken.png")]

    code, _, err = run(["predict", "--model", str(tmp_path / "nope.pt2"), str(unseen), "--out", str(preds)], capsys)
    assert code == 1 and err.startswith("error: model not found") and len(err.strip().splitlines()) == 1

    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip archive")
    junk.with_suffix(".json").write_text(model.with_suffix(".json").read_text())
    code, _, err = run(["predict", "--model", str(junk), str(unseen), "--out", str(preds)], capsys)
    assert code == 1 and err.startswith("error: cannot load model") and len(err.strip().splitlines()) == 1


def test_predict_batches_agree_with_one_by_one(extracted: dict[str, Any], tmp_path: Path) -> None:
    clf = extracted["mobilenet_v2-clf"]
    images = sorted((extracted["images"] / "dog").glob("*.png"))
    result = predict(clf, [extracted["images"] / "dog"], out=tmp_path / "p.csv", batch_size=4, progress=False)
    assert result.n_images == 6 and not result.failed
    one = [predict_batch(clf, [read_image(p, clf.preprocess)])[0] for p in images[:2]]  # zip stops after 2
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    for row, p in zip(rows, one):
        assert row["class"] == clf.classes[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), rel=1e-4)
