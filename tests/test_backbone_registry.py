"""The backbone family registry (``BACKBONE_FAMILIES``): a family added by one entry runs through every command
(extract -> train-head -> export -> predict, ``list backbones``, ``inspect --nodes``), and the backbone rebuilt from
a feature file's record or an export's record computes what the original computed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline import catalog, inspection
from pipeline.deploy.export import export_model, read_export_meta, sidecar_paths
from pipeline.deploy.predict import predict
from pipeline.errors import PipelineError
from pipeline.stage1.backbones import (
    BACKBONE_FAMILIES,
    BackboneRecord,
    family_of,
    load_backbone,
    rebuild_backbone,
    with_outputs,
)
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage1.families import Backbone, BackboneFamily, frozen, seeded
from pipeline.stage1.preprocessing import Preprocessing
from pipeline.stage2.heads import HeadConfig, load_head
from pipeline.stage2.train import train_head
from pipeline.store import WeightsIdentity, read_features
from pipeline.store import read_meta as read_feature_meta
from tests.conftest import TINY_EXTRACT

TOY = "toy:tiny"


class ToyNet(nn.Module):
    """Two small convolutions, a pooled map and a classifier ``fc``: traceable, tiny, image-size agnostic."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


class ToyFamily(BackboneFamily):
    """A family of one random-weight model, ``toy:tiny``, with its own data config (mean 0.5, std 0.25)."""

    key = "toy"
    prefix = "toy:"

    def names(self) -> list[str]:
        return [TOY]

    def build(self, name: str, *, weights: str, image_size: int | None, seed: int, resize: str) -> Backbone:
        if weights.lower() != "none":
            raise PipelineError(f"{name} has random weights only: --weights none")
        pre = Preprocessing(resize_size=28, crop_size=24, mean=(0.5,) * 3, std=(0.25,) * 3, resize=resize)
        pre = pre.with_crop(image_size) if image_size else pre
        model, where = self.architecture(name, crop_size=pre.crop_size, seed=seed)
        identity = str(WeightsIdentity("none", str(seed)))
        return frozen(model, preprocess=pre, name=name, weights=identity, classifier_path=where)

    def architecture(self, name: str, *, crop_size: int, seed: int = 0) -> tuple[nn.Module, str]:
        if name != TOY:
            raise PipelineError(f"unknown toy model {name!r}; choose {TOY}")
        with seeded(seed):
            model = ToyNet()
        model.fc = nn.Identity()
        return model, "fc"


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> ToyFamily:
    """The toy family registered by its one entry."""
    family = ToyFamily()
    monkeypatch.setitem(BACKBONE_FAMILIES, "toy", family)
    return family


def _extract(images: Path, out: Path, **settings: object) -> Path:
    extract(ExtractConfig(dataset=str(images), out=str(out), **{**TINY_EXTRACT, **settings}))
    return out


def test_names_go_to_their_family(toy: ToyFamily) -> None:
    assert family_of(TOY) is toy
    assert family_of("resnet18") is BACKBONE_FAMILIES["torchvision"]
    assert family_of("timm:vit_tiny_patch16_224") is BACKBONE_FAMILIES["timm"]
    with pytest.raises(PipelineError, match="unknown backbone 'resnet19'; choose one of: .*resnet18.*toy:tiny"):
        family_of("resnet19")
    assert TOY in [e.name for e in catalog.backbones()]  # `list backbones` reads the registry


def test_a_toy_family_runs_extract_train_export_predict(toy: ToyFamily, image_folder: Path, tmp_path: Path) -> None:
    """One registry entry is all a family needs: predict's classes on the images equal the head's on the features."""
    feats = _extract(image_folder, tmp_path / "toy.h5", backbone=TOY, image_size=None, seed=5)
    meta = read_feature_meta(feats)
    assert (meta.backbone, meta.weights, meta.feature_dim, meta.classifier_path) == (TOY, "none(seed=5)", 12, "fc")
    assert meta.preprocessing["mean"] == [0.5, 0.5, 0.5] and meta.preprocessing["crop_size"] == 24

    head_dir = tmp_path / "head"
    train_head(feats, HeadConfig(head="logreg", device="cpu"), out=head_dir)
    model = tmp_path / "toy.pt2"
    result = export_model(head_dir, model)
    assert result.max_abs_diff < 1e-4
    assert read_export_meta(sidecar_paths(model)[1]).backbone == TOY

    out = tmp_path / "preds.csv"
    predict(model, [image_folder], out=out, progress=False, device="cpu", workers=0)
    predicted = {r["path"]: r["class"] for r in csv.DictReader(out.open())}
    head, _ = load_head(head_dir)
    fs = read_features(feats)
    classes = np.array(fs.classes)
    for split in fs.splits.values():
        expected = dict(zip(split.ids, classes[head.logits(split.features).argmax(1)]))
        assert {str(image_folder / i): predicted[str(image_folder / i)] for i in split.ids} == {
            str(image_folder / i): c for i, c in expected.items()
        }
    assert len(set(predicted.values())) > 1  # the check compares answers, not one constant class

    nodes = [n["node"] for n in inspection.list_nodes(TOY)["nodes"]]  # inspect --nodes through the registry
    assert "block" in " ".join(nodes) and nodes[-1]


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize(("name", "layers"), [(TOY, None), (TOY, ["stem", "block"]), ("resnet18", ["layer3"])])
def test_rebuilt_from_a_feature_files_record_computes_what_made_it(
    toy: ToyFamily, image_folder: Path, tmp_path: Path, name: str, layers: list[str] | None
) -> None:
    feats = _extract(image_folder, tmp_path / "f.h5", backbone=name, seed=3, layers=",".join(layers or []) or None)
    record = BackboneRecord.of_features(read_feature_meta(feats))
    assert record.weights == "none(seed=3)" and record.layers == (tuple(layers) if layers else None)
    rebuilt = rebuild_backbone(record)
    original = with_outputs(load_backbone(name, weights="none", image_size=32, seed=3), layers=layers)
    other_seed = with_outputs(load_backbone(name, weights="none", image_size=32, seed=4), layers=layers)
    x = torch.randn(2, 3, 32, 32)
    assert rebuilt.feature_dim == original.feature_dim == read_feature_meta(feats).feature_dim
    torch.testing.assert_close(_outputs(rebuilt.model, x), _outputs(original.model, x), rtol=0, atol=0)
    assert not torch.allclose(_outputs(other_seed.model, x), _outputs(original.model, x))  # the seed matters


@pytest.mark.parametrize(("name", "layer"), [(TOY, None), (TOY, "block"), ("resnet18", None)])
def test_rebuilt_from_an_exports_record_computes_what_was_exported(
    toy: ToyFamily, image_folder: Path, tmp_path: Path, name: str, layer: str | None
) -> None:
    """MODEL.json's record gives the bare architecture (random init, another seed); with the backbone's tensors of
    MODEL.safetensors loaded, it computes the original backbone's features."""
    feats = _extract(image_folder, tmp_path / "f.h5", backbone=name, seed=3, layers=layer)
    head_dir = tmp_path / "head"
    train_head(feats, HeadConfig(head="linear", epochs=2, device="cpu", layer=layer), out=head_dir)
    model = tmp_path / "m.pt2"
    export_model(head_dir, model)
    meta = read_export_meta(sidecar_paths(model)[1])
    rebuilt = rebuild_backbone(meta.backbone_record())
    state = load_file(sidecar_paths(model)[0])
    head_prefix, body_prefix = meta.head_path + ".", "backbone." if meta.layers else ""
    body = {k[len(body_prefix) :]: v for k, v in state.items() if not k.startswith(head_prefix)}
    x = torch.randn(2, 3, 32, 32)
    original = with_outputs(
        load_backbone(name, weights="none", image_size=32, seed=3), layers=[layer] if layer else None
    )
    assert not torch.allclose(_outputs(rebuilt.model, x), _outputs(original.model, x))  # not the weights yet
    missing, unexpected = rebuilt.model.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith(meta.classifier_path + ".") for k in missing)
    torch.testing.assert_close(_outputs(rebuilt.model.eval(), x), _outputs(original.model, x), rtol=0, atol=0)


def test_a_record_that_differs_from_what_the_family_builds_is_one_line(toy: ToyFamily) -> None:
    pre = Preprocessing(resize_size=28, crop_size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    good = BackboneRecord(TOY, pre, weights="none(seed=1)", feature_dim=12, classifier_path="fc")
    assert rebuild_backbone(good).weights == "none(seed=1)"
    cases = {
        "preprocessing": (BackboneRecord(TOY, Preprocessing(28, 24), weights="none(seed=1)"), "differs from"),
        "width": (BackboneRecord(TOY, pre, weights="none(seed=1)", feature_dim=13), "gives 12-d features"),
        "classifier": (BackboneRecord(TOY, pre, classifier_path="head"), "classifier is 'fc', not 'head'"),
        "layer": (BackboneRecord(TOY, pre, layers=("nowhere",)), "has no node 'nowhere'"),
        "weights file": (BackboneRecord(TOY, pre, weights="file:" + "0" * 64, weights_source="/gone.pt"), "not found"),
    }
    for what, (record, fragment) in cases.items():
        with pytest.raises(PipelineError, match=fragment) as e:
            rebuild_backbone(record)
        assert "\n" not in str(e.value), what


def test_one_preprocessing_decoder_checks_every_field() -> None:
    pre = Preprocessing(resize_size=40, crop_size=32, resize="full")
    assert Preprocessing.from_dict(pre.as_dict()) == pre
    for bad, fragment in [
        ({**pre.as_dict(), "std": [0.2, 0, 0.2]}, "std must be 3 positive"),
        ({**pre.as_dict(), "mean": [0.5, 0.5]}, "mean must be 3"),
        ({**pre.as_dict(), "crop_size": "32"}, "crop_size must be"),
        ({}, "must have the keys"),
    ]:
        with pytest.raises(PipelineError, match=fragment):
            Preprocessing.from_dict(bad)


def test_only_the_timm_family_reads_the_timm_prefix() -> None:
    """Naming is the registry's: no module outside the timm family branches on a ``timm:`` backbone name (store's
    weights identity has its own ``timm:ARCH.TAG`` text, which is not a backbone name)."""
    import pipeline

    root = Path(pipeline.__file__).parent
    allowed = {root / "stage1" / "timm_models.py", root / "store.py", root / "store"}
    found = [
        f"{path.relative_to(root)}:{n}"
        for path in sorted(root.rglob("*.py"))
        if path not in allowed and path.parent not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "TIMM_PREFIX" in line or 'startswith("timm:")' in line or "startswith('timm:')" in line
    ]
    assert not found, found
