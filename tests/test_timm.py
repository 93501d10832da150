"""timm backbones (``--backbone timm:NAME``): timm's own test-size ViT and ConvNeXt, random init or local files,
never a download. Extract -> train-head -> export -> predict gives the head's answers on the cached features."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.deploy.export import export_model
from pipeline.deploy.predict import load_classifier, predict, read_image
from pipeline.errors import PipelineError
from pipeline.stage1.backbones import load_backbone
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.heads import HeadConfig, load_head
from pipeline.stage2.train import train_head
from pipeline.store import WeightsIdentity, read_features, read_meta
from tests.conftest import TINY_ARGS, TINY_EXTRACT, assert_one_line_error, run, write_image_folder

timm = pytest.importorskip("timm")

VIT, CONVNEXT = "timm:test_vit", "timm:test_convnext"  # timm's own test-size models (~0.2-0.3 M parameters)
MODELS = {VIT: ("logreg", "head"), CONVNEXT: ("mlp", "head.fc")}  # head trained on it, where its classifier sat


def _features(backbone: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone.model(x)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """For each model: features of a tiny folder at 32 px (random init), a head trained on them, the export."""
    root = tmp_path_factory.mktemp("timm")
    images = write_image_folder(root / "images", per_class=6)
    out: dict[str, Any] = {"images": images}
    for name, (head, _) in MODELS.items():
        stem = name.split(":")[1]
        feats, head_dir = root / f"{stem}.h5", root / "heads" / stem
        extract(ExtractConfig(dataset=str(images), out=str(feats), **{**TINY_EXTRACT, "backbone": name}))
        train_head(feats, HeadConfig(head=head, epochs=3, hidden=16, device="cpu"), out=head_dir)
        result = export_model(head_dir, root / f"{stem}.pt2")
        out[name] = {"features": feats, "head": head_dir, "export": result}
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_extract_records_the_timm_model_and_its_data_config(pipeline_run: dict[str, Any], name: str) -> None:
    model = timm.create_model(name[5:], num_classes=0)
    cfg = timm.data.resolve_model_data_config(model)
    meta = read_meta(pipeline_run[name]["features"])
    assert meta.backbone == name and meta.weights == "none(seed=0)"
    assert meta.versions["timm"] == timm.__version__  # its model code computed the features
    assert meta.feature_dim == model.num_features == 64
    pre = meta.preprocessing
    # timm's eval recipe at a 32 px crop: shorter side to floor(32 / crop_pct), its interpolation, mean and std
    assert pre["crop_size"] == 32 and pre["resize_size"] == math.floor(32 / cfg["crop_pct"]) == 33
    assert pre["interpolation"] == cfg["interpolation"] == "bicubic"
    assert tuple(pre["mean"]) == tuple(cfg["mean"]) and tuple(pre["std"]) == tuple(cfg["std"])
    assert pre["mean"] != [0.485, 0.456, 0.406]  # not the torchvision default: the model's own (0.5)


def test_default_size_and_classifier_path_come_from_the_model() -> None:
    bb = load_backbone(CONVNEXT, weights="none")
    assert bb.preprocess.crop_size == 160 and bb.preprocess.resize_size == math.floor(160 / 0.95)
    assert bb.classifier_path == "head.fc" and bb.feature_dim == 64
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training


def test_random_init_is_seeded_and_leaves_the_callers_rng_alone() -> None:
    x = torch.randn(2, 3, 32, 32)
    state = torch.random.get_rng_state()
    a, b = (load_backbone(VIT, weights="none", image_size=32, seed=3) for _ in range(2))
    other = load_backbone(VIT, weights="none", image_size=32, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(_features(a, x), _features(b, x))
    assert not torch.allclose(_features(a, x), _features(other, x))
    assert a.weights == "none(seed=3)"


@pytest.mark.parametrize("name", list(MODELS))
def test_export_and_predict_give_the_heads_answers(pipeline_run: dict[str, Any], name: str) -> None:
    run_ = pipeline_run[name]
    result = run_["export"]
    assert result.max_abs_diff < 1e-4
    clf = load_classifier(result.program, device="cpu")
    head, _ = load_head(run_["head"])
    fs = read_features(run_["features"])
    images = pipeline_run["images"]
    batch = torch.stack([read_image(images / rel, clf.preprocess) for rel in fs.train.ids])
    with torch.inference_mode():
        exported = clf.module(clf.preprocess.normalize(batch)).numpy()
    cached = head.logits(fs.train.features)
    np.testing.assert_allclose(exported, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())
    # predict's CSV: the head's argmax on the cached features of the same images
    out = predict(clf, [images], out=result.program.parent / f"{name[5:]}.csv", progress=False)
    with open(out.out, newline="") as fh:
        rows = {r["path"]: r["class"] for r in csv.DictReader(fh)}
    expected = {str(images / rel): fs.classes[k] for rel, k in zip(fs.train.ids, cached.argmax(1))}
    assert out.n_images == 18 and {p: rows[p] for p in expected} == expected
    meta = result.meta.read_text()
    assert "timm.create_model" in meta and '"timm": "' in meta  # how to load it elsewhere, and timm's version


# ------------------------------------------------------------------------------------------ weights files


def _saved_state(seed: int) -> dict[str, torch.Tensor]:
    """A seeded test_vit's full state_dict, classifier included (1000 classes): what a user's file holds."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in timm.create_model("test_vit", num_classes=1000).state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    state = _saved_state(5)
    path = tmp_path / f"w{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    bb = load_backbone(VIT, weights=str(path), image_size=32)
    assert WeightsIdentity.parse(bb.weights).kind == "file"
    assert torch.equal(bb.model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    # position embeddings: loaded at the model's 160 px, then resampled to the 32 px crop (2 x 2 patches + cls)
    assert bb.model.pos_embed.shape[1] == 1 + 2 * 2
    random = load_backbone(VIT, weights="none", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(_features(bb, x), _features(random, x))


def test_a_file_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(PipelineError, match="does not fit"):
        load_backbone(VIT, weights=str(path))


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    torch.save({**_saved_state(0), "evil": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(PipelineError, match="cannot load weights file"):
        load_backbone(VIT, weights=str(path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ pretrained weights


def _fake_hub_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """What ``hf download REPO`` leaves in the Hugging Face cache: refs/main -> snapshots/<commit>/FILE."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(state, folder / "snapshots" / commit / "model.safetensors")
    return folder


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with HF_HUB_OFFLINE on: nothing can be downloaded."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_pretrained_offline_without_the_file_is_one_line(offline_cache: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(PipelineError) as e:
        load_backbone(VIT)  # the default --weights: the model's pretrained weights
    message = str(e.value)
    assert "\n" not in message and time.perf_counter() - t0 < 10  # no network retries
    assert "hf download timm/test_vit.r160_in1k" in message and "--weights PATH" in message
    assert str(offline_cache / "models--timm--test_vit.r160_in1k") in message


def test_pretrained_weights_come_from_the_cache_without_network(offline_cache: Path) -> None:
    state = {k: v for k, v in _saved_state(7).items() if not k.startswith("head.")}
    _fake_hub_cache(offline_cache, "timm/test_vit.r160_in1k", state)
    for weights in ("pretrained", "IMAGENET1K_V1", "DEFAULT"):
        bb = load_backbone(VIT, weights=weights)
        assert bb.weights == "timm:test_vit.r160_in1k"
        assert torch.equal(bb.model.state_dict()["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"])
    assert WeightsIdentity.parse(bb.weights).argument == "pretrained"


def test_list_weights_shows_the_tags_and_whether_they_load_offline(offline_cache: Path, capsys) -> None:
    code, out, _ = run(["list", "weights", "--backbone", VIT], capsys)
    assert code == 0 and "--backbone timm:test_vit.r160_in1k" in out and "downloaded on first use" in out
    state = {k: v for k, v in _saved_state(7).items() if not k.startswith("head.")}
    _fake_hub_cache(offline_cache, "timm/test_vit.r160_in1k", state)
    code, out, _ = run(["list", "weights", "--backbone", VIT], capsys)
    assert code == 0 and "cached, works offline" in out and "none" in out


def test_export_refuses_when_the_rebuilt_weights_differ(
    pipeline_run: dict[str, Any], offline_cache: Path, tmp_path: Path
) -> None:
    """What export rebuilds must be what made the features: here the features name a tag that timm's default
    (what ``pretrained`` loads for a bare name) no longer is."""
    import json
    import shutil

    _fake_hub_cache(offline_cache, "timm/test_vit.r160_in1k", {k: v for k, v in _saved_state(1).items()
                                                               if not k.startswith("head.")})  # fmt: skip
    head_dir = shutil.copytree(pipeline_run[VIT]["head"], tmp_path / "head")
    config = json.loads((head_dir / "config.json").read_text())
    (head_dir / "config.json").write_text(json.dumps({**config, "weights": "timm:test_vit.older_tag"}))
    with pytest.raises(PipelineError, match="has weights timm:test_vit.r160_in1k; .* timm:test_vit.older_tag"):
        export_model(head_dir, tmp_path / "m.pt2")


def test_a_model_without_pretrained_weights_says_so(offline_cache: Path) -> None:
    with pytest.raises(PipelineError, match="no pretrained weights in timm"):
        load_backbone("timm:test_coatnet")  # tag 'untrained'


def test_weights_identity_round_trips() -> None:
    identity = WeightsIdentity.parse("timm:convnext_tiny.fb_in1k")
    assert (identity.kind, identity.value, identity.argument) == ("timm", "convnext_tiny.fb_in1k", "pretrained")
    assert str(identity) == "timm:convnext_tiny.fb_in1k" and identity.label() == "convnext_tiny.fb_in1k"
    with pytest.raises(PipelineError, match="cannot tell"):
        WeightsIdentity.parse("timm:")


# ------------------------------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize(
    ("name", "weights", "fragments"),
    [
        ("timm:test_vi", "none", ["unknown timm model 'test_vi'", "timm:test_vit"]),
        ("timm:test_vit.bogus", "none", ["no tag 'bogus'", "timm:test_vit.r160_in1k"]),
        (VIT, "IMAGENET1K_V2", ["unknown weights", "pretrained, none"]),
    ],
)
def test_bad_names_are_one_line(name: str, weights: str, fragments: list[str]) -> None:
    with pytest.raises(PipelineError) as e:
        load_backbone(name, weights=weights)
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)


def test_without_timm_a_timm_name_is_one_line_naming_the_extra(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    args = [a if a != "resnet18" else VIT for a in TINY_ARGS]
    code, _, err = run(["extract", "--dataset", str(image_folder), "--out", str(tmp_path / "f.h5"), *args], capsys)
    assert_one_line_error(code, err, "timm:NAME needs timm", "pip install -e '.[timm]'")
    assert load_backbone("resnet18", weights="none", image_size=32).feature_dim == 512  # torchvision unaffected
