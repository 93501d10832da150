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

A file is written as ``<out>.tmp`` and renamed to ``<out>`` only when complete (after an fsync), so a reader
never sees a partial file under the final name. Every few batches the writer *commits*: it writes
``n_seen``/``n_rows``/``skipped`` and then flushes, and touches them at no other time, so a ``.tmp`` left by a
crash or ``kill -9`` describes exactly the rows that reached the disk and can be resumed (see :class:`FeatureWriter`).
A finished file also records ``extract_seconds`` and ``resumed_from`` (JSON: samples per split a resumed run found).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import fsync_path

log = logging.getLogger(__name__)
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
        if _is_locked(e):
            raise PipelineError(f"{path} is being written by another process; wait for it to finish") from None
        raise PipelineError(f"cannot open {path}: damaged or truncated HDF5 file ({e})") from None


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _meta_from(f: h5py.File, path: Path) -> dict[str, Any]:
    try:
        meta = {k: _decode_attr(v) for k, v in f.attrs.items()}
    except (OSError, TypeError, ValueError) as e:
        raise PipelineError(f"cannot read the metadata of {path}: damaged HDF5 file ({e})") from None
    if meta.get("format") != FORMAT:
        raise PipelineError(f"{path} was not written by `pipeline extract` (no '{FORMAT}' format attribute)")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PipelineError(
            f"{path} has feature-file schema version {version}; this version of pipeline reads {SCHEMA_VERSION}"
        )
    for key in ("preprocessing", "dataset_identity", "config", "versions"):
        if isinstance(meta.get(key), str):
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                raise PipelineError(f"{path}: the '{key}' attribute is not valid JSON") from None
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """Root metadata of a feature file (validated format and schema version, no arrays read)."""
    path = Path(path)
    with _open_for_read(path) as f:
        return _meta_from(f, path)


def _read_split(f: h5py.File, name: str, path: Path) -> SplitFeatures:
    if (
        name not in f
        or not isinstance(f[name], h5py.Group)
        or not all(k in f[name] for k in ("features", "labels", "ids"))
    ):
        raise PipelineError(f"{path} has no complete '/{name}' group (features, labels, ids)")
    g = f[name]
    feats, labels = g["features"][()], g["labels"][()]
    if feats.dtype.kind != "f" or labels.dtype.kind not in "iu" or g["ids"].dtype.kind not in "OSU":
        raise PipelineError(
            f"{path}: /{name} has the wrong types (features {feats.dtype}, labels {labels.dtype}, "
            f"ids {g['ids'].dtype}); expected float features, integer labels, string ids"
        )
    ids = g["ids"].asstr()[()]
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels) or len(ids) != len(labels):
        raise PipelineError(
            f"{path}: /{name} arrays disagree in shape (features {feats.shape}, labels {labels.shape}, ids {ids.shape})"
        )
    return SplitFeatures(features=feats, labels=labels.astype(np.int64, copy=False), ids=ids)


def _validate(fs: FeatureSet) -> None:
    path, n_classes = fs.path, len(fs.classes)
    dims = {name: split.features.shape[1] for name, split in fs.splits.items()}
    if len(set(dims.values())) > 1:
        shown = ", ".join(f"{name} {d}" for name, d in dims.items())
        raise PipelineError(f"{path}: the splits disagree in feature dimension ({shown})")
    dim = fs.meta.get("feature_dim")
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
    if not n_classes:
        raise PipelineError(f"{path}: the class list is empty")
    if "train" in fs.splits and len(fs.train) == 0:
        raise PipelineError(f"{path}: the train split is empty")


def read_features(path: Path | str, *, splits: tuple[str, ...] = SPLITS) -> FeatureSet:
    """Load and validate a complete feature file; every problem is a one-line :class:`PipelineError`.

    Any number of processes may read one file at once (HDF5 takes a shared lock for mode "r").
    """
    path = Path(path)
    with _open_for_read(path) as f:
        meta = _meta_from(f, path)
        if not meta.get("complete"):
            raise PipelineError(f"{path} is incomplete (extraction did not finish); rerun extract to resume")
        if "classes" not in f:
            raise PipelineError(f"{path} has no /classes dataset")
        try:
            classes = list(f["classes"].asstr()[()])
            data = {name: _read_split(f, name, path) for name in splits}
        except (OSError, TypeError, ValueError, KeyError) as e:  # h5py raises these for damaged data
            raise PipelineError(f"cannot read {path}: damaged or truncated HDF5 file ({e})") from None
    fs = FeatureSet(path=path, classes=classes, splits=data, meta=meta)
    _validate(fs)
    return fs


# --------------------------------------------------------------------------------------------- writing


# Descriptors through which this process holds a lock: the ``.lock`` file and the open ``.tmp`` (HDF5 locks it too).
# A forked child (a DataLoader worker) inherits them and with them the locks, so after a ``kill -9`` of the parent
# its orphaned workers would keep the output locked for seconds more. The child points its copies at /dev/null:
# same numbers (nothing in it can reuse them by accident), no reference to the locked file left.
_LOCK_FDS: dict[int, tuple[int, int]] = {}  # fd -> (st_dev, st_ino) of the file it was opened on


@functools.cache
def _install_fork_hook() -> None:
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _drop_locks_in_child() -> None:
    if not _LOCK_FDS:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd, file_id in _LOCK_FDS.items():
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == file_id:  # still that file, not a number reused since
                os.dup2(null, fd)  # never flock(LOCK_UN) here: that would unlock the parent's lock too
    os.close(null)
    _LOCK_FDS.clear()


def _hold(fd: int) -> None:
    _install_fork_hook()
    st = os.fstat(fd)
    _LOCK_FDS[fd] = (st.st_dev, st.st_ino)


class FileLock:
    """An exclusive, non-blocking lock on ``<path>.lock``; the OS drops it when the process dies.

    The holder deletes the lock file when it releases it (no ``.lock`` is left beside finished output). The
    delete happens while the lock is still held, and ``acquire`` checks, after locking, that the file it locked
    is still the one at that path (a process that opened it just before the holder deleted it would otherwise lock
    a deleted file and believe it holds the lock); if not, it tries again on the new file."""

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise PipelineError(f"cannot write to {self.path.parent}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PipelineError(
                    f"another extract is already writing {self.path.with_suffix('')}; wait for it or choose --out"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # locked a lock file its holder had just deleted: start again on the current one
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _hold(fd)

    def release(self) -> None:
        if self._fd is not None:
            _LOCK_FDS.pop(self._fd, None)
            self.path.unlink(missing_ok=True)  # before unlocking: whoever locks next finds the path gone or new
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, dim * itemsize))


class FeatureWriter:
    """Writes one feature file under ``<out>.tmp``, resumable, and renames it to ``<out>`` when finished.

    ``meta`` holds the root attributes (must include ``fingerprint``); ``sizes`` the number of source samples
    per split. Progress is *committed* every ``flush_every`` appends: the ``n_seen``/``n_rows``/``skipped``
    attributes are written and then the file is flushed, so whatever a crash leaves on disk describes only
    rows that reached the disk before it (HDF5 may write metadata between flushes, which is why the counters
    are never touched in between). If a ``.tmp`` with the same fingerprint exists, its committed rows are copied
    into a fresh ``.tmp`` and writing continues from there (``start`` says where). A readable ``.tmp`` with
    another fingerprint is refused, never deleted: only ``--force`` (the caller) discards one. An
    unreadable ``.tmp`` (killed before a commit reached the disk) holds nothing to recover and is replaced.
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
        # Per split: (rows written, source samples consumed, ids of unreadable samples), in memory until committed.
        self._progress: dict[str, tuple[int, int, list[str]]] = {s: (0, 0, []) for s in sizes}
        self.f = self._open()
        self._fd = self.fileno()
        _hold(self._fd)
        self.start = {s: self._progress[s][1] for s in sizes}  # where this run began: > 0 means resumed

    # -- opening
    def _open(self) -> h5py.File:
        if self.tmp.exists():
            f = self._try_resume()
            if f is not None:
                return f
            log.warning("%s is unreadable (killed before its first commit?); starting it over", self.tmp)
            self.tmp.unlink()
        try:
            f = h5py.File(self.tmp, "w")
        except OSError as e:
            raise PipelineError(f"cannot create {self.tmp}: {e.strerror or e}") from None
        self._create(f)
        return f

    def _try_resume(self) -> h5py.File | None:
        if not h5py.is_hdf5(self.tmp) and self.tmp.stat().st_size > 0:
            raise PipelineError(f"{self.tmp} exists and is not a partial feature file; move it away or pass --force")
        try:
            old = h5py.File(self.tmp, "r")
        except OSError as e:
            if _is_locked(e):
                raise PipelineError(f"{self.tmp} is being written by another process; wait for it to finish") from None
            return None  # killed before its first commit reached the disk: nothing to resume
        with old:
            try:
                progress = self._committed(old)
            except (KeyError, ValueError, TypeError, OSError):
                return None
            if progress is None:
                fp = _decode_attr(old.attrs.get("fingerprint"))
                raise PipelineError(
                    f"{self.tmp} holds a partial extraction with other settings (fingerprint {str(fp)[:12]} != "
                    f"{self.meta['fingerprint'][:12]}); rerun that command to finish it, or pass --force to discard it"
                )
            fresh = self.tmp.with_name(self.tmp.name + ".resume")
            try:
                self._copy_committed(old, fresh, progress)
            except (KeyError, ValueError, TypeError, OSError) as e:
                # Kept, not started over: a full disk fails here as well as a damaged file, and the rows are work.
                fresh.unlink(missing_ok=True)
                raise PipelineError(
                    f"cannot carry over the committed rows of {self.tmp} ({type(e).__name__}: {e}); free disk space "
                    "and rerun to resume, or pass --force to start over"
                ) from None
        # The old file is never written to again: a kill can leave HDF5 structures updated after the last flush
        # half written (seen: the global heap of the id strings), and appending to them then fails with "bad heap
        # index" although the committed rows read back intact. A copy of the committed rows starts clean.
        fsync_path(fresh)
        os.replace(fresh, self.tmp)
        self._progress = progress
        return h5py.File(self.tmp, "a")

    def _copy_committed(self, old: h5py.File, fresh: Path, progress: dict[str, tuple[int, int, list[str]]]) -> None:
        """Write ``fresh``: a new ``.tmp`` holding the committed rows of ``old``, copied in ~16 MiB blocks."""
        step = 16 * _chunk_rows(self.dim, self.dtype.itemsize)
        with h5py.File(fresh, "w") as f:
            self._create(f)
            if "created" in old.attrs:
                f.attrs["created"] = old.attrs["created"]
            for s, (rows, seen, bad) in progress.items():
                src, dst = old[s], f[s]
                for key in ("features", "labels", "ids"):
                    dst[key].resize(rows, axis=0)
                for a in range(0, rows, step):
                    b = min(rows, a + step)
                    dst["features"][a:b] = src["features"][a:b]
                    dst["labels"][a:b] = src["labels"][a:b]
                    dst["ids"][a:b] = src["ids"].asstr()[a:b]
                dst.attrs.update(n_rows=rows, n_seen=seen, skipped=json.dumps(bad))

    def _committed(self, f: h5py.File) -> dict[str, tuple[int, int, list[str]]] | None:
        """The committed progress of a reopened ``.tmp``, or None if it belongs to other settings."""
        if _decode_attr(f.attrs.get("fingerprint")) != self.meta["fingerprint"]:
            return None
        if any(s not in f for s in self.sizes) or f[next(iter(self.sizes))]["features"].shape[1:] != (self.dim,):
            return None
        progress = {}
        for s in self.sizes:
            g = f[s]
            rows, seen = int(g.attrs["n_rows"]), int(g.attrs["n_seen"])
            if any(g[key].shape[0] < rows for key in ("features", "labels", "ids")):
                raise ValueError(f"/{s} is shorter than its committed {rows} rows")
            progress[s] = (rows, seen, list(json.loads(_decode_attr(g.attrs.get("skipped", "[]")))))
        return progress

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
        return self._progress[split][1]

    def skipped(self, split: str) -> list[str]:
        return list(self._progress[split][2])

    def fileno(self) -> int:
        """The OS file descriptor of the open ``.tmp`` (a forked loader worker must close its copy)."""
        return int(self.f.id.get_vfd_handle())

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
        rows, n_seen, bad = self._progress[split]
        n = len(labels)
        for key, arr in (
            ("features", features.astype(self.dtype, copy=False)),
            ("labels", labels),
            ("ids", ids),
        ):
            g[key].resize(rows + n, axis=0)
            g[key][rows : rows + n] = arr
        # One assignment, after the rows are in place: an interrupt anywhere above leaves the old progress.
        self._progress[split] = (rows + n, n_seen + seen, [*bad, *skipped])
        self._writes += 1
        if self._writes % self.flush_every == 0:
            self.commit()

    def commit(self) -> None:
        """Write the progress counters, then flush: after a crash they describe exactly the rows on disk."""
        for s, (rows, seen, bad) in self._progress.items():
            self.f[s].attrs.update(n_rows=rows, n_seen=seen, skipped=json.dumps(bad))
        self.f.flush()

    def finish(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Mark complete, close, sync to disk and atomically rename to the final name."""
        self.commit()
        for key, value in (extra_attrs or {}).items():
            self.f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self.f.attrs["complete"] = True
        _LOCK_FDS.pop(self._fd, None)
        self.f.close()
        fsync_path(self.tmp)  # the data must be on disk before the name says "complete" (power loss)
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        return self.path

    def close(self) -> None:
        """Commit and close without finishing (interrupt, error): the ``.tmp`` stays resumable."""
        if self.f.id.valid:
            self.commit()
            _LOCK_FDS.pop(self._fd, None)
            self.f.close()


def _is_locked(e: OSError) -> bool:
    """h5py's error when another process holds the file open for writing (HDF5 file locking, errno 11)."""
    return "unable to lock file" in str(e) or getattr(e, "errno", None) == 11
