"""Resizing in-memory uint8 batches on the device gives the PIL path's features, within a stated tolerance.

Measured here (CPU, ResNet18 random weights, 32 px arrays -> 64 px crops): max abs input difference ~0.018 after
normalising (rounding of PIL's uint8 resize), per-image relative feature difference 2.7e-3 (RGB) to 5.8e-3
(greyscale), cosine > 0.9999, and identical head accuracy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backbones import Preprocessing
from pipeline.batches import choose_source
from pipeline.datasets import Source, Split, array_split, to_rgb
from pipeline.errors import PipelineError
from pipeline.extract import ExtractConfig, extract, plan_extraction
from pipeline.heads import HeadConfig
from pipeline.store import read_features
from pipeline.train import fit_and_evaluate
from tests.conftest import TINY_EXTRACT

INPUT_TOL = 0.03  # max abs difference of normalised inputs (FACTS.md: ~0.018)
# Per-image ||a - b|| / ||a|| of features: measured 2.7e-3 (RGB) and 5.8e-3 (greyscale) here with random weights,
# which amplify pixel rounding more than trained ones (FACTS.md: ~6e-4 with ImageNet weights on Fashion-MNIST).
FEATURE_REL_TOL = 1.5e-2
MIN_COSINE = 0.9999


def _arrays(n: int, *, seed: int, grey: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Noisy solid colours, one per class: even random-weight features separate them."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    base = np.array([(200, 60, 60), (60, 60, 200), (60, 200, 60)])[labels][:, None, None, :]
    pixels = (base + rng.normal(0, 30, (n, 32, 32, 3))).clip(0, 255).astype(np.uint8)
    if grey:  # one brightness per class (the colours above all have the same mean)
        pixels = (np.array([40, 128, 215])[labels][:, None, None] + rng.normal(0, 30, (n, 32, 32))).clip(0, 255)
    return pixels.astype(np.uint8), labels.astype(np.int64)


def array_source(*, n_train: int = 48, n_val: int = 24, grey: bool = False) -> Source:
    """What datasets.load_torchvision builds for CIFAR/MNIST, without downloading anything."""
    splits = {}
    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        arrays, labels = _arrays(n, seed=seed, grey=grey)
        splits[name] = array_split(arrays, labels)
    identity = {"kind": "test-arrays", "grey": grey, "n": [n_train, n_val]}
    return Source(name="arrays", classes=["red", "blue", "green"], splits=splits, identity=identity)


@pytest.mark.parametrize("grey", [False, True])
def test_device_geometry_matches_pil_inputs(grey: bool) -> None:
    pre = Preprocessing().with_crop(64)
    arrays, _ = _arrays(12, seed=0, grey=grey)
    pil = torch.stack([pre.geometry(to_rgb(Image.fromarray(a))) for a in arrays])
    batch = torch.from_numpy(arrays)
    on_device = pre.geometry_batch(batch if grey else batch.permute(0, 3, 1, 2))
    assert on_device.shape == pil.shape == (12, 3, 64, 64)
    diff = (pre.normalize(pil) - pre.normalize(on_device)).abs().max().item()
    assert 0 < diff < INPUT_TOL  # not identical (rounding), but close


def _extract(tmp_path: Path, mode: str, source: Source) -> Path:
    cfg = ExtractConfig(dataset="arrays", out=str(tmp_path / f"{mode}.h5"), preprocess=mode, **TINY_EXTRACT)
    cfg = replace(cfg, image_size=64)
    return extract(cfg, plan=plan_extraction(cfg, source=source)).path


@pytest.mark.parametrize("grey", [False, True])
def test_device_path_gives_pil_features_and_same_head_accuracy(tmp_path: Path, grey: bool) -> None:
    source = array_source(grey=grey)
    loader = read_features(_extract(tmp_path, "loader", source))
    device = read_features(_extract(tmp_path, "device", source))
    assert loader.meta["fingerprint"] != device.meta["fingerprint"]  # the mode is part of the identity
    for split in ("train", "val"):
        a, b = loader.splits[split].features, device.splits[split].features
        assert a.shape == b.shape and np.array_equal(loader.splits[split].labels, device.splits[split].labels)
        rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert rel.max() < FEATURE_REL_TOL and cos.min() > MIN_COSINE
    for head in ("linear", "logreg"):
        acc = [fit_and_evaluate(fs, HeadConfig(head=head, device="cpu"))[1]["val_accuracy"] for fs in (loader, device)]
        assert acc[0] == acc[1]


def test_preprocess_modes_resolve_and_refuse_files(image_folder: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    arrays = array_source().splits["train"]
    files = arrays.subset(np.arange(4))
    files = Split(ids=files.ids, labels=files.labels, load=files.load)  # same samples, no arrays: read as files
    assert choose_source("auto", arrays, cpu) == "loader"
    assert choose_source("auto", arrays, cuda) == "device"
    assert choose_source("auto", files, cuda) == "loader"
    assert choose_source("loader", arrays, cuda) == "loader"
    with pytest.raises(PipelineError, match="in memory as arrays"):
        plan_extraction(ExtractConfig(dataset=str(image_folder), preprocess="device", **TINY_EXTRACT))
    with pytest.raises(PipelineError, match="preprocess mode"):
        ExtractConfig(preprocess="gpu")
