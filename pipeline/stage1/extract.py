"""Stage one: run a frozen backbone once over a dataset and write the features to HDF5."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError, raise_if_stopped
from pipeline.exclude import Exclusion, read_exclusion
from pipeline.progress import progress_bar
from pipeline.stage1.backbones import Backbone, Preprocessing, load_backbone, with_outputs
from pipeline.stage1.batches import (
    Batch,
    Marks,
    SourceSettings,
    choose_source,
    default_batch_size,
    default_prefetch,
    default_workers,
    error_line,
    open_source,
)
from pipeline.stage1.config import ExtractConfig
from pipeline.stage1.datasets import Source, Split
from pipeline.stage1.precision import Precision, precision_context, resolve_precision
from pipeline.stage1.sources import load_options
from pipeline.stage1.targets import TargetTable, match_targets, read_targets_csv, skipped_line
from pipeline.store import (
    AUDIT_COLUMNS,
    DIGESTS,
    IDENTITY_VERSION,
    PHASH,
    FeatureMeta,
    FeatureWriter,
    FileLock,
    MultiHot,
    WeightsIdentity,
    check_output_name,
    describe_change,
    fingerprint,
    free_bytes,
    library_versions,
    read_dataset_files,
    read_meta,
    rewrite_targets,
)

__all__ = ["ExtractConfig", "ExtractPlan", "ExtractResult", "extract", "library_versions", "plan_extraction"]

log = logging.getLogger(__name__)


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
    compile_seconds: float = 0.0  # of ``seconds``, spent compiling the backbone (--compile)
    notes: list[str] = field(default_factory=list)  # lines for the summary (targets left out or re-attached)
    targets_stale: bool = False  # reused: features up to date, their stored targets not those of --targets


class ExtractInterrupted(PipelineError):
    """Ctrl-C / SIGTERM during extraction; the partial file stays resumable."""


def feature_identity(
    *,
    backbone: Backbone,
    source: Source,
    cfg: ExtractConfig,
    precision: Precision,
    sources: dict[str, str],
    exclusion: Exclusion | None = None,
) -> dict[str, Any]:
    """Everything that determines the features; its hash is the file's fingerprint. ``sources``: the batch source
    of each split (see :mod:`pipeline.stage1.batches`); ``exclusion``: the images --exclude left out."""
    identity = {
        "schema_version": IDENTITY_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "preprocessing": backbone.preprocess.as_dict(),
        "dataset": source.identity,
        "dtype": cfg.dtype,
        "precision": precision.label,
    }
    # Batch sources agree to rounding, not bit for bit, so what ran is part of the fingerprint: one name when all
    # splits share a source, else one per split. ("loader", the default before it was recorded, is hashed as
    # absent: see pipeline.store.record.DEFAULTS.)
    used = set(sources.values())
    identity["preprocess_on"] = used.pop() if len(used) == 1 else dict(sources)
    # What the file holds beyond the classifier's input; absent without --layers/--cache-at, so files written
    # before these options keep their fingerprint. A file of other layers is stale.
    if backbone.layers:
        identity["layers"] = [layer["name"] for layer in backbone.layers]
    if backbone.activations:
        identity["cache_at"] = backbone.activations["node"]
    if exclusion is not None:  # absent without --exclude: files written before it keep their fingerprint
        identity["exclude"] = exclusion.record()
    return identity


def default_out(cfg: ExtractConfig, source: Source, backbone: Backbone, *, exclusion: Exclusion | None = None) -> Path:
    kind = WeightsIdentity.parse(backbone.weights).kind
    weights = {"none": "none", "file": Path(cfg.weights).stem, "timm": "pretrained"}.get(kind, cfg.weights)
    parts = [source.name, cfg.backbone.replace(":", "-"), weights]  # timm:NAME: no colon in a file name
    if cfg.image_size:
        parts.append(f"img{cfg.image_size}")
    if cfg.limit:
        parts.append(f"n{cfg.limit}")
    if cfg.resize != "crop":
        parts.append(cfg.resize)  # a second recipe of the same images gets its own file, not a stale-file refusal
    parts += _outputs_suffix(cfg)
    if exclusion is not None:  # the cleaned images get their own file beside the whole set's
        parts.append(f"x{len(exclusion)}-{exclusion.digest[:6]}")
    return Path("artifacts") / "features" / ("_".join(parts) + ".h5")


def _outputs_suffix(cfg: ExtractConfig) -> list[str]:
    """``L<layer>+<layer>`` and ``at<node>`` for --layers and --cache-at: other outputs, another default file.
    A long list of nodes is named by a short hash instead (file names have a length limit)."""
    parts = []
    if cfg.layer_list:
        layers = list(dict.fromkeys(cfg.layer_list))
        names = "+".join(layers)
        if len(names) > 48:  # readable still: each name shortened (features.14.conv.2 -> f14c2), a hash if long
            short = "+".join(short_layer_name(n) for n in layers)
            tag = fingerprint({"layers": names})[:6]
            names = (
                f"{short}_{tag}"
                if len(short) <= 48
                else f"{short_layer_name(layers[0])}..{short_layer_name(layers[-1])}_{len(layers)}_{tag}"
            )
        parts.append("L" + names)
    if cfg.cache_at:
        parts.append("at" + cfg.cache_at.strip())
    return [p.replace("/", "-").replace(":", "-") for p in parts]


def short_layer_name(name: str) -> str:
    """A layer's name in a few characters: each dotted word's first letter and its digits (``features.14.conv.2``
    -> ``f14c2``, ``layer3.1.conv2`` -> ``l31c2``)."""
    out = []
    for part in name.replace("/", ".").replace(":", ".").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        letter = next((ch for ch in part if ch.isalpha()), "")
        out.append(letter + digits)
    return "".join(out) or name


def output_columns(backbone: Backbone) -> dict[str, tuple[tuple[int, ...], str]]:
    """The per-row columns a file of this backbone holds beside the features (:class:`FeatureWriter`'s
    ``columns``): the --cache-at activation map, and always the audit's content digest and perceptual hash of each
    image (the batch sources compute them: ``SourceSettings.marks``). These are not in the fingerprint: they do not
    change the features, and a file written before them stays up to date (the audit then goes without them)."""
    acts = backbone.activations
    return ({"activations": (tuple(acts["shape"]), acts["dtype"])} if acts else {}) | AUDIT_COLUMNS


def marks_columns(marks: Marks) -> dict[str, np.ndarray]:
    """A batch's :class:`Marks` as the writer's rows of the audit columns."""
    return {DIGESTS: np.array(marks.digests, dtype="S64"), PHASH: np.array(marks.phash, dtype=np.uint64)}


def exclude_from(source: Source, exclusion: Exclusion) -> Source:
    """``source`` without the images ``exclusion`` names (every split narrowed; the dataset identity kept: the
    fingerprint records the exclusion apart); ids it names that no split holds are refused in one line."""
    exclusion.check_known({name: split.ids for name, split in source.splits.items()})
    splits = {
        name: split.subset(np.flatnonzero(exclusion.keep(name, split.ids))) for name, split in source.splits.items()
    }
    return replace(source, splits=splits)


def multi_hot_of(source: Source) -> MultiHot | None:
    """Several labels per image (a labels table or shards read them: ``Split.multi_hot``), to store by id at
    finish; None for one label per image."""
    if not any(split.multi_hot is not None for split in source.splits.values()):
        return None
    return MultiHot({name: (split.ids, split.multi_hot) for name, split in source.splits.items()})


def check_room(plan: ExtractPlan) -> None:
    """--cache-at: refuse up front, with the estimate, when the output's disk cannot hold the activation maps
    (and the features) of every image. Without --cache-at the commits' own checks suffice (features are small)."""
    acts = plan.backbone.activations
    if not acts:
        return
    per_image = int(np.prod(acts["shape"])) * np.dtype(acts["dtype"]).itemsize
    images = sum(len(split) for split in plan.source.splits.values())
    need = images * (per_image + plan.backbone.feature_dim * 4 + 64)  # + features (float32 at most), label, id
    free = free_bytes(plan.out.parent)
    if free is not None and free < need:
        raise PipelineError(
            f"--cache-at {acts['node']} stores {_size(per_image)} per image, {_size(need)} for {images:,} images; "
            f"{plan.out.parent} has {_size(free)} free"
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit == "MB" else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ------------------------------------------------------------------------------------------ the model


# torch.compile: the mode and the run size above which it pays. Inductor's default mode: "max-autotune" modes spend
# minutes autotuning, which a one-pass extraction never earns back. The break-even is the images at which compile
# time equals the time it saves, measured by `make bench-gpu` (section "compile"); until it is measured on a GPU it is
# estimated from the H200 figures in FACTS.md (~16 s of compile, ~15% faster forward at ~35,000 images/s).
COMPILE_MODE = "default"
COMPILE_BREAK_EVEN_IMAGES = 2_000_000


def prepare_model(backbone: Backbone, device: torch.device, *, compile: bool = False) -> torch.nn.Module:
    # channels_last: 3-5x faster convolutions on CPU here, and the tensor-core layout on CUDA.
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Every batch has one shape (the last is padded, see _embed): cuDNN's autotuning runs once per layer and
        # then picks the fastest kernels (depthwise convolutions, MobileNetV2's, have slow heuristic defaults).
        torch.backends.cudnn.benchmark = True
    return torch.compile(model, mode=COMPILE_MODE, dynamic=False) if compile else model


@torch.inference_mode()
def embed_batch(
    model: torch.nn.Module,
    batch: torch.Tensor,
    *,
    pre: Preprocessing,
    device: torch.device,
    precision: Precision,
    geometry: bool = False,
) -> dict[str, torch.Tensor]:
    """uint8 NCHW batch -> ``{"features": float32 (N, D)}`` on ``device``, plus ``"activations"``: float16
    (N, C, H, W) when the model returns them (--cache-at, see :func:`with_outputs`); ``geometry`` resizes and
    crops the batch there first."""
    x = batch.to(device, non_blocking=True)
    if geometry:
        x = pre.geometry_batch(x)
    x = pre.normalize(x)  # channels_last
    with precision_context(precision, device):
        y = model(x)
    if isinstance(y, tuple):  # (features, activation map): stored float16 in NCHW, converted here on the device
        return {"features": y[0].flatten(1).float(), "activations": y[1].to(torch.float16).contiguous()}
    return {"features": y.flatten(1).float()}


def _embed(
    model: torch.nn.Module, images: torch.Tensor, *, plan: ExtractPlan, cfg: ExtractConfig, geometry: bool
) -> dict[str, torch.Tensor]:
    """The one call of :func:`embed_batch`. A short batch is padded to ``plan.pad_to`` rows and the padding dropped:
    one input shape for the whole run, so neither torch.compile nor cuDNN's autotuner meets a new one at the end."""
    n = len(images)
    if plan.pad_to and n < plan.pad_to:
        images = torch.cat([images, images.new_zeros((plan.pad_to - n, *images.shape[1:]))])
    outputs = embed_batch(
        model,
        images,
        pre=plan.backbone.preprocess,
        device=plan.device,
        precision=plan.precision,
        geometry=geometry,
    )
    return {k: v[:n] for k, v in outputs.items()}


@dataclass
class _Job:
    split: str
    slot: int | None  # the pinned host buffers holding the outputs; None for a batch of unreadable samples only
    rows: int
    event: Any  # CUDA event recorded after the copy to the host; None on the CPU
    host: dict[str, np.ndarray]  # the columns made on the host (the audit's marks), already as rows
    labels: np.ndarray
    ids: list[str]
    seen: int
    skipped: list[str]


def _check_finite(columns: dict[str, np.ndarray], *, ids: list[str]) -> None:
    """Activation maps are stored in float16, whose range ends at 65504: a larger value (some ViTs' blocks) would
    be stored as inf and train nothing. Refused with the first image, before the rows reach the file."""
    for name, rows in columns.items():
        bad = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        if bad.any():
            raise PipelineError(
                f"the {name} of image {ids[int(np.argmax(bad))]} are not finite in float16 (beyond its range of "
                f"+-65504, or NaN) in {int(bad.sum())} of {len(rows)} images of a batch; cache at another node"
            )


class FeatureSink:
    """Features (and the other outputs: --cache-at's activation maps) on their way from the device to the file, off
    the main thread.

    ``put`` starts a non-blocking copy of a batch of outputs into one of a few pinned host buffers (a ring: one
    buffer per output column in each slot), on a
    side CUDA stream, and queues it; one writer thread waits for each copy (its event, not a device-wide
    synchronisation) and calls ``writer.append``. The main thread meanwhile queues the next batches on the GPU. Once
    started, only the writer thread touches the :class:`FeatureWriter` until :meth:`stop` has joined it. The ring
    bounds how far the GPU runs ahead of the disk (``put`` waits for a free buffer). The audit's columns are made on
    the host by the batch sources and travel with their batch as they are (no buffer, no copy).
    """

    def __init__(self, writer: FeatureWriter, *, device: torch.device, rows: int, slots: int = 4):
        self.writer, self.device = writer, device
        cuda = device.type == "cuda"
        columns = {"features": ((writer.dim,), torch.float32)}
        columns |= {c: (shape, getattr(torch, str(dtype)))
                    for c, (shape, dtype) in writer.columns.items() if c not in AUDIT_COLUMNS}  # fmt: skip
        self._bufs = [
            {c: torch.empty((rows, *shape), dtype=dtype, pin_memory=cuda) for c, (shape, dtype) in columns.items()}
            for _ in range(slots)
        ]
        self._free: queue.Queue[int] = queue.Queue()
        for k in range(slots):
            self._free.put(k)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._abandon = False  # set by an interrupt while stopping: stop appending, just let the thread end
        self.interrupted = False  # an interrupt arrived while stop() waited (the Ctrl-C went there, not to the loop)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
        self._thread.start()
        self._stopped = False

    def put(
        self,
        split: str,
        outputs: dict[str, torch.Tensor] | None,
        *,
        labels: np.ndarray,
        ids: list[str],
        seen: int,
        skipped: list[str],
        marks: Marks | None = None,
    ) -> None:
        """Queue a batch: ``outputs`` (from :func:`embed_batch`: features and any other column) or None, with the
        batch's ``marks`` (the audit columns, required when the writer has them and the batch has rows)."""
        self.raise_error()
        slot = event = None
        rows = 0 if outputs is None else len(outputs["features"])
        if rows:
            slot = self._take_slot()
            hosts = {c: buf[:rows] for c, buf in self._bufs[slot].items()}
            if self._stream is None:
                for c, host in hosts.items():
                    host.copy_(outputs[c])
            else:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the forward that made them
                with torch.cuda.stream(self._stream):
                    for c, host in hosts.items():
                        host.copy_(outputs[c], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                for c in hosts:
                    outputs[c].record_stream(self._stream)
        host = marks_columns(marks) if rows and marks is not None else {}
        host = {c: v for c, v in host.items() if c in self.writer.columns}  # a .tmp resumed without them has none
        self._jobs.put(_Job(split, slot, rows, event, host, labels, ids, seen, skipped))

    def _take_slot(self) -> int:
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                self.raise_error()  # the writer died holding the buffers: say why instead of waiting forever

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self.error is None and not self._abandon:
                    self._append(job)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread by raise_error
                self.error = e
            finally:
                if job.slot is not None:
                    self._free.put(job.slot)

    def _append(self, job: _Job) -> None:
        if job.event is not None:
            job.event.synchronize()
        if job.slot is None:
            feats, extra = np.zeros((0, self.writer.dim), np.float32), None
        else:
            host = {c: buf[: job.rows].numpy() for c, buf in self._bufs[job.slot].items()}
            feats, extra = host.pop("features"), host
            _check_finite(extra, ids=job.ids)
            extra |= job.host
        self.writer.append(job.split, feats, job.labels, job.ids, seen=job.seen, skipped=job.skipped, extra=extra)

    def raise_error(self) -> None:
        """Re-raise, on the calling thread, what stopped the writer thread (one line; the traceback at -v)."""
        e = self.error
        if e is None:
            return
        if isinstance(e, (PipelineError, KeyboardInterrupt)):  # already one line / the interrupt path
            raise e
        log.debug("the feature writer thread failed", exc_info=e)
        raise PipelineError(
            f"writing {self.writer.tmp} failed ({error_line(e)}); rerun the same command to resume"
        ) from None

    def stop(self) -> None:
        """Append what is queued, then join the thread (every exit path calls this; it may be called twice). A Ctrl-C
        while it waits drops what is still queued and sets ``interrupted``: the file then holds fewer rows, all of them
        whole, and the run must end as interrupted (resumable), never finish it."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt:
                self._abandon = True
                self.interrupted = True  # the caller must not finish the file: queued rows were dropped


def _run_split(
    name: str,
    split: Split,
    *,
    start: int,
    sink: FeatureSink,
    model: torch.nn.Module,
    plan: ExtractPlan,
    cfg: ExtractConfig,
) -> int:
    if start >= len(split):
        return 0
    if start:
        log.info("resuming %s at sample %d of %d", name, start, len(split))
    bar = progress_bar(total=len(split), initial=start, desc=f"extract {name}", enabled=cfg.progress)
    done = 0
    source = open_source(plan.sources[name], split, plan.settings)
    batches = source.batches(start)
    try:
        for batch in batches:
            _check_bad(batch, split, skip_bad=cfg.skip_bad)
            outputs = None
            if batch.images is not None:
                outputs = _embed(model, batch.images, plan=plan, cfg=cfg, geometry=source.geometry_on_device)
                if not done:  # the first batch: weights holding NaN made a file of NaN features, exit 0
                    check_first_features(outputs["features"], weights=cfg.weights, first=split.ids[batch.indices[0]])
            ok = batch.indices
            sink.put(
                name,
                outputs,
                labels=split.labels[ok],
                ids=[split.ids[i] for i in ok],
                seen=batch.consumed,
                skipped=[split.ids[i] for i, _ in batch.bad],
                marks=batch.marks,
            )
            done += len(ok)
            bar.update(batch.consumed)
            raise_if_stopped()
    finally:
        batches.close()  # stops loader workers and reading threads on every exit path
        bar.close()
    return done


def check_first_features(features: torch.Tensor, *, weights: str, first: str) -> None:
    """Stop, in one line naming the weights, when the first batch's features are not finite: every later batch
    would be the same (one sync with the device, once a split)."""
    if not bool(torch.isfinite(features).all()):
        raise PipelineError(
            f"the features of the first batch (image {first}) are NaN or infinite: the weights ({weights}) hold NaN "
            "or infinite values, or --precision overflows"
        )


def _check_bad(batch: Batch, split: Split, *, skip_bad: bool) -> None:
    if batch.bad and not skip_bad:
        i, err = batch.bad[0]
        raise PipelineError(f"cannot read image {split.ids[i]}: {err} (pass --skip-bad to skip such files)")
    for i, err in batch.bad:
        log.warning("skipped unreadable image %s: %s", split.ids[i], err)


# ------------------------------------------------------------------------------------------ entry point


def reuse_existing(plan: ExtractPlan, *, force: bool) -> ExtractResult | None:
    """The result of reusing ``plan.out`` if it already holds these features, else None (write them).

    Never deletes: a file of other settings without --force is refused with one line saying what changed.
    A file under the final name is always complete (it is renamed there when finished), so this needs no lock.
    """
    out, fp = plan.out, plan.fp
    if not out.exists():
        return None
    try:
        meta = read_meta(out)
    except PipelineError as e:
        if force:
            return None
        raise PipelineError(
            f"{out} exists but is not a usable feature file ({e}); pass --force to replace it"
        ) from None
    if meta.fingerprint == fp and meta.complete and not force:
        counts = {s: len(v) for s, v in plan.source.splits.items()}
        stale = _targets_key(meta.targets) != _targets_key(plan.targets.info if plan.targets else None)
        return ExtractResult(path=out, reused=True, counts=counts, fingerprint=fp, targets_stale=stale)
    if not force:
        if meta.identity:
            change = describe_change(
                meta.identity, plan.identity, old_files=read_dataset_files(out), new_files=plan.source.files
            )
        else:  # written before files recorded their identity
            change = f"fingerprint {meta.fingerprint[:12]} != {fp[:12]}"
        raise PipelineError(
            f"{out} holds features made with other settings ({change}); pass --force to replace it or choose "
            "another --out"
        )
    return None


def _targets_key(info: dict[str, Any] | None) -> tuple | None:
    """What makes two stored sets of targets the same: the CSV's bytes and its column names."""
    return None if not info else (info.get("sha256"), tuple(info.get("names") or ()))


def refresh_targets(plan: ExtractPlan, result: ExtractResult, *, cfg: ExtractConfig) -> ExtractResult:
    """Give an up-to-date file (``result``, reused) the targets of ``plan`` without running the backbone: the
    targets are not in the fingerprint (see :mod:`pipeline.stage1.targets`). The caller holds the file lock."""
    if not result.targets_stale:
        return result
    config = {**(read_meta(plan.out).config or {}), "targets": cfg.targets}
    rewrite_targets(plan.out, plan.targets, updates={"config": config})
    if plan.targets is None:
        result.notes.append(f"removed the regression targets from {plan.out} (extract without --targets)")
    else:
        result.notes.append(
            f"attached the targets of {plan.targets.source} ({', '.join(plan.targets.names)}) to the up-to-date "
            "features: the backbone did not run again"
        )
    result.targets_stale = False
    return result


@dataclass
class ExtractPlan:
    """What an extraction will write, decided before any image is read: model, data, fingerprint, file."""

    device: torch.device
    backbone: Backbone
    source: Source
    identity: dict[str, Any]
    fp: str
    out: Path
    sources: dict[str, str]  # split -> batch source name (pipeline.stage1.batches.BATCH_SOURCES), decided once here
    settings: SourceSettings  # batch size, loader workers, preprocessing, device: what the sources run with
    precision: Precision  # the backbone's arithmetic on this device (--precision resolved once)
    compile: bool = False  # torch.compile the backbone (cfg.compile, with None resolved by the run size)
    pad_to: int = 0  # pad every batch to this many rows (0: no padding): one shape for compile and cuDNN
    targets: TargetTable | None = None  # --targets, checked against the images (stored at finish)
    targets_skipped: dict[str, int] = field(default_factory=dict)  # images --skip-missing-targets left out
    exclusion: Exclusion | None = None  # --exclude: the images left out (in the fingerprint)

    def recorded_config(self, cfg: ExtractConfig) -> dict[str, Any]:
        """The file's ``config``: the options with every ``None`` (= by device) replaced by the value used."""
        s = self.settings
        resolved = replace(cfg, batch_size=s.batch_size, workers=s.workers, compile=self.compile)
        return {**asdict(resolved), **s.recorded(), "pad_to": self.pad_to}


def meta_from_plan(plan: ExtractPlan, *, config: dict[str, Any]) -> FeatureMeta:
    """The record of a file an extraction plan writes: the same for a plain run, each shard and the merge."""
    backbone, source = plan.backbone, plan.source
    return FeatureMeta(
        fingerprint=plan.fp,
        backbone=backbone.name,
        weights=backbone.weights,
        feature_dim=backbone.feature_dim,
        num_classes=len(source.classes),
        preprocessing=backbone.preprocess.as_dict(),
        dataset=source.name,
        dataset_identity=source.identity,
        identity=plan.identity,
        config=config,
        classifier_path=backbone.classifier_path,
        versions=library_versions(),
        device=str(plan.device),
        precision=str(plan.identity.get("precision", "")),
        scan_skipped=list(getattr(source, "unreadable", None) or []) or None,
        layers=backbone.layers,
        activations=backbone.activations,
        label_kind="multi" if multi_hot_of(source) is not None else "single",
    )


def plan_extraction(cfg: ExtractConfig, *, source: Source | None = None) -> ExtractPlan:
    """Load the backbone and the dataset index and fix the output path and fingerprint.

    ``source`` replaces ``cfg.dataset`` with a ready-made one (e.g. in-memory arrays in tests and benchmarks).
    """
    device = resolve_device(cfg.device)
    table = read_targets_csv(cfg.targets) if cfg.targets else None  # first: a bad CSV costs nothing
    backbone = load_backbone(
        cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, seed=cfg.seed, resize=cfg.resize
    )
    backbone = with_outputs(backbone, layers=cfg.layer_list, cache_at=cfg.cache_at and cfg.cache_at.strip())
    source = source or load_options(cfg)
    skipped: dict[str, int] = {}
    if table is not None:  # before the fingerprint: --skip-missing-targets narrows the rows it covers
        table, source, skipped = match_targets(table, source, skip_missing=cfg.skip_missing_targets)
    exclusion = read_exclusion(cfg.exclude) if cfg.exclude else None
    if exclusion is not None:
        source = exclude_from(source, exclusion)
    sources = {name: choose_source(cfg.preprocess, split, device) for name, split in source.splits.items()}
    precision = resolve_precision(cfg.precision, device)
    identity = feature_identity(
        backbone=backbone, source=source, cfg=cfg, precision=precision, sources=sources, exclusion=exclusion
    )
    out = Path(cfg.out) if cfg.out else default_out(cfg, source, backbone, exclusion=exclusion)
    settings = source_settings(cfg, device=device, pre=backbone.preprocess)
    images = sum(len(split) for split in source.splits.values())
    compile = resolve_compile(cfg.compile, device=device, images=images)
    pad_to = settings.batch_size if compile or device.type == "cuda" else 0
    return ExtractPlan(
        device,
        backbone,
        source,
        identity,
        fingerprint(identity),
        out,
        sources,
        settings,
        precision,
        compile=compile,
        pad_to=pad_to,
        targets=table,
        targets_skipped=skipped,
        exclusion=exclusion,
    )


def resolve_compile(choice: bool | None, *, device: torch.device, images: int) -> bool:
    """``--compile`` as given, or (None) only on CUDA and only for runs that earn the compile time back."""
    if choice is not None:
        return choice
    return device.type == "cuda" and images >= COMPILE_BREAK_EVEN_IMAGES


def source_settings(cfg: ExtractConfig, *, device: torch.device, pre: Preprocessing) -> SourceSettings:
    """Batch size, workers, pinned memory and prefetch: the user's values, else the device's defaults."""
    return SourceSettings(
        pre=pre,
        device=device,
        batch_size=cfg.batch_size or default_batch_size(device, crop_size=pre.crop_size),
        workers=default_workers(device) if cfg.workers is None else cfg.workers,
        pin_memory=device.type == "cuda",
        prefetch=default_prefetch(device),
        marks=True,  # the audit columns (output_columns): every source computes them where its pixels are
    )


def extract(cfg: ExtractConfig, *, plan: ExtractPlan | None = None) -> ExtractResult:
    """Extract features for every split of ``cfg.dataset`` into one HDF5 file (reused if up to date).

    ``plan`` (from :func:`plan_extraction`) may be narrowed to one rank's rows and shard file; see
    :mod:`pipeline.stage1.distributed`. The fingerprint stays that of the whole run.
    """
    p = plan or plan_extraction(cfg)
    check_output_name(p.out)
    # Checked before taking the lock, so an up-to-date file in a read-only folder is reused, not refused.
    reused = reuse_existing(p, force=cfg.force)
    if reused and not reused.targets_stale:
        return _with_notes(reused, p)
    try:
        p.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create output folder {p.out.parent}: {e.strerror}") from None
    with FileLock(p.out):
        reused = reuse_existing(p, force=cfg.force)  # again: another process may have finished it meanwhile
        if reused:
            return _with_notes(refresh_targets(p, reused, cfg=cfg), p)
        return _with_notes(_write(p, cfg=cfg), p)


def _with_notes(result: ExtractResult, plan: ExtractPlan) -> ExtractResult:
    if plan.exclusion is not None:
        result.notes.insert(0, plan.exclusion.line())
    if plan.targets_skipped and plan.targets is not None:
        result.notes.insert(0, skipped_line(plan.targets_skipped, plan.targets.source))
    pre = plan.backbone.preprocess
    hint = small_images_hint(plan.source, crop=pre.crop_size, resize=pre.resize)
    if hint:
        result.notes.append(hint)
    return result


SMALL_IMAGE = 64  # px: below this (shorter side) the crop recipe mostly magnifies the image


def small_images_hint(source: Any, *, crop: int, resize: str, sample: int = 32) -> str | None:
    """A hint when most images (a sample of each split) are smaller than SMALL_IMAGE px and the crop recipe blows
    them up to ``crop`` px: on 28 px photos ``--resize full`` at 112 px scored 0.871 in 165 s against 0.878 in 466 s
    at 224 px crop (issue 25)."""
    if resize != "crop":
        return None
    sides = []
    for split in source.splits.values():
        n = len(split)
        for i in np.unique(np.linspace(0, n - 1, min(sample, n)).astype(int)) if n else []:
            try:
                if split.arrays is not None:
                    sides.append(min(split.arrays.shape[1:3]))
                elif split.path is not None:  # an image file: its header only, no decode
                    with Image.open(split.path(int(i))) as img:
                        sides.append(min(img.size))
                # other sources (shards) are not read again for a hint
            except (OSError, ValueError):
                continue
    if not sides or np.median(sides) >= SMALL_IMAGE or np.median(sides) * 2 > crop:
        return None
    m = int(np.median(sides))
    return (
        f"most images are about {m} px and the crop recipe upsamples them to {crop} px: --resize full with a "
        f"smaller --image-size (e.g. {max(32, 4 * m)}) costs a fraction of the time and often scores the same"
    )


def _write(plan: ExtractPlan, *, cfg: ExtractConfig) -> ExtractResult:
    out, backbone, source, fp, device = plan.out, plan.backbone, plan.source, plan.fp, plan.device
    check_room(plan)
    writer = FeatureWriter(
        out,
        meta=meta_from_plan(plan, config=plan.recorded_config(cfg)),
        classes=source.classes,
        sizes={s: len(v) for s, v in source.splits.items()},
        feature_dim=backbone.feature_dim,
        dtype=cfg.dtype,
        files=source.files,
        restart=cfg.force,  # --force: the one place a partial .tmp is discarded
        columns=output_columns(backbone),
    )
    starts = {name: writer.seen(name) for name in source.splits}  # read before the writer thread owns the writer
    model = prepare_model(backbone, device, compile=plan.compile)
    sink = FeatureSink(writer, device=device, rows=plan.settings.batch_size)
    t0, done, compile_s = time.perf_counter(), 0, 0.0
    try:
        if plan.compile:
            compile_s = _compile_now(model, plan=plan, cfg=cfg)
        for name, split in source.splits.items():
            done += _run_split(name, split, start=starts[name], sink=sink, model=model, plan=plan, cfg=cfg)
        sink.stop()
        if sink.interrupted:  # Ctrl-C while the last batches were written: they were dropped, so do not finish
            raise KeyboardInterrupt
        raise_if_stopped()  # a stop signal Python could not raise (see pipeline.errors.stop_signals)
        sink.raise_error()
    except KeyboardInterrupt:
        sink.stop()
        writer.close()
        seen = sum(writer.seen(s) for s in source.splits)  # committed: what a rerun will not redo
        total = sum(len(v) for v in source.splits.values())
        raise ExtractInterrupted(
            f"stopped after {seen} of {total} images; rerun the same command to resume ({writer.tmp} keeps them)"
        ) from None
    except BaseException as e:
        sink.stop()
        writer.close()
        _raise_one_line(e, cfg=cfg, plan=plan)
        raise
    seconds = time.perf_counter() - t0
    skipped = {s: writer.skipped(s) for s in source.splits}
    writer.finish({"extract_seconds": round(seconds, 3), "resumed_from": writer.start}, targets=plan.targets,
                  multi_hot=multi_hot_of(source))  # fmt: skip
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
        compile_seconds=compile_s,
    )


def _compile_now(model: torch.nn.Module, *, plan: ExtractPlan, cfg: ExtractConfig) -> float:
    """Compile on a blank batch of the run's one shape, so the compile time is said, not hidden in the first batch."""
    crop = plan.backbone.preprocess.crop_size
    blank = torch.zeros((plan.pad_to, 3, crop, crop), dtype=torch.uint8, device=plan.device)
    t0 = time.perf_counter()
    _embed(model, blank, plan=plan, cfg=cfg, geometry=False)
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)  # once, to time the compile
    seconds = time.perf_counter() - t0
    log.info("--compile: compiled %s in %.1f s (mode %s)", plan.backbone.name, seconds, COMPILE_MODE)
    return seconds


def _raise_one_line(e: BaseException, *, cfg: ExtractConfig, plan: ExtractPlan) -> None:
    """Errors a user can fix by changing an option become one line; the partial ``.tmp`` stays resumable."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if plan.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        raise PipelineError(
            f"--compile failed ({type(e).__name__}: {first}); rerun without --compile to resume"
        ) from None
    if isinstance(e, torch.cuda.OutOfMemoryError):
        raise PipelineError(
            f"out of GPU memory at batch size {plan.settings.batch_size}; rerun with a smaller --batch-size to resume"
        ) from None
