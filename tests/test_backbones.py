"""Backbones: classifier stripped, dimension discovered, frozen, seeded, and weights files checked."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

from pipeline.errors import PipelineError
from pipeline.stage1.backbones import Preprocessing, load_backbone


@pytest.mark.parametrize(
    ("name", "dim", "classifier"),
    [("resnet18", 512, "fc"), ("mobilenet_v2", 1280, "classifier.1"), ("efficientnet_b0", 1280, "classifier.1")],
)
def test_classifier_becomes_identity_and_dim_is_discovered(name: str, dim: int, classifier: str) -> None:
    bb = load_backbone(name, weights="none", image_size=32)
    assert bb.feature_dim == dim
    assert bb.classifier_path == classifier
    out = bb.model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, dim)


def test_model_is_frozen_in_eval_mode() -> None:
    bb = load_backbone("resnet18", weights="none", image_size=32)
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    bn = bb.model.bn1
    before = bn.running_mean.clone()
    with torch.inference_mode():
        bb.model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(bn.running_mean, before)  # BatchNorm statistics did not move


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone("resnet18", weights="none", image_size=32, seed=7)
    after = torch.rand(1)
    b = load_backbone("resnet18", weights="none", image_size=32, seed=7)
    c = load_backbone("resnet18", weights="none", image_size=32, seed=8)
    assert torch.equal(after, expected_next)
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)
    assert a.weights == "none(seed=7)"


def test_preprocessing_comes_from_the_weights_and_image_size_keeps_the_ratio() -> None:
    t = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert (t.resize_size[0], t.crop_size[0]) == (256, 224)
    pre = Preprocessing().with_crop(112)
    assert (pre.resize_size, pre.crop_size) == (128, 112)


def test_grayscale_and_rgba_inputs_come_out_rgb() -> None:
    from PIL import Image

    from pipeline.stage1.datasets import to_rgb

    pre = Preprocessing().with_crop(32)
    for mode in ("L", "RGBA", "P", "I;16", "CMYK"):
        img = to_rgb(Image.new(mode, (50, 40)))
        assert pre.geometry(img).shape == (3, 32, 32), mode


def test_local_state_dict_loads_and_changes_the_features(tmp_path: Path) -> None:
    donor = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(donor.conv1.weight, 0.01)
    path = tmp_path / "r18.pt"
    torch.save(donor.state_dict(), path)
    bb = load_backbone("resnet18", weights=str(path), image_size=32)
    assert torch.equal(bb.model.conv1.weight, donor.conv1.weight)
    assert bb.weights.startswith("file:") and len(bb.weights) == len("file:") + 64


def test_state_dict_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "mnv2.pt"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(PipelineError, match="does not fit ResNet"):
        load_backbone("resnet18", weights=str(path), image_size=32)


def test_shape_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(PipelineError, match=r"conv1.weight has shape \(64, 3, 5, 5\)"):
        load_backbone("resnet18", weights=str(path), image_size=32)


def test_not_a_state_dict_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(PipelineError, match="not a state_dict"):
        load_backbone("resnet18", weights=str(path))
    with pytest.raises(PipelineError, match="weights file not found"):
        load_backbone("resnet18", weights=str(tmp_path / "nope.pt"))


def test_unknown_backbone_and_weights_list_the_choices() -> None:
    with pytest.raises(PipelineError, match="unknown backbone 'resnet19'; choose one of: .*resnet18"):
        load_backbone("resnet19", weights="none")
    with pytest.raises(PipelineError, match="choose one of: IMAGENET1K_V1, DEFAULT"):
        load_backbone("resnet18", weights="IMAGENET9K")


def test_offline_download_says_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(PipelineError) as e:
        load_backbone("resnet18", weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg and "--weights PATH" in msg


def test_resize_mode_travels_with_the_preprocessing() -> None:
    bb = load_backbone("resnet18", weights="none", image_size=32, resize="full")
    assert bb.preprocess.resize == "full" and bb.preprocess.with_crop(48).resize == "full"
    assert bb.preprocess.resized_size(10, 40) == (32, 32)  # the whole image, squashed to the crop
    crop = load_backbone("resnet18", weights="none", image_size=32).preprocess
    for h, w in ((10, 40), (40, 10), (7, 23), (33, 33)):  # torchvision's Resize(37) rule on a PIL image
        width, height = TF.resize(Image.new("L", (w, h)), [crop.resize_size]).size
        assert crop.resized_size(h, w) == (height, width)
    with pytest.raises(PipelineError, match="unknown resize mode"):
        load_backbone("resnet18", weights="none", image_size=32, resize="stretch")
