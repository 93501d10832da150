"""The tail head (issue 17 item 3): the backbone cut after a node (torch.fx), trained on cached activation maps,
put back into the backbone by export."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.deploy.export import export_model
from pipeline.deploy.predict import load_classifier, predict
from pipeline.errors import PipelineError
from pipeline.stage1.backbones import load_backbone
from pipeline.stage1.datasets import load_image
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.stage1.tail import put_back, tail_after
from pipeline.stage2.heads import HEAD_FILE, HeadConfig, TailHead, load_head
from pipeline.stage2.heads import tail as tail_module
from pipeline.stage2.heads.tail import ActivationRows, build_tail, with_activations
from pipeline.stage2.train import compare, fit_and_evaluate, train_head
from pipeline.store import read_features
from tests.conftest import TINY_EXTRACT, assert_one_line_error, run, write_image_folder

NODE = "layer3"


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-class image folder, its resnet18 features (random init, 32 px) with layer3 activations, and a trained
    tail head."""
    root = tmp_path_factory.mktemp("tail")
    images = write_image_folder(root / "images", per_class=8)
    feats = root / "resnet18.h5"
    extract(ExtractConfig(dataset=str(images), out=str(feats), cache_at=NODE, **TINY_EXTRACT))
    head_dir = root / "heads" / "tail"
    train_head(feats, HeadConfig(head="tail", epochs=4, batch_size=8, lr=1e-3, device="cpu"), out=head_dir)
    return {"root": root, "images": images, "features": feats, "head": head_dir}


# ------------------------------------------------------------------------------------------ the cut


@pytest.mark.parametrize(
    ("backbone", "node"),
    [
        ("resnet18", "layer3"),
        ("resnet18", "layer4.0"),
        ("mobilenet_v2", "features.16"),
        ("mobilenet_v2", "features.17"),
    ],
)
def test_tail_after_node_equals_the_backbone(backbone: str, node: str) -> None:
    model = load_backbone(backbone, weights="none", image_size=64, seed=1).model
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        whole = model(x)
        tail = tail_after(model, node)
        out = tail(create_feature_extractor(model, {node: "a"})(x)["a"])
    torch.testing.assert_close(out, whole, rtol=0, atol=0)  # the same operations on the same values
    state, full = tail.state_dict(), model.state_dict()
    assert state and all(torch.equal(v, full[k]) for k, v in state.items())  # the backbone's own names and values
    assert not any(k.startswith(("conv1.", "layer1.", "features.0.")) for k in state)  # nothing from before the cut
    with torch.no_grad():
        next(iter(tail.parameters())).add_(1.0)
    assert torch.equal(model.state_dict()[next(iter(state))], full[next(iter(state))])  # a copy, not a view


def test_a_cut_across_a_skip_connection_or_an_unknown_node_is_refused() -> None:
    model = load_backbone("resnet18", weights="none", image_size=32).model
    with pytest.raises(PipelineError, match=r"cannot cut at 'layer3.0.conv1': .* uses layer2.1.relu_1"):
        tail_after(model, "layer3.0.conv1")  # layer3.0's residual branch starts before the cut
    with pytest.raises(PipelineError, match="no node 'layer9'"):
        tail_after(model, "layer9")


def test_put_back_loads_a_tail_into_the_backbone() -> None:
    model = load_backbone("resnet18", weights="none", image_size=32).model
    state = {k: v + 1 for k, v in tail_after(model, NODE).state_dict().items() if v.is_floating_point()}
    other = load_backbone("resnet18", weights="none", image_size=32).model
    put_back(other, state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(PipelineError, match="not a tensor of this backbone"):
        put_back(other, {"layer9.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------ the head


def test_the_fixture_activations_give_the_files_features(cached: dict[str, Path]) -> None:
    """The fixture is sound: the tail on the stored (float16) maps gives the features extract stored."""
    fs = read_features(cached["features"])
    acts = with_activations(fs).val.features
    tail = build_tail(fs.meta)
    with torch.inference_mode():
        out = tail(torch.as_tensor(acts.source.read(acts.rows), dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out, fs.val.features, rtol=0, atol=2e-2 * np.abs(fs.val.features).max())


def test_tail_head_learns_and_saves_its_blocks(cached: dict[str, Path]) -> None:
    metrics = read_json(cached["head"] / "metrics.json")
    history = metrics["history"]
    assert len(history) == 4 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["val_accuracy"] >= 0.8 and metrics["train_accuracy"] >= 0.8  # 3 colour classes, chance 0.33
    state = load_file(str(cached["head"] / HEAD_FILE))
    assert state["weight"].shape == (3, 512) and "tail.layer4.1.conv2.weight" in state
    assert not any(k.startswith("tail.layer3.") for k in state)
    config = read_json(cached["head"] / "config.json")
    assert config["activations"]["node"] == NODE and config["head_config"]["train_bn"] is False


def test_batchnorm_is_frozen_unless_asked(cached: dict[str, Path]) -> None:
    fs = with_activations(read_features(cached["features"]))
    before = build_tail(fs.meta).state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats
    for train_bn, moved in ((False, False), (True, True)):
        head = TailHead(HeadConfig(head="tail", epochs=1, train_bn=train_bn), num_classes=3, feature_dim=512)
        head.fit(fs.train.features, fs.train.labels)
        same = [np.array_equal(head.tail_state[k], before[k].numpy()) for k in stats]
        assert (not all(same)) is moved
        conv = "layer4.0.conv1.weight"
        assert not np.array_equal(head.tail_state[conv], before[conv].numpy())  # the block itself trained


def test_blocks_read_each_row_once_in_any_order(cached: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Large activations are read per block: every row once, each with its own map, for any subset of rows."""
    fs = with_activations(read_features(cached["features"]))
    whole = fs.train.features.source.read(np.arange(len(fs.train)))
    monkeypatch.setattr(tail_module, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(tail_module, "BLOCK_BYTES", 3 * whole[0].nbytes)  # 3 rows a block
    fresh = with_activations(read_features(cached["features"])).train.features
    subset = fresh[np.array([7, 2, 3, 4, 15, 0])]  # unordered, partly consecutive
    seen = []
    for positions, maps in subset.blocks(rng=np.random.default_rng(0)):
        assert len(positions) <= 3
        np.testing.assert_array_equal(maps, whole[subset.rows[positions]])
        seen += positions.tolist()
    assert sorted(seen) == list(range(len(subset)))
    assert fresh.source.array is None  # never held whole


def test_export_and_predict_reproduce_the_heads_predictions(cached: dict[str, Path], tmp_path: Path) -> None:
    result = export_model(cached["head"], tmp_path / "model.pt2")
    assert result.max_abs_diff < 1e-4
    head, _ = load_head(cached["head"])
    fs = with_activations(read_features(cached["features"]))
    cached_logits = head.logits(fs.val.features)  # rebuilt from the saved tensors and the file's backbone
    clf = load_classifier(result.program, device="cpu")
    batch = torch.stack([clf.preprocess.geometry(load_image(cached["images"] / i)) for i in fs.val.ids])
    with torch.inference_mode():
        exported = clf.module(clf.preprocess.normalize(batch)).numpy()
    # the head saw float16 maps, the exported model computes them in float32
    np.testing.assert_allclose(exported, cached_logits, rtol=0, atol=2e-2 * np.abs(cached_logits).max())
    assert (exported.argmax(1) == cached_logits.argmax(1)).all()
    out = tmp_path / "pred.csv"
    predict(result.program, [cached["images"] / i for i in fs.val.ids], out=out, progress=False, device="cpu")
    with open(out, newline="") as fh:
        predicted = [row["class"] for row in csv.DictReader(fh)]
    assert predicted == [fs.classes[k] for k in cached_logits.argmax(1)]


def test_a_file_without_activations_is_one_line(cached: dict[str, Path], tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain.h5"
    extract(ExtractConfig(dataset=str(cached["images"]), out=str(plain), **TINY_EXTRACT))
    code, _, err = run(["train-head", "--features", str(plain), "--head", "tail", "--out", str(tmp_path / "t")], capsys)
    assert_one_line_error(code, err, "holds no activation maps", "--cache-at NODE")
    assert not (tmp_path / "t").exists()
    result = compare(plain, heads=["centroid", "tail"], base=HeadConfig(head="centroid"), out=tmp_path / "c")
    assert [r["head"] for r in result["rows"]] == ["centroid"]  # tail skipped: nothing to train it on
    with pytest.raises(PipelineError, match="--cache-at NODE"):
        compare(plain, heads=["tail"], base=HeadConfig(head="tail"), out=tmp_path / "c2")


def test_compare_includes_tail_when_the_file_has_activations(cached: dict[str, Path], tmp_path: Path) -> None:
    base = HeadConfig(head="centroid", epochs=2, device="cpu")
    result = compare(cached["features"], heads=["centroid", "tail"], base=base, out=tmp_path / "c")
    assert [r["head"] for r in result["rows"]] == ["centroid", "tail"]
    assert (tmp_path / "c" / "tail" / HEAD_FILE).is_file()


def test_tail_head_takes_few_shot_samples(cached: dict[str, Path]) -> None:
    fs = read_features(cached["features"])
    head, metrics, _ = fit_and_evaluate(fs, HeadConfig(head="tail", epochs=1, shots=2, device="cpu"))
    assert metrics["n_train_used"] == 6 and isinstance(head, TailHead)


def test_in_memory_activations(cached: dict[str, Path]) -> None:
    fs = with_activations(read_features(cached["features"]))
    maps = fs.train.features.source.read(np.arange(len(fs.train)))
    rows = ActivationRows.in_memory(maps, fs.meta)
    head = TailHead(HeadConfig(head="tail", epochs=1), num_classes=3, feature_dim=512)
    head.fit(rows, fs.train.labels)
    assert head.logits(rows).shape == (len(maps), 3)


def read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


def test_the_benchmarks_recompute_loop_trains_like_the_cached_one(cached: dict[str, Path]) -> None:
    """bench.tail's loop without a cache (the front run at every read) is the tail head's own loop: on the same
    (float32) maps it ends with the same history."""
    from pipeline.bench.tail import RecomputedActivations, _front, _images, run_front

    fs = read_features(cached["features"])
    front, pre = _front(fs.meta, NODE)
    images = _images(fs.train.ids, root=cached["images"], pre=pre)
    live = RecomputedActivations(images=images, front=front, pre=pre, meta=fs.meta, split="train")
    stored = ActivationRows.in_memory(run_front(front, images, pre=pre), fs.meta)
    histories = []
    for rows in (ActivationRows(live, np.arange(len(images))), stored):
        head = TailHead(HeadConfig(head="tail", epochs=2, batch_size=8), num_classes=3, feature_dim=512)
        histories.append(head.fit(rows, fs.train.labels).history)
    assert histories[0] == histories[1] and len(histories[0]) == 2


def test_a_missing_weights_file_is_one_line(cached: dict[str, Path]) -> None:
    meta = read_features(cached["features"]).meta
    moved = type(meta).from_dict({**meta.as_dict(), "weights": "file:" + "0" * 64, "config": {"weights": "/gone.pt"}})
    with pytest.raises(PipelineError, match=r"tail head starts from the backbone .* \(/gone.pt\); not found"):
        build_tail(moved)
