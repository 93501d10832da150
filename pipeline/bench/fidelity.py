"""Feature agreement: the same real images through every extraction path and precision this machine has, against
the reference (PIL in loader workers, fp32, TF32 off). ``python -m pipeline.bench.fidelity [--quick]``.

Images: the committed digits (greyscale) and a tinted copy (each digit gets its own ink and paper colour), held in
memory as arrays, through the demo's ImageNet MobileNetV2 at the demo's 112 px. Per row: the median and max relative
L2 distance of the features per image, the min cosine, and the val accuracy of a logistic regression on them.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.fileio import write_json
from pipeline.stage1.batches import BATCH_SOURCES
from pipeline.stage1.datasets import Source, array_split, load_folder
from pipeline.stage1.extract import ExtractConfig, extract, plan_extraction
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.train import fit_and_evaluate
from pipeline.store import FeatureSet, read_features

log = logging.getLogger(__name__)

DIGITS = Path("data/digits")
DEMO_WEIGHTS = Path("artifacts/weights/mobilenet_v2_imagenet.pt")
GPU_DECODE = "gpu-decode"  # the GPU JPEG batch source, where pipeline.stage1.batches has one


def digits_source(root: Path = DIGITS, *, tinted: bool = False, per_split: int | None = None, seed: int = 0) -> Source:
    """The committed digits as in-memory uint8 arrays (greyscale, or tinted RGB), split as ``extract`` splits the
    folder (stratified 20% val, seed 0). ``per_split``: a seeded sample of N per split, in split order (the folder
    lists its splits class by class, so the first N would hold a few classes only)."""
    folder = load_folder(root)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, split in folder.splits.items():
        keep = np.arange(len(split))
        if per_split is not None and per_split < len(split):
            keep = np.sort(rng.permutation(len(split))[:per_split])
        grey = np.stack([np.asarray(split.load(int(i)))[..., 0] for i in keep])
        splits[name] = array_split(tint(grey, rng) if tinted else grey, split.labels[keep])
    identity = {"kind": "digits-arrays", "tinted": tinted, "n": {k: len(v) for k, v in splits.items()}}
    return Source(
        name="digits-tinted" if tinted else "digits", classes=folder.classes, splits=splits, identity=identity
    )


def tint(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) greyscale -> (N, H, W, 3): per image a dark paper colour and a light ink colour."""
    paper = rng.integers(0, 110, (len(grey), 1, 1, 3))
    ink = rng.integers(150, 256, (len(grey), 1, 1, 3))
    return np.rint(paper + (ink - paper) * (grey[..., None] / 255.0)).astype(np.uint8)


def write_jpegs(source: Source, root: Path) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: the same images as files, for the batch sources that decode them."""
    for name, split in source.splits.items():
        for i, (img, label) in enumerate(zip(split.arrays, split.labels, strict=True)):
            folder = root / name / source.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=95)
    return root


@dataclass(frozen=True)
class Row:
    name: str  # what the table shows
    preprocess: str  # batch source (--preprocess)
    precision: str
    files: bool = False  # read JPEG files (the decoding sources) rather than arrays


def rows_for(device: torch.device) -> list[Row]:
    """Reference first; every path and precision ``device`` can run."""
    rows = [Row("PIL loader, fp32 (reference)", "loader", "fp32"), Row("device resize, fp32", "device", "fp32")]
    if device.type == "cuda":
        rows += [
            Row("PIL loader, tf32", "loader", "tf32"),
            Row("PIL loader, bf16", "loader", "bf16"),
            Row("device resize, tf32", "device", "tf32"),
            Row("device resize, bf16 (CUDA default)", "device", "bf16"),
            Row("device resize, fp16", "device", "fp16"),
        ]
        if GPU_DECODE in BATCH_SOURCES:
            rows += [
                Row("JPEG files, PIL loader, fp32 (reference)", "loader", "fp32", files=True),
                Row("JPEG files, GPU decode, fp32", GPU_DECODE, "fp32", files=True),
                Row("JPEG files, GPU decode, bf16", GPU_DECODE, "bf16", files=True),
            ]
    else:
        rows.append(Row("PIL loader, bf16 autocast on CPU", "loader", "bf16"))
    return rows


def _extract(cfg: ExtractConfig, source: Source | None) -> tuple[FeatureSet, float]:
    plan = plan_extraction(cfg, source=source)
    result = extract(cfg, plan=plan)
    return read_features(result.path), result.images_per_second


def agreement(ref: FeatureSet, other: FeatureSet) -> dict[str, float]:
    """Per image over every split: relative L2 distance ``|b - a| / |a|`` and cosine against ``ref``."""
    a = np.concatenate([ref.splits[s].features for s in ref.splits]).astype(np.float64)
    b = np.concatenate([other.splits[s].features for s in ref.splits]).astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    rel = np.linalg.norm(b - a, axis=1) / np.maximum(norm_a, 1e-12)
    cos = (a * b).sum(1) / np.maximum(norm_a * norm_b, 1e-12)
    return {"median_rel": float(np.median(rel)), "max_rel": float(rel.max()), "min_cos": float(cos.min())}


def logreg_accuracy(fs: FeatureSet) -> float:
    return float(fit_and_evaluate(fs, HeadConfig(head="logreg", device="cpu"))[1]["val_accuracy"])


def _dataset_rows(source: Source, *, base: ExtractConfig, rows: list[Row], work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": [], "skipped": {}}
    jpegs = write_jpegs(source, work / f"jpeg-{source.name}") if any(r.files for r in rows) else None
    refs: dict[bool, FeatureSet] = {}
    for row in rows:
        cfg = replace(base, preprocess=row.preprocess, precision=row.precision)
        cfg = replace(cfg, out=str(work / f"{source.name}-{row.preprocess}-{row.precision}-{row.files:d}.h5"))
        try:
            if row.files:
                fs, speed = _extract(replace(cfg, dataset=str(jpegs), val_fraction=0.2), None)
            else:
                fs, speed = _extract(cfg, source)
        except PipelineError as e:
            out["skipped"][row.name] = str(e)
            continue
        refs.setdefault(row.files, fs)  # the first row of each kind is its reference
        out["rows"].append(
            {"path": row.name, **agreement(refs[row.files], fs), "logreg_val_acc": logreg_accuracy(fs)}
            | {"images_per_s": round(speed, 1)}
        )
    return out


def fidelity_bench(*, work: Path, quick: bool = False, weights: Path = DEMO_WEIGHTS, device: str = "auto") -> dict:
    """Run the agreement table on this machine; returns it as a dict (and writes the feature files under ``work``).

    ``quick``: 200 images per split at 64 px (a smoke run); else every digit at the demo's 112 px.
    """
    if not Path(weights).is_file():
        raise PipelineError(f"{weights} not found: `make demo` builds it (the demo's ImageNet MobileNetV2)")
    dev = resolve_device(device)
    work.mkdir(parents=True, exist_ok=True)
    per_split, size = (200, 64) if quick else (None, 112)
    base = ExtractConfig(
        dataset="digits",
        backbone="mobilenet_v2",
        weights=str(weights),
        image_size=size,
        device=device,
        batch_size=64,
        force=True,
        progress=False,
    )
    rows = rows_for(dev)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"device": str(dev), "image_size": size, "backbone": "mobilenet_v2", "quick": quick}
    result["torch"] = torch.__version__
    for tinted in (False, True):
        source = digits_source(tinted=tinted, per_split=per_split)
        result[source.name] = _dataset_rows(source, base=base, rows=rows, work=work)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def format_table(result: dict) -> str:
    lines = [
        f"feature agreement against PIL fp32 (TF32 off), {result['backbone']} ImageNet at {result['image_size']} px, "
        f"on {result['device']}",
        f"{'images':<14}{'path':<42}{'median rel':>11}{'max rel':>10}{'min cos':>10}{'logreg':>8}{'img/s':>8}",
    ]
    for name in ("digits", "digits-tinted"):
        block = result.get(name, {})
        for r in block.get("rows", []):
            lines.append(
                f"{name:<14}{r['path']:<42}{r['median_rel']:>11.1e}{r['max_rel']:>10.1e}{r['min_cos']:>10.6f}"
                f"{r['logreg_val_acc']:>8.3f}{r['images_per_s']:>8.0f}"
            )
        for path, why in block.get("skipped", {}).items():
            lines.append(f"{name:<14}{path:<42} skipped: {why}")
    lines.append(f"({result['seconds']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images per split at 64 px")
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench/fidelity"))
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = fidelity_bench(work=args.work, quick=args.quick, weights=args.weights, device=args.device)
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_table(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
