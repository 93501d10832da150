"""Stage one: run a frozen backbone once over a dataset and write the features to HDF5."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import sklearn
import torch
import torchvision
from tqdm import tqdm

import pipeline
from pipeline.backbones import RESIZE_MODES, Backbone, Preprocessing, load_backbone
from pipeline.batches import PREPROCESS_MODES, SourceSettings, choose_source, default_workers, open_source
from pipeline.datasets import Source, Split, load_source
from pipeline.devices import DEVICES, resolve_device
from pipeline.errors import PipelineError, raise_if_stopped
from pipeline.precision import Precision, check_precision, precision_context, resolve_precision
from pipeline.store import (
    FEATURE_DTYPES,
    SCHEMA_VERSION,
    FeatureWriter,
    FileLock,
    fingerprint,
    read_meta,
    tmp_path_for,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    dataset: str = "cifar10"
    backbone: str = "resnet18"
    weights: str = "IMAGENET1K_V1"
    data_root: str = "data"
    download: bool = True
    val_fraction: float = 0.2
    split_seed: int = 0
    limit: int | None = None
    image_size: int | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: chosen from the device and CPU count
    out: str | None = None
    force: bool = False
    dtype: str = "float32"
    precision: str = "auto"  # see pipeline.precision; features are stored in `dtype` regardless
    resize: str = "crop"  # see Preprocessing.resize: crop = the weights' recipe, full = whole image to the crop size
    skip_bad: bool = False
    seed: int = 0  # initialisation seed for --weights none
    progress: bool = True
    preprocess: str = "auto"  # see PREPROCESS_MODES
    compile: bool = False  # torch.compile the backbone (pays a compile once; worth it on large GPU runs)

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.resize not in RESIZE_MODES:
            raise PipelineError(f"unknown resize mode {self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if self.preprocess not in PREPROCESS_MODES:
            raise PipelineError(
                f"unknown preprocess mode {self.preprocess!r}; choose one of: {', '.join(PREPROCESS_MODES)}"
            )
        if self.device not in DEVICES:
            raise PipelineError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.dtype not in FEATURE_DTYPES:
            raise PipelineError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(FEATURE_DTYPES)}")
        if self.batch_size < 1:
            raise PipelineError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise PipelineError(f"--limit must be at least 1, not {self.limit}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise PipelineError(f"--image-size must be between 16 and 1024, not {self.image_size}")
        if self.workers is not None and self.workers < 0:
            raise PipelineError(f"--workers must be 0 or more, not {self.workers}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"--val-fraction must be between 0 and 1, not {self.val_fraction}")


@dataclass
class ExtractResult:
    path: Path
    reused: bool
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    fingerprint: str = ""
    resumed_from: dict[str, int] = field(default_factory=dict)  # samples per split a partial .tmp already held


class ExtractInterrupted(PipelineError):
    """Ctrl-C / SIGTERM during extraction; the partial file stays resumable."""


def library_versions() -> dict[str, str]:
    return {
        "pipeline": pipeline.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def _precision(cfg: ExtractConfig, device: torch.device) -> Precision:
    return resolve_precision(cfg.precision, device)


def feature_identity(
    *, backbone: Backbone, source: Source, cfg: ExtractConfig, device: torch.device, sources: dict[str, str]
) -> dict[str, Any]:
    """Everything that determines the features; its hash is the file's fingerprint. ``sources``: the batch source
    of each split (see :mod:`pipeline.batches`)."""
    identity = {
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "preprocessing": backbone.preprocess.as_dict(),
        "dataset": source.identity,
        "dtype": cfg.dtype,
        "precision": _precision(cfg, device).label,
    }
    # Batch sources agree to rounding, not bit for bit, so what ran is part of the fingerprint. The key is absent
    # when every split ran on the PIL loader, which keeps files written before it existed valid; one name when all
    # splits share a source, else one per split.
    used = set(sources.values())
    if used != {"loader"}:
        identity["preprocess_on"] = used.pop() if len(used) == 1 else dict(sources)
    return identity


def default_out(cfg: ExtractConfig, source: Source, backbone: Backbone) -> Path:
    weights = (
        "none"
        if cfg.weights.lower() == "none"
        else Path(cfg.weights).stem
        if "file:" in backbone.weights
        else cfg.weights
    )
    parts = [source.name, cfg.backbone, weights]
    if cfg.image_size:
        parts.append(f"img{cfg.image_size}")
    if cfg.limit:
        parts.append(f"n{cfg.limit}")
    return Path("artifacts") / "features" / ("_".join(parts) + ".h5")


# ------------------------------------------------------------------------------------------ the model


def prepare_model(backbone: Backbone, device: torch.device, *, compile: bool = False) -> torch.nn.Module:
    # channels_last: 3-5x faster convolutions on CPU here, and the tensor-core layout on CUDA.
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


@torch.inference_mode()
def embed_batch(
    model: torch.nn.Module,
    batch: torch.Tensor,
    *,
    pre: Preprocessing,
    device: torch.device,
    precision: Precision,
    geometry: bool = False,
) -> torch.Tensor:
    """uint8 NCHW batch -> float32 (N, D) features on ``device``; ``geometry`` resizes and crops it there first."""
    x = batch.to(device, non_blocking=True)
    if geometry:
        x = pre.geometry_batch(x)
    x = pre.normalize(x)  # channels_last
    with precision_context(precision, device):
        y = model(x)
    return y.flatten(1).float()


def _run_split(
    name: str,
    split: Split,
    *,
    writer: FeatureWriter,
    model: torch.nn.Module,
    plan: ExtractPlan,
    cfg: ExtractConfig,
) -> int:
    pre, device = plan.backbone.preprocess, plan.device
    start = writer.seen(name)
    if start >= len(split):
        return 0
    if start:
        log.info("resuming %s at sample %d of %d", name, start, len(split))
    bar = tqdm(
        total=len(split),
        initial=start,
        desc=f"extract {name}",
        unit="img",
        disable=not cfg.progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    done = 0
    source = open_source(plan.sources[name], split, plan.settings)
    batches = source.batches(start)
    try:
        for batch in batches:
            if batch.bad and not cfg.skip_bad:
                i, err = batch.bad[0]
                raise PipelineError(f"cannot read image {split.ids[i]}: {err} (pass --skip-bad to skip such files)")
            for i, err in batch.bad:
                log.warning("skipped unreadable image %s: %s", split.ids[i], err)
            feats = (
                embed_batch(
                    model,
                    batch.images,
                    pre=pre,
                    device=device,
                    precision=_precision(cfg, device),
                    geometry=source.geometry_on_device,
                )
                .cpu()
                .numpy()
                if batch.images is not None
                else np.zeros((0, writer.dim), np.float32)
            )
            ok = batch.indices
            writer.append(
                name,
                feats,
                split.labels[ok],
                [split.ids[i] for i in ok],
                seen=batch.consumed,
                skipped=[split.ids[i] for i, _ in batch.bad],
            )
            done += len(ok)
            bar.update(batch.consumed)
            raise_if_stopped()
    finally:
        batches.close()  # stops loader workers on every exit path
        bar.close()
    return done


# ------------------------------------------------------------------------------------------ entry point


def _check_existing(out: Path, fp: str, force: bool) -> bool:
    """True if ``out`` already holds these features. Never deletes: a mismatch without --force is an error."""
    if not out.exists():
        return False
    try:
        meta = read_meta(out)
    except PipelineError as e:
        if force:
            return False
        raise PipelineError(
            f"{out} exists but is not a usable feature file ({e}); pass --force to replace it"
        ) from None
    if meta.get("fingerprint") == fp and meta.get("complete") and not force:
        return True
    if not force:
        raise PipelineError(
            f"{out} holds features made with other settings (fingerprint {str(meta.get('fingerprint'))[:12]} "
            f"!= {fp[:12]}); pass --force to replace it or choose another --out"
        )
    return False


@dataclass
class ExtractPlan:
    """What an extraction will write, decided before any image is read: model, data, fingerprint, file."""

    device: torch.device
    backbone: Backbone
    source: Source
    identity: dict[str, Any]
    fp: str
    out: Path
    sources: dict[str, str]  # split -> batch source name (pipeline.batches.BATCH_SOURCES), decided once here
    settings: SourceSettings  # batch size, loader workers, preprocessing, device: what the sources run with


def plan_extraction(cfg: ExtractConfig, *, source: Source | None = None) -> ExtractPlan:
    """Load the backbone and the dataset index and fix the output path and fingerprint.

    ``source`` replaces ``cfg.dataset`` with a ready-made one (e.g. in-memory arrays in tests and benchmarks).
    """
    device = resolve_device(cfg.device)
    backbone = load_backbone(
        cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, seed=cfg.seed, resize=cfg.resize
    )
    source = source or load_source(
        cfg.dataset,
        data_root=Path(cfg.data_root),
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        limit=cfg.limit,
    )
    sources = {name: choose_source(cfg.preprocess, split, device) for name, split in source.splits.items()}
    identity = feature_identity(backbone=backbone, source=source, cfg=cfg, device=device, sources=sources)
    out = Path(cfg.out) if cfg.out else default_out(cfg, source, backbone)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    settings = SourceSettings(pre=backbone.preprocess, device=device, batch_size=cfg.batch_size, workers=workers)
    return ExtractPlan(device, backbone, source, identity, fingerprint(identity), out, sources, settings)


def extract(cfg: ExtractConfig, *, plan: ExtractPlan | None = None) -> ExtractResult:
    """Extract features for every split of ``cfg.dataset`` into one HDF5 file (reused if up to date).

    ``plan`` (from :func:`plan_extraction`) may be narrowed to one rank's rows and shard file; see
    :mod:`pipeline.distributed`. The fingerprint stays that of the whole run.
    """
    p = plan or plan_extraction(cfg)
    source, fp, out = p.source, p.fp, p.out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create output folder {out.parent}: {e.strerror}") from None
    with FileLock(out):
        if _check_existing(out, fp, cfg.force):
            counts = {s: len(v) for s, v in source.splits.items()}
            return ExtractResult(path=out, reused=True, counts=counts, fingerprint=fp)
        if cfg.force and tmp_path_for(out).exists():
            tmp_path_for(out).unlink()
        return _write(p, cfg=cfg)


def _write(plan: ExtractPlan, *, cfg: ExtractConfig) -> ExtractResult:
    out, backbone, source, identity, fp, device = (
        plan.out,
        plan.backbone,
        plan.source,
        plan.identity,
        plan.fp,
        plan.device,
    )
    meta = {
        "fingerprint": fp,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "feature_dim": backbone.feature_dim,
        "num_classes": len(source.classes),
        "preprocessing": backbone.preprocess.as_dict(),
        "dataset": source.name,
        "dataset_identity": source.identity,
        "identity": identity,
        "config": asdict(cfg),
        "classifier_path": backbone.classifier_path,
        "versions": library_versions(),
        "device": str(device),
        "precision": identity["precision"],
    }
    writer = FeatureWriter(
        out,
        meta=meta,
        classes=source.classes,
        sizes={s: len(v) for s, v in source.splits.items()},
        feature_dim=backbone.feature_dim,
        dtype=cfg.dtype,
    )
    model = prepare_model(backbone, device, compile=cfg.compile)
    t0, done = time.perf_counter(), 0
    try:
        for name, split in source.splits.items():
            done += _run_split(name, split, writer=writer, model=model, plan=plan, cfg=cfg)
    except KeyboardInterrupt:
        writer.close()
        seen = sum(writer.seen(s) for s in source.splits)  # committed: what a rerun will not redo
        total = sum(len(v) for v in source.splits.values())
        raise ExtractInterrupted(
            f"stopped after {seen} of {total} images; rerun the same command to resume ({writer.tmp} keeps them)"
        ) from None
    except BaseException as e:
        writer.close()
        if cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PipelineError(
                f"--compile failed ({type(e).__name__}: {first}); rerun without --compile to resume"
            ) from None
        raise
    seconds = time.perf_counter() - t0
    skipped = {s: writer.skipped(s) for s in source.splits}
    writer.finish({"extract_seconds": round(seconds, 3), "resumed_from": writer.start})
    counts = {s: len(v) - len(skipped[s]) for s, v in source.splits.items()}
    return ExtractResult(
        path=out,
        reused=False,
        counts=counts,
        skipped=skipped,
        seconds=seconds,
        images_per_second=done / seconds if seconds > 0 else 0.0,
        fingerprint=fp,
        resumed_from=dict(writer.start),
    )
