"""Known faults planted in a copy of a real image folder, to measure what the audit finds (tests, benchmark).

The copy has ``train/`` and ``val/`` folders (every ``val_every``-th file of a class in val), so each planted image
lands in the split chosen for it. Planted, each on distinct train images:

- ``exact``: train images copied byte for byte into val (leaks the near-duplicate pass and the digests must find);
- ``near``: train images resized to ``near_size`` px, shifted by one pixel and re-encoded as JPEG, put in val;
- ``within``: train images copied byte for byte inside train (duplicates within a split);
- ``moved``: train images moved to another class's folder (wrong labels).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Planted:
    """What was planted, by id (paths relative to the copy's root, as extract stores them)."""

    exact: list[tuple[str, str]] = field(default_factory=list)  # (val id, train id of its source)
    near: list[tuple[str, str]] = field(default_factory=list)
    within: list[tuple[str, str]] = field(default_factory=list)  # (train copy id, train source id)
    moved: list[str] = field(default_factory=list)  # train ids whose folder (label) is wrong


def shifted_jpeg(src: Path, dst: Path, *, size: int, quality: int = 90) -> None:
    """``src`` resized to ``size`` px, shifted one pixel right and down (edge repeated), saved as JPEG."""
    img = Image.open(src).convert("RGB").resize((size, size), Image.BILINEAR)
    a = np.asarray(img)
    a = np.concatenate([a[:1], a[:-1]], 0)
    a = np.concatenate([a[:, :1], a[:, :-1]], 1)
    Image.fromarray(a).save(dst, "JPEG", quality=quality)


def plant_faults(
    source: Path, out: Path, *, exact: int = 20, near: int = 20, within: int = 5, moved: int = 20,
    val_every: int = 5, near_size: int = 32, seed: int = 0,
) -> Planted:  # fmt: skip
    """Copy the class folders of ``source`` to ``out/train`` and ``out/val`` and plant the faults listed above."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    train: list[tuple[str, Path]] = []
    for c in classes:
        files = sorted(p for p in (source / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for i, f in enumerate(files):
            split = "val" if i % val_every == val_every - 1 else "train"
            (out / split / c).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out / split / c / f.name)
            if split == "train":
                train.append((c, out / split / c / f.name))
    picks = rng.choice(len(train), size=exact + near + within + moved, replace=False)
    planted = Planted()
    rel = lambda p: str(p.relative_to(out))  # noqa: E731
    for n, t in enumerate(picks):
        c, path = train[t]
        if n < exact:
            dst = out / "val" / c / f"copy_{path.name}"
            shutil.copyfile(path, dst)
            planted.exact.append((rel(dst), rel(path)))
        elif n < exact + near:
            dst = out / "val" / c / f"near_{path.stem}.jpg"
            shifted_jpeg(path, dst, size=near_size)
            planted.near.append((rel(dst), rel(path)))
        elif n < exact + near + within:
            dst = out / "train" / c / f"dup_{path.name}"
            shutil.copyfile(path, dst)
            planted.within.append((rel(dst), rel(path)))
        else:
            wrong = classes[(classes.index(c) + int(rng.integers(1, len(classes)))) % len(classes)]
            dst = out / "train" / wrong / f"moved_{path.name}"
            path.rename(dst)
            planted.moved.append(rel(dst))
    return planted


def with_audit_columns(features: Path, root: Path, out: Path) -> Path:
    """A copy of the feature file ``features`` (extracted from the image folder ``root``) with the per-row ``digests``
    (sha256 of each file's bytes) and ``phash`` (:func:`pipeline.imagehash.perceptual_hash` of the decoded image)
    columns, written through the store's writer: the columns extraction records (docs/schema.md), for files
    extracted without them."""
    import hashlib

    from pipeline.imagehash import perceptual_hash
    from pipeline.store import AUDIT_COLUMNS, FeatureWriter, read_features

    fs = read_features(features)
    w = FeatureWriter(out, meta=fs.meta, classes=fs.classes, sizes={s: len(v) for s, v in fs.splits.items()},
                      feature_dim=fs.feature_dim, columns=AUDIT_COLUMNS)  # fmt: skip
    for name, s in fs.splits.items():
        digests, hashes = [], []
        for i in s.ids:
            data = (root / str(i)).read_bytes()
            digests.append(hashlib.sha256(data).hexdigest())
            with Image.open(root / str(i)) as img:
                hashes.append(perceptual_hash(img))
        extra = {"digests": digests, "phash": np.array(hashes, np.uint64)}
        w.append(name, s.features, s.labels, [str(i) for i in s.ids], seen=len(s), extra=extra)
    w.finish()
    return out
