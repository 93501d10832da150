"""WebDataset shards as a dataset: ``extract --dataset 'shards/train-{00000..00041}.tar'``.

A sample is the tar members sharing a key (the member name up to the first dot of its file name); its image is
the first of jpg / jpeg / png / webp, its label the ``.cls`` integer, else the ``.txt`` text, else a field of the
``.json`` (``--label-key``, default ``label``).

Read with the standard :mod:`tarfile`, not the ``webdataset`` package: ``webdataset`` is a stream (an
IterableDataset) with no notion of "sample 7,301", and everything downstream here (``--limit``, resume,
``--skip-bad``, torchrun ranks) addresses samples by position. One pass over each shard's tar headers (no image
bytes read: headers are seeked past) gives every sample's member offset and size; an image is then one ``pread``
of those bytes from a shard opened once per process, never unpacked to disk. The samples keep shard order, each
carries its shard number (:attr:`Split.units`), so torchrun ranks take whole shards, and a resumed run reads no
image bytes of the shards it already committed.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.stage1.datasets import Source, Split, decode_image, display_name

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the first present is the sample's image
LABEL_EXTS = ("cls", "txt", "json")
SHOWN = 3


# ------------------------------------------------------------------------------------------ naming the shards


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..003}.tar`` -> 4 names (zero padding kept); ``{x,y}`` -> both; nested and repeated braces too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        if int(hi) < int(lo):
            raise PipelineError(f"brace range {{{body}}} runs backwards")
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def is_url(name: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", name) is not None


def shard_names(spec: str) -> list[str]:
    """The shards ``spec`` names: brace ranges, globs, or a list file (one shard per line, relative to it)."""
    if not is_url(spec) and Path(spec).is_file() and ".tar" not in Path(spec).name.lower():
        base = Path(spec).parent
        try:
            lines = [ln.strip() for ln in Path(spec).read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise PipelineError(f"cannot read the shard list {spec}: {e}") from None
        names = [ln if is_url(ln) or os.path.isabs(ln) else str(base / ln) for ln in lines if ln and ln[0] != "#"]
        return [n for line in names for n in shard_names(line)]
    names = []
    for name in expand_braces(spec):
        if not is_url(name) and glob.has_magic(name):
            found = sorted(glob.glob(name))
            if not found:
                raise PipelineError(f"no shards match {name}")
            names.extend(found)
        else:
            names.append(name)
    if not names:
        raise PipelineError(f"{spec} names no shards")
    return names


def looks_like_shards(spec: str) -> bool:
    """Whether a --dataset value names WebDataset shards (a .tar name or pattern, or a .txt list of them)."""
    return ".tar" in spec.lower() or (spec.lower().endswith(".txt") and Path(spec).is_file())


# ------------------------------------------------------------------------------------------ opening


def _fsspec_open(url: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise PipelineError(f"reading {url} needs fsspec: pip install fsspec (plus the scheme's own package)") from None
    try:
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError, ImportError) as e:
        raise PipelineError(f"cannot open {url}: {e}") from None


def open_stream(name: str) -> Any:
    """A seekable binary file object for a local shard or an fsspec URL."""
    if is_url(name):
        return _fsspec_open(name)
    try:
        return open(name, "rb")
    except FileNotFoundError:
        raise PipelineError(f"shard not found: {name}") from None
    except OSError as e:
        raise PipelineError(f"cannot open shard {name}: {e.strerror}") from None


@dataclass
class ShardReader:
    """``read(i)``: the image bytes of sample i, one positioned read from its shard.

    Each process (loader workers are forked) opens a shard once and keeps the last few open; local shards are read
    with ``os.pread`` (no shared file position), URLs through fsspec; a lock keeps gpu-decode's threads apart.
    """

    names: list[str]  # shard names
    shard: np.ndarray  # per sample: index into names
    offset: np.ndarray  # per sample: the image member's data offset in its shard
    size: np.ndarray  # per sample: its byte count
    keep_open: int = 8
    _open: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _pid: int = field(default=-1, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_open=OrderedDict(), _pid=-1, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handle(self, s: int) -> Any:
        if self._pid != os.getpid():  # forked: the parent's descriptors are not ours to use or close
            self._open, self._pid, self._lock = OrderedDict(), os.getpid(), threading.Lock()
        h = self._open.get(s)
        if h is None:
            name = self.names[s]
            h = _fsspec_open(name) if is_url(name) else os.open(name, os.O_RDONLY)
            self._open[s] = h
            while len(self._open) > self.keep_open:
                _, old = self._open.popitem(last=False)
                os.close(old) if isinstance(old, int) else old.close()
        self._open.move_to_end(s)
        return h

    def __call__(self, i: int) -> bytes:
        s, off, n = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        with self._lock:  # held while reading: a descriptor in use is never closed by another thread's eviction
            h = self._handle(s)
            if isinstance(h, int):
                data = os.pread(h, n, off)
            else:
                h.seek(off)
                data = h.read(n)
        if len(data) != n:
            raise OSError(f"{self.names[s]} is truncated ({len(data)} of {n} bytes of the image at offset {off})")
        return data


@dataclass
class _ShardImage:
    """``split.load`` of a shard split: the member's bytes decoded as :func:`load_image` decodes a file."""

    read: ShardReader

    def __call__(self, i: int) -> Image.Image:
        return decode_image(io.BytesIO(self.read(i)))


# ------------------------------------------------------------------------------------------ indexing a shard


@dataclass
class _Sample:
    key: str
    image: tuple[str, int, int] | None = None  # (ext, offset, size)
    label: str | list[str] | None = None  # a list: several labels (a .json list)
    label_from: str | None = None


def _member_label(
    tf: tarfile.TarFile, m: tarfile.TarInfo, ext: str, label_key: str, where: str
) -> str | list[str] | None:
    fh = tf.extractfile(m)
    raw = fh.read(1 << 20) if fh else b""
    text = raw.decode("utf-8", "replace").strip()
    if ext != "json":
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise PipelineError(f"{where}: {m.name} is not JSON") from None
    value = obj.get(label_key) if isinstance(obj, dict) else None
    if isinstance(value, list):  # several labels: a multi-label sample
        return [_json_text(v) for v in value if v is not None and not isinstance(v, (dict, list))]
    if value is None or isinstance(value, dict):
        return None
    return _json_text(value)


def _json_text(value: object) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()


def index_shard(name: str, *, label_key: str | None) -> list[_Sample]:
    """Every sample of one shard in tar order: its image member's (ext, offset, size) and its label text."""
    samples: dict[str, _Sample] = {}
    key_field = label_key or "label"
    with open_stream(name) as fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 - closed by the `with tf` below
        except tarfile.ReadError as e:
            raise PipelineError(f"{name} is not an uncompressed tar file ({e}); WebDataset shards are .tar") from None
        with tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    folder, base = os.path.split(m.name)
                    if base.startswith(".") or "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
                    s = samples.setdefault(key, _Sample(key))
                    if ext in IMAGE_EXTS:
                        if s.image is None or IMAGE_EXTS.index(ext) < IMAGE_EXTS.index(s.image[0]):
                            s.image = (ext, m.offset_data, m.size)
                    elif ext in LABEL_EXTS and (label_key is None or ext == "json"):
                        rank = LABEL_EXTS.index(ext)
                        if s.label_from is None or rank < LABEL_EXTS.index(s.label_from):
                            s.label = _member_label(tf, m, ext, key_field, f"{name}")
                            s.label_from = ext
            except tarfile.TarError as e:
                raise PipelineError(f"{name} is a damaged tar file: {e}") from None
    return list(samples.values())


# ------------------------------------------------------------------------------------------ a Source


def _label_classes(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Integers (``.cls``) sort as numbers, text as text (as a labels table's do); a mix is refused."""
    ints = [re.fullmatch(r"[-+]?\d+", v) is not None for v in labels]
    if any(ints) and not all(ints):
        first_text = labels[ints.index(False)]
        first_int = labels[ints.index(True)]
        raise PipelineError(
            f"labels are integers in {sum(ints)} samples ({first_int!r}) and text in {len(ints) - sum(ints)} "
            f"({first_text!r}); make them all one kind"
        )
    keys = [str(int(v)) for v in labels] if all(ints) else labels
    classes = sorted(set(keys), key=int) if all(ints) else sorted(set(keys))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[k] for k in keys], dtype=np.int64)


def _multi_hot(names: list[list[str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(label names, -1 per sample, the (samples, labels) uint8 multi-hot matrix) of .json label lists."""
    found = sorted({n for ns in names for n in ns})
    ints = [re.fullmatch(r"[-+]?\d+", n) is not None for n in found]
    classes = sorted(found, key=int) if found and all(ints) else found
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(names), len(classes)), dtype=np.uint8)
    for k, ns in enumerate(names):
        matrix[k, [index[n] for n in ns]] = 1
    return classes, np.full(len(names), -1, dtype=np.int64), matrix


def _indexed(names: list[str], *, label_key: str | None) -> tuple[list[_Sample], np.ndarray]:
    samples, shard = [], []
    for s, name in enumerate(names):
        found = index_shard(name, label_key=label_key)
        samples.extend(found)
        shard.extend([s] * len(found))
    if not samples:
        raise PipelineError(f"{names[0]}{' ...' if len(names) > 1 else ''}: the shards hold no samples")
    no_image = [x.key for x in samples if x.image is None]
    if no_image:
        raise PipelineError(
            f"{len(no_image)} samples have no {'/'.join(IMAGE_EXTS)} image: {', '.join(no_image[:SHOWN])}"
            + (" ..." if len(no_image) > SHOWN else "")
        )
    no_label = [x.key for x in samples if x.label is None or x.label == ""]
    if no_label:
        where = f".json field {label_key!r}" if label_key else ".cls, .txt or .json 'label'"
        raise PipelineError(
            f"{len(no_label)} samples have no label ({where}): {', '.join(no_label[:SHOWN])}"
            + (" ..." if len(no_label) > SHOWN else "")
            + "; label them, or pass --label-key FIELD for another .json field"
        )
    keys = [x.key for x in samples]
    if len(set(keys)) != len(keys):
        seen, dupes = set(), []
        for k in keys:
            (dupes.append(k) if k in seen else seen.add(k))
        raise PipelineError(f"{len(dupes)} keys appear twice in the shards: {', '.join(dupes[:SHOWN])}")
    return samples, np.array(shard, dtype=np.int64)


def _shard_split(names: list[str], samples: list[_Sample], shard: np.ndarray, labels: np.ndarray) -> Split:
    reader = ShardReader(
        names=names,
        shard=shard,
        offset=np.array([x.image[1] for x in samples], dtype=np.int64),
        size=np.array([x.image[2] for x in samples], dtype=np.int64),
    )
    return Split(
        ids=[display_name(x.key) for x in samples],
        labels=labels,
        load=_ShardImage(reader),
        read_bytes=reader,
        units=shard,
    )


def _by_key(keys: list[str], *, val_fraction: float, seed: int) -> np.ndarray:
    """True for the samples in val: a seeded hash of the key under ``val_fraction`` (stable as shards are added)."""
    if not 0 < val_fraction < 1:
        raise PipelineError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    cut = int(val_fraction * 2**64)
    return np.array(
        [int.from_bytes(hashlib.sha256(f"{seed}\0{k}".encode()).digest()[:8], "big") < cut for k in keys], dtype=bool
    )


def _shard_identity(names: list[str], *, verify: str) -> tuple[str, dict[str, str]]:
    """Hash of every shard's name with its size and modification time (or its bytes, ``verify=content``)."""
    h, digests = hashlib.sha256(), {}
    for name in names:
        key = _shard_key(name, verify=verify)
        digests[display_name(name)] = hashlib.sha256(key.encode()).hexdigest()[:16]
        h.update(f"{name}\0{key}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest(), digests


def _shard_key(name: str, *, verify: str) -> str:
    if verify == "content":
        h = hashlib.sha256()
        with open_stream(name) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if is_url(name):
        import fsspec

        fs, path = fsspec.core.url_to_fs(name)
        info = fs.info(path)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
        return f"{info.get('size')}\0{stamp}"
    st = os.stat(name)
    return f"{st.st_size}\0{st.st_mtime_ns}"


def load_shards(
    spec: str,
    *,
    val_spec: str | None = None,
    label_key: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    verify: str = "stat",
) -> Source:
    """WebDataset shards as a Source: ``val_spec``'s shards are the val split, else ``val_fraction`` of the
    samples by a seeded hash of their key."""
    train_names = shard_names(spec)
    val_names = shard_names(val_spec) if val_spec else []
    overlap = sorted(set(train_names) & set(val_names))
    if overlap:
        raise PipelineError(f"{overlap[0]} is both a train and a --val-dataset shard")
    names = train_names + val_names
    samples, shard = _indexed(names, label_key=label_key)
    multi = any(isinstance(x.label, list) for x in samples)
    if multi:
        classes, labels, matrix = _multi_hot([x.label if isinstance(x.label, list) else [x.label] for x in samples])
    else:
        classes, labels = _label_classes([x.label for x in samples])
    if len(classes) < 2:
        raise PipelineError(f"the shards hold only one class ({classes[0]}); a classifier needs at least two")
    whole = _shard_split(names, samples, shard, labels)
    if multi:
        whole = replace(whole, multi_hot=matrix)
    if val_names:
        in_val = shard >= len(train_names)
        how = "val shards"
    else:
        in_val = _by_key([x.key for x in samples], val_fraction=val_fraction, seed=seed)
        how = f"by key val_fraction={val_fraction} seed={seed}"
    if in_val.all() or not in_val.any():
        raise PipelineError(f"{spec}: too few samples for a validation split of {val_fraction}")
    splits = {"train": whole.subset(np.flatnonzero(~in_val)), "val": whole.subset(np.flatnonzero(in_val))}
    files_sha256, digests = _shard_identity(names, verify=verify)
    identity = {
        "kind": "webdataset",
        "shards": [n if is_url(n) else str(Path(n).resolve()) for n in names],
        "split": how,
        "label": f"json:{label_key}" if label_key else "cls|txt|json:label",
        **({"multi_label": "json list"} if multi else {}),
        "num_samples": len(samples),
        "files_sha256": files_sha256,
    }
    identity["verify"] = verify  # always: a new kind has no older fingerprints to keep valid
    first = names[0]
    name = Path(first.split("://", 1)[-1]).parent.name or Path(first).stem
    return Source(name=name, classes=classes, splits=splits, identity=identity, files=digests)
