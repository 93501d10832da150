"""The feature file's record: :class:`FeatureMeta` (its root attributes) with its one encoder and decoder, the
versioned reader that upgrades older files, the fingerprint, the backbone weights' identity, and the one-line
account of what changed between two identities. The schema itself: docs/schema.md."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError

FORMAT = "pipeline.cached-embeddings"
# The file's layout and record. 2: every record complete (no key left out for holding its default), optional
# per-row ``digests`` and ``phash``. Version 1 files are upgraded on read (:data:`DEFAULTS`), not refused.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# The identity's own ``schema_version``: what the fingerprint's keys mean. Unchanged by schema version 2 (whose
# reader reads version 1 files): a file written before it keeps its fingerprint and is reused, not re-extracted.
IDENTITY_VERSION = 1
SPLITS = ("train", "val")
DIGEST_LEN = 16  # hex digits of a per-file digest in /dataset_files

# Keys that version 1 files leave out when they hold their default, so that the fingerprints of files written
# before an option existed stayed valid. One table, read two ways: the reader fills them into a version 1 record
# (and the writer into every record it writes), so callers see complete records; :func:`fingerprint` hashes an
# identity without them, so an identity hashes alike whether such a key is written or not.
# (path in the record, default, only into a parent whose "kind" is this, or None)
DEFAULTS: tuple[tuple[tuple[str, ...], Any, str | None], ...] = (
    (("preprocessing", "resize"), "crop", None),  # Preprocessing.resize, before --resize
    (("identity", "preprocessing", "resize"), "crop", None),
    (("identity", "preprocess_on"), "loader", None),  # the PIL loader ran every split, before the batch sources
    (("identity", "dataset", "verify"), "stat", "folder"),  # an image folder's --verify, before --verify content
    (("dataset_identity", "verify"), "stat", "folder"),
)


def _parent(record: dict[str, Any], path: tuple[str, ...], kind: str | None) -> dict[str, Any] | None:
    """The dict holding ``path``'s last key, when it exists, holds other keys (a hand-made record may have none:
    nothing to complete) and is of ``kind``."""
    node: Any = record
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not node or (kind is not None and node.get("kind") != kind):
        return None
    return node


def complete(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a record's fields, decoded) with every key of :data:`DEFAULTS` that it leaves out filled in:
    the upgrade from schema version 1, and what the writer writes. A copy; ``values`` is not changed."""
    values = copy.deepcopy(values)
    for path, default, kind in DEFAULTS:
        parent = _parent(values, path, kind)
        if parent is not None:
            parent.setdefault(path[-1], default)
    return values


def _canonical(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` without the keys of :data:`DEFAULTS` that hold their default (what version 1 wrote)."""
    identity = copy.deepcopy(identity)
    for path, default, kind in DEFAULTS:
        if path[0] != "identity":
            continue
        parent = _parent({"identity": identity}, path, kind)
        if parent is not None and parent.get(path[-1], object()) == default:
            del parent[path[-1]]
    return identity


def fingerprint(identity: dict[str, Any]) -> str:
    """Hash of everything that determines the features (canonical JSON, sha256). Keys holding the default they
    had before they were recorded (:data:`DEFAULTS`) are left out: a complete identity hashes as the version 1
    identity that omitted them, so files written before stay up to date."""
    blob = json.dumps(_canonical(identity), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


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
    """The root attributes of a feature file: one field per attribute, each with its type, read as attributes
    (``meta.fingerprint``). Attributes this version does not know are kept in ``extra`` (decoded as stored)."""

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

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _KINDS if getattr(self, k) is not None}
        return {**out, **self.extra}

    def completed(self) -> FeatureMeta:
        """This record with the keys of :data:`DEFAULTS` it leaves out filled in (what the writer writes)."""
        return FeatureMeta.from_dict(complete(self.as_dict()))

    # -- the one encoder and decoder
    def encode(self) -> dict[str, Any]:
        """HDF5 attribute values: JSON text for dicts and lists; ``None`` fields are not written."""
        return {k: encode_attr(k, v) for k, v in self.as_dict().items() if v is not None}

    @classmethod
    def decode(cls, attrs: dict[str, Any], *, path: Path | str = "") -> FeatureMeta:
        """The record of a file's root attributes, every value as the type its field has; a version 1 record is
        upgraded (:func:`complete`). The format and version are checked by :func:`read_record`."""
        values = {}
        for key, raw in attrs.items():
            value = decode_attr(raw)
            kind = _KINDS.get(key)
            try:
                values[key] = value if kind is None else _as_kind(kind, value)
            except (TypeError, ValueError):
                what = "valid JSON" if kind is list or kind is dict else f"a {kind.__name__}"
                raise PipelineError(f"{path}: the '{key}' attribute is not {what}") from None
        if values.get("schema_version", SCHEMA_VERSION) < SCHEMA_VERSION:
            values = complete(values)
        return cls.from_dict(values)


def read_record(attrs: dict[str, Any], *, path: Path | str) -> FeatureMeta:
    """The one reader of a feature file's root attributes: format and schema version checked, then decoded and
    upgraded to the current version (:meth:`FeatureMeta.decode`)."""
    if decode_attr(attrs.get("format")) != FORMAT:
        raise PipelineError(f"{path} was not written by `pipeline extract` (no '{FORMAT}' format attribute)")
    version = decode_attr(attrs.get("schema_version"))
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise PipelineError(
            f"{path} has feature-file schema version {version}; this version of pipeline reads "
            f"{', '.join(map(str, READABLE_VERSIONS))} (a newer pipeline wrote it?)"
        )
    return FeatureMeta.decode(attrs, path=path)


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


def decode_attr(value: Any) -> Any:
    """An HDF5 attribute value as Python: bytes as text, numpy scalars as Python numbers."""
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
    (files: 2 added, 0 removed, 1 changed)``). ``*_files``: per-file digests, when both sides know them. Both
    are compared complete (:data:`DEFAULTS`): a key one leaves out for holding its default is no change."""
    old, new = complete({"identity": old})["identity"], complete({"identity": new})["identity"]
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
    """``/dataset_files``: each source file as the first :data:`DIGEST_LEN` hex digits of its digest, then its path."""
    return [f"{digest[:DIGEST_LEN]}{name}" for name, digest in files.items()]
