"""Predict: run an exported classifier (``export``) over image files and write one CSV row per image.

The model is rebuilt from ``MODEL.json`` and ``MODEL.safetensors`` (tensors only, checked before use); the
``MODEL.pt2`` program is never opened, since torch's loader for it unpickles and a crafted archive runs code.

Columns: ``path``, ``class``, ``probability``, then ``class_2``, ``probability_2`` ... up to ``--top-k``, then
``error`` (empty unless the image could not be read: such an image is reported and skipped, never fatal).
A regression model (``MODEL.json``'s ``"task": "regress"``) writes ``path``, one column per target (the predicted
values, in the targets' units), then ``error``; with ``--targets FILE.csv`` (extract's format) it is scored per
target (MSE, RMSE, MAE, R^2) on the images whose id, their path relative to the folder given, has a row there.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from pipeline.deploy.export import (
    IDENTITY_KEY,
    Decision,
    ExportMeta,
    classifier_model,
    non_finite,
    read_export_meta,
    sidecar_paths,
)
from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_path, check_digests
from pipeline.progress import progress_bar
from pipeline.stage1.backbones import Preprocessing, rebuild_backbone
from pipeline.stage1.batches import (
    SourceSettings,
    choose_source,
    default_batch_size,
    default_prefetch,
    default_workers,
    open_source,
)
from pipeline.stage1.datasets import Split, list_images, load_image
from pipeline.stage1.extract import embed_batch
from pipeline.stage1.precision import Precision, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Classifier:
    """An exported model rebuilt for inference, with the class names and preprocessing that travel beside it."""

    module: nn.Module
    classes: list[str]
    preprocess: Preprocessing
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decision: Decision | None = None  # a threshold for one class (MODEL.json's "decision"); None: argmax
    targets: list[str] = field(default_factory=list)  # a regression model's outputs (then ``classes`` is empty)


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
    targets: list[str] = field(default_factory=list)  # a regression model's
    values: list[np.ndarray] = field(default_factory=list)  # regression: (n, T) predicted values, batch by batch
    truth_source: str | None = None  # regression with --targets: the CSV's name
    truth: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (true, predicted) (T,) per image
    no_truth: list[str] = field(default_factory=list)  # readable images the --targets CSV has no row for

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

    def regression_scores(self) -> dict[str, Any]:
        """MSE, RMSE, MAE and R^2 per target (and their means) on the images with a row in the --targets CSV."""
        from pipeline.stage2.evaluate import regression_metrics

        true, pred = (np.stack(column) for column in zip(*self.truth))
        return regression_metrics(true, pred, self.targets)


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
        meta = read_export_meta(meta_path)
        if not tensors_path.is_file():
            raise PipelineError(f"{tensors_path.name} (the weights) is missing beside it; export the head again")
        model = _assemble(meta, _read_tensors(tensors_path, meta))
        # the tensors must be the ones written with MODEL.json (a kill between export's writes left two models'
        # files); the program is never opened here, so one of another export is said, not refused
        check_digests({"tensors": tensors_path}, meta.files, unit=meta_path.name, remedy="export the model again")
        try:
            check_digests({"program": path}, meta.files, unit=meta_path.name, remedy="export the model again")
        except PipelineError as e:
            log.warning("%s (predict does not run it)", e)
        _probe(model, meta)
    except PipelineError as e:
        raise PipelineError(shown(f"cannot load model {path}: {e}")) from None
    model = model.to(dev, memory_format=torch.channels_last)  # the layout normalize() gives the batches
    return Classifier(model, list(meta.classes), meta.preprocessing, dev, meta.decision, list(meta.targets))


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
    """The backbone's architecture (traced to give the pooled layers MODEL.json names, if any), the head's layer
    where its classifier was (or after those layers), then every tensor checked (names, shapes, dtypes, finite
    values) and loaded."""
    bad = non_finite(state)
    if bad is not None:
        raise PipelineError(f"tensor {bad} holds NaN or infinite values")
    backbone = rebuild_backbone(meta.backbone_record())  # the architecture, traced to MODEL.json's layers if any
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


@torch.inference_mode()
def _probe(model: nn.Module, meta: ExportMeta) -> None:
    """One blank image through the model: it must run at the recorded crop size and give one logit per class
    (one value per target for a regression model)."""
    crop = meta.preprocessing.crop_size
    try:
        out = model(torch.zeros(1, 3, crop, crop))
    except Exception as e:  # noqa: BLE001 - e.g. a ViT given another image size
        raise PipelineError(f"the model does not run on a {crop} x {crop} image: {str(e).splitlines()[0]}") from None
    if tuple(out.shape) != (1, len(meta.outputs)):
        what = "targets" if meta.targets else "classes"
        raise PipelineError(f"the model gives {tuple(out.shape[1:])} outputs for {len(meta.outputs)} {what}")


def collect_images(inputs: list[Path | str]) -> list[Path]:
    """Image files named directly, plus every image under named folders, listed as extract lists its folders
    (:func:`~pipeline.stage1.datasets.list_images`: hidden folders skipped, regular files only, sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            problems: list[str] = []
            files += list_images(item, problems)
            for why in problems:
                log.warning("skipped %s", shown(item / why))
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
    return torch.softmax(model_outputs(clf, images), dim=1)


@torch.inference_mode()
def model_outputs(clf: Classifier, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 CHW tensors (already resized and cropped) -> (N, C) float32 outputs on the CPU: logits, or a regression
    model's predicted values."""
    x = clf.preprocess.normalize(torch.stack(images).to(clf.device))
    return clf.module(x).float().cpu()


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


# A cell a spreadsheet would run as a formula: OWASP's "CSV injection" list (=, +, -, @, tab, carriage return).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell as a spreadsheet shows it, never runs it: one starting like a formula gets a leading ``'``
    (OWASP's advice). Class names, paths and error messages come from the user's files; numbers stay numbers."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)  # a negative value ("-0.250000") is a number, not a formula
    except ValueError:
        return f"'{value}"
    return value


class SafeCsvWriter:
    """``csv.writer`` whose every text cell goes through :func:`csv_cell`: the one writer of predictions CSVs."""

    def __init__(self, fh: Any):
        self._w = csv.writer(fh)

    def writerow(self, row: list[Any]) -> None:
        self._w.writerow([csv_cell(c) for c in row])

    def writerows(self, rows: list[list[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def predict(
    model: Path | str | Classifier,
    inputs: list[Path | str],
    *,
    out: Path | str,
    batch_size: int | None = None,
    top_k: int = 3,
    progress: bool = True,
    device: str = "auto",
    targets: Path | str | None = None,
    workers: int | None = None,
    preprocess: str = "auto",
    precision: str = "auto",
) -> PredictResult:
    """Classify every image file in ``inputs`` (files and folders) with an exported model; write a CSV.
    ``device`` (``auto|cpu|cuda|mps``) is where a model named by path runs. ``targets``: for a regression model, a
    CSV in extract's ``--targets`` format to score the predictions against (checked before any image is read)."""
    clf = model if isinstance(model, Classifier) else load_classifier(model, device=device)
    paths = collect_images(inputs)
    truth = None if targets is None else read_truth(Path(targets), clf=clf, inputs=inputs, paths=paths)
    reading = Reading(batch_size=batch_size, workers=workers, preprocess=preprocess, precision=precision)
    return predict_with(
        clf, paths, out=out, batch_size=batch_size, top_k=top_k, progress=progress, truth=truth, reading=reading
    )


@dataclass(frozen=True)
class Reading:
    """How predict reads its images: extract's ``--batch-size``, ``--workers``, ``--preprocess`` and ``--precision``
    (None: the device's default, as extract resolves it)."""

    batch_size: int | None = None
    workers: int | None = None
    preprocess: str = "auto"
    precision: str = "auto"


def _image_split(paths: list[Path]) -> Split:
    """The files to predict as a split, so extraction's batch sources read them (ids are the paths as shown)."""
    return Split(
        ids=[shown(p) for p in paths],
        labels=np.zeros(len(paths), dtype=np.int64),
        load=_Loader(paths),
        path=paths.__getitem__,
    )


@dataclass
class _Loader:
    """``split.load``: picklable for loader workers."""

    paths: list[Path]

    def __call__(self, i: int) -> Any:
        return load_image(self.paths[i])


@torch.inference_mode()
def _batched_outputs(
    clf: Classifier, paths: list[Path], *, reading: Reading, progress: bool
) -> Iterator[tuple[list[Path], torch.Tensor | None, list[tuple[Path, str]]]]:
    """(readable paths, their (N, C) float32 outputs on the CPU, (unreadable path, why)) batch by batch, read
    through extraction's batch sources (:mod:`pipeline.stage1.batches`) with extract's defaults."""
    dev, pre = clf.device, clf.preprocess
    split = _image_split(paths)
    name = choose_source(reading.preprocess, split, dev)
    settings = SourceSettings(
        pre=pre,
        device=dev,
        batch_size=reading.batch_size or default_batch_size(dev, crop_size=pre.crop_size),
        workers=default_workers(dev) if reading.workers is None else reading.workers,
        pin_memory=dev.type == "cuda",  # page-locked batches: the copy to the device is asynchronous
        prefetch=default_prefetch(dev),
    )
    precision: Precision = resolve_precision(reading.precision, dev)
    source = open_source(name, split, settings)
    batches = source.batches(0)
    bar = progress_bar(total=len(paths), desc="predict", enabled=progress)
    try:
        for batch in batches:
            out = None
            if batch.images is not None:
                y = embed_batch(
                    clf.module, batch.images, pre=pre, device=dev, precision=precision,
                    geometry=source.geometry_on_device,
                )  # fmt: skip
                out = y["features"].float().cpu()
            yield [paths[i] for i in batch.indices], out, [(paths[i], why) for i, why in batch.bad]
            bar.update(batch.consumed)
    finally:
        batches.close()
        bar.close()


def predict_with(
    clf: Classifier,
    paths: list[Path],
    *,
    out: Path | str,
    batch_size: int = 32,
    top_k: int = 3,
    progress: bool = True,
    truth: Truth | None = None,
    reading: Reading | None = None,
) -> PredictResult:
    """Run a loaded model over ``paths``; write the CSV to ``out`` (temporary name, then renamed). What each row
    holds is the model's task's (:func:`outputs_for`): a classifier's top-k classes, a regression model's values."""
    if (batch_size is not None and batch_size < 1) or top_k < 1:
        raise PipelineError("--batch-size and --top-k must be at least 1")
    if reading is None or reading.batch_size != batch_size:
        reading = replace(reading or Reading(), batch_size=batch_size)
    if reading.workers is not None and reading.workers < 0:
        raise PipelineError(f"--workers must be 0 or more, not {reading.workers}")
    out = Path(out)
    outputs = outputs_for(clf, top_k=top_k, truth=truth)
    result = outputs.result(out=out, n_images=len(paths))
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = SafeCsvWriter(fh)
        writer.writerow(outputs.columns())
        for ok_paths, batch, bad in _batched_outputs(clf, paths, reading=reading, progress=progress):
            _report_bad(bad, writer=writer, result=result, blank=outputs.blank())
            if batch is not None:
                writer.writerows(outputs.rows(ok_paths, batch, result=result))
    result.seconds = time.perf_counter() - t0
    return result


class LabelOutputs:
    """A classifier's CSV: per image the top-k classes with their probabilities; with MODEL.json's threshold also
    the class it decided and how. The result counts the decided classes, and scores the images that sit in a
    folder named after a class."""

    def __init__(self, clf: Classifier, *, top_k: int) -> None:
        self.clf, self.top_k = clf, min(top_k, len(clf.classes))

    def result(self, *, out: Path, n_images: int) -> PredictResult:
        return PredictResult(out=out, n_images=n_images, classes=list(self.clf.classes))

    def columns(self) -> list[str]:
        return _columns(self.top_k, decision=self.clf.decision)

    def blank(self) -> list[str]:
        return [""] * (2 * self.top_k + (2 if self.clf.decision else 0))

    def rows(self, paths: list[Path], logits: torch.Tensor, *, result: PredictResult) -> list[list[Any]]:
        clf = self.clf
        proba = torch.softmax(logits, dim=1)
        rows = _rows(paths, proba, clf.classes, self.top_k)
        decided, how = decide(clf, proba)
        if clf.decision:
            rows = [[*row[:-1], clf.classes[k], by, row[-1]] for row, k, by in zip(rows, decided, how)]
        result.counts.update(clf.classes[k] for k in decided)
        index = {c: i for i, c in enumerate(clf.classes)}
        for path, pred in zip(paths, decided):
            if path.parent.name in index:  # images sorted into class folders: the folder is the truth
                result.labelled.append((index[path.parent.name], pred))
        return rows


class ValueOutputs:
    """A regression model's CSV: ``path``, one column per target (the predicted values, in their units),
    ``error``; with ``truth`` each image that has a true value is scored (:meth:`PredictResult.regression_scores`)."""

    def __init__(self, clf: Classifier, *, truth: Truth | None) -> None:
        self.clf, self.truth = clf, truth

    def result(self, *, out: Path, n_images: int) -> PredictResult:
        result = PredictResult(out=out, n_images=n_images, targets=list(self.clf.targets))
        result.truth_source = self.truth.source if self.truth else None
        return result

    def columns(self) -> list[str]:
        return ["path", *self.clf.targets, "error"]

    def blank(self) -> list[str]:
        return [""] * len(self.clf.targets)

    def rows(self, paths: list[Path], outputs: torch.Tensor, *, result: PredictResult) -> list[list[Any]]:
        values = outputs.numpy()
        result.values.append(values)
        if self.truth is not None:
            for path, row in zip(paths, values):
                if path in self.truth.values:
                    result.truth.append((self.truth.values[path], row))
                else:
                    result.no_truth.append(shown(path))
        return [[shown(p), *(f"{v:.7g}" for v in row), ""] for p, row in zip(paths, values)]


def outputs_for(clf: Classifier, *, top_k: int, truth: Truth | None) -> LabelOutputs | ValueOutputs:
    """What predict writes for the model's task (MODEL.json's ``task``): a regression model's values, else
    classes. A third task (many labels per image) adds its writer here."""
    return ValueOutputs(clf, truth=truth) if clf.targets else LabelOutputs(clf, top_k=top_k)


def _report_bad(bad: list[tuple[Path, str]], *, writer: Any, result: PredictResult, blank: list[str]) -> None:
    """Each image that could not be read is reported, counted in ``result.failed`` and written as a row of
    ``blank`` cells with the reason (``Type: first line``, as the batch sources give it) in the error column."""
    for path, why in bad:
        reason = shown(why)  # may name the file
        log.warning("cannot read %s: %s", shown(path), reason)
        result.failed[shown(path)] = reason
        writer.writerow([shown(path), *blank, reason])


# ------------------------------------------------------------------------------------------ regression models


@dataclass(frozen=True)
class Truth:
    """``predict --targets``: the true values of the images that have a row in the CSV, in the model's target order."""

    source: str  # the CSV's file name
    values: dict[Path, np.ndarray]  # image path (as collected) -> (T,) float64


def image_ids(inputs: list[Path | str], paths: list[Path]) -> list[str]:
    """Each image's id as ``extract`` stores it: its path relative to the folder given that holds it (``3/0042.png``);
    an image named directly keeps its path as given."""
    folders = [Path(item) for item in inputs if Path(item).is_dir()]
    ids = []
    for path in paths:
        folder = next((f for f in folders if path.is_relative_to(f)), None)
        ids.append((path.relative_to(folder) if folder else path).as_posix())
    return ids


def read_truth(csv_path: Path, *, clf: Classifier, inputs: list[Path | str], paths: list[Path]) -> Truth:
    """The targets CSV (extract's ``--targets`` format) matched to ``paths`` by id; one-line errors for a classifier,
    a CSV without the model's target columns, or one whose ids match none of the images."""
    from pipeline.stage1.targets import read_targets_csv

    if not clf.targets:
        raise PipelineError("--targets scores a regression model; this one classifies (its folders score it)")
    table = read_targets_csv(csv_path)
    lacking = [t for t in clf.targets if t not in table.names]
    if lacking:
        raise PipelineError(f"{table.source} has no column {', '.join(lacking)} (it has {', '.join(table.names)}); "
                            f"the model predicts {', '.join(clf.targets)}")  # fmt: skip
    columns = [table.names.index(t) for t in clf.targets]
    ids = image_ids(inputs, paths)
    values = {p: table.values[i][columns] for p, i in zip(paths, ids) if i in table.values}
    if not values:
        example = next(iter(table.values), "")
        raise PipelineError(f"no image matches an id of {table.source} (ids are paths relative to the folder given, "
                            f"such as {shown(ids[0])!r}; the CSV has {example!r})")  # fmt: skip
    return Truth(table.source, values)


def format_values(result: PredictResult) -> str:
    """What `predict` prints for a regression model: the range of each predicted target, then with --targets the
    scores per target (the figures train-head reports), and the images that had no true value."""
    from pipeline.stage2.evaluate import MAX_TARGETS_SHOWN as SHOWN

    width = max(6, *map(len, result.targets))
    lines = []
    if result.values:
        values = np.concatenate(result.values)
        lines.append(f"  {'target':<{width}}  {'mean':<10}  {'min':<10}  max")
        for name, v in list(zip(result.targets, values.T))[:SHOWN]:
            lines.append(f"  {name:<{width}}  {v.mean():<10.4g}  {v.min():<10.4g}  {v.max():.4g}")
    if result.truth:
        m = result.regression_scores()
        over = f" (mean of {len(result.targets)} targets)" if len(result.targets) > 1 else ""
        lines += [
            f"\nR^2 {m['r2']:.4f}   RMSE {m['rmse']:.4g}   MAE {m['mae']:.4g}   MSE {m['mse']:.4g}{over} on "
            f"{len(result.truth)} images (true values from {result.truth_source})",
            f"  {'target':<{width}}  R^2       RMSE        MAE         MSE",
        ]
        for t in m["per_target"][:SHOWN]:
            figures = f"{t['r2']:<8.4f}  {t['rmse']:<10.4g}  {t['mae']:<10.4g}  {t['mse']:.4g}"
            lines.append(f"  {t['target']:<{width}}  {figures}")
    if len(result.targets) > SHOWN:
        lines.append(f"  ... {len(result.targets) - SHOWN} more targets (all in the CSV)")
    if result.no_truth:
        some = ", ".join(result.no_truth[:5]) + (", ..." if len(result.no_truth) > 5 else "")
        lines.append(f"{len(result.no_truth)} images have no row in {result.truth_source}, not scored: {some}")
    return "\n".join(lines)
