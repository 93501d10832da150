"""The feature file: the contract between stage one (extract) and stage two (heads).

The schema is defined here and nowhere else; stage two reads it only through :func:`read_features`.

    /                      attrs: format, schema_version, fingerprint, complete, backbone, weights,
                                  feature_dim, num_classes, preprocessing (JSON), dataset, dataset_identity
                                  (JSON), config (JSON), created (ISO 8601), versions (JSON)
    /classes               (C,)   utf-8 class names, index = label
    /<split>/features      (N, D) float32 (or float16)
    /<split>/labels        (N,)   int64 in [0, C)
    /<split>/ids           (N,)   utf-8 per-sample id: dataset index or path relative to the image folder
    /<split>               attrs: n_total (samples in the source split), n_seen (samples processed),
                                  n_rows (rows written), skipped (JSON list of ids of unreadable images)

A file is written as ``<out>.tmp`` and renamed to ``<out>`` only when complete, so a reader never sees a
partial file under the final name. The ``.tmp`` file is flushed every few batches with ``n_seen``/``n_rows``
updated first, which is what makes an interrupted extraction resumable (see :class:`FeatureWriter`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError

FORMAT = "pipeline.cached-embeddings"
SCHEMA_VERSION = 1
SPLITS = ("train", "val")
FEATURE_DTYPES = ("float32", "float16")
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks of whole rows: fast full reads (tiny auto-chunks are 7x slower)


def fingerprint(identity: dict[str, Any]) -> str:
    """Hash of everything that determines the features (canonical JSON, sha256)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tmp_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@dataclass
class SplitFeatures:
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FeatureSet:
    """A validated feature file held in memory."""

    path: Path
    classes: list[str]
    splits: dict[str, SplitFeatures]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> SplitFeatures:
        return self.splits["train"]

    @property
    def val(self) -> SplitFeatures:
        return self.splits["val"]

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])


# --------------------------------------------------------------------------------------------- reading


def _open_for_read(path: Path) -> h5py.File:
    if not path.exists():
        raise PipelineError(f"feature file not found: {path} (run `python -m pipeline extract` first)")
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, not a feature file")
    if not h5py.is_hdf5(path):
        raise PipelineError(f"{path} is not an HDF5 file (truncated, or not written by `pipeline extract`)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise PipelineError(f"cannot open {path}: damaged or truncated HDF5 file ({e})") from None


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _meta_from(f: h5py.File, path: Path) -> dict[str, Any]:
    meta = {k: _decode_attr(v) for k, v in f.attrs.items()}
    if meta.get("format") != FORMAT:
        raise PipelineError(f"{path} was not written by `pipeline extract` (no '{FORMAT}' format attribute)")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PipelineError(
            f"{path} has feature-file schema version {version}; this version of pipeline reads {SCHEMA_VERSION}"
        )
    for key in ("preprocessing", "dataset_identity", "config", "versions"):
        if isinstance(meta.get(key), str):
            meta[key] = json.loads(meta[key])
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """Root metadata of a feature file (validated format and schema version, no arrays read)."""
    path = Path(path)
    with _open_for_read(path) as f:
        return _meta_from(f, path)


def _read_split(f: h5py.File, name: str, path: Path) -> SplitFeatures:
    if name not in f or not all(k in f[name] for k in ("features", "labels", "ids")):
        raise PipelineError(f"{path} has no complete '/{name}' group (features, labels, ids)")
    g = f[name]
    feats = g["features"][()]
    labels = g["labels"][()]
    ids = g["ids"].asstr()[()]
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels) or len(ids) != len(labels):
        raise PipelineError(
            f"{path}: /{name} arrays disagree in shape (features {feats.shape}, labels {labels.shape}, ids {ids.shape})"
        )
    return SplitFeatures(features=feats, labels=labels.astype(np.int64, copy=False), ids=ids)


def _validate(fs: FeatureSet) -> None:
    path, dim, n_classes = fs.path, fs.feature_dim, len(fs.classes)
    for name, split in fs.splits.items():
        if split.features.shape[1] != dim:
            raise PipelineError(
                f"{path}: /{name}/features has dimension {split.features.shape[1]}, the file says {dim}"
            )
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= n_classes):
            raise PipelineError(
                f"{path}: /{name}/labels fall outside the {n_classes} classes "
                f"(range {split.labels.min()}..{split.labels.max()})"
            )
        if not np.isfinite(split.features).all():
            bad = int((~np.isfinite(split.features)).any(axis=1).sum())
            raise PipelineError(f"{path}: /{name}/features holds NaN or Inf in {bad} rows")
    if len(fs.train) == 0:
        raise PipelineError(f"{path}: the train split is empty")


def read_features(path: Path | str, *, splits: tuple[str, ...] = SPLITS) -> FeatureSet:
    """Load and validate a complete feature file; every problem is a one-line :class:`PipelineError`."""
    path = Path(path)
    with _open_for_read(path) as f:
        meta = _meta_from(f, path)
        if not meta.get("complete"):
            raise PipelineError(f"{path} is incomplete (extraction did not finish); rerun extract to resume")
        if "classes" not in f:
            raise PipelineError(f"{path} has no /classes dataset")
        classes = list(f["classes"].asstr()[()])
        data = {name: _read_split(f, name, path) for name in splits}
    fs = FeatureSet(path=path, classes=classes, splits=data, meta=meta)
    _validate(fs)
    return fs


# --------------------------------------------------------------------------------------------- writing


class FileLock:
    """An exclusive, non-blocking lock on ``<path>.lock``; the OS drops it when the process dies."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PipelineError(f"cannot write to {self.path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise PipelineError(
                f"another extract is already writing {self.path.with_suffix('')}; wait for it or choose --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, dim * itemsize))


class FeatureWriter:
    """Writes one feature file under ``<out>.tmp``, resumable, and renames it to ``<out>`` when finished.

    ``meta`` holds the root attributes (must include ``fingerprint``); ``sizes`` the number of source samples
    per split. If a ``.tmp`` with the same fingerprint exists it is reopened and writing continues after the
    last flushed row; a ``.tmp`` with another fingerprint is replaced.
    """

    def __init__(
        self,
        path: Path,
        *,
        meta: dict[str, Any],
        classes: list[str],
        sizes: dict[str, int],
        feature_dim: int,
        dtype: str = "float32",
        flush_every: int = 8,
    ):
        if dtype not in FEATURE_DTYPES:
            raise PipelineError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype!r}")
        self.path = Path(path)
        self.tmp = tmp_path_for(self.path)
        self.meta, self.classes, self.sizes = meta, classes, sizes
        self.dim, self.dtype, self.flush_every = feature_dim, np.dtype(dtype), flush_every
        self._writes = 0
        self._skipped: dict[str, list[str]] = {s: [] for s in sizes}
        self.f = self._open()

    # -- opening
    def _open(self) -> h5py.File:
        if self.tmp.exists():
            f = self._try_resume()
            if f is not None:
                return f
            self.tmp.unlink()
        try:
            f = h5py.File(self.tmp, "w")
        except OSError as e:
            raise PipelineError(f"cannot create {self.tmp}: {e.strerror or e}") from None
        self._create(f)
        return f

    def _try_resume(self) -> h5py.File | None:
        try:
            f = h5py.File(self.tmp, "a")
        except OSError:
            return None  # killed before its first flush: nothing to resume
        if _decode_attr(f.attrs.get("fingerprint")) != self.meta["fingerprint"] or any(s not in f for s in self.sizes):
            f.close()
            return None
        for s in self.sizes:
            rows = int(f[s].attrs["n_rows"])
            for key in ("features", "labels", "ids"):
                f[s][key].resize(rows, axis=0)  # drop rows written after the last flush
            self._skipped[s] = json.loads(f[s].attrs.get("skipped", "[]"))
        return f

    def _create(self, f: h5py.File) -> None:
        for key, value in self.meta.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        f.attrs["format"] = FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.create_dataset("classes", data=np.array(self.classes, dtype=object), dtype=_STR)
        rows = _chunk_rows(self.dim, self.dtype.itemsize)
        for s, n in self.sizes.items():
            g = f.create_group(s)
            g.create_dataset(
                "features",
                shape=(0, self.dim),
                maxshape=(None, self.dim),
                dtype=self.dtype,
                chunks=(max(1, min(rows, n)), self.dim),
            )
            g.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(max(1, min(n, 65536)),))
            g.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(max(1, min(n, 65536)),))
            g.attrs.update(n_total=n, n_seen=0, n_rows=0, skipped="[]")
        f.flush()

    # -- progress
    def seen(self, split: str) -> int:
        """Source samples of ``split`` already processed (the resume point)."""
        return int(self.f[split].attrs["n_seen"])

    def skipped(self, split: str) -> list[str]:
        return list(self._skipped[split])

    def append(
        self,
        split: str,
        features: np.ndarray,
        labels: np.ndarray,
        ids: list[str],
        *,
        seen: int,
        skipped: list[str] = (),
    ) -> None:
        """Append rows for ``seen`` consumed source samples (``skipped`` of them unreadable)."""
        g = self.f[split]
        rows = int(g.attrs["n_rows"])
        n = len(labels)
        for key, arr in (
            ("features", features.astype(self.dtype, copy=False)),
            ("labels", labels),
            ("ids", ids),
        ):
            g[key].resize(rows + n, axis=0)
            g[key][rows : rows + n] = arr
        self._skipped[split].extend(skipped)
        # Counters are attributes of the same file, so whatever the last flush saved is self-consistent:
        # after a crash n_rows/n_seen describe exactly the rows that reached the disk.
        g.attrs.update(n_rows=rows + n, n_seen=int(g.attrs["n_seen"]) + seen)
        if skipped:
            g.attrs["skipped"] = json.dumps(self._skipped[split])
        self._writes += 1
        if self._writes % self.flush_every == 0:
            self.f.flush()

    def finish(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Mark complete, close and atomically rename to the final name."""
        for s in self.sizes:
            g = self.f[s]
            g.attrs["skipped"] = json.dumps(self._skipped[s])
        for key, value in (extra_attrs or {}).items():
            self.f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Flush and close without finishing (interrupt): the ``.tmp`` stays resumable."""
        if self.f.id.valid:
            self.f.flush()
            self.f.close()
