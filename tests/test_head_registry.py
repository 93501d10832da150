"""A head is one module plus one registry entry: a toy head registered that way (the registry monkeypatched, the
module this file) trains through train-head and compare, and exports with its own nn.Module layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.deploy.export import export_model, read_export_meta
from pipeline.deploy.predict import load_classifier, read_image
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage2.heads import HeadConfig, load_head, registry
from pipeline.stage2.heads.base import FitResult, Head
from pipeline.stage2.heads.knobs import MLPKnobs
from pipeline.stage2.training import train_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT, run, write_image_folder


class ToyHead(Head):
    """Nearest class mean through a rank-``hidden`` bottleneck: ``Linear(D, r) -> Linear(r, C)``, r = min(hidden,
    C), from the SVD of the class-mean layer (exact when hidden >= C). Not one nn.Linear, so export must record
    its shape (``layer_record``) and rebuild it (``from_layer_record``)."""

    name = "toy"

    def _module(self) -> nn.Sequential:
        r = min(self.cfg.hidden, self.num_classes)
        return nn.Sequential(nn.Linear(self.feature_dim, r), nn.Linear(r, self.num_classes)).eval()

    def fit(self, X: np.ndarray, y: np.ndarray, *, val: object = None) -> FitResult:
        means = np.stack([X[y == c].mean(0) for c in range(self.num_classes)]).astype(np.float64)
        weight, bias = 2 * means, -(means**2).sum(1)
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        r = min(self.cfg.hidden, self.num_classes)
        self.module = self._module()
        with torch.no_grad():
            self.module[0].weight.copy_(torch.as_tensor(vt[:r]))
            self.module[0].bias.zero_()
            self.module[1].weight.copy_(torch.as_tensor(u[:, :r] * s[:r]))
            self.module[1].bias.copy_(torch.as_tensor(bias))
        return FitResult(info={"rank": r})

    @torch.no_grad()
    def logits(self, X: np.ndarray) -> np.ndarray:
        return self.module(torch.as_tensor(np.asarray(X, np.float32))).numpy()

    def as_module(self) -> nn.Module:
        return self.module

    def layer_record(self) -> dict[str, int]:
        return {"hidden": self.cfg.hidden}

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.module.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.module = self._module()
        self.module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})


TOY = registry.HeadSpec(
    "toy", f"{__name__}:ToyHead", "Nearest class mean through a low-rank bottleneck (a test's toy)",
    knobs=(MLPKnobs,), advice="try a smaller --hidden",
)  # fmt: skip


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.HEADS, "toy", TOY)  # the one registry entry


def test_toy_head_trains_compares_and_is_listed(toy: None, feature_file: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run(["list", "heads"], capsys)
    assert code == 0 and "toy" in out and "low-rank bottleneck" in out
    code, out, err = run(["train-head", "--features", str(feature_file), "--head", "toy", "--hidden", "2",
                          "--out", str(tmp_path / "h")], capsys)  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["head_config"] == {"head": "toy", "hidden": 2, "dropout": 0.5}  # its knobs, and only those
    metrics = json.loads((tmp_path / "h" / "metrics.json").read_text())
    assert metrics["rank"] == 2 and 0.0 <= metrics["val_accuracy"] <= 1.0
    head, _ = load_head(tmp_path / "h")
    assert isinstance(head, ToyHead) and head.module[0].out_features == 2
    code, out, err = run(["compare", "--features", str(feature_file), "--heads", "toy,centroid", "--hidden", "16",
                          "--out", str(tmp_path / "c")], capsys)  # fmt: skip
    assert code == 0, err
    rows = {r["head"]: r for r in json.loads((tmp_path / "c" / "compare.json").read_text())["rows"]}
    # with full rank the toy is the nearest class mean exactly: the same predictions as the centroid head
    assert rows["toy"]["val_accuracy"] == pytest.approx(rows["centroid"]["val_accuracy"])
    assert "| toy |" in out


def test_toy_head_exports_its_own_layer(toy: None, tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=4)
    feats = tmp_path / "f.h5"
    extract(ExtractConfig(dataset=str(images), out=str(feats), **TINY_EXTRACT))
    train_head(feats, HeadConfig(head="toy", hidden=2), out=tmp_path / "h")
    result = export_model(tmp_path / "h", tmp_path / "m.pt2")
    assert result.max_abs_diff < 1e-4
    meta = read_export_meta(result.meta)
    assert meta.head_layer.type == "toy" and meta.head_layer.knobs == {"hidden": 2}
    clf = load_classifier(tmp_path / "m.pt2", device="cpu")  # rebuilt from MODEL.json + the tensors
    head, _ = load_head(tmp_path / "h")
    fs = read_features(feats)
    batch = torch.stack([read_image(images / rel, clf.preprocess) for rel in fs.val.ids])
    with torch.inference_mode():
        exported = clf.module(clf.preprocess.normalize(batch)).numpy()
    cached = head.logits(fs.val.features)
    np.testing.assert_allclose(exported, cached, rtol=1e-4, atol=1e-4 * np.abs(cached).max())
