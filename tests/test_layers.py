"""Issue 17, stage one: features from named layers (--layers) and cached activation maps (--cache-at): what the
file holds equals the node outputs computed directly, it is resumed and merged like the features, and a plain
run is unchanged."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import pipeline.stage1.extract as ex
from pipeline.errors import PipelineError
from pipeline.stage1.backbones import Backbone, Preprocessing, load_backbone, pool, with_outputs
from pipeline.stage1.distributed import extract_distributed
from pipeline.stage1.extract import ExtractConfig, ExtractInterrupted, default_out, extract, plan_extraction
from pipeline.store import (
    AUDIT_COLUMNS,
    FeatureWriter,
    fingerprint,
    read_activations,
    read_features,
    read_meta,
    tmp_path_for,
)
from tests.conftest import TINY_ARGS, TINY_EXTRACT, assert_one_line_error, run, write_image_folder
from tests.test_reliability import one_thread  # noqa: F401 - autouse: one torch thread in this module

# resnet18 at 64 px: layer3 is 256 x 4 x 4, layer4 512 x 2 x 2 (at 32 px layer4 would be 1 x 1: pooling untested)
SETTINGS = {**TINY_EXTRACT, "image_size": 64}
# Rows computed in batches of another composition differ in the last bits on CPU (see test_distributed.py).
ATOL = 1e-5


def _cfg(folder: Path, out: Path, **kw: object) -> ExtractConfig:
    return ExtractConfig(dataset=str(folder), out=str(out), **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 7 images: 18 train / 3 val."""
    return write_image_folder(tmp_path_factory.mktemp("layers") / "img", per_class=7)


def _direct(folder: Path, ids: list[str], nodes: list[str]) -> dict[str, torch.Tensor]:
    """The node outputs for these images, computed without the pipeline's extraction: PIL preprocessing, a fresh
    backbone of the same seed, torchvision's feature extractor."""
    bb = load_backbone("resnet18", weights="none", image_size=64)
    pre = bb.preprocess
    batch = torch.stack([pre.geometry(Image.open(folder / i).convert("RGB")) for i in ids])
    body = create_feature_extractor(bb.model, return_nodes=nodes).eval()
    with torch.inference_mode():
        return body(pre.normalize(batch))


def test_layers_are_the_pooled_node_outputs_and_cache_at_the_map(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    extract(_cfg(folder, out, layers="layer3,layer4", cache_at="layer3"))
    meta = read_meta(out)
    assert meta.layers == [{"name": "layer3", "dim": 256}, {"name": "layer4", "dim": 512}]
    assert meta.feature_dim == 768
    assert meta.activations == {"node": "layer3", "shape": [256, 4, 4], "dtype": "float16"}
    fs = read_features(out)
    for name, split in fs.splits.items():
        direct = _direct(folder, list(split.ids), ["layer3", "layer4"])
        expected = torch.cat([direct["layer3"].mean((2, 3)), direct["layer4"].mean((2, 3))], 1).numpy()
        np.testing.assert_allclose(split.features, expected, rtol=1e-4, atol=ATOL)
        maps = read_activations(out, name)
        assert maps.dtype == np.float16 and maps.shape == (len(split), 256, 4, 4)
        np.testing.assert_allclose(maps, direct["layer3"].numpy(), rtol=2e-3, atol=2e-3)  # float16 rounding
        with h5py.File(out) as f:  # the per-layer views: zero-copy column slices of the features
            assert f[name]["layers"]["layer3"].is_virtual
            np.testing.assert_array_equal(f[name]["layers"]["layer3"][()], split.features[:, :256])
            np.testing.assert_array_equal(f[name]["layers"]["layer4"][()], split.features[:, 256:])


def test_a_plain_run_is_unchanged(folder: Path, tmp_path: Path) -> None:
    """No new identity key, no new column, no new name: files written before the options stay valid."""
    cfg = _cfg(folder, tmp_path / "plain.h5")
    plan = plan_extraction(cfg)
    assert set(plan.identity) == {"schema_version", "backbone", "weights", "preprocessing", "dataset", "dtype",
                                  "precision", "preprocess_on"}  # fmt: skip
    # the keys a plain run records at their defaults hash as absent: the fingerprint of a file written before them
    legacy = {k: v for k, v in plan.identity.items() if k != "preprocess_on"}
    legacy["preprocessing"] = {k: v for k, v in legacy["preprocessing"].items() if k != "resize"}
    legacy["dataset"] = {k: v for k, v in legacy["dataset"].items() if k != "verify"}
    as_before = hashlib.sha256(json.dumps(legacy, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert plan.identity["preprocess_on"] == "loader" and plan.identity["dataset"]["verify"] == "stat"
    assert plan.fp == fingerprint(legacy) == as_before
    assert plan.backbone.layers is None and plan.backbone.activations is None
    extract(cfg)
    meta = read_meta(tmp_path / "plain.h5")
    assert meta.layers is None and meta.activations is None and meta.feature_dim == 512
    with h5py.File(tmp_path / "plain.h5") as f:
        # no layer datasets; the audit columns (digests, phash) every extraction now writes are not layers
        assert set(f["train"]) == {"features", "labels", "ids", *AUDIT_COLUMNS}
    plain_name = default_out(replace(cfg, out=None), plan.source, plan.backbone)
    layered = plan_extraction(replace(cfg, out=None, layers="layer3", cache_at="layer2"))
    assert plain_name.name == "img_resnet18_none_img64.h5"
    assert layered.out.name == "img_resnet18_none_img64_Llayer3_atlayer2.h5"
    assert layered.identity["layers"] == ["layer3"] and layered.identity["cache_at"] == "layer2"
    assert layered.fp != plan.fp


def test_cache_at_alone_keeps_the_default_features(folder: Path, tmp_path: Path) -> None:
    plain, cached = tmp_path / "plain.h5", tmp_path / "cached.h5"
    extract(_cfg(folder, plain))
    extract(_cfg(folder, cached, cache_at="layer4"))
    a, b = read_features(plain), read_features(cached)
    assert b.meta.layers is None and b.meta.feature_dim == 512
    for name in ("train", "val"):
        np.testing.assert_allclose(a.splits[name].features, b.splits[name].features, rtol=0, atol=ATOL)
        maps = read_activations(cached, name).astype(np.float32)  # layer4's map pools to the default features
        np.testing.assert_allclose(maps.mean((2, 3)), a.splits[name].features, rtol=2e-3, atol=2e-3)


def test_a_file_of_other_layers_is_stale(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    extract(_cfg(folder, out, layers="layer3"))
    assert extract(_cfg(folder, out, layers="layer3")).reused
    with pytest.raises(PipelineError, match=r"other settings \(layers \['layer3'\] -> \['layer4'\]\)"):
        extract(_cfg(folder, out, layers="layer4"))
    with pytest.raises(PipelineError, match=r"cache_at absent -> layer3"):
        extract(_cfg(folder, out, layers="layer3", cache_at="layer3"))


def test_an_interrupted_run_resumes_with_the_right_activations(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Batches of 2, stopped (Ctrl-C) in the 6th: the 10 train rows before it are committed; the rerun carries
    them (and their maps) into a fresh .tmp and ends with the file of an uninterrupted run."""
    whole, out = tmp_path / "whole.h5", tmp_path / "f.h5"
    kw = {"batch_size": 2, "layers": "layer3,layer4", "cache_at": "layer3"}
    extract(_cfg(folder, whole, **kw))
    real, calls = ex.embed_batch, [0]

    def stop_at_6(*a: object, **k: object) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "embed_batch", stop_at_6)
    with pytest.raises(ExtractInterrupted, match="stopped after 10 of 21 images"):
        extract(_cfg(folder, out, **kw))
    with h5py.File(tmp_path_for(out)) as f:
        assert f["train"]["activations"].shape[0] == 10 == f["train"].attrs["n_rows"]
    monkeypatch.undo()
    result = extract(_cfg(folder, out, **kw))
    assert result.resumed_from == {"train": 10, "val": 0}
    a, b = read_features(whole), read_features(out)
    for name in ("train", "val"):
        assert list(a.splits[name].ids) == list(b.splits[name].ids)
        np.testing.assert_array_equal(a.splits[name].features, b.splits[name].features)
        np.testing.assert_array_equal(read_activations(whole, name), read_activations(out, name))


def test_the_writer_resumes_extra_columns_after_a_crash(tmp_path: Path) -> None:
    """The store alone: rows of an extra column appended after the last commit are lost with the crash, the
    committed ones are carried over, and a column of the wrong shape in the .tmp is refused."""
    rng = np.random.default_rng(0)
    feats, maps = rng.standard_normal((10, 3)).astype(np.float32), rng.standard_normal((10, 2, 3, 3))

    def writer(columns: dict | None = None) -> FeatureWriter:
        return FeatureWriter(tmp_path / "f.h5", meta={"fingerprint": "fp", "feature_dim": 3}, classes=["a"],
                             sizes={"train": 10}, feature_dim=3, flush_every=2,
                             columns=columns or {"maps": ((2, 3, 3), "float16")})  # fmt: skip

    w = writer()
    for i in range(5):  # commits after appends 2 and 4: rows 0..3 on disk, row 4 pending
        w.append("train", feats[i : i + 1], np.zeros(1, np.int64), [str(i)], seen=1, extra={"maps": maps[i : i + 1]})
    w.f.close()  # the crash
    with pytest.raises(PipelineError, match="not their columns"):
        writer({"maps": ((2, 3, 4), "float16")})
    again = writer()
    assert again.seen("train") == 4
    with pytest.raises(ValueError, match="column"):
        again.append("train", feats[4:5], np.zeros(1, np.int64), ["4"], seen=1)  # the column's rows are missing
    for i in range(4, 10):
        again.append(
            "train", feats[i : i + 1], np.zeros(1, np.int64), [str(i)], seen=1, extra={"maps": maps[i : i + 1]}
        )
    again.finish()
    with h5py.File(tmp_path / "f.h5") as f:
        np.testing.assert_array_equal(f["train"]["maps"][()], maps.astype(np.float16))
        assert f["train"]["maps"].chunks[1:] == (2, 3, 3)  # chunks of whole rows
    np.testing.assert_array_equal(read_features(tmp_path / "f.h5", splits=("train",)).train.features, feats)


def test_torchrun_shards_merge_the_activations(folder: Path, tmp_path: Path) -> None:
    single, out = tmp_path / "single.h5", tmp_path / "out.h5"
    kw = {"layers": "layer3,layer4", "cache_at": "layer3"}
    extract(_cfg(folder, single, **kw))
    # Both ranks in this process, sharing one store (as tests/test_distributed.py does without torchrun).
    store, cfg = dist.HashStore(), _cfg(folder, out, **kw)
    store.set("planned", "ok")
    extract_distributed(cfg, rank=1, world=2, store=store, timeout_s=5)
    result = extract_distributed(cfg, rank=0, world=2, store=store, timeout_s=5)
    assert result.path == out and not list(tmp_path.glob("out.h5.shard-*"))
    assert read_meta(out).layers == read_meta(single).layers
    assert read_meta(out).activations == read_meta(single).activations
    a, b = read_features(single), read_features(out)
    for name in ("train", "val"):
        assert list(a.splits[name].ids) == list(b.splits[name].ids)
        np.testing.assert_allclose(a.splits[name].features, b.splits[name].features, rtol=0, atol=ATOL)
        np.testing.assert_allclose(read_activations(single, name), read_activations(out, name), rtol=1e-3, atol=1e-3)
        with h5py.File(out) as f:
            np.testing.assert_array_equal(f[name]["layers"]["layer4"][()], b.splits[name].features[:, 256:])


def test_an_unknown_node_is_one_line_naming_near_ones(folder: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run(["extract", "--dataset", str(folder), *TINY_ARGS, "--out", str(tmp_path / "f.h5"),
                        "--layers", "layer3,layer5"], capsys)  # fmt: skip
    assert_one_line_error(code, err, "resnet18 has no node 'layer5'", "layer4", "inspect --nodes")
    code, _, err = run(["extract", "--dataset", str(folder), *TINY_ARGS, "--cache-at", "fc"], capsys)
    assert_one_line_error(code, err, "--cache-at fc", "not a C x H x W map")
    assert not (tmp_path / "f.h5").exists() and not tmp_path_for(tmp_path / "f.h5").exists()


def test_cache_at_is_refused_up_front_without_room(folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ex, "free_bytes", lambda folder: 2_000_000)
    out = tmp_path / "f.h5"
    with pytest.raises(PipelineError) as e:
        extract(_cfg(folder, out, cache_at="layer1", image_size=224))  # 64 x 56 x 56 x 2 bytes = 401 KB per image
    assert str(e.value) == (
        f"--cache-at layer1 stores 401 KB per image, 8.5 MB for 21 images; {tmp_path} has 2.0 MB free"
    )
    assert not tmp_path_for(out).exists()
    extract(_cfg(folder, out))  # without --cache-at the features fit


def test_activations_beyond_float16_are_refused_naming_the_image(folder: Path, tmp_path: Path, monkeypatch) -> None:
    real = ex.embed_batch

    def overflowing(*a, **kw):
        outputs = real(*a, **kw)
        acts = outputs["activations"].clone()
        acts[0] = float("inf")  # what a value above 65504 becomes in float16
        return {**outputs, "activations": acts}

    monkeypatch.setattr(ex, "embed_batch", overflowing)
    out = tmp_path / "inf.h5"
    with pytest.raises(PipelineError, match=r"activations of image .+ are not finite in float16 .* in 1 of \d+"):
        extract(_cfg(folder, out, cache_at="layer3"))
    assert not out.exists()


def test_any_module_with_token_outputs_works() -> None:
    """A module that is not torchvision's, with (B, N, C) token outputs as a ViT's blocks give: mean over tokens."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.block = nn.Linear(8, 8)
            self.head = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.block(self.embed(x).flatten(2).transpose(1, 2))  # (B, 16, 8)
            return self.head(tokens[:, 0])

    model = Tokens().eval()
    bb = Backbone(model, Preprocessing(resize_size=16, crop_size=16), "tokens", "none(seed=0)", 8, "head")
    out = with_outputs(bb, layers=["block", "embed"], cache_at="embed")
    assert out.layers == [{"name": "block", "dim": 8}, {"name": "embed", "dim": 8}] and out.feature_dim == 16
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        feats, maps = out.model(x)
        emb = model.embed(x)
        expected = torch.cat([model.block(emb.flatten(2).transpose(1, 2)).mean(1), emb.mean((2, 3))], 1)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(maps, emb)
    assert pool(torch.ones(2, 5, 3)).shape == (2, 3)
    with pytest.raises(PipelineError, match="has no class token"):  # nothing says which token would be one
        with_outputs(bb, layers=["block:cls"])


def test_timm_models_are_traced_with_timms_tracer() -> None:
    timm = pytest.importorskip("timm")
    from timm.models import _features_fx as timm_fx

    from pipeline.stage1.backbones import _tracer

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    assert _tracer(model)[0] is timm_fx.create_feature_extractor
    bb = Backbone(model, Preprocessing(resize_size=32, crop_size=32), "timm:vit_tiny", "none(seed=0)", 192, "head")
    out = with_outputs(bb, layers=["blocks.10:cls", "blocks.11", "blocks.11:cls+mean"])
    assert out.layers == [{"name": "blocks.10:cls", "dim": 192}, {"name": "blocks.11", "dim": 192},
                          {"name": "blocks.11:cls+mean", "dim": 384}]  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        feats = out.model(x)
        t10 = model.blocks[:11](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))
        t11 = model.blocks[11](t10)
    assert model.num_prefix_tokens == 1  # the class token; the mean is of the patch tokens after it
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(feats[:, :192], t10[:, 0], **close)
    torch.testing.assert_close(feats[:, 192:384], t11[:, 1:].mean(1), **close)
    torch.testing.assert_close(feats[:, 384:], torch.cat([t11[:, 0], t11[:, 1:].mean(1)], 1), **close)
    with pytest.raises(PipelineError, match="pools the tokens of a transformer block"):
        with_outputs(load_backbone("resnet18", weights="none", image_size=32), layers=["layer3:cls"])
    with pytest.raises(PipelineError, match="unknown pooling 'max'"):
        with_outputs(bb, layers=["blocks.11:max"])


def test_nhwc_maps_of_a_swin_are_pooled_over_h_and_w() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_dim=16,
                              depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4).eval()  # fmt: skip
    assert model.output_fmt == "NHWC"
    bb = Backbone(model, Preprocessing(resize_size=32, crop_size=32), "timm:swin", "none(seed=0)", 32, "head")
    out = with_outputs(bb, layers=["layers.0", "layers.1"])
    assert out.layers == [{"name": "layers.0", "dim": 16}, {"name": "layers.1", "dim": 32}]  # C, not W
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        feats = out.model(x)
        maps0 = model.layers[0](model.patch_embed(x))  # (B, H, W, C)
        maps1 = model.layers[1](maps0)
    torch.testing.assert_close(feats[:, :16], maps0.mean((1, 2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[:, 16:], maps1.mean((1, 2)), rtol=1e-4, atol=1e-5)


def test_cli_extract_layers_and_inspect_nodes(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "f.h5"
    code, stdout, err = run(["extract", "--dataset", str(folder), *TINY_ARGS, "--out", str(out),
                             "--layers", "layer3,layer4", "--cache-at", "layer3"], capsys)  # fmt: skip
    assert code == 0, err
    assert out.exists() and read_meta(out).feature_dim == 768
    code, stdout, _ = run(["inspect", str(out)], capsys)
    assert code == 0 and "layer3 (256), layer4 (512)" in stdout and "layer3: 256 x 2 x 2 per image" in stdout
    code, stdout, _ = run(["inspect", "--nodes", "resnet18", "--image-size", "64"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split("  ", 1)[1].strip() for line in stdout.splitlines()[3:]}
    assert rows["layer3.1.relu_1"].split("  ")[0] == "256 x 4 x 4" and rows["flatten"] == "512"
    assert rows["layer3.1.relu_1"].endswith("layer3, layer3.1")  # the module names --layers accepts for it
    code, _, err = run(["inspect"], capsys)
    assert code == 2 and "--nodes BACKBONE" in err
