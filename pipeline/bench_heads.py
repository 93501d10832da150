"""``python -m pipeline.bench_heads``: the heads timed on features of real images from a real pretrained backbone.

The feature file: augmented views (random crops, flips, small rotations; seeded) of the committed ``data/digits``
through the ImageNet MobileNetV2 (1,280-d), at CIFAR scale (50,000 train + 10,000 val views; the val views come
from digit images no train view comes from). The same file reduced to 512-d by PCA fitted on train is the second
real file; a synthetic file of separable blobs is a last row only, to show how much synthetic features flatter.
The files are cached under ``artifacts/bench/`` keyed by their settings and reused.

Each row is a figure beside its target; ``met`` says whether it is within it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

WEIGHTS = Path("artifacts/weights/mobilenet_v2_imagenet.pt")
DIGITS = Path("data/digits")


@dataclass(frozen=True)
class RealFeatures:
    """How the real feature file is made; every field is in its cache key."""

    n_train: int = 50_000
    n_val: int = 10_000
    image_size: int = 64  # MobileNetV2 at 64 px: ~1,000 images/s on 2 cores, so the one-off build is ~1 minute
    val_images: float = 0.2  # share of the digit images whose views form val
    seed: int = 0
    batch_size: int = 256


QUICK_FEATURES = RealFeatures(n_train=2_000, n_val=500, image_size=32)


# ------------------------------------------------------------------------------------------ the feature files


def _digits(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.png")):
            images.append(np.asarray(Image.open(f).convert("L"), np.float32) / 255.0)
            labels.append(c)
    return np.stack(images), np.asarray(labels, np.int64), classes


def augmented_views(
    images: torch.Tensor, n: int, *, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` views of (M, H, W) images in [0, 1]: random source, crop (zoom 1-1.3x, shift up to 15%), horizontal
    flip, rotation of at most 15 degrees, resampled bilinearly to ``size`` x ``size``. (views, source index)."""
    src = torch.randint(len(images), (n,), generator=gen)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15)
    zoom = 1 / (1 + 0.3 * torch.rand(n, generator=gen))  # < 1: the view covers part of the image (a crop)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.15
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, [n, 1, size, size], align_corners=False)
    views = torch.nn.functional.grid_sample(
        images[src, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return views, src


def _key(spec: RealFeatures, weights: Path) -> str:
    from pipeline.backbones import file_sha256

    settings = {**asdict(spec), "weights": file_sha256(weights), "digits": _digits_identity(DIGITS)}
    settings.pop("batch_size")  # does not change the features
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _digits_identity(root: Path) -> str:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


@torch.inference_mode()
def _embed(model: torch.nn.Module, views: torch.Tensor, *, batch_size: int, device: torch.device) -> np.ndarray:
    from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for batch in views.split(batch_size):
        x = ((batch.to(device).expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


def real_feature_file(
    work: Path, *, spec: RealFeatures = RealFeatures(), weights: Path = WEIGHTS, device: str = "auto"
) -> Path:
    """The 1,280-d MobileNetV2 features of augmented digit views, built once per settings and reused."""
    from pipeline.backbones import load_backbone
    from pipeline.devices import resolve_device
    from pipeline.train import stratified_holdout

    path = Path(work) / f"digits_aug_mobilenet_v2_{spec.image_size}px_{spec.n_train}_{_key(spec, weights)}.h5"
    if path.is_file():
        log.info("reusing %s", path)
        return path
    dev = resolve_device(device)
    images, labels, classes = _digits(DIGITS)
    fit, held = stratified_holdout(labels, fraction=spec.val_images, seed=spec.seed)
    model = load_backbone("mobilenet_v2", weights=str(weights)).model.to(dev).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(spec.seed)
    splits = {}
    t0 = time.perf_counter()
    for name, rows, n in (("train", fit, spec.n_train), ("val", held, spec.n_val)):
        views, src = augmented_views(torch.as_tensor(images[rows]), n, size=spec.image_size, gen=gen)
        splits[name] = (_embed(model, views, batch_size=spec.batch_size, device=dev), labels[rows][src.numpy()])
    seconds = time.perf_counter() - t0
    log.info(
        "embedded %d views in %.0f s (%.0f images/s)",
        spec.n_train + spec.n_val,
        seconds,
        (spec.n_train + spec.n_val) / seconds,
    )
    meta = {
        "backbone": "mobilenet_v2",
        "weights": f"file:{weights.name}",
        "dataset": "digits (augmented views)",
        "bench": asdict(spec),
    }
    _write(path, splits, classes=classes, meta=meta)
    return path


def _write(
    path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, classes: list[str], meta: dict[str, Any]
) -> None:
    """A feature file in the schema extract writes (through the store's writer)."""
    from pipeline.store import FeatureWriter

    dim = splits["train"][0].shape[1]
    meta = {
        "fingerprint": f"bench-{path.stem}",
        "feature_dim": dim,
        "num_classes": len(classes),
        "preprocessing": {},
        "dataset_identity": {},
        **meta,
    }
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    w = FeatureWriter(path, meta=meta, classes=classes, sizes=sizes, feature_dim=dim)
    for name, (X, y) in splits.items():
        w.append(name, X, y, [str(i) for i in range(len(y))], seen=len(y))
    w.finish()


def pca_file(path: Path, *, dim: int = 512) -> Path:
    """``path`` projected on the top ``dim`` principal components of its train split (fitted on train only)."""
    from pipeline.store import read_features

    out = path.with_name(f"{path.stem}_pca{dim}.h5")
    if out.is_file():
        return out
    fs = read_features(path)
    X = fs.train.features.astype(np.float64)
    mean = X.mean(0)
    _, vectors = np.linalg.eigh(np.cov(X - mean, rowvar=False))
    basis = vectors[:, ::-1][:, :dim]  # eigh sorts ascending
    splits = {
        s: (((fs.splits[s].features - mean) @ basis).astype(np.float32), fs.splits[s].labels) for s in ("train", "val")
    }
    meta = {k: fs.meta[k] for k in ("backbone", "weights", "dataset") if k in fs.meta}
    _write(out, splits, classes=fs.classes, meta={**meta, "reduced": f"PCA to {dim} (fitted on train)"})
    return out
