"""The feature file: the contract between stage one (extract) and stage two (heads).

The schema is defined here and nowhere else: :class:`FeatureMeta` is the one record of the root attributes, with
its one encoder and decoder (every attribute reads back as the type it was written as); stage two reads files only
through :func:`read_features`, stage one writes them only through :class:`FeatureWriter`.

    /                      attrs: the fields of FeatureMeta (format, schema_version, fingerprint, complete,
                                  backbone, weights, feature_dim, num_classes, preprocessing, dataset,
                                  dataset_identity, identity, config, classifier_path, versions, device,
                                  precision, created, extract_seconds, resumed_from, merge, scan_skipped);
                                  dicts and lists as JSON text, absent values not written
    /classes               (C,)   utf-8 class names, index = label
    /dataset_files         (F,)   optional, utf-8: 16 hex digits of each source file's digest, then its path;
                                  only used to say what changed when a file is refused as stale
    /<split>/features      (N, D) float32 (or float16)
    /<split>/labels        (N,)   int64 in [0, C)
    /<split>/ids           (N,)   utf-8 per-sample id: dataset index or path relative to the image folder
    /<split>/targets       (N, T) optional, float32 regression targets (``targets`` attribute: their names)
    /<split>/activations   (N, C, H, W) optional, float16 activation map at the ``--cache-at`` node
    (--layers: /<split>/features is the concatenation of the pooled layers the ``layers`` attribute lists)
    /<split>/layers/<name> (N, D_i) --layers: a virtual dataset (no copy) of the columns of /<split>/features
                                  that hold layer ``name`` (written when the file is finished)
    /<split>               attrs: n_total (samples in the source split), n_seen (samples processed),
                                  n_rows (rows written), skipped (JSON list of ids of unreadable images)

Schema version 1: files written before the record existed (``identity``, ``resumed_from`` and ``merge`` read back
as JSON text then) are read by the same decoder, which knows each attribute's type.

**Writing.** A file is written as ``<out>.tmp`` and renamed to ``<out>`` only when complete (after an fsync), so a
reader never sees a partial file under the final name. Appended rows are held in memory and written at each
*commit* (every few batches): free space is checked first (``statvfs`` and the file-size limit), then the rows are
written and flushed, and only then the ``n_seen``/``n_rows``/``skipped`` counters are written and flushed. So a
``.tmp`` left by a crash, ``kill -9`` or a full disk describes exactly rows that reached the disk. A commit that
cannot be written (no space, any write or flush error) ends the run with one line (``disk full: N rows kept in
<out>.tmp; free space and rerun``) and the file is closed without touching it again. Extra per-row columns (the
``--cache-at`` maps: the writer's ``columns``) travel with their rows through every step: held, committed, copied
on resume and merged from shards by the same code as the features.

**The partial ``.tmp`` policy** (one policy, for plain runs and torchrun merges alike, in :class:`FeatureWriter`):

- same settings (fingerprint) and readable: resumed; its committed rows are copied into a fresh ``.tmp``;
- other settings, or not a feature file at all: refused with one line and kept; only ``--force`` discards it;
- HDF5 that will not open (killed before its first commit reached the disk): it holds nothing; replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import fsync_path
from pipeline.stage1.config import FEATURE_DTYPES

log = logging.getLogger(__name__)
FORMAT = "pipeline.cached-embeddings"
SCHEMA_VERSION = 1
SPLITS = ("train", "val")
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks of whole rows: fast full reads (tiny auto-chunks are 7x slower)
_COPY_CHUNKS = 16  # chunks per block when copying rows (resume, merge): measured 2x faster than one
_COMPANIONS = (".tmp.resume", ".lock")  # the longest names written beside <out>
_DIGEST_LEN = 16  # hex digits of a per-file digest in /dataset_files


def fingerprint(identity: dict[str, Any]) -> str:
    """Hash of everything that determines the features (canonical JSON, sha256)."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


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


def library_versions() -> dict[str, str]:
    """Versions of everything that computes or stores the features (imported here only when a file is written)."""
    import torch
    import torchvision

    import pipeline

    return {
        "pipeline": pipeline.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "scikit-learn": _version("scikit-learn"),
        "python": platform.python_version(),
    } | _timm_version()


def _timm_version() -> dict[str, str]:
    """timm's version when it is loaded (a ``timm:`` backbone made the features): its model code computes them."""
    timm = sys.modules.get("timm")
    return {"timm": str(getattr(timm, "__version__", "?"))} if timm is not None else {}


def _version(dist: str) -> str:
    """A package's version without importing it (scikit-learn alone takes ~1 s to import; extraction never uses it)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class WeightsIdentity:
    """What made a backbone's weights, as feature files record it (the ``weights`` attribute), written and parsed
    here only: ``ResNet18_Weights.IMAGENET1K_V1`` (torchvision), ``none(seed=S)`` (random init), ``file:<sha256>``,
    ``timm:ARCH.TAG`` (a timm model's pretrained weights, by their tag)."""

    kind: str  # "torchvision" | "none" | "file" | "timm"
    value: str  # the weights enum's name, the seed, the file's sha256, or timm's ARCH.TAG

    def __str__(self) -> str:
        if self.kind == "none":
            return f"none(seed={self.value})" if self.value else "none"  # bare "none": hand-made files, no seed
        return {"torchvision": "", "file": "file:", "timm": "timm:"}[self.kind] + self.value

    @classmethod
    def parse(cls, text: str) -> WeightsIdentity:
        text = str(text)
        if text == "none":
            return cls("none", "")
        if text.startswith("none(seed=") and text.endswith(")") and text[10:-1].isdigit():
            return cls("none", text[10:-1])
        if text.startswith("file:") and len(text) > 5:
            return cls("file", text[5:])
        if text.startswith("timm:") and len(text) > 5:
            return cls("timm", text[5:])
        if "." in text and not text.startswith(("none", "file:", "timm:")):  # e.g. "ResNet18_Weights.IMAGENET1K_V1"
            return cls("torchvision", text)
        raise PipelineError(f"cannot tell which backbone weights made these features (weights {text!r})")

    @property
    def seed(self) -> int:
        return int(self.value) if self.kind == "none" and self.value else 0

    @property
    def argument(self) -> str | None:
        """The ``--weights`` value that loads these weights again (None for a file: only its hash is recorded;
        ``pretrained`` for timm, whose tag travels in the backbone name or is timm's default)."""
        torchvision = self.value.rsplit(".", 1)[-1]
        return {"torchvision": torchvision, "none": "none", "file": None, "timm": "pretrained"}[self.kind]

    def label(self, source: str | None = None) -> str:
        """For people: the torchvision name (or timm's ARCH.TAG), 'random init (seed=S)', or the file's name
        (``source``) and hash."""
        if self.kind == "file":
            return f"{Path(source).name} (sha256 {self.value[:8]})" if source else f"file sha256 {self.value[:8]}"
        if self.kind == "none":
            return f"random init (seed={self.value})" if self.value else "random init"
        return self.value


# --------------------------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class FeatureMeta:
    """The root attributes of a feature file: one field per attribute, each with its type.

    Reads like the dict it replaces (``meta["fingerprint"]``, ``meta.get("config")``): stage two indexes it by name.
    Attributes this version does not know are kept in ``extra`` (decoded as stored).
    """

    fingerprint: str = ""
    backbone: str = ""
    weights: str = ""
    feature_dim: int = 0
    num_classes: int = 0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""
    dataset_identity: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)  # everything hashed into the fingerprint
    config: dict[str, Any] = field(default_factory=dict)  # the extract options
    classifier_path: str | None = None  # where the backbone's classifier sat (used by export)
    versions: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    precision: str = ""
    scan_skipped: list[str] | None = None  # entries of the image folder that could not be read (links, rights)
    # Beyond one vector per image (issue 17, 18); None in files that hold only the classifier's input:
    layers: list[dict[str, Any]] | None = None  # --layers: [{"name": node, "dim": D}, ...] in /<split>/features order
    activations: dict[str, Any] | None = None  # --cache-at: {"node", "shape": [C, H, W], "dtype"}; /<split>/activations
    targets: dict[str, Any] | None = None  # --targets: {"names", "source": file name, "sha256"}; /<split>/targets
    # Written by the writer:
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION
    complete: bool = False
    created: str = ""  # ISO 8601, UTC
    extract_seconds: float | None = None
    resumed_from: dict[str, int] | None = None  # samples per split a resumed run found done
    merge: dict[str, Any] | None = None  # torchrun: {"shards": W, "seconds": s}
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureMeta:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in values.items() if k in known},
            extra={k: v for k, v in values.items() if k not in known},
        )

    # -- dict-like reading, for stage two and older callers
    def __getitem__(self, key: str) -> Any:
        if key != "extra" and key in _KINDS:
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _KINDS if getattr(self, k) is not None}
        return {**out, **self.extra}

    # -- the one encoder and decoder
    def encode(self) -> dict[str, Any]:
        """HDF5 attribute values: JSON text for dicts and lists; ``None`` fields are not written."""
        return {k: encode_attr(k, v) for k, v in self.as_dict().items() if v is not None}

    @classmethod
    def decode(cls, attrs: dict[str, Any], *, path: Path | str = "") -> FeatureMeta:
        values = {}
        for key, raw in attrs.items():
            value = _decode_attr(raw)
            kind = _KINDS.get(key)
            try:
                values[key] = value if kind is None else _as_kind(kind, value)
            except (TypeError, ValueError):
                what = "valid JSON" if kind is list or kind is dict else f"a {kind.__name__}"
                raise PipelineError(f"{path}: the '{key}' attribute is not {what}") from None
        return cls.from_dict(values)


def _kind_of(annotation: str) -> type:
    for kind in (bool, int, float, dict, list):
        if annotation.startswith(kind.__name__):
            return kind
    return str


_KINDS: dict[str, type] = {f.name: _kind_of(str(f.type)) for f in fields(FeatureMeta) if f.name != "extra"}


def _as_kind(kind: type, value: Any) -> Any:
    if kind in (dict, list):
        value = json.loads(value) if isinstance(value, str) else value
        if not isinstance(value, kind):
            raise TypeError(f"not a {kind.__name__}")
        return value
    if kind is bool:
        return bool(value)
    if kind is str:
        return str(value)
    return kind(value)


def encode_attr(key: str, value: Any) -> Any:
    """One attribute value as HDF5 stores it (JSON text for dicts and lists, also for keys the record lacks)."""
    if isinstance(value, (dict, list, tuple)) or _KINDS.get(key) in (dict, list):
        return json.dumps(value)
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value


# --------------------------------------------------------------------------------------------- what changed

_IDENTITY_ORDER = ("backbone", "weights", "preprocessing", "dataset", "dtype", "precision", "preprocess_on")


def _short(value: Any) -> str:
    text = "absent" if value is None else json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dict_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new), key=str)
            if old.get(k) != new.get(k)]  # fmt: skip


def _files_change(old: dict[str, str] | None, new: dict[str, str] | None) -> str:
    if old is None or new is None:
        return "files changed"
    added = len(new.keys() - old.keys())
    removed = len(old.keys() - new.keys())
    changed = sum(old[k] != new[k] for k in old.keys() & new.keys())
    return f"files: {added} added, {removed} removed, {changed} changed"


def describe_change(
    old: dict[str, Any],
    new: dict[str, Any],
    *,
    old_files: dict[str, str] | None = None,
    new_files: dict[str, str] | None = None,
) -> str:
    """Which parts of two feature identities differ, in one line (``backbone resnet18 -> resnet50; dataset
    (files: 2 added, 0 removed, 1 changed)``). ``*_files``: per-file digests, when both sides know them."""
    keys = [
        *(k for k in _IDENTITY_ORDER if k in old or k in new),
        *sorted((old.keys() | new.keys()) - set(_IDENTITY_ORDER)),
    ]
    parts = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "dataset" and isinstance(a, dict) and isinstance(b, dict):
            inner = [_files_change(old_files, new_files)] if a.get("files_sha256") != b.get("files_sha256") else []
            a2 = {k: v for k, v in a.items() if k not in ("files_sha256", "num_files")}
            b2 = {k: v for k, v in b.items() if k not in ("files_sha256", "num_files")}
            parts.append(f"dataset ({', '.join([*inner, *_dict_change(a2, b2)]) or 'num_files'})")
        elif isinstance(a, dict) and isinstance(b, dict):
            parts.append(f"{key} ({', '.join(_dict_change(a, b))})")
        else:
            parts.append(f"{key} {_short(a)} -> {_short(b)}")
    return "; ".join(parts) or "same settings, other fingerprint"


def files_digests_lines(files: dict[str, str]) -> list[str]:
    return [f"{digest[:_DIGEST_LEN]}{name}" for name, digest in files.items()]


# --------------------------------------------------------------------------------------------- reading


@dataclass
class SplitFeatures:
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    targets: np.ndarray | None = None  # (N, T) float32 regression targets, when the file has them (--targets)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FeatureSet:
    """A validated feature file held in memory: every stored column, or one layer's (``layer``; then ``meta``
    describes that slice: its ``feature_dim`` and ``layers``)."""

    path: Path
    classes: list[str]
    splits: dict[str, SplitFeatures]
    meta: FeatureMeta = field(default_factory=FeatureMeta)
    layer: str | None = None  # the layer these features are (read_features(layer=...)); None: the whole stored row

    def __post_init__(self) -> None:
        if isinstance(self.meta, dict):  # built in memory (tests, benchmarks) from a plain dict of fields
            self.meta = FeatureMeta.from_dict(self.meta)

    @property
    def train(self) -> SplitFeatures:
        return self.splits["train"]

    @property
    def val(self) -> SplitFeatures:
        return self.splits["val"]

    @property
    def feature_dim(self) -> int:
        return int(self.meta.feature_dim)


def _open_for_read(path: Path) -> h5py.File:
    if not path.exists():
        raise PipelineError(f"feature file not found: {path} (run `python -m pipeline extract` first)")
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, not a feature file")
    if not h5py.is_hdf5(path):
        raise PipelineError(f"{path} is not an HDF5 file (truncated, or not written by `pipeline extract`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if _is_locked(e):
            raise PipelineError(f"{path} is being written by another process; wait for it to finish") from None
        raise PipelineError(f"cannot open {path}: damaged or truncated HDF5 file ({e})") from None
    try:
        refuse_outside_reads(f, path=path)
    except BaseException:
        f.close()
        raise
    return f


def refuse_outside_reads(f: h5py.File, *, path: Path) -> None:
    """A feature file reads nothing outside itself (issue 24): one line naming the first object that would (an
    external link, a dangling soft link, external raw storage, a virtual dataset of another file). The per-layer
    views ``/<split>/layers/<name>`` are virtual datasets of this same file (source ``.``) and stay allowed."""
    try:
        # The visit stops at the first object that returns a reason (h5py cannot raise through it).
        found = f.visititems_links(functools.partial(_outside_read, f))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise PipelineError(f"cannot open {path}: damaged HDF5 file ({e})") from None
    if found:
        raise PipelineError(f"{path}: {found}; a feature file may read nothing outside itself")


def _outside_read(f: h5py.File, name: str, link: object) -> str | None:
    """Why the object linked as ``name`` in ``f`` would read outside the file, or None."""
    if isinstance(link, h5py.ExternalLink):
        return f"/{name} is an external link to {link.filename}:{link.path}"
    if isinstance(link, h5py.SoftLink):
        # Its target is a link of this file, visited on its own; a missing one could be made to resolve elsewhere.
        return None if f.get(name) is not None else f"/{name} is a soft link to {link.path}, which does not exist"
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        return None
    if obj.external:
        return f"/{name} stores its data in an external file ({obj.external[0][0]!s})"
    if obj.is_virtual:
        for source in obj.virtual_sources():
            if source.file_name != ".":
                return f"/{name} is a virtual dataset reading {source.file_name}:{source.dset_name}"
    return None


def _meta_from(f: h5py.File, path: Path) -> FeatureMeta:
    try:
        attrs = dict(f.attrs.items())
    except (OSError, TypeError, ValueError) as e:
        raise PipelineError(f"cannot read the metadata of {path}: damaged HDF5 file ({e})") from None
    if _decode_attr(attrs.get("format")) != FORMAT:
        raise PipelineError(f"{path} was not written by `pipeline extract` (no '{FORMAT}' format attribute)")
    version = _decode_attr(attrs.get("schema_version"))
    if version != SCHEMA_VERSION:
        raise PipelineError(
            f"{path} has feature-file schema version {version}; this version of pipeline reads {SCHEMA_VERSION}"
        )
    return FeatureMeta.decode(attrs, path=path)


def read_meta(path: Path | str) -> FeatureMeta:
    """Root metadata of a feature file (validated format and schema version, no arrays read)."""
    path = Path(path)
    with _open_for_read(path) as f:
        return _meta_from(f, path)


def read_dataset_files(path: Path | str) -> dict[str, str] | None:
    """The per-file digests a file recorded of its source (``/dataset_files``), or None if it has none."""
    try:
        with _open_for_read(Path(path)) as f:
            if "dataset_files" not in f:
                return None
            lines = f["dataset_files"].asstr()[()]
    except (OSError, KeyError, ValueError, TypeError, PipelineError):  # outside reads refused too
        return None
    return {line[_DIGEST_LEN:]: line[:_DIGEST_LEN] for line in lines}


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
    targets = g["targets"][()] if "targets" in g else None
    return SplitFeatures(features=feats, labels=labels.astype(np.int64, copy=False), ids=ids, targets=targets)


# --------------------------------------------------------------------------------------------- layers

FINAL_LAYER = "final"  # the one layer of a file made without --layers: the input of the backbone's final classifier
ALL_LAYERS = "all"  # every stored layer: the whole row (their concatenation)


def layer_columns(meta: FeatureMeta, *, path: Path | str = "") -> dict[str, slice]:
    """The columns of each stored layer, in file order: ``meta.layers`` (``extract --layers``), checked against
    ``feature_dim``; a file without them holds one layer, :data:`FINAL_LAYER`. A damaged record is one line."""
    dim = int(meta.feature_dim)
    if meta.layers is None:
        return {FINAL_LAYER: slice(0, dim)}
    entries = meta.layers
    ok = bool(entries) and all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] not in ("", ".", "..", ALL_LAYERS)
        and "/" not in e["name"]  # a name is also a folder name (train-head's default --out)
        and isinstance(e.get("dim"), int) and not isinstance(e["dim"], bool) and e["dim"] > 0
        for e in entries
    )  # fmt: skip
    if not ok or len({e["name"] for e in entries}) != len(entries):
        raise PipelineError(
            f"{path}: the 'layers' attribute is damaged (expected distinct names, none 'all' or with a '/', each "
            f"with a positive dim): {json.dumps(entries)[:120]}"
        )
    total = sum(e["dim"] for e in entries)
    if total != dim:
        shown = " + ".join(f"{e['name']} {e['dim']}" for e in entries)
        raise PipelineError(f"{path}: the 'layers' dims add up to {total} ({shown}), the file says {dim} features")
    columns, at = {}, 0
    for e in entries:
        columns[e["name"]] = slice(at, at + e["dim"])
        at += e["dim"]
    return columns


def resolve_layer(meta: FeatureMeta, layer: str | None, *, path: Path | str = "") -> str | None:
    """The layer ``train-head --layer`` names, in one canonical form: None for the whole stored row (no name,
    ``all``, or the name of a file's only layer), else a layer name of the file. An unknown name is one line
    listing the file's layers."""
    columns = layer_columns(meta, path=path)
    if layer is None or layer == ALL_LAYERS or (len(columns) == 1 and layer in columns):
        return None
    if layer not in columns:
        known = ", ".join(f"{name} ({c.stop - c.start})" for name, c in columns.items())
        how = "" if meta.layers else f" ('{FINAL_LAYER}': the classifier's input; extract --layers stores others)"
        raise PipelineError(f"{path} has no layer {layer!r}; its layers: {known}{how}, or '{ALL_LAYERS}'")
    return layer


def select_layer(fs: FeatureSet, layer: str | None) -> FeatureSet:
    """``fs`` reduced to the columns of ``layer`` (see :func:`resolve_layer`; None: ``fs`` itself)."""
    layer = resolve_layer(fs.meta, layer, path=fs.path)
    if layer is None:
        return fs
    cols = layer_columns(fs.meta, path=fs.path)[layer]
    dim = cols.stop - cols.start
    splits = {
        name: replace(split, features=np.ascontiguousarray(split.features[:, cols]))
        for name, split in fs.splits.items()
    }
    meta = replace(fs.meta, feature_dim=dim, layers=[{"name": layer, "dim": dim}])
    return replace(fs, splits=splits, meta=meta, layer=layer)


def _validate(fs: FeatureSet) -> None:
    path, n_classes = fs.path, len(fs.classes)
    layer_columns(fs.meta, path=path)  # the layers' dims add up to feature_dim
    dims = {name: split.features.shape[1] for name, split in fs.splits.items()}
    if len(set(dims.values())) > 1:
        shown = ", ".join(f"{name} {d}" for name, d in dims.items())
        raise PipelineError(f"{path}: the splits disagree in feature dimension ({shown})")
    dim = fs.meta.feature_dim
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
    _validate_targets(fs)
    if not n_classes:
        raise PipelineError(f"{path}: the class list is empty")
    if "train" in fs.splits and len(fs.train) == 0:
        raise PipelineError(f"{path}: the train split is empty")
    _validate_classes(fs)


def _validate_classes(fs: FeatureSet) -> None:
    """Class names are distinct: a head's outputs are named by them."""
    seen: set[str] = set()
    for name in fs.classes:
        if name in seen:
            raise PipelineError(f"{fs.path}: duplicate class name {name!r} in /classes; each class needs its own name")
        seen.add(name)


def check_classes_have_rows(fs: FeatureSet) -> None:
    """Before a classifier trains: each class has training rows. A class with none (``--skip-bad`` may drop all of
    its images, ``--limit`` may sample none) cannot be learnt, and its recall would read 1.0 of nothing. Refused
    rather than dropped: dropping would renumber the labels the file and every head made from it share. Not a
    read check: such a file's features are still sound (and a regression file's classes are only its folders)."""
    counts = np.bincount(fs.train.labels, minlength=len(fs.classes))
    empty = [fs.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise PipelineError(
            f"{fs.path}: class {empty[0]!r} has 0 training rows"
            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
            + "; add readable images of it or remove its folder (or raise --limit), then rerun extract"
        )


def _validate_targets(fs: FeatureSet) -> None:
    """Regression targets, when the file has them: in every split, (N, T) for the T names recorded, finite."""
    names = (fs.meta.targets or {}).get("names")
    held = [name for name, split in fs.splits.items() if split.targets is not None]
    if not names and not held:
        return
    if not names or len(held) != len(fs.splits):
        raise PipelineError(
            f"{fs.path}: regression targets are incomplete (names {names or 'missing'}, stored in "
            f"{', '.join(held) or 'no split'}); rerun extract --targets"
        )
    for name, split in fs.splits.items():
        t = split.targets
        if t.dtype.kind != "f" or t.shape != (len(split), len(names)):
            raise PipelineError(
                f"{fs.path}: /{name}/targets is {t.dtype} {t.shape}, expected float ({len(split)}, {len(names)})"
            )
        if not np.isfinite(t).all():
            bad = int((~np.isfinite(t)).any(axis=1).sum())
            raise PipelineError(f"{fs.path}: /{name}/targets holds NaN or Inf in {bad} rows")
        split.targets = t.astype(np.float32, copy=False)


def read_features(path: Path | str, *, splits: tuple[str, ...] = SPLITS, layer: str | None = None) -> FeatureSet:
    """Load and validate a complete feature file; every problem is a one-line :class:`PipelineError`.

    ``layer``: None or ``all``, every stored column; a layer's name (``extract --layers``; :data:`FINAL_LAYER` in
    other files), only its columns (:func:`select_layer`). An unknown name is refused before the arrays are read.
    Any number of processes may read one file at once (HDF5 takes a shared lock for mode "r").
    """
    path = Path(path)
    with _open_for_read(path) as f:
        meta = _meta_from(f, path)
        if not meta.complete:
            raise PipelineError(f"{path} is incomplete (extraction did not finish); rerun extract to resume")
        resolve_layer(meta, layer, path=path)
        if "classes" not in f:
            raise PipelineError(f"{path} has no /classes dataset")
        try:
            classes = list(f["classes"].asstr()[()])
            data = {name: _read_split(f, name, path) for name in splits}
        except (OSError, TypeError, ValueError, KeyError) as e:  # h5py raises these for damaged data
            raise PipelineError(f"cannot read {path}: damaged or truncated HDF5 file ({e})") from None
    fs = FeatureSet(path=path, classes=classes, splits=data, meta=meta)
    _validate(fs)
    return select_layer(fs, layer)


def read_activations(path: Path | str, split: str, *, rows: np.ndarray | slice | None = None) -> np.ndarray:
    """The ``--cache-at`` activation maps of ``split`` (``rows`` of them, default all): (N, C, H, W) as stored
    (float16). Read apart from :func:`read_features`: they are large (ResNet18 layer3: 98 KB per image)."""
    path = Path(path)
    with _open_for_read(path) as f:
        meta = _meta_from(f, path)
        if not meta.activations:
            raise PipelineError(f"{path} holds no activation maps; extract with --cache-at NODE first")
        if not meta.complete:
            raise PipelineError(f"{path} is incomplete (extraction did not finish); rerun extract to resume")
        try:
            data = f[split]["activations"]
            return data[()] if rows is None else data[rows]
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise PipelineError(f"cannot read /{split}/activations of {path} ({type(e).__name__}: {e})") from None


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
        rows = max(1, min(len(ids), _chunk_rows(values.shape[1], 4)))
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
    with _open_for_read(path) as src, atomic_path(path) as tmp, h5py.File(tmp, "w") as dst:
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


# --------------------------------------------------------------------------------------------- blocks of rows


@dataclass(frozen=True)
class Progress:
    """What a file holds of one split: rows written, source samples consumed, ids of the unreadable ones."""

    rows: int = 0
    seen: int = 0
    skipped: tuple[str, ...] = ()


class FeatureReadError(PipelineError):
    """Rows that a file says it holds could not be read back (damaged after it was written)."""


Rows = tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]  # features, labels, ids, extra columns


def _blocks(g: h5py.Group, *, start: int, stop: int, step: int, columns: tuple[str, ...] = ()) -> Iterator[Rows]:
    """The one block iterator: ``(features, labels, ids, {column: rows})`` of rows ``[start, stop)`` of a split
    group, ``step`` rows at a time, with the extra per-row ``columns`` (e.g. ``activations``). Shared by the resume
    (committed rows into a fresh ``.tmp``) and the merge (shards into ``<out>``)."""
    a = start
    while a < stop:
        b = min(stop, a + step)
        try:
            extra = {c: g[c][a:b] for c in columns}
            block = g["features"][a:b], g["labels"][a:b], list(g["ids"].asstr()[a:b]), extra
        except (OSError, KeyError, ValueError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise FeatureReadError(
                f"cannot read rows {a}..{b} of {g.file.filename}{g.name} ({type(e).__name__}: {first})"
            ) from None
        yield block
        a = b


def _progress_of(g: h5py.Group) -> Progress:
    rows, seen = int(g.attrs["n_rows"]), int(g.attrs["n_seen"])
    if any(g[key].shape[0] < rows for key in ("features", "labels", "ids", *_columns_in(g))):
        raise ValueError(f"/{g.name} is shorter than its committed {rows} rows")
    return Progress(rows, seen, tuple(json.loads(_decode_attr(g.attrs.get("skipped", "[]")))))


def _columns_in(g: h5py.Group) -> list[str]:
    """The extra per-row columns a split group holds (datasets beside features, labels and ids)."""
    return [k for k, v in g.items() if isinstance(v, h5py.Dataset) and k not in ("features", "labels", "ids")]


class StoredFile:
    """A complete feature file opened once for copying its rows elsewhere (the shards of a torchrun merge)."""

    def __init__(self, path: Path, *, fingerprint: str):
        self.path = Path(path)
        self.f = _open_for_read(self.path)
        try:
            self.meta = _meta_from(self.f, self.path)
        except PipelineError:
            self.f.close()
            raise
        if self.meta.fingerprint != fingerprint or not self.meta.complete:
            self.f.close()
            raise PipelineError(f"{self.path} is incomplete or from other settings; rerun the same command")

    def progress(self, split: str) -> Progress:
        try:
            return _progress_of(self.f[split])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise FeatureReadError(f"cannot read /{split} of {self.path} ({type(e).__name__}: {e})") from None

    def blocks(self, split: str, *, start: int = 0, step: int, columns: tuple[str, ...] = ()) -> Iterator[Rows]:
        return _blocks(self.f[split], start=start, stop=self.progress(split).rows, step=step, columns=columns)

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> StoredFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- locks


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

    BUSY = "another extract is already writing {target}; wait for it or choose --out"  # the refusal, per user

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
                raise PipelineError(self.BUSY.format(target=self.path.with_suffix(""))) from None
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


class DiskFull(PipelineError):
    """No room for the next commit; the rows of the last one are kept and a rerun resumes from them."""


def _is_disk_full(e: BaseException) -> bool:
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


def _room_for(path: Path, need: int, *, size: int) -> bool:
    """Whether ``need`` more bytes fit: free space of the filesystem and this process's file-size limit
    (``ulimit -f``), for a file at ``path`` that holds ``size`` bytes now."""
    free = free_bytes(path.parent)
    if free is not None and free < need:  # a filesystem that cannot say: the write itself will tell
        return False
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return soft == resource.RLIM_INFINITY or size + need <= soft


def _abandon(f: h5py.File) -> None:
    """Close a file whose last write failed without writing to it again. After a failed flush HDF5 retries the
    write at close and again at exit, and h5py then crashed the process (SIGSEGV seen at exit): its descriptor is
    pointed at /dev/null first, so those retries succeed harmlessly and the file keeps what the last commit left."""
    with contextlib.suppress(Exception):
        fd = int(f.id.get_vfd_handle())
        _LOCK_FDS.pop(fd, None)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    with contextlib.suppress(Exception):
        f.close()


class FeatureWriter:
    """Writes one feature file under ``<out>.tmp``, resumable, and renames it to ``<out>`` when finished.

    ``meta``: the root attributes (a :class:`FeatureMeta`, or a dict of its fields); ``sizes``: source samples per
    split; ``files``: per-file digests of the source (``/dataset_files``); ``columns``: extra per-row datasets
    beside the features, name -> (row shape, dtype), e.g. ``{"activations": ((256, 14, 14), "float16")}``: appended,
    committed, resumed and merged with the rows they belong to. Appended rows are held in memory and
    written at each commit (every ``flush_every`` appends, or 64 MiB): space checked, rows written and flushed,
    then the counters written and flushed (see the module docstring). An existing ``.tmp`` is handled by the one
    policy of the module docstring; ``restart`` (``--force``) discards it first. ``start`` says where this run
    began (> 0: resumed).
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
        self.classes, self.sizes, self.files = classes, sizes, files
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
        _hold(self._fd)
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
            _abandon(f)
            raise self._write_error(e) from None
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
            refuse_outside_reads(old, path=self.tmp)
            try:
                progress = self._partial_progress(old)
            except (KeyError, ValueError, TypeError, OSError):
                return None  # counters unreadable: no commit of ours reached the disk
            fresh = _resume_path(self.tmp)
            rows = sum(p.rows for p in progress.values())
            if not _room_for(fresh, self.tmp.stat().st_size + (4 << 20), size=0):
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
        return {s: _progress_of(f[s]) for s in self.sizes}

    def _copy_committed(self, old: h5py.File, fresh: Path, progress: dict[str, Progress]) -> None:
        """Write ``fresh``: a new ``.tmp`` holding the committed rows of ``old``, copied block by block."""
        rows = sum(p.rows for p in progress.values())
        f = h5py.File(fresh, "w")
        try:
            self._create(f, created=_decode_attr(old.attrs.get("created", "")))
            for s, p in progress.items():
                dst, a = f[s], 0
                for key in ("features", "labels", "ids", *self.columns):
                    dst[key].resize(p.rows, axis=0)
                columns = tuple(self.columns)
                for feats, labels, ids, extra in _blocks(old[s], start=0, stop=p.rows, step=self._copy_step,
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
            _abandon(f)
            fresh.unlink(missing_ok=True)
            if _is_disk_full(e):
                raise DiskFull(f"disk full: {rows} rows kept in {self.tmp}; free space and rerun") from None
            raise PipelineError(
                f"cannot carry over the committed rows of {self.tmp} ({type(e).__name__}: {str(e)[:200]}); "
                "rerun to resume, or pass --force to start over"
            ) from None
        f.close()

    @property
    def _copy_step(self) -> int:
        """Rows per block copied (resume, merge): whole chunks of every column, the widest row deciding."""
        return _COPY_CHUNKS * min([_chunk_rows(self.dim, self.dtype.itemsize), *self._column_chunk_rows.values()])

    @property
    def _column_chunk_rows(self) -> dict[str, int]:
        return {c: _chunk_rows(int(np.prod(shape)), t.itemsize) for c, (shape, t) in self.columns.items()}

    def _create(self, f: h5py.File, *, created: str) -> None:
        meta = replace(self.meta, format=FORMAT, schema_version=SCHEMA_VERSION, complete=False, created=created)
        for key, value in meta.encode().items():
            f.attrs[key] = value
        f.create_dataset("classes", data=np.array(self.classes, dtype=object), dtype=_STR)
        if self.files is not None:
            f.create_dataset("dataset_files", data=np.array(files_digests_lines(self.files), dtype=object), dtype=_STR)
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
            held = {c: extra[c].astype(t, copy=True) for c, (_, t) in self.columns.items()}
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
        if not _room_for(self.tmp, self._room_needed(), size=os.fstat(self._fd).st_size):
            self._dead = True  # nothing written: the file stays as the last commit left it
            _abandon(self.f)
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
            _abandon(self.f)
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
        if _is_disk_full(e):
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

    def finish(self, updates: dict[str, Any] | None = None, *, targets: TargetColumn | None = None) -> Path:
        """Refuse an empty split, mark complete, close, sync to disk and atomically rename to the final name.
        ``targets``: regression targets, written whole from the stored ids (see :func:`write_targets`)."""
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
            for key, value in (updates or {}).items():
                self.f.attrs[key] = encode_attr(key, value)
            self.f.attrs["complete"] = True
            _LOCK_FDS.pop(self._fd, None)
            self.f.close()
        except Exception as e:
            self._dead = True
            _abandon(self.f)
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
        _LOCK_FDS.pop(self._fd, None)
        self.f.close()


def _is_locked(e: OSError) -> bool:
    """h5py's error when another process holds the file open for writing (HDF5 file locking, errno 11)."""
    return "unable to lock file" in str(e) or getattr(e, "errno", None) == 11
