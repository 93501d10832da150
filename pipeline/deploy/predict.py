"""Predict: run an exported classifier (``export``) over image files and write one CSV row per image.

The model is rebuilt from ``MODEL.json`` and ``MODEL.safetensors`` (tensors only, checked before use); the
``MODEL.pt2`` program is never opened, since torch's loader for it unpickles and a crafted archive runs code.

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
import torchvision
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from pipeline.deploy.export import (
    IDENTITY_KEY,
    Decision,
    ExportMeta,
    classifier_model,
    non_finite,
    read_meta,
    sidecar_paths,
)
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_path
from pipeline.stage1.backbones import TIMM_PREFIX, Backbone, Preprocessing, strip_classifier, with_outputs
from pipeline.stage1.datasets import IMG_EXTENSIONS, load_image

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    """An exported model rebuilt for inference, with the class names and preprocessing that travel beside it."""

    module: nn.Module
    classes: list[str]
    preprocess: Preprocessing
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decision: Decision | None = None  # a threshold for one class (MODEL.json's "decision"); None: argmax


@dataclass
class PredictResult:
    out: Path
    n_images: int
    failed: dict[str, str] = field(default_factory=dict)  # path (as shown) -> why it could not be read
    counts: Counter = field(default_factory=Counter)  # predicted class -> images
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)  # the model's
    # (true, predicted) class indices of the images whose folder is named after one of the model's classes
    labelled: list[tuple[int, int]] = field(default_factory=list)

    @property
    def scored(self) -> bool:
        """Whether every readable image sat in a class folder: then the accuracy below means something."""
        return bool(self.labelled) and len(self.labelled) == self.n_images - len(self.failed)

    def accuracy(self) -> float:
        return sum(t == p for t, p in self.labelled) / len(self.labelled)

    def confusion(self) -> list[list[int]]:
        cm = [[0] * len(self.classes) for _ in self.classes]
        for t, p in self.labelled:
            cm[t][p] += 1
        return cm


def shown(path: Path | str) -> str:
    """A path as text any file or terminal takes: bytes that are not UTF-8 appear as ``\\xNN`` escapes
    (``str(path)`` holds surrogates there, which a UTF-8 writer refuses)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def load_classifier(path: Path | str, *, device: str = "auto") -> Classifier:
    """Rebuild the classifier ``export`` wrote as ``path`` (``MODEL.pt2``) from ``MODEL.json`` and the tensors in
    ``MODEL.safetensors``. The program itself is never opened: torch's ``.pt2`` loader unpickles, safetensors holds
    tensors only, so a crafted file cannot run code here. Anything damaged or inconsistent is a one-line error."""
    path = Path(path)
    dev = resolve_device(device)
    tensors_path, meta_path = sidecar_paths(path)
    if not tensors_path.is_file() and not meta_path.is_file():
        raise PipelineError(f"model not found: {shown(path)} (write one with `python -m pipeline export`)")
    try:
        if not meta_path.is_file():
            raise PipelineError(f"{meta_path.name} (class names, preprocessing) is missing beside it")
        meta = read_meta(meta_path)
        if not tensors_path.is_file():
            raise PipelineError(f"{tensors_path.name} (the weights) is missing beside it; export the head again")
        model = _assemble(meta, _read_tensors(tensors_path, meta))
        _probe(model, meta)
    except PipelineError as e:
        raise PipelineError(shown(f"cannot load model {path}: {e}")) from None
    model = model.to(dev, memory_format=torch.channels_last)  # the layout normalize() gives the batches
    return Classifier(model, list(meta.classes), meta.preprocessing, dev, meta.decision)


def _read_tensors(path: Path, meta: ExportMeta) -> dict[str, torch.Tensor]:
    """The tensors of ``MODEL.safetensors``, whose header must describe the model MODEL.json describes."""
    try:
        with safe_open(path, framework="pt") as f:
            recorded = json.loads((f.metadata() or {})[IDENTITY_KEY])
            if not isinstance(recorded, dict):
                raise ValueError(f"{IDENTITY_KEY} in its header is not a mapping")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors (Rust) raises its own types; no code runs either way
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise PipelineError(f"{path.name} is not a tensors file written by `pipeline export` ({reason})") from None
    identity = meta.identity()
    for key, value in identity.items():
        was = recorded.get(key)
        if was != value:
            if isinstance(was, dict) and isinstance(value, dict):  # name the entry that differs
                diffs = ((f"{key}.{k}", v, was.get(k)) for k, v in value.items() if was.get(k) != v)
                key, value, was = next(diffs, (key, value, was))
            json_name = path.with_suffix(".json").name
            raise PipelineError(f"{json_name} says {key} {value!r}, but {path.name} was exported with {was!r}")
    extra = next((k for k in recorded if k not in identity), None)  # e.g. `layers` deleted from MODEL.json
    if extra is not None:
        json_name = path.with_suffix(".json").name
        raise PipelineError(f"{json_name} has no {extra} entry, but {path.name} was exported with {recorded[extra]!r}")
    return state


def _assemble(meta: ExportMeta, state: dict[str, torch.Tensor]) -> nn.Module:
    """torchvision's architecture (traced to give the pooled layers MODEL.json names, if any), the head's layer
    where its classifier was (or after those layers), then every tensor checked (names, shapes, dtypes, finite
    values) and loaded."""
    bad = non_finite(state)
    if bad is not None:
        raise PipelineError(f"tensor {bad} holds NaN or infinite values")
    model, where = _architecture(meta.backbone, meta.preprocessing.crop_size)
    if where != meta.classifier_path:
        raise PipelineError(f"{meta.backbone}'s classifier is {where!r}, not {meta.classifier_path!r}")
    backbone = _on_layers(Backbone(model, meta.preprocessing, meta.backbone, "", 0, where), meta)
    prefix = meta.head_path + "."
    layer = meta.head_layer.build({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    model = classifier_model(backbone, layer)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{len(names)} {what} (e.g. {', '.join(names[:2])})" for what, names in
                 (("missing", missing), ("unexpected", unexpected)) if names]  # fmt: skip
        raise PipelineError(f"tensors do not fit {meta.backbone}: {'; '.join(parts)}")
    for k, v in expected.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            got, want = (f"{tuple(t.shape)} {str(t.dtype)[6:]}" for t in (state[k], v))
            raise PipelineError(f"tensor {k} is {got}; {meta.backbone} needs {want}")
    model.load_state_dict(state)
    return model


def _on_layers(backbone: Backbone, meta: ExportMeta) -> Backbone:
    """``backbone`` traced to output the pooled layers MODEL.json names (as export traced it: the same module
    names), or as it is for a model without them. A node the architecture lacks is one line."""
    if not meta.layers:
        return backbone
    backbone = with_outputs(backbone, layers=list(meta.layers))
    if backbone.feature_dim != meta.head_layer.in_features:
        dims = " + ".join(f"{e['name']} {e['dim']}" for e in backbone.layers or [])
        raise PipelineError(f"the layers give {backbone.feature_dim} features ({dims}); the head takes "
                            f"{meta.head_layer.in_features}")  # fmt: skip
    return backbone


def _architecture(backbone: str, crop_size: int) -> tuple[nn.Module, str]:
    """The bare backbone (random init, overwritten by the tensors; the caller's RNG untouched) and where its
    classifier sat: torchvision's, or a timm model fitted to ``crop_size`` as extract built it."""
    if backbone.startswith(TIMM_PREFIX):
        from pipeline.stage1.timm_models import timm_architecture  # timm is optional: imported for timm models only

        return timm_architecture(backbone, crop_size)
    with torch.random.fork_rng(devices=[]):
        model = torchvision.models.get_model(backbone, weights=None)
    return model, strip_classifier(model)


@torch.inference_mode()
def _probe(model: nn.Module, meta: ExportMeta) -> None:
    """One blank image through the model: it must run at the recorded crop size and give one logit per class."""
    crop = meta.preprocessing.crop_size
    try:
        out = model(torch.zeros(1, 3, crop, crop))
    except Exception as e:  # noqa: BLE001 - e.g. a ViT given another image size
        raise PipelineError(f"the model does not run on a {crop} x {crop} image: {str(e).splitlines()[0]}") from None
    if tuple(out.shape) != (1, len(meta.classes)):
        raise PipelineError(f"the model gives {tuple(out.shape[1:])} outputs for {len(meta.classes)} classes")


def collect_images(inputs: list[Path | str]) -> list[Path]:
    """Image files named directly, plus every image under named folders (recursively, sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif item.is_file():
            files.append(item)
        else:
            raise PipelineError(f"no such image or folder: {shown(item)}")
    if not files:
        raise PipelineError(f"no images found in {', '.join(map(shown, inputs))}")
    return files


def read_image(path: Path, pre: Preprocessing) -> torch.Tensor:
    return pre.geometry(load_image(path))


@torch.inference_mode()
def predict_batch(clf: Classifier, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 CHW tensors (already resized and cropped) -> (N, C) probabilities."""
    x = clf.preprocess.normalize(torch.stack(images).to(clf.device))
    return torch.softmax(clf.module(x).float(), dim=1).cpu()


def _columns(top_k: int, *, decision: Decision | None = None) -> list[str]:
    """The CSV's header: the top-k classes by probability; with a threshold, also the class it decided and how."""
    extra = [f"{name}_{i}" for i in range(2, top_k + 1) for name in ("class", "probability")]
    decided = ["decided_class", "decided_by"] if decision else []
    return ["path", "class", "probability", *extra, *decided, "error"]


def decide(clf: Classifier, proba: torch.Tensor) -> tuple[list[int], list[str]]:
    """The class of each row: argmax, or with MODEL.json's threshold the positive class where its probability
    reaches it ("threshold") and the most probable other class elsewhere ("below threshold")."""
    if clf.decision is None:
        return proba.argmax(dim=1).tolist(), ["argmax"] * len(proba)
    from pipeline.stage2.thresholds import thresholded_predictions

    positive = clf.classes.index(clf.decision.positive)
    pred = thresholded_predictions(proba.numpy(), positive=positive, threshold=clf.decision.threshold)
    return pred.tolist(), ["threshold" if k == positive else "below threshold" for k in pred.tolist()]


def _rows(paths: list[Path], proba: torch.Tensor, classes: list[str], top_k: int) -> list[list[Any]]:
    p, idx = proba.topk(top_k, dim=1)
    rows = []
    for path, ps, ks in zip(paths, p.tolist(), idx.tolist()):
        cells: list[Any] = [shown(path)]
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
    device: str = "auto",
) -> PredictResult:
    """Classify every image file in ``inputs`` (files and folders) with an exported model; write a CSV.
    ``device`` (``auto|cpu|cuda|mps``) is where a model named by path runs."""
    clf = model if isinstance(model, Classifier) else load_classifier(model, device=device)
    return predict_with(clf, collect_images(inputs), out=out, batch_size=batch_size, top_k=top_k, progress=progress)


def predict_with(
    clf: Classifier, paths: list[Path], *, out: Path | str, batch_size: int = 32, top_k: int = 3, progress: bool = True
) -> PredictResult:
    """Classify ``paths`` with a loaded classifier; write the CSV to ``out`` (temporary name, then renamed)."""
    if batch_size < 1 or top_k < 1:
        raise PipelineError("--batch-size and --top-k must be at least 1")
    top_k = min(top_k, len(clf.classes))
    out = Path(out)
    result = PredictResult(out=out, n_images=len(paths), classes=list(clf.classes))
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_columns(top_k, decision=clf.decision))
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
    blank = [""] * (2 * top_k + (2 if clf.decision else 0))
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not progress):
        ok_paths, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path, clf.preprocess))
                ok_paths.append(path)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a corrupt file; report and go on
                reason = shown(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")  # may name the file
                log.warning("cannot read %s: %s", shown(path), reason)
                result.failed[shown(path)] = reason
                writer.writerow([shown(path), *blank, reason])
        if images:
            proba = predict_batch(clf, images)
            rows = _rows(ok_paths, proba, clf.classes, top_k)
            decided, how = decide(clf, proba)
            if clf.decision:
                rows = [[*row[:-1], clf.classes[k], by, row[-1]] for row, k, by in zip(rows, decided, how)]
            writer.writerows(rows)
            result.counts.update(clf.classes[k] for k in decided)
            index = {c: i for i, c in enumerate(clf.classes)}
            for path, pred in zip(ok_paths, decided):
                if path.parent.name in index:  # images sorted into class folders: the folder is the truth
                    result.labelled.append((index[path.parent.name], pred))
