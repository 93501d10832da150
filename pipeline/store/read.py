"""Reading a feature file: opened only when it reads nothing outside itself, its record read and upgraded,
every array validated, one layer's columns selected. Every problem is one line (:class:`PipelineError`)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np

from pipeline import pages
from pipeline.errors import PipelineError
from pipeline.store.record import DIGEST_LEN, SPLITS, FeatureMeta, read_record


@dataclass
class SplitFeatures:
    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    targets: np.ndarray | None = None  # (N, T) float32 regression targets, when the file has them (--targets)
    # Per-row columns for the audit (schema version 2), None in files without them: the hex sha256 of each
    # sample's bytes (str), and a 64-bit perceptual hash of its decoded image (uint64).
    digests: np.ndarray | None = None
    phash: np.ndarray | None = None
    # Several labels per image (``label_kind`` "multi", schema 3): (N, classes) uint8 0/1; ``labels`` is then -1.
    multi_hot: np.ndarray | None = None

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


def is_locked(e: OSError) -> bool:
    """h5py's error when another process holds the file open for writing (HDF5 file locking, errno 11)."""
    return "unable to lock file" in str(e) or getattr(e, "errno", None) == 11


def open_for_read(path: Path) -> h5py.File:
    """A feature file opened read-only, after checking it is one and reads nothing outside itself."""
    if not path.exists():
        raise PipelineError(f"feature file not found: {path} (run `python -m pipeline extract` first)")
    if path.is_dir():
        raise PipelineError(f"{path} is a folder, not a feature file")
    if not h5py.is_hdf5(path):
        raise PipelineError(f"{path} is not an HDF5 file (truncated, or not written by `pipeline extract`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        if is_locked(e):
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


def meta_of(f: h5py.File, path: Path) -> FeatureMeta:
    """The record of an open feature file (:func:`pipeline.store.record.read_record`)."""
    try:
        attrs = dict(f.attrs.items())
    except (OSError, TypeError, ValueError) as e:
        raise PipelineError(f"cannot read the metadata of {path}: damaged HDF5 file ({e})") from None
    return read_record(attrs, path=path)


def read_meta(path: Path | str) -> FeatureMeta:
    """Root metadata of a feature file (validated format and schema version, no arrays read)."""
    path = Path(path)
    with open_for_read(path) as f:
        return meta_of(f, path)


def read_dataset_files(path: Path | str) -> dict[str, str] | None:
    """The per-file digests a file recorded of its source (``/dataset_files``), or None if it has none."""
    try:
        with open_for_read(Path(path)) as f:
            if "dataset_files" not in f:
                return None
            lines = f["dataset_files"].asstr()[()]
    except (OSError, KeyError, ValueError, TypeError, PipelineError):  # outside reads refused too
        return None
    return {line[DIGEST_LEN:]: line[:DIGEST_LEN] for line in lines}


def _read_split(f: h5py.File, name: str, path: Path) -> SplitFeatures:
    if (
        name not in f
        or not isinstance(f[name], h5py.Group)
        or not all(k in f[name] for k in ("features", "labels", "ids"))
    ):
        raise PipelineError(f"{path} has no complete '/{name}' group (features, labels, ids)")
    g = f[name]
    feats, labels = _read_array(g["features"]), g["labels"][()]
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
    return SplitFeatures(
        features=feats,
        labels=labels.astype(np.int64, copy=False),
        ids=ids,
        targets=targets,
        digests=_audit_column(g, "digests", len(labels), path=path),
        phash=_audit_column(g, "phash", len(labels), path=path),
        multi_hot=g["multi_hot"][()] if "multi_hot" in g else None,
    )


def _read_array(d: h5py.Dataset) -> np.ndarray:
    """A dataset's values; a large float one read into memory mapped up front (:mod:`pipeline.pages`): reading
    60,000 x 1,280 float32 into a new numpy array took 0.13-1.2 s here, nearly all of it page faults (how long
    depends on the kernel's free huge pages), and 0.28-0.37 s so."""
    if d.dtype.kind != "f" or not d.dtype.isnative or d.ndim != 2 or not d.size:
        return d[()]
    out = pages.empty(d.shape, d.dtype)
    d.read_direct(out)
    return out


def _audit_column(g: h5py.Group, name: str, rows: int, *, path: Path) -> np.ndarray | None:
    """``digests`` (64 hex digits per row, as str) or ``phash`` (uint64 per row), or None when absent."""
    if name not in g:
        return None
    d = g[name]
    want = "S" if name == "digests" else "u"
    if not isinstance(d, h5py.Dataset) or d.shape != (rows,) or d.dtype.kind != want:
        raise PipelineError(
            f"{path}: /{d.name.lstrip('/')} is {getattr(d, 'dtype', 'a group')} {getattr(d, 'shape', '')}, "
            f"expected {rows} {'hex digests' if name == 'digests' else 'uint64 hashes'}"
        )
    return d.asstr()[()] if name == "digests" else d[()].astype(np.uint64, copy=False)


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


# --------------------------------------------------------------------------------------------- validation


def all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in ``a``: its min and max (a NaN propagates to both, an Inf is one of them), two passes and no
    new array, where ``np.isfinite(a).all()`` wrote a boolean array the size of ``a`` (77 MB for 60,000 x 1,280)."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


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
        if fs.meta.label_kind == "multi":
            _validate_multi_hot(fs, name, split)
        elif len(split) and (split.labels.min() < 0 or split.labels.max() >= n_classes):
            raise PipelineError(
                f"{path}: /{name}/labels fall outside the {n_classes} classes "
                f"(range {split.labels.min()}..{split.labels.max()})"
            )
        if not all_finite(split.features):
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


def _validate_multi_hot(fs: FeatureSet, name: str, split: SplitFeatures) -> None:
    """Several labels per image: ``/<split>/multi_hot`` is (N, classes) of 0 and 1."""
    m = split.multi_hot
    if m is None or m.shape != (len(split), len(fs.classes)) or m.dtype.kind not in "iub" or (m.size and m.max() > 1):
        shown = "missing" if m is None else f"{m.dtype} {m.shape}"
        raise PipelineError(
            f"{fs.path}: /{name}/multi_hot is {shown}, expected ({len(split)}, {len(fs.classes)}) 0/1 for a "
            "multi-label file; rerun extract"
        )
    split.multi_hot = m.astype(np.uint8, copy=False)


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
        if not all_finite(t):
            bad = int((~np.isfinite(t)).any(axis=1).sum())
            raise PipelineError(f"{fs.path}: /{name}/targets holds NaN or Inf in {bad} rows")
        split.targets = t.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- the readers


def read_features(path: Path | str, *, splits: tuple[str, ...] = SPLITS, layer: str | None = None) -> FeatureSet:
    """Load and validate a complete feature file; every problem is a one-line :class:`PipelineError`.

    ``layer``: None or ``all``, every stored column; a layer's name (``extract --layers``; :data:`FINAL_LAYER` in
    other files), only its columns (:func:`select_layer`). An unknown name is refused before the arrays are read.
    Any number of processes may read one file at once (HDF5 takes a shared lock for mode "r").
    """
    path = Path(path)
    with open_for_read(path) as f:
        meta = meta_of(f, path)
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
    with open_for_read(path) as f:
        meta = meta_of(f, path)
        if not meta.activations:
            raise PipelineError(f"{path} holds no activation maps; extract with --cache-at NODE first")
        if not meta.complete:
            raise PipelineError(f"{path} is incomplete (extraction did not finish); rerun extract to resume")
        try:
            data = f[split]["activations"]
            return data[()] if rows is None else data[rows]
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise PipelineError(f"cannot read /{split}/activations of {path} ({type(e).__name__}: {e})") from None
