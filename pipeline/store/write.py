"""Writing a feature file: ``<out>.tmp`` written in commits and renamed to ``<out>`` when complete, resumed after a
kill, merged from torchrun's shards; the disk-space checks before each commit; the regression targets. How and why:
docs/schema.md and docs/reliability.md."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import fsync_path
from pipeline.locks import FileLock, forget, hold_in_parent_only
from pipeline.stage1.config import FEATURE_DTYPES
from pipeline.store.read import is_locked, open_for_read, refuse_outside_reads
from pipeline.store.record import (
    FORMAT,
    SCHEMA_VERSION,
    SPLITS,
    FeatureMeta,
    decode_attr,
    describe_change,
    encode_attr,
    files_digests_lines,
)
from pipeline.store.rows import Progress, Rows, StoredFile, progress_of, row_blocks

log = logging.getLogger(__name__)
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks of whole rows: fast full reads (tiny auto-chunks are 7x slower)
COPY_CHUNKS = 16  # chunks per block when copying rows (resume, merge): measured 2x faster than one

# The optional per-row columns for the audit (schema version 2), as FeatureWriter's ``columns`` takes them: the
# hex sha256 of each sample's bytes (an image file's bytes; an array dataset's pixel bytes), 64 ASCII digits, and
# the 64-bit perceptual hash of its decoded image (:func:`pipeline.imagehash.perceptual_hash`). See docs/schema.md.
DIGESTS = "digests"
PHASH = "phash"
AUDIT_COLUMNS: dict[str, tuple[tuple[int, ...], str]] = {DIGESTS: ((), "S64"), PHASH: ((), "uint64")}


class FeatureFileLock(FileLock):
    """The lock of one feature file's output (``<out>.lock``), held by extract and the torchrun merge."""

    BUSY = "another extract is already writing {target}; wait for it or choose --out"


def tmp_path_for(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _resume_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".resume")


def check_output_name(path: Path) -> None:
    """Refuse an output name whose companion files (``.tmp.resume``) would exceed the file-name limit, before
    anything is written rather than at the first resume."""
    path = Path(path)
    try:
        limit = os.pathconf(path.parent if path.parent.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len((path.name + ".tmp.resume").encode(errors="surrogateescape"))
    if longest > limit:
        keep = limit - len(".tmp.resume")
        raise PipelineError(
            f"output name {path.name[:40]}... is too long: at most {keep} bytes, since files named after it "
            f"(<name>.tmp.resume) must fit the {limit}-byte file-name limit; choose a shorter --out"
        )


def storable_name(name: str) -> str:
    """A name as UTF-8 text HDF5 can store: bytes of a file name that are not UTF-8 (held by Python as lone
    surrogates, ``os.fsdecode``) shown as ``\\xNN``, as file names are in the ids. Valid text is unchanged."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: escaped as \udXXX
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _storable_classes(classes: list[str]) -> list[str]:
    """Class names as stored (:func:`storable_name`); two that become one are refused (the name must say which)."""
    stored = [storable_name(str(c)) for c in classes]
    if len(set(stored)) != len(stored):
        dup = next(s for s in stored if stored.count(s) > 1)
        raise PipelineError(f"two class folders are both named {dup!r} once escaped for the file; rename one")
    return stored


def _column_rows(name: str, rows: Any, dtype: np.dtype) -> np.ndarray:
    """The rows of an extra column, copied as its dtype (arrays or lists: the digests come as hex text)."""
    rows = np.asarray(rows)
    if name == DIGESTS and not (rows.dtype.kind in "SU" and (np.char.str_len(rows) == 64).all()):
        raise ValueError("digests must be 64 hex digits each (hashlib.sha256(data).hexdigest())")
    return rows.astype(dtype, copy=True)


# --------------------------------------------------------------------------------------------- room on disk


def chunk_rows(dim: int, itemsize: int) -> int:
    """Rows in a ~1 MiB chunk of rows of ``dim`` values of ``itemsize`` bytes."""
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


class DiskFull(PipelineError):
    """No room for the next commit; the rows of the last one are kept and a rerun resumes from them."""


def is_disk_full(e: BaseException) -> bool:
    text = str(e)
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
        s in text for s in ("No space left", "File too large", "Disk quota", "errno = 28", "errno = 27")
    )


def free_bytes(folder: Path) -> int | None:
    """Bytes free to this user on the filesystem of ``folder`` (None: it cannot say)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room_for(path: Path, need: int, *, size: int) -> bool:
    """Whether ``need`` more bytes fit: free space of the filesystem and this process's file-size limit
    (``ulimit -f``), for a file at ``path`` that holds ``size`` bytes now."""
    free = free_bytes(path.parent)
    if free is not None and free < need:  # a filesystem that cannot say: the write itself will tell
        return False
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return soft == resource.RLIM_INFINITY or size + need <= soft


def abandon(f: h5py.File) -> None:
    """Close a file whose last write failed without writing to it again. After a failed flush HDF5 retries the
    write at close and again at exit, and h5py then crashed the process (SIGSEGV seen at exit): its descriptor is
    pointed at /dev/null first, so those retries succeed harmlessly and the file keeps what the last commit left."""
    with contextlib.suppress(Exception):
        fd = int(f.id.get_vfd_handle())
        forget(fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    with contextlib.suppress(Exception):
        f.close()


# --------------------------------------------------------------------------------------------- targets


class TargetColumn(Protocol):
    """Regression targets to store (:class:`pipeline.stage1.targets.TargetTable`): ``lookup(split, ids)`` gives
    their (N, T) rows; ``info`` is ``FeatureMeta.targets`` ({"names", "source", "sha256"})."""

    @property
    def info(self) -> dict[str, Any]: ...

    def lookup(self, split: str, ids: list[str]) -> np.ndarray: ...


def write_targets(f: h5py.File, targets: TargetColumn | None) -> None:
    """Write ``/<split>/targets`` for every stored row (from the stored ids, so they stay aligned whatever order or
    subset the rows were extracted in) and the ``targets`` attribute; ``None`` removes them."""
    for split in (s for s in SPLITS if s in f):
        g = f[split]
        if "targets" in g:
            del g["targets"]
        if targets is None:
            continue
        ids = list(g["ids"].asstr()[()])
        values = np.asarray(targets.lookup(split, ids), dtype=np.float32)
        if values.shape != (len(ids), len(targets.info["names"])) or not np.isfinite(values).all():
            raise PipelineError(
                f"targets for /{split}: {values.shape} values, expected {len(ids)} rows of "
                f"{len(targets.info['names'])} finite numbers"
            )
        rows = max(1, min(len(ids), chunk_rows(values.shape[1], 4)))
        g.create_dataset("targets", data=values, chunks=(rows, values.shape[1]) if len(ids) else None)
    if targets is None:
        if "targets" in f.attrs:
            del f.attrs["targets"]
    else:
        f.attrs["targets"] = encode_attr("targets", targets.info)


def rewrite_targets(path: Path | str, targets: TargetColumn | None, *, updates: dict[str, Any] | None = None) -> None:
    """Replace the regression targets of a complete feature file without touching its features: a copy with the new
    targets (and root attributes ``updates``) is written beside it and renamed over it (:func:`atomic_path`), so a
    crash leaves the old file or the new one. The caller holds the file's :class:`FileLock`."""
    from pipeline.fileio import atomic_path

    path = Path(path)
    with open_for_read(path) as src, atomic_path(path) as tmp, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name, obj in src.items():
            if isinstance(obj, h5py.Group):  # a split: every member but the targets, whatever else it holds
                g = dst.create_group(name)
                for key, value in obj.attrs.items():
                    g.attrs[key] = value
                for key in obj:
                    if key != "targets":
                        obj.copy(obj[key], g, name=key)
            else:
                src.copy(obj, dst, name=name)
        write_targets(dst, targets)
        for key, value in (updates or {}).items():
            dst.attrs[key] = encode_attr(key, value)


class MultiHot:
    """Several labels per image (``label_kind`` "multi"), to store as ``/<split>/multi_hot``: each split's sample
    ids and their (N, labels) 0/1 rows, looked up by id (:meth:`lookup`), so the stored rows follow the stored ids
    whatever order, subset (``--skip-bad``), resume or torchrun merge wrote them in."""

    def __init__(self, splits: dict[str, tuple[list[str], np.ndarray]]):
        self.rows = {s: ({i: k for k, i in enumerate(ids)}, np.asarray(m, np.uint8)) for s, (ids, m) in splits.items()}

    def lookup(self, split: str, ids: list[str]) -> np.ndarray:
        index, matrix = self.rows[split]
        missing = [i for i in ids if i not in index]
        if missing:
            first = missing[0]
            raise PipelineError(f"no labels for {len(missing)} stored {split} ids (first: {first!r}); rerun extract")
        return matrix[[index[i] for i in ids]] if ids else matrix[:0]


def write_multi_hot(f: h5py.File, multi_hot: MultiHot) -> None:
    """Write ``/<split>/multi_hot`` (N, classes) uint8 for every stored row, from the stored ids."""
    classes = len(f["classes"])
    for split in (s for s in SPLITS if s in f):
        g = f[split]
        if "multi_hot" in g:
            del g["multi_hot"]
        ids = list(g["ids"].asstr()[()])
        values = multi_hot.lookup(split, ids)
        if values.shape != (len(ids), classes) or values.max(initial=0) > 1:
            raise PipelineError(
                f"labels for /{split}: {values.shape} values, expected {len(ids)} rows of {classes} values 0 or 1"
            )
        rows = max(1, min(len(ids), chunk_rows(classes, 1)))
        g.create_dataset("multi_hot", data=values, chunks=(rows, classes) if len(ids) else None)


# --------------------------------------------------------------------------------------------- the writer


class FeatureWriter:
    """Writes one feature file under ``<out>.tmp``, resumable, and renames it to ``<out>`` when finished.

    ``meta``: the root attributes (a :class:`FeatureMeta`, or a dict of its fields); ``sizes``: source samples per
    split; ``files``: per-file digests of the source (``/dataset_files``); ``columns``: extra per-row datasets
    beside the features, name -> (row shape, dtype), e.g. ``{"activations": ((256, 14, 14), "float16")}`` or the
    audit's :data:`AUDIT_COLUMNS`: appended, committed, resumed and merged with the rows they belong to. Appended
    rows are held in memory and written at each commit (every ``flush_every`` appends, or 64 MiB): space checked,
    rows written and flushed, then the counters written and flushed. So a ``.tmp`` left by a crash, ``kill -9`` or a
    full disk describes exactly rows that reached the disk. An existing ``.tmp`` is handled by the one policy for a
    partial file (docs/reliability.md): same settings, resumed; other settings or not a feature file, refused and
    kept; an HDF5 file that will not open (killed before its first commit), replaced. ``restart`` (``--force``)
    discards it first. ``start`` says where this run began (> 0: resumed).
    """

    def __init__(
        self,
        path: Path,
        *,
        meta: FeatureMeta | dict[str, Any],
        classes: list[str],
        sizes: dict[str, int],
        feature_dim: int,
        dtype: str = "float32",
        flush_every: int = 8,
        files: dict[str, str] | None = None,
        restart: bool = False,
        columns: dict[str, tuple[tuple[int, ...], str]] | None = None,
    ):
        if dtype not in FEATURE_DTYPES:
            raise PipelineError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype!r}")
        self.path = Path(path)
        check_output_name(self.path)
        self.tmp = tmp_path_for(self.path)
        self.meta = meta if isinstance(meta, FeatureMeta) else FeatureMeta.from_dict(meta)
        self.classes, self.sizes, self.files = _storable_classes(classes), sizes, files
        self.dim, self.dtype, self.flush_every = feature_dim, np.dtype(dtype), flush_every
        self.columns = {k: (tuple(int(n) for n in shape), np.dtype(t)) for k, (shape, t) in (columns or {}).items()}
        self._writes, self._dead = 0, False
        self._progress = {s: Progress() for s in sizes}  # in memory: committed + pending
        self._committed = dict(self._progress)  # on disk
        self._pending: dict[str, list[Rows]] = {s: [] for s in sizes}
        if restart:
            self.tmp.unlink(missing_ok=True)
            _resume_path(self.tmp).unlink(missing_ok=True)
        self.f = self._open()
        self._fd = self.fileno()
        hold_in_parent_only(self._fd)
        self.start = {s: self._progress[s].seen for s in sizes}  # where this run began: > 0 means resumed

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
        try:
            self._create(f, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        except Exception as e:
            abandon(f)
            self.tmp.unlink(missing_ok=True)  # holds no rows: nothing to resume, and a rerun would fail alike
            if is_disk_full(e):
                raise DiskFull(f"disk full: cannot create {self.tmp}; free space and rerun") from None
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise PipelineError(f"cannot create {self.tmp} ({first})") from None
        return f

    def _try_resume(self) -> h5py.File | None:
        if not h5py.is_hdf5(self.tmp) and self.tmp.stat().st_size > 0:
            raise PipelineError(f"{self.tmp} exists and is not a partial feature file; move it away or pass --force")
        try:
            old = h5py.File(self.tmp, "r")
        except OSError as e:
            if is_locked(e):
                raise PipelineError(f"{self.tmp} is being written by another process; wait for it to finish") from None
            return None  # killed before its first commit reached the disk: nothing to resume
        with old:
            refuse_outside_reads(old, path=self.tmp)
            try:
                progress = self._partial_progress(old)
            except (KeyError, ValueError, TypeError, OSError):
                return None  # counters unreadable: no commit of ours reached the disk
            fresh = _resume_path(self.tmp)
            rows = sum(p.rows for p in progress.values())
            if not room_for(fresh, self.tmp.stat().st_size + (4 << 20), size=0):
                raise DiskFull(f"disk full: {rows} rows kept in {self.tmp}; free space and rerun")
            self._copy_committed(old, fresh, progress)
        # The old file is never written to again: a kill can leave HDF5 structures updated after the last flush
        # half written (seen: the global heap of the id strings), and appending to them then fails with "bad heap
        # index" although the committed rows read back intact. A copy of the committed rows starts clean.
        fsync_path(fresh)
        os.replace(fresh, self.tmp)
        self._progress, self._committed = dict(progress), dict(progress)
        return h5py.File(self.tmp, "a")

    def _partial_progress(self, f: h5py.File) -> dict[str, Progress]:
        """The committed progress of a reopened ``.tmp`` of these settings; a one-line refusal for another's."""
        old = FeatureMeta.decode(dict(f.attrs.items()), path=self.tmp)
        if old.fingerprint != self.meta.fingerprint:
            change = (
                describe_change(old.identity, self.meta.identity)
                if old.identity and self.meta.identity
                else (f"fingerprint {old.fingerprint[:12]} != {self.meta.fingerprint[:12]}")
            )
            raise PipelineError(
                f"{self.tmp} holds a partial extraction with other settings ({change}); rerun that command to "
                "finish it, or pass --force to discard it"
            )
        shapes = {s: f[s]["features"].shape[1:] if s in f else None for s in self.sizes}
        lacking = {c for s in self.sizes if s in f for c in self.columns if c not in f[s]}
        if lacking and lacking <= set(AUDIT_COLUMNS):  # begun before extraction filled them: finished without them
            log.info("%s was begun without the audit columns (%s): it is finished without them", self.tmp,
                     ", ".join(sorted(lacking)))  # fmt: skip
            self.columns = {c: v for c, v in self.columns.items() if c not in AUDIT_COLUMNS}
        wrong = [s for s in self.sizes if s in f and any(
            c not in f[s] or f[s][c].shape[1:] != shape for c, (shape, _) in self.columns.items())]  # fmt: skip
        if wrong:
            raise PipelineError(
                f"{self.tmp} has these settings but not their columns ({', '.join(self.columns)} expected in "
                f"/{wrong[0]}); it was not written by this version of pipeline: pass --force to discard it"
            )
        if any(shape != (self.dim,) for shape in shapes.values()):
            shown = ", ".join(f"{s} {shape[0] if shape else 'missing'}" for s, shape in shapes.items())
            raise PipelineError(
                f"{self.tmp} has these settings but not their shape (feature dimension {self.dim} expected: {shown}); "
                "it was not written by this version of pipeline: pass --force to discard it"
            )
        return {s: progress_of(f[s]) for s in self.sizes}

    def _copy_committed(self, old: h5py.File, fresh: Path, progress: dict[str, Progress]) -> None:
        """Write ``fresh``: a new ``.tmp`` holding the committed rows of ``old``, copied block by block."""
        rows = sum(p.rows for p in progress.values())
        f = h5py.File(fresh, "w")
        try:
            self._create(f, created=decode_attr(old.attrs.get("created", "")))
            for s, p in progress.items():
                dst, a = f[s], 0
                for key in ("features", "labels", "ids", *self.columns):
                    dst[key].resize(p.rows, axis=0)
                columns = tuple(self.columns)
                for feats, labels, ids, extra in row_blocks(old[s], start=0, stop=p.rows, step=self._copy_step,
                                                         columns=columns):  # fmt: skip
                    b = a + len(labels)
                    dst["features"][a:b], dst["labels"][a:b], dst["ids"][a:b] = feats, labels, ids
                    for c in columns:
                        dst[c][a:b] = extra[c]
                    a = b
                dst.attrs.update(n_rows=p.rows, n_seen=p.seen, skipped=json.dumps(list(p.skipped)))
            f.flush()
        except Exception as e:
            # Kept, not started over: a full disk fails here as well as a damaged file, and the rows are work.
            abandon(f)
            fresh.unlink(missing_ok=True)
            if is_disk_full(e):
                raise DiskFull(f"disk full: {rows} rows kept in {self.tmp}; free space and rerun") from None
            raise PipelineError(
                f"cannot carry over the committed rows of {self.tmp} ({type(e).__name__}: {str(e)[:200]}); "
                "rerun to resume, or pass --force to start over"
            ) from None
        f.close()

    @property
    def _copy_step(self) -> int:
        """Rows per block copied (resume, merge): whole chunks of every column, the widest row deciding."""
        return COPY_CHUNKS * min([chunk_rows(self.dim, self.dtype.itemsize), *self._column_chunk_rows.values()])

    @property
    def _column_chunk_rows(self) -> dict[str, int]:
        return {c: chunk_rows(int(np.prod(shape)), t.itemsize) for c, (shape, t) in self.columns.items()}

    def _create(self, f: h5py.File, *, created: str) -> None:
        meta = self.meta.completed()  # every record complete (schema version 2): see record.DEFAULTS
        meta = replace(meta, format=FORMAT, schema_version=SCHEMA_VERSION, complete=False, created=created)
        for key, value in meta.encode().items():
            f.attrs[key] = value
        f.create_dataset("classes", data=np.array(self.classes, dtype=object), dtype=STR)
        if self.files is not None:
            f.create_dataset("dataset_files", data=np.array(files_digests_lines(self.files), dtype=object), dtype=STR)
        rows = chunk_rows(self.dim, self.dtype.itemsize)
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
            g.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(max(1, min(n, 65536)),))
            for c, (shape, t) in self.columns.items():  # chunks of whole rows (~1 MiB), as the features
                rows_c = max(1, min(self._column_chunk_rows[c], n))
                g.create_dataset(c, shape=(0, *shape), maxshape=(None, *shape), dtype=t, chunks=(rows_c, *shape))
            g.attrs.update(n_total=n, n_seen=0, n_rows=0, skipped="[]")
        f.flush()

    # -- progress
    def seen(self, split: str) -> int:
        """Source samples of ``split`` already processed (the resume point)."""
        return self._progress[split].seen

    def rows(self, split: str) -> int:
        return self._progress[split].rows

    def skipped(self, split: str) -> list[str]:
        return list(self._progress[split].skipped)

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
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append rows for ``seen`` consumed source samples (``skipped`` of them unreadable); ``extra``: the rows of
        each extra column (``columns``). The rows are copied: they are held until the next commit, and callers
        reuse their buffers (the extraction's pinned ring)."""
        if self._dead:
            raise PipelineError(f"{self.tmp} was closed after a failed write")
        p = self._progress[split]
        if len(labels):
            extra = extra or {}
            if set(extra) != set(self.columns) or any(len(v) != len(labels) for v in extra.values()):
                raise ValueError(f"append needs {len(labels)} rows of each column {sorted(self.columns)}")
            held = {c: _column_rows(c, extra[c], t) for c, (_, t) in self.columns.items()}
            self._pending[split].append((features.astype(self.dtype, copy=True), np.array(labels), list(ids), held))
        # One assignment, after the rows are held: an interrupt anywhere above leaves the old progress.
        self._progress[split] = Progress(p.rows + len(labels), p.seen + seen, (*p.skipped, *skipped))
        self._writes += 1
        if self._writes % self.flush_every == 0 or self._pending_bytes() >= 64 << 20:
            self.commit()

    def _pending_bytes(self) -> int:
        return sum(
            feats.nbytes + labels.nbytes + sum(len(i) + 16 for i in ids) + sum(v.nbytes for v in extra.values())
            for blocks in self._pending.values()
            for feats, labels, ids, extra in blocks
        )

    def _room_needed(self) -> int:
        """Bytes the next commit may add: the rows, the chunks they open (HDF5 allocates a chunk in full when its
        first row is written) and some metadata (index nodes, the heap of the id strings)."""
        need = self._pending_bytes() + (64 << 10)
        for s, blocks in self._pending.items():
            at = self._committed[s].rows
            n = sum(len(labels) for _, labels, _, _ in blocks)
            for key in ("features", "labels", "ids", *self.columns):
                d = self.f[s][key]
                per_chunk = d.chunks[0]
                new_chunks = -(-(at + n) // per_chunk) - -(-at // per_chunk)
                need += new_chunks * int(np.prod(d.chunks)) * (d.dtype.itemsize if key != "ids" else 16)
        return need

    def commit(self) -> None:
        """Write the held rows and flush; then the progress counters and flush: after a crash or a failed write
        the counters on disk describe only rows that reached the disk."""
        if self._dead:
            raise PipelineError(f"{self.tmp} was closed after a failed write")
        kept = sum(p.rows for p in self._committed.values())
        if not room_for(self.tmp, self._room_needed(), size=os.fstat(self._fd).st_size):
            self._dead = True  # nothing written: the file stays as the last commit left it
            abandon(self.f)
            raise DiskFull(f"disk full: {kept} rows kept in {self.tmp}; free space and rerun")
        try:
            for s, blocks in self._pending.items():
                self._write_rows(self.f[s], self._committed[s].rows, blocks)
            self.f.flush()
            for s, p in self._progress.items():
                self.f[s].attrs.update(n_rows=p.rows, n_seen=p.seen, skipped=json.dumps(list(p.skipped)))
            self.f.flush()
        except Exception as e:  # any failed write is fatal for this commit (h5py raises OSError or RuntimeError)
            self._dead = True
            abandon(self.f)
            raise self._write_error(e) from None
        self._committed = dict(self._progress)
        self._pending = {s: [] for s in self._pending}

    @staticmethod
    def _write_rows(g: h5py.Group, at: int, blocks: list[Rows]) -> None:
        if not blocks:
            return
        n = sum(len(labels) for _, labels, _, _ in blocks)
        columns = list(blocks[0][3])  # every block holds every column (append checks)
        for key in ("features", "labels", "ids", *columns):
            g[key].resize(at + n, axis=0)  # once per commit: the rows' size is known before any is written
        for feats, labels, ids, extra in blocks:
            b = at + len(labels)
            g["features"][at:b], g["labels"][at:b], g["ids"][at:b] = feats, labels, ids
            for c in columns:
                g[c][at:b] = extra[c]
            at = b

    def _write_error(self, e: BaseException) -> PipelineError:
        kept = sum(p.rows for p in self._committed.values())
        if is_disk_full(e):
            return DiskFull(f"disk full: {kept} rows kept in {self.tmp}; free space and rerun")
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return PipelineError(f"cannot write {self.tmp} ({first}); {kept} rows kept: rerun to resume")

    def extend_from(self, sources: list[StoredFile], split: str) -> None:
        """Append the rows of ``sources`` (complete files of the same settings: torchrun's shards) in order.

        Continues a resumed ``.tmp``: its rows are the first rows of the same sequence, so the copy starts after
        them; consumed counts and skipped ids are brought up to each source's end as it finishes."""
        done = self._progress[split].rows
        cum_rows = cum_seen = 0
        for src in sources:
            p = src.progress(split)
            for feats, labels, ids, extra in src.blocks(
                split, start=min(max(done - cum_rows, 0), p.rows), step=self._copy_step, columns=tuple(self.columns)
            ):
                self.append(split, feats, labels, ids, seen=len(labels), extra=extra)
            cum_rows, cum_seen = cum_rows + p.rows, cum_seen + p.seen
            mine = self._progress[split]
            have = set(mine.skipped)
            missing = [i for i in p.skipped if i not in have]
            if cum_seen > mine.seen or missing:
                empty = np.zeros((0, self.dim), self.dtype)
                self.append(split, empty, np.zeros(0, np.int64), [], seen=max(0, cum_seen - mine.seen), skipped=missing)

    def finish(
        self,
        updates: dict[str, Any] | None = None,
        *,
        targets: TargetColumn | None = None,
        multi_hot: MultiHot | None = None,
    ) -> Path:
        """Refuse an empty split, mark complete, close, sync to disk and atomically rename to the final name.
        ``targets``: regression targets, written whole from the stored ids (see :func:`write_targets`); likewise
        ``multi_hot``, several labels per image (:func:`write_multi_hot`; the record's ``label_kind`` "multi")."""
        empty = [s for s, n in self.sizes.items() if n and not self._progress[s].rows]
        if empty:
            self.close()
            s = empty[0]
            raise PipelineError(
                f"every one of the {self.sizes[s]} {s} images was unreadable (skipped): a feature file without "
                f"{s} rows would fail later; fix or remove them ({self.tmp} keeps the other rows)"
            )
        self.commit()
        try:
            self._layer_views()
            if targets is not None:
                write_targets(self.f, targets)
            if multi_hot is not None:
                write_multi_hot(self.f, multi_hot)
            for key, value in (updates or {}).items():
                self.f.attrs[key] = encode_attr(key, value)
            self.f.attrs["complete"] = True
            forget(self._fd)
            self.f.close()
        except Exception as e:
            self._dead = True
            abandon(self.f)
            raise self._write_error(e) from None
        fsync_path(self.tmp)  # the data must be on disk before the name says "complete" (power loss)
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        return self.path

    def _layer_views(self) -> None:
        """--layers: ``/<split>/layers/<name>``, a virtual dataset of the columns of ``/<split>/features`` that hold
        that layer: no copy, and (source file ``.``, this file) it reads back wherever the file is moved."""
        if not self.meta.layers:
            return
        for s, p in self._committed.items():
            group, at = self.f[s].require_group("layers"), 0
            for layer in self.meta.layers:
                name, dim = str(layer["name"]), int(layer["dim"])
                layout = h5py.VirtualLayout(shape=(p.rows, dim), dtype=self.dtype)
                source = h5py.VirtualSource(".", f"/{s}/features", shape=(p.rows, self.dim), dtype=self.dtype)
                layout[:, :] = source[:, at : at + dim]
                group.create_virtual_dataset(name.replace("/", "|"), layout)  # "/" would nest groups
                at += dim

    def close(self) -> None:
        """Commit and close without finishing (interrupt, error): the ``.tmp`` stays resumable."""
        if self._dead or not self.f.id.valid:
            return
        self.commit()
        forget(self._fd)
        self.f.close()
