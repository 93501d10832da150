"""Export and predict for heads trained on pooled inner layers (``extract --layers``, ``train-head --layer``): the
exported model is the backbone traced to give those layers, then the head; its logits and predict's answers on the
images equal the head's on the cached features of the same images. MODEL.json names the layers, and predict
rebuilds exactly that model from MODEL.json and MODEL.safetensors."""

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
from safetensors.torch import load_file, save_file

from pipeline.deploy.export import IDENTITY_KEY, export_model
from pipeline.deploy.predict import Classifier, load_classifier, predict, read_image
from pipeline.errors import PipelineError
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.heads import HeadConfig, load_head
from pipeline.stage2.train import train_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT, assert_one_line_error, run, write_image_folder

STORED = "layer2,layer3"  # extract --layers, file order
HEADS = {  # train-head --layer -> (head, the layers the exported model computes, in order)
    "layer3": ("logreg", ["layer3"]),
    "all": ("mlp", ["layer2", "layer3"]),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny folder, resnet18 (random init, 32 px) features of layer2 and layer3, and per ``--layer`` a head
    trained on them and its export."""
    root = tmp_path_factory.mktemp("export-layers")
    images = write_image_folder(root / "images", per_class=6)
    feats = root / "layers.h5"
    extract(ExtractConfig(dataset=str(images), out=str(feats), **TINY_EXTRACT, layers=STORED))
    out: dict[str, Any] = {"root": root, "images": images, "features": feats}
    for layer, (head, _) in HEADS.items():
        head_dir = root / "heads" / layer
        train_head(feats, HeadConfig(head=head, epochs=3, hidden=16, device="cpu", layer=layer), out=head_dir)
        out[layer] = {"head": head_dir, "export": export_model(head_dir, root / f"{layer}.pt2")}
    return out


def _exported_vs_cached(
    clf: Classifier, head_dir: Path, features: Path, images: Path, *, layer: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(the exported model's logits on the train images, the head's logits on their cached features, their ids)."""
    head, _ = load_head(head_dir)
    fs = read_features(features, layer=layer)
    batch = torch.stack([read_image(images / rel, clf.preprocess) for rel in fs.train.ids])
    with torch.inference_mode():
        exported = clf.module(clf.preprocess.normalize(batch)).numpy()
    return exported, head.logits(fs.train.features), list(fs.train.ids)


@pytest.mark.parametrize("layer", list(HEADS))
def test_export_and_predict_give_the_heads_answers(exported: dict[str, Any], layer: str) -> None:
    result = exported[layer]["export"]
    assert result.max_abs_diff < 1e-4  # the torch.export program against the eager model
    clf = load_classifier(result.program, device="cpu")
    images = exported["images"]
    logits, cached, ids = _exported_vs_cached(clf, exported[layer]["head"], exported["features"], images, layer=layer)
    assert logits.shape == cached.shape == (15, 3)
    np.testing.assert_allclose(logits, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())
    # predict's CSV: the head's class and probability on the cached features of the same image
    out = predict(clf, [images], out=exported["root"] / f"{layer}.csv", progress=False)
    with open(out.out, newline="", encoding="utf-8") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    proba = torch.softmax(torch.as_tensor(cached, dtype=torch.float64), dim=1).numpy()
    classes = read_features(exported["features"]).classes
    assert out.n_images == 18
    for rel, p in zip(ids, proba, strict=True):
        row = rows[str(images / rel)]
        assert row["class"] == classes[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=1e-4)


@pytest.mark.parametrize("layer", list(HEADS))
def test_model_json_and_tensors_name_the_layers(exported: dict[str, Any], layer: str) -> None:
    result = exported[layer]["export"]
    _, layers = HEADS[layer]
    meta = json.loads(result.meta.read_text())
    assert meta["layers"] == layers and meta["classifier_path"] == "fc"
    assert "create_feature_extractor(return_nodes=" in meta["state_dict_loads_into"]
    with safe_open(result.state_dict, framework="pt") as f:
        identity = json.loads(f.metadata()[IDENTITY_KEY])
        keys = list(f.keys())  # noqa: SIM118 - safe_open has no __iter__
    assert identity["layers"] == layers  # the tensors say which layers they compute
    assert all(k.startswith(("backbone.body.", "head.")) for k in keys)
    # the traced backbone stops at the last layer the head takes: layer4 and fc are not in the model
    assert any(k.startswith("backbone.body.layer3.") for k in keys)
    assert not any(k.startswith(("backbone.body.layer4.", "backbone.body.fc.")) for k in keys)


def test_a_model_without_layers_records_none(exported: dict[str, Any], tmp_path: Path) -> None:
    """Features of the classifier's input: MODEL.json and the tensors' header have no ``layers``, and the head
    sits where the classifier was (``fc``), as before layers could be exported."""
    feats = tmp_path / "plain.h5"
    extract(ExtractConfig(dataset=str(exported["images"]), out=str(feats), **TINY_EXTRACT))
    train_head(feats, HeadConfig(head="centroid"), out=tmp_path / "head")
    result = export_model(tmp_path / "head", tmp_path / "plain.pt2")
    assert "layers" not in json.loads(result.meta.read_text())
    with safe_open(result.state_dict, framework="pt") as f:
        assert "layers" not in json.loads(f.metadata()[IDENTITY_KEY])
        assert {"fc.weight", "fc.bias", "layer4.0.conv1.weight"} <= set(f.keys())  # noqa: SIM118


def test_a_tail_head_ignores_the_files_pooled_layers(exported: dict[str, Any], tmp_path: Path) -> None:
    """The tail head takes the --cache-at maps and ends where the classifier sat: the layers the file also stores
    (here layer4, as wide as the classifier's input, so the tail head trains on it) are not its input."""
    feats = tmp_path / "tail.h5"
    extract(ExtractConfig(dataset=str(exported["images"]), out=str(feats), **TINY_EXTRACT, layers="layer4",
                          cache_at="layer3"))  # fmt: skip
    train_head(feats, HeadConfig(head="tail", epochs=1, batch_size=8, device="cpu"), out=tmp_path / "head")
    assert json.loads((tmp_path / "head" / "config.json").read_text())["layers"] == [{"name": "layer4", "dim": 512}]
    result = export_model(tmp_path / "head", tmp_path / "tail.pt2")
    assert result.max_abs_diff < 1e-4 and "layers" not in json.loads(result.meta.read_text())
    assert "fc.weight" in load_file(result.state_dict)  # the new linear layer where the classifier sat
    clf = load_classifier(result.program, device="cpu")
    assert clf.module(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_a_regression_head_on_one_layer(exported: dict[str, Any], tmp_path: Path) -> None:
    """Layers and regression targets together: a ridge head on layer2 exports with both in MODEL.json and gives
    the head's values on the cached features."""
    images = exported["images"]
    ids = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    table = tmp_path / "t.csv"
    table.write_text("id,ink\n" + "".join(f"{i},{k * 1.5}\n" for k, i in enumerate(ids)))
    feats = tmp_path / "r.h5"
    extract(ExtractConfig(dataset=str(images), out=str(feats), **TINY_EXTRACT, layers=STORED, targets=str(table)))
    train_head(feats, HeadConfig(head="ridge", alpha=1.0, layer="layer2", device="cpu"), out=tmp_path / "head")
    result = export_model(tmp_path / "head", tmp_path / "r.pt2")
    meta = json.loads(result.meta.read_text())
    assert meta["layers"] == ["layer2"] and meta["task"] == "regress" and meta["targets"] == ["ink"]
    clf = load_classifier(result.program, device="cpu")
    values, cached, _ = _exported_vs_cached(clf, tmp_path / "head", feats, images, layer="layer2")
    assert values.shape == cached.shape == (15, 1)
    np.testing.assert_allclose(values, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())


# ------------------------------------------------------------------------------------------ damaged files


@pytest.fixture
def copy_of(exported: dict[str, Any], tmp_path: Path) -> Path:
    """The ``--layer all`` model's three files, copied to be damaged."""
    program = exported["all"]["export"].program
    for suffix in (".pt2", ".safetensors", ".json"):
        shutil.copy(program.with_suffix(suffix), tmp_path / f"m{suffix}")
    return tmp_path / "m.pt2"


def _edit_json(model: Path, **entries: Any) -> None:
    path = model.with_suffix(".json")
    meta = json.loads(path.read_text())
    for key, value in entries.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def _edit_header(model: Path, **entries: Any) -> None:
    """Rewrite the tensors file's identity header as a forger who edits both files would."""
    path = model.with_suffix(".safetensors")
    with safe_open(path, framework="pt") as f:
        identity = json.loads(f.metadata()[IDENTITY_KEY])
    save_file(load_file(path), path, metadata={IDENTITY_KEY: json.dumps(identity | entries, sort_keys=True)})


@pytest.mark.parametrize(
    ("layers", "fragment"),
    [
        ("layer3", "layers must be a list of node names, not 'layer3'"),
        ([], "layers must be a non-empty list of distinct node names"),
        (["layer2", "layer2"], "layers must be a non-empty list of distinct node names"),
        (["layer2", 3], "layers must be a non-empty list of distinct node names"),
        (["layer3", "layer2"], "says layers ['layer3', 'layer2'], but m.safetensors was exported with ['layer2', "),
        (["layer3"], "says layers ['layer3'], but m.safetensors was exported with"),
        (None, "m.json has no layers entry, but m.safetensors was exported with ['layer2', 'layer3']"),
    ],
)
def test_a_damaged_layers_entry_is_one_line(
    copy_of: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], layers: Any, fragment: str
) -> None:
    _edit_json(copy_of, layers=layers)
    images = str(write_image_folder(tmp_path / "img", per_class=1))
    code, _, err = run(["predict", "--model", str(copy_of), images, "--out", str(tmp_path / "p.csv")], capsys)
    assert_one_line_error(code, err, "cannot load model", fragment)
    assert not (tmp_path / "p.csv").exists()


def test_layers_both_files_agree_on_but_the_model_lacks_are_one_line(copy_of: Path) -> None:
    _edit_json(copy_of, layers=["layer2", "layer9"])
    _edit_header(copy_of, layers=["layer2", "layer9"])
    with pytest.raises(PipelineError, match=r"resnet18 has no node 'layer9'") as e:
        load_classifier(copy_of, device="cpu")
    assert "\n" not in str(e.value)
    # real layers of other widths than the head takes: the mismatch is named, not a matmul error
    _edit_json(copy_of, layers=["layer3", "layer4"])
    _edit_header(copy_of, layers=["layer3", "layer4"])
    with pytest.raises(PipelineError, match=r"the layers give 768 features \(layer3 256 \+ layer4 512\); the head "
                                            r"takes 384"):  # fmt: skip
        load_classifier(copy_of, device="cpu")


def test_a_head_whose_config_layers_are_damaged_is_refused(exported: dict[str, Any], tmp_path: Path) -> None:
    head_dir = shutil.copytree(exported["layer3"]["head"], tmp_path / "head")
    config = json.loads((head_dir / "config.json").read_text())
    (head_dir / "config.json").write_text(json.dumps(config | {"layer": "layer2"}))  # says one layer, holds another
    with pytest.raises(PipelineError, match=r"says layer 'layer2' but layers \['layer3'\]"):
        export_model(head_dir, tmp_path / "m.pt2")
    (head_dir / "config.json").write_text(json.dumps(config | {"layers": [{"dim": 256}]}))
    with pytest.raises(PipelineError, match="damaged 'layers' entry"):
        export_model(head_dir, tmp_path / "m.pt2")
    assert not list(tmp_path.glob("m.*"))


def test_export_command_on_a_layer_head(exported: dict[str, Any], tmp_path: Path, capsys) -> None:
    model = tmp_path / "clf.pt2"
    code, out, err = run(["export", "--head", str(exported["layer3"]["head"]), "--out", str(model)], capsys)
    assert code == 0 and str(model) in out, err
    preds = tmp_path / "p.csv"
    code, out, err = run(["predict", "--model", str(model), str(exported["images"]), "--out", str(preds)], capsys)
    assert code == 0 and "18 images" in out, err
    assert len(list(csv.DictReader(preds.open()))) == 18


# ------------------------------------------------------------------------------------------ timm


def test_timm_convnext_on_two_stages(tmp_path: Path) -> None:
    """A timm model traced by timm's own tracer: stages.1 and stages.3 of timm's test-size ConvNeXt."""
    pytest.importorskip("timm")
    images = write_image_folder(tmp_path / "images", per_class=4)
    feats = tmp_path / "convnext.h5"
    settings = {**TINY_EXTRACT, "backbone": "timm:test_convnext"}
    extract(ExtractConfig(dataset=str(images), out=str(feats), **settings, layers="stages.1,stages.3"))
    train_head(feats, HeadConfig(head="linear", epochs=3, device="cpu", layer="all"), out=tmp_path / "head")
    result = export_model(tmp_path / "head", tmp_path / "convnext.pt2")
    assert result.max_abs_diff < 1e-4
    meta = json.loads(result.meta.read_text())
    assert meta["layers"] == ["stages.1", "stages.3"] and meta["classifier_path"] == "head.fc"
    clf = load_classifier(result.program, device="cpu")
    logits, cached, _ = _exported_vs_cached(clf, tmp_path / "head", feats, images, layer="all")
    assert logits.shape == cached.shape and cached.shape[1] == 3
    np.testing.assert_allclose(logits, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())
