"""Predict: run an exported classifier (``export``) over image files and write one CSV row per image.

Columns: ``path``, ``class``, ``probability``, then ``class_2``, ``probability_2`` ... up to ``--top-k``, then
``error`` (empty unless the image could not be read: such an image is reported and skipped, never fatal).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.backbones import Preprocessing
from pipeline.datasets import IMG_EXTENSIONS, load_image
from pipeline.errors import PipelineError
from pipeline.export import EXPORT_FORMAT, sidecar_paths
from pipeline.fileio import atomic_path

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    """An exported program with the class names and preprocessing that travel beside it."""

    module: Any
    classes: list[str]
    preprocess: Preprocessing


@dataclass
class PredictResult:
    out: Path
    n_images: int
    failed: dict[str, str] = field(default_factory=dict)  # path -> why it could not be read
    counts: Counter = field(default_factory=Counter)  # predicted class -> images
    seconds: float = 0.0


def load_classifier(path: Path | str) -> Classifier:
    """Load ``MODEL.pt2`` and ``MODEL.json`` as written by ``export``."""
    path = Path(path)
    _, meta_path = sidecar_paths(path)
    if not path.is_file():
        raise PipelineError(f"model not found: {path} (write one with `python -m pipeline export`)")
    if not meta_path.is_file():
        raise PipelineError(f"{meta_path} is missing: predict needs the class names and preprocessing beside {path}")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not written by `pipeline export` (format {meta.get('format')!r})")
        pre = Preprocessing.from_dict(meta["preprocessing"])
        classes = list(meta["classes"])
        program = _quiet_load(path)
    except Exception as e:  # noqa: BLE001 - json, key, zip and torch errors all mean an unusable model file
        raise PipelineError(f"cannot load model {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return Classifier(program.module(), classes, pre)


def _quiet_load(path: Path) -> Any:
    """``torch.export.load`` without the tracebacks it logs before raising on a damaged file (we raise one line)."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    # torch.export's deserializer retries a failed weights_only unpickling with weights_only=False, which runs
    # whatever a crafted .pt2 holds (checked on torch 2.15). Forcing weights_only for every torch.load inside
    # turns that retry into a refusal.
    forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        return torch.export.load(path)
    finally:
        logger.setLevel(level)
        if forced is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced


def collect_images(inputs: list[Path | str]) -> list[Path]:
    """Image files named directly, plus every image under named folders (recursively, sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise PipelineError(f"no such image or folder: {item}")
    if not files:
        raise PipelineError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def read_image(path: Path, pre: Preprocessing) -> torch.Tensor:
    return pre.geometry(load_image(path))


@torch.inference_mode()
def predict_batch(clf: Classifier, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 CHW tensors (already resized and cropped) -> (N, C) probabilities."""
    x = clf.preprocess.normalize(torch.stack(images))
    return torch.softmax(clf.module(x), dim=1)


def _columns(top_k: int) -> list[str]:
    extra = [f"{name}_{i}" for i in range(2, top_k + 1) for name in ("class", "probability")]
    return ["path", "class", "probability", *extra, "error"]


def _rows(paths: list[Path], proba: torch.Tensor, classes: list[str], top_k: int) -> list[list[Any]]:
    p, idx = proba.topk(top_k, dim=1)
    rows = []
    for path, ps, ks in zip(paths, p.tolist(), idx.tolist()):
        cells: list[Any] = [str(path)]
        for prob, k in zip(ps, ks):
            cells += [classes[k], f"{prob:.6f}"]
        rows.append([*cells, ""])
    return rows


def predict(
    model: Path | str | Classifier,
    inputs: list[Path | str],
    *,
    out: Path | str,
    batch_size: int = 32,
    top_k: int = 3,
    progress: bool = True,
) -> PredictResult:
    """Classify every image file in ``inputs`` (files and folders) with an exported model; write a CSV."""
    clf = model if isinstance(model, Classifier) else load_classifier(model)
    return predict_with(clf, collect_images(inputs), out=out, batch_size=batch_size, top_k=top_k, progress=progress)


def predict_with(
    clf: Classifier, paths: list[Path], *, out: Path | str, batch_size: int = 32, top_k: int = 3, progress: bool = True
) -> PredictResult:
    """Classify ``paths`` with a loaded classifier; write the CSV to ``out`` (temporary name, then renamed)."""
    if batch_size < 1 or top_k < 1:
        raise PipelineError("--batch-size and --top-k must be at least 1")
    top_k = min(top_k, len(clf.classes))
    out = Path(out)
    result = PredictResult(out=out, n_images=len(paths))
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_columns(top_k))
        _predict_all(clf, paths, writer=writer, result=result, batch_size=batch_size, top_k=top_k, progress=progress)
    result.seconds = time.perf_counter() - t0
    return result


def _predict_all(
    clf: Classifier,
    paths: list[Path],
    *,
    writer: Any,
    result: PredictResult,
    batch_size: int,
    top_k: int,
    progress: bool,
) -> None:
    blank = [""] * (2 * top_k)
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
        ok_paths, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path, clf.preprocess))
                ok_paths.append(path)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a corrupt file; report and go on
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("cannot read %s: %s", path, reason)
                result.failed[str(path)] = reason
                writer.writerow([str(path), *blank, reason])
        if images:
            rows = _rows(ok_paths, predict_batch(clf, images), clf.classes, top_k)
            writer.writerows(rows)
            result.counts.update(row[1] for row in rows)
