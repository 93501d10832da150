"""Shared fixtures: tiny data made in tmp_path, random-weight backbones, no downloads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.store import FeatureWriter

# One intra-op thread: the tensors in these tests are tiny, and on a shared 2-core machine torch's default
# OpenMP threads spin against other processes (measured ~15x slower extractions under load).
torch.set_num_threads(1)

COLOURS = {"cat": (200, 60, 60), "dog": (60, 60, 200), "bird": (60, 200, 60)}


def write_image_folder(
    root: Path,
    *,
    per_class: int = 6,
    classes: tuple[str, ...] = ("cat", "dog", "bird"),
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """``root/<class>/<i>.png``: noisy solid colours, so even random-weight features separate the classes."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        base = np.array(COLOURS.get(c, ((50 * k) % 255, (90 * k) % 255, (130 * k) % 255)))
        folder = root / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (base + rng.normal(0, 25, (*size, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class folder of 6 PNGs per class (PATH/<class>/*)."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def split_image_folder(tmp_path: Path) -> Path:
    """PATH/train/<class>/* and PATH/val/<class>/*."""
    root = tmp_path / "split_images"
    write_image_folder(root / "train", per_class=5, seed=1)
    write_image_folder(root / "val", per_class=2, seed=2)
    return root


def separable_features(
    *, n: int, dim: int = 32, classes: int = 4, seed: int = 0, spread: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around well-separated class means: any sound head scores > 95%."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (classes, dim))
    y = np.arange(n) % classes
    X = means[y] + rng.normal(0, spread, (n, dim))
    return X.astype(np.float32), y.astype(np.int64)


def write_feature_file(
    path: Path,
    *,
    n_train: int = 400,
    n_val: int = 200,
    dim: int = 32,
    classes: int = 4,
    seed: int = 0,
    spread: float = 0.5,
    dtype: str = "float32",
) -> Path:
    """A complete, valid feature file of separable synthetic features (same schema as extract writes)."""
    X, y = separable_features(n=n_train + n_val, dim=dim, classes=classes, seed=seed, spread=spread)
    Xtr, ytr, Xva, yva = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    names = [f"class_{i}" for i in range(classes)]
    meta = {
        "fingerprint": f"synthetic-{seed}",
        "backbone": "synthetic",
        "weights": "none",
        "feature_dim": dim,
        "num_classes": classes,
        "dataset": "synthetic",
        "preprocessing": {},
        "dataset_identity": {},
    }
    w = FeatureWriter(
        path, meta=meta, classes=names, sizes={"train": n_train, "val": n_val}, feature_dim=dim, dtype=dtype
    )
    w.append("train", Xtr, ytr, [str(i) for i in range(n_train)], seen=n_train)
    w.append("val", Xva, yva, [str(i) for i in range(n_val)], seen=n_val)
    w.finish()
    return path


@pytest.fixture
def feature_file(tmp_path: Path) -> Path:
    return write_feature_file(tmp_path / "features.h5")


@pytest.fixture
def make_feature_file(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "f.h5", **kw: object) -> Path:
        return write_feature_file(tmp_path / name, **kw)

    return make


# Settings for a real extraction that runs in about a second on 2 CPU cores.
TINY_EXTRACT = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 32,
    "batch_size": 8,
    "workers": 0,
    "progress": False,
    "device": "cpu",
}

# The same settings as command-line options.
TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8",
             "--workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip


# The command line in-process: (exit code, stdout, stderr) of `python -m pipeline ARGS`.
def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
