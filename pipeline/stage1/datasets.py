"""Image sources for stage one: torchvision datasets by name, or a folder of the user's own images.

Every source yields, per split, a deterministic sequence of samples with an id and a label, and an
``identity`` dict that goes into the feature file's fingerprint (so changed data is never silently reused).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError
from pipeline.stage1.config import VERIFY_MODES, SourceOptions  # noqa: F401 (their home is torch-free config)

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Images above this many pixels are refused from their header, before decoding: a 20 KB PNG can declare 13000 x 13000
# 1-bit pixels and take 1.7 GB once decoded. 120 MP keeps 100 MP camera photos readable.
MAX_PIXELS = 120_000_000


def _cifar(cls_name: str) -> Callable[..., Any]:
    def make(root: str, split: str, download: bool) -> Any:
        import torchvision.datasets as tvd

        return getattr(tvd, cls_name)(root, train=(split == "train"), download=download)

    return make


def _split_kw(cls_name: str) -> Callable[..., Any]:
    def make(root: str, split: str, download: bool) -> Any:
        import torchvision.datasets as tvd

        return getattr(tvd, cls_name)(root, split="train" if split == "train" else "test", download=download)

    return make


# name -> factory(root, split, download). The official test split is stored as "val".
TORCHVISION_DATASETS: dict[str, Callable[..., Any]] = {
    "cifar10": _cifar("CIFAR10"),
    "cifar100": _cifar("CIFAR100"),
    "mnist": _cifar("MNIST"),
    "fashionmnist": _cifar("FashionMNIST"),
    "kmnist": _cifar("KMNIST"),
    "svhn": _split_kw("SVHN"),
    "stl10": _split_kw("STL10"),
}


@dataclass
class Split:
    """One split: ``len(ids)`` samples; ``load(i)`` returns an RGB PIL image or raises with the reason."""

    ids: list[str]
    labels: np.ndarray
    load: Callable[[int], Image.Image]
    arrays: np.ndarray | None = None  # uint8 NHWC (or NHW) when the whole split sits in memory
    path: Callable[[int], Path] | None = None  # the file of sample i, when samples are files (raw-byte sources)
    # The encoded bytes of sample i, when samples are not files of their own (WebDataset shards): what gpu-decode
    # reads instead of ``path``.
    read_bytes: Callable[[int], bytes] | None = None
    # The unit of work each sample belongs to (its shard's number), non-decreasing: torchrun ranks split a split
    # at unit boundaries, so each rank reads its own shards (see :func:`rank_rows`). None: any row boundary.
    units: np.ndarray | None = None
    # Several labels per sample: (N, classes) uint8 0/1 (``labels`` is then -1). Read from a labels table or shards
    # (see :mod:`pipeline.stage1.tables`); extract stores it as ``/<split>/multi_hot``.
    multi_hot: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: np.ndarray) -> Split:
        """The samples at ``indices``, every field narrowed (``replace`` keeps any field added later)."""
        narrowed: dict[str, Any] = {"ids": [self.ids[i] for i in indices], "labels": self.labels[indices]}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in narrowed or value is None:
                continue
            narrowed[f.name] = _Remapped(value, indices) if callable(value) else value[indices]
        return replace(self, **narrowed)


@dataclass
class _Remapped:
    """A per-sample function (``load``, ``path``) of the parent split, called through the subset's indices."""

    fn: Callable[[int], Any]
    indices: np.ndarray

    def __call__(self, i: int) -> Any:
        return self.fn(int(self.indices[i]))


@dataclass
class Source:
    name: str
    classes: list[str]
    splits: dict[str, Split]
    identity: dict[str, Any] = field(default_factory=dict)  # hashed into the fingerprint
    # Beside the identity, not in it: a digest per image file (its path -> hex), to say which files changed when a
    # feature file is refused as stale; and the folder entries that could not be read (broken links, rights).
    files: dict[str, str] | None = None
    unreadable: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ image files


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit greyscale is scaled, not clipped; palettes and CMYK converted)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        img = Image.fromarray((np.clip(arr, 0, top) * 255 // top).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / (hi - lo or 1) * 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Decode an image file fully (so truncation is caught here, not later) as RGB.

    Large photos are fine up to :data:`MAX_PIXELS` (PIL's own warning at ~89 megapixels, which a 100 MP camera
    exceeds, is silenced); a larger one is refused from its header, before any pixel is decoded.
    """
    return read_image_file(path)[0]


def read_image_file(path: Path) -> tuple[Image.Image, bytes]:
    """:func:`load_image`, with the file's bytes: read once, then decoded from memory (extract's content digest)."""
    check_regular(path)  # the one-word reasons first (missing, broken link, not a regular file)
    data = read_regular_file(path)
    return decode_image(io.BytesIO(data)), data


def read_regular_file(path: Any) -> bytes:
    """The bytes of a regular file; anything else (a FIFO or device swapped in after the scan) is refused from the
    open descriptor's ``fstat``. Opened non-blocking, so a FIFO cannot block the reading thread (a thread, unlike a
    worker process, cannot be killed at exit)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def check_regular(path: Path) -> None:
    """Raise ``ValueError`` with the one-word reason (``missing``, ``broken link``, ``not a regular file``...)
    when ``path`` is not an image file to open."""
    kind = _not_regular(Path(path))
    if kind:
        raise ValueError(kind)


def decode_image(src: Path | io.BytesIO) -> Image.Image:
    """:func:`load_image` for a file or the bytes of one (a WebDataset member): the same checks, the same pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(src)
        except UnidentifiedImageError:
            if isinstance(src, io.BytesIO):  # PIL names the buffer object (``<_io.BytesIO object at 0x...>``)
                raise UnidentifiedImageError("cannot identify image file") from None
            raise
        with img:
            check_pixels(*img.size)
            img.load()
            return to_rgb(img)


def check_pixels(w: int, h: int) -> None:
    """The one pixel policy of every reader (PIL here, the JPEG decoder of ``gpu-decode``): a header declaring more
    than :data:`MAX_PIXELS` is refused before any pixel is decoded."""
    if w * h > MAX_PIXELS:
        cap = MAX_PIXELS // 1_000_000
        raise ValueError(f"{w}x{h} pixels is over the {cap}-megapixel limit (a decompression bomb?)")


@dataclass
class _FileLoader:
    root: Path
    relpaths: list[str]

    def __call__(self, i: int) -> Image.Image:
        return load_image(self.root / self.relpaths[i])


@dataclass
class _FilePath:
    root: Path
    relpaths: list[str]

    def __call__(self, i: int) -> Path:
        return self.root / self.relpaths[i]


def display_name(name: str) -> str:
    """A path as text HDF5 can store: undecodable bytes of a file name (not UTF-8) shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_regular(path: Path) -> str | None:
    """Why ``path`` is not an image file, from its ``stat`` (links followed), before anything opens it: only a
    regular file is an image. Opening a FIFO blocks forever and a character device (``/dev/zero``) never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken link" if os.path.islink(path) else "missing"
    except OSError as e:
        return e.strerror or "cannot be read"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _walk_images(folder: Path, *, root: Path, problems: list[str]) -> list[Path]:
    """Image files under ``folder`` (links followed); broken links, link loops and folders that cannot be listed
    are added to ``problems`` instead of vanishing silently."""
    found, visited = [], set()

    def rel(p: str | Path) -> str:
        return display_name(os.path.relpath(p, root))

    def unlistable(e: OSError) -> None:
        problems.append(f"{rel(e.filename)} ({e.strerror or 'cannot be listed'})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in visited:
            problems.append(f"{rel(dirpath)} (symlink loop)")
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if name.startswith("."):
                continue
            if p.suffix.lower() not in IMG_EXTENSIONS:
                continue
            kind = _not_regular(p)
            if kind:
                problems.append(f"{rel(p)} ({kind})")
            else:
                found.append(p)
    return sorted(found)


def list_images(folder: Path, problems: list[str]) -> list[Path]:
    """The image files under ``folder`` as extract sees them (hidden files and folders skipped, links followed,
    regular files only), sorted; what was passed over goes to ``problems``. Predict lists its folders with it too."""
    return _walk_images(Path(folder), root=Path(folder), problems=problems)


def _holds_only_outputs(folder: Path) -> bool:
    """A folder of feature files (``--out`` inside the image folder): not a class."""
    return any(".h5" in p.name for p in folder.rglob("*") if p.is_file())


def _scan_classes(root: Path, problems: list[str] | None = None) -> tuple[list[str], dict[str, list[Path]]]:
    if not root.is_dir():
        raise PipelineError(f"image folder not found: {root}")
    problems = [] if problems is None else problems
    try:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise PipelineError(f"cannot list {root}: {e.strerror}") from None
    if not class_dirs:
        raise PipelineError(f"{root} has no class folders (expected {root}/<class>/<image files>)")
    files = {d.name: _walk_images(d, root=root, problems=problems) for d in class_dirs}
    for d in class_dirs:
        if not files[d.name] and _holds_only_outputs(d):
            log.info("ignoring %s: it holds feature files, not images", d)
            del files[d.name]
    class_dirs = [d for d in class_dirs if d.name in files]
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        raise PipelineError(f"class folder {root / empty[0]} has no images ({len(empty)} empty class folders)")
    if len(files) < 2:
        raise PipelineError(f"{root} has only one class ({class_dirs[0].name}); a classifier needs at least two")
    return [d.name for d in class_dirs], files


def _file_digest(path: Path, *, verify: str) -> tuple[str, str]:
    """(what the identity hashes for one file, its short digest). ``stat``: size and modification time, as before
    ``--verify`` existed (so older fingerprints stay valid); ``content``: the sha256 of its bytes."""
    if verify == "content":
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest(), h.hexdigest()[:16]
    st = path.stat()
    key = f"{st.st_size}\0{st.st_mtime_ns}"
    return key, hashlib.sha256(key.encode()).hexdigest()[:16]


def file_identity(root: Path, relpaths: list[str], *, verify: str = "stat") -> tuple[str, dict[str, str]]:
    """Hash of sorted relative paths with sizes and modification times (or contents): any change to the files
    changes it. Also the per-file digests, by displayed path."""
    h, digests = hashlib.sha256(), {}
    for rel in sorted(relpaths):
        key, digests[display_name(rel)] = _file_digest(root / rel, verify=verify)
        h.update(f"{rel}\0{key}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest(), digests


def _split_from_files(root: Path, classes: list[str], files: dict[str, list[Path]], base: Path) -> Split:
    index = {c: i for i, c in enumerate(classes)}
    rel = [str(p.relative_to(base)) for c in classes for p in files.get(c, [])]
    labels = np.array([index[c] for c in classes for _ in files.get(c, [])], dtype=np.int64)
    return file_split(base, rel, labels)


def file_split(base: Path, relpaths: list[str], labels: np.ndarray) -> Split:
    """Image files ``base/relpath`` with their labels; ids are the relative paths as storable text."""
    ids = [display_name(r) for r in relpaths]  # the real names open the files; the ids must be storable text
    return Split(ids=ids, labels=labels, load=_FileLoader(base, relpaths), path=_FilePath(base, relpaths))


def load_folder(root: Path, *, val_fraction: float = 0.2, seed: int = 0, verify: str = "stat") -> Source:
    """``root/train/<class>/*`` + ``root/val/<class>/*``, or ``root/<class>/*`` split by a seeded fraction."""
    root = Path(root)
    problems: list[str] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train_files = _scan_classes(root / "train", problems)
        val_classes, val_files = _scan_classes(root / "val", problems)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise PipelineError(f"{root}/val has classes missing from {root}/train: {', '.join(extra[:5])}")
        splits = {
            "train": _split_from_files(root / "train", classes, train_files, root),
            "val": _split_from_files(root / "val", classes, val_files, root),
        }
        how = "folders"
    else:
        classes, files = _scan_classes(root, problems)
        whole = _split_from_files(root, classes, files, root)
        splits = stratified_split(whole, val_fraction=val_fraction, seed=seed, root=root)
        how = f"stratified val_fraction={val_fraction} seed={seed}"
    if problems:
        shown = ", ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        log.warning("skipped %d entries of %s that cannot be read: %s", len(problems), root, shown)
    found = [train_files, val_files] if how == "folders" else [files]
    relpaths = [str(p.relative_to(root)) for by_class in found for ps in by_class.values() for p in ps]
    files_sha256, digests = file_identity(root, relpaths, verify=verify)
    identity = {
        "kind": "folder",
        "root": str(root.resolve()),
        "split": how,
        "num_files": len(relpaths),
        "files_sha256": files_sha256,
    }
    identity["verify"] = verify  # "stat", the default before it was recorded, hashes as absent (store DEFAULTS)
    return Source(name=root.name, classes=classes, splits=splits, identity=identity, files=digests, unreadable=problems)


def stratified_split(whole: Split, *, val_fraction: float, seed: int, root: Path | str) -> dict[str, Split]:
    """Each class's samples shuffled by ``seed``, ``val_fraction`` of them to val; both splits keep the order."""
    if not 0 < val_fraction < 1:
        raise PipelineError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(whole.labels):
        idx = np.flatnonzero(whole.labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)  # every class in both splits when it has 2+ images
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    if not val_idx:
        raise PipelineError(f"{root}: too few images for a validation split of {val_fraction}")
    return {"train": whole.subset(np.sort(train_idx)), "val": whole.subset(np.sort(val_idx))}


# ------------------------------------------------------------------------------------ torchvision sets


@dataclass
class _ArrayLoader:
    arrays: np.ndarray

    def __call__(self, i: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.arrays[i]))


def array_split(arrays: np.ndarray, labels: np.ndarray) -> Split:
    """A split held in memory: uint8 ``(N, H, W)`` greyscale or ``(N, H, W, 3)`` RGB images, ids ``"0".."N-1"``."""
    labels = np.asarray(labels, dtype=np.int64)
    return Split(ids=[str(i) for i in range(len(labels))], labels=labels, load=_ArrayLoader(arrays), arrays=arrays)


def _as_nhwc(ds: Any) -> np.ndarray:
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    if data.ndim == 4 and data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):
        data = data.transpose(0, 2, 3, 1)  # SVHN/STL10 store NCHW
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.ascontiguousarray(data)


def _labels_of(ds: Any) -> np.ndarray:
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            v = getattr(ds, attr)
            return np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.int64)
    raise PipelineError(f"{type(ds).__name__} exposes no labels")


def load_torchvision(name: str, *, root: Path, download: bool) -> Source:
    key = name.lower().replace("-", "").replace("_", "")
    factory = TORCHVISION_DATASETS[key]
    splits, classes = {}, None
    for split in ("train", "val"):
        try:
            ds = factory(str(root), split, download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
            hint = "" if download else " (pass --download to fetch it)"
            raise PipelineError(f"{name} not found under {root}{hint}: {str(e).splitlines()[0]}") from None
        except OSError as e:  # no network
            raise PipelineError(
                f"cannot download {name} to {root} ({type(e).__name__}: {e}); offline? copy the dataset "
                f"files under {root} and pass --no-download"
            ) from None
        splits[split] = array_split(_as_nhwc(ds), _labels_of(ds))
        classes = classes or [str(c) for c in getattr(ds, "classes", sorted(set(splits[split].labels.tolist())))]
    identity = {
        "kind": "torchvision",
        "name": key,
        "root": str(Path(root).resolve()),
        "lengths": {s: len(v) for s, v in splits.items()},
        "split": "official train/test",
    }
    return Source(name=key, classes=classes, splits=splits, identity=identity)


def available_datasets() -> list[str]:
    return sorted(TORCHVISION_DATASETS)


def load_source(
    dataset: str,
    *,
    data_root: Path = Path("data"),
    download: bool = True,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
    verify: str = "stat",
) -> Source:
    """Resolve ``dataset`` (a torchvision name or a folder path) and apply ``limit`` to each split.

    ``verify``: how a folder's image files enter the identity (see :data:`VERIFY_MODES`)."""
    key = dataset.lower().replace("-", "").replace("_", "")
    if key in TORCHVISION_DATASETS and not Path(dataset).is_dir():
        source = load_torchvision(dataset, root=Path(data_root), download=download)
    elif Path(dataset).is_dir() or os.sep in dataset:
        source = load_folder(Path(dataset), val_fraction=val_fraction, seed=split_seed, verify=verify)
    else:
        raise PipelineError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(available_datasets())}, or a folder path, a "
            "labels table (.csv, .tsv, .jsonl, .parquet) or WebDataset shards (.tar)"
        )
    if limit is not None:
        source = limited(source, limit, seed=split_seed)
    return source


def limited(source: Source, limit: int, *, seed: int) -> Source:
    """``--limit``: the first N samples of a torchvision split, else a seeded sample in the split's order."""
    if limit < 1:
        raise PipelineError(f"--limit must be at least 1, not {limit}")
    splits = {}
    for name, split in source.splits.items():
        n = len(split)
        if source.identity["kind"] == "torchvision":
            idx = np.arange(min(limit, n))  # the first N, as course material on CIFAR subsets does
        else:
            # folders are sorted by class: a seeded sample keeps every class represented
            idx = np.sort(np.random.default_rng(seed).permutation(n)[: min(limit, n)])
        splits[name] = split.subset(idx)
    identity = {**source.identity, "limit": limit}
    if source.identity["kind"] != "torchvision":
        identity["limit_seed"] = seed  # the seeded sample is part of what the features are of
    return replace(source, splits=splits, identity=identity)


def rank_rows(split: Split, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``split`` that torchrun rank ``rank`` of ``world`` extracts: contiguous, in order, and,
    when the split has :attr:`Split.units` (shards), cut only where a unit ends, so no two ranks read one shard."""
    n = len(split)
    if split.units is None or n == 0:
        return n * rank // world, n * (rank + 1) // world
    starts = np.flatnonzero(np.r_[True, split.units[1:] != split.units[:-1]])  # first row of each unit
    edges = np.r_[starts, n]

    def cut(r: int) -> int:  # the unit edge nearest the even cut n*r/W (ties to the earlier edge)
        return int(edges[np.argmin(np.abs(edges * world - n * r))])

    return cut(rank), cut(rank + 1)
