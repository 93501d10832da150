"""Labels tables as datasets: a CSV / TSV / JSON Lines / Parquet file naming image files and their labels, and
Hugging Face's ``imagefolder`` layout (``metadata.csv`` or ``metadata.jsonl`` beside the images, split folders).

Both end as the same :class:`~pipeline.stage1.datasets.Source` a class folder gives: image files on disk read by
every batch source, split by a ``split`` column, split folders, or ``--val-fraction`` (stratified, as folders).
Rows with no label are refused (one line naming them): a feature file is for training; to get predictions for
unlabelled images, run ``pipeline predict`` on them.

Several labels per image (multi-label) are read too: a label column holding ``;``-separated labels (or
``--label-delimiter``), or one 0/1 column per label (``--label-columns a,b,c``). The split then carries a multi-hot
matrix (:attr:`Split.multi_hot`, classes in column order or sorted) and ``labels`` of -1; a row with no label is
an image with none of them. Storing and training such a split needs the multi-label task (not yet here).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage1.datasets import (
    IMG_EXTENSIONS,
    Source,
    display_name,
    file_identity,
    file_split,
    stratified_split,
)

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
IMAGE_COLUMNS = ("path", "file_name", "filename", "file", "image", "id")  # the first present names the image
LABEL_COLUMNS = ("label", "labels", "class", "target")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")  # Hugging Face imagefolder
# Split folder names as Hugging Face's loader reads them; this pipeline has train and val, so test is val.
SPLIT_WORDS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "val", "testing": "val", "eval": "val", "evaluation": "val",
}  # fmt: skip
SHOWN = 3  # offending rows named in an error
DEFAULT_DELIMITER = ";"  # a label column holding it in any row is multi-label
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no", "")  # a --label-columns value


@dataclass
class Row:
    """One table row, as read: where it is (for errors), the image as written, its label and split as text."""

    where: str  # "labels.csv line 7"
    image: str  # relative to the row's folder
    label: str
    split: str | None
    folder: Path  # what ``image`` is relative to
    labels: list[str] | None = None  # with --label-columns: the columns that are 1


def _first_rows(rows: Iterable[Row], what: str, *, total: int | None = None) -> str:
    rows = list(rows)
    n = total if total is not None else len(rows)
    shown = ", ".join(f"{r.where} ({r.image!r})" for r in rows[:SHOWN])
    return f"{n} {what}: {shown}" + (" ..." if n > SHOWN else "")


# ------------------------------------------------------------------------------------------ reading a table


def read_records(path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """(column names, [(where, {column: text value})]) of a .csv / .tsv / .jsonl / .parquet file."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise PipelineError(f"labels table not found: {path}")
    try:
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".parquet":
            return _read_parquet(path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot read {path} as {suffix[1:]}: {e}") from None
    raise PipelineError(f"{path}: a labels table is one of {', '.join(TABLE_SUFFIXES)}")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        records = []
        for row in reader:
            values = {c.strip(): _text(v) for c, v in row.items() if c is not None}
            records.append((f"{path.name} line {reader.line_num}", values))
    return columns, records


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    columns: dict[str, None] = {}
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{path.name} line {n} is not JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise PipelineError(f"{path.name} line {n} is not a JSON object")
            columns.update(dict.fromkeys(obj))
            records.append((f"{path.name} line {n}", {k: _text(v) for k, v in obj.items()}))
    return list(columns), records


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PipelineError(f"reading {path.name} needs pyarrow: pip install -e '.[parquet]'") from None
    table = pq.read_table(path)
    rows = table.to_pylist()
    return table.column_names, [(f"{path.name} row {n}", {k: _text(v) for k, v in r.items()}) for n, r in
                                enumerate(rows, 1)]  # fmt: skip


def _pick_column(columns: list[str], *, given: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if given is not None:
        if given not in columns:
            raise PipelineError(f"{path.name} has no column {given!r} (its columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        flag = "--image-column" if what == "image" else "--label-column"
        raise PipelineError(
            f"{path.name} has no {what} column: expected one of {', '.join(candidates)} (its columns: "
            f"{', '.join(columns) or 'none'}); name it with {flag} NAME"
        )
    return found


def table_rows(
    path: Path,
    *,
    folder: Path,
    image_column: str | None,
    label_column: str | None,
    label_columns: list[str] | None = None,
    split: str | None = None,
) -> list[Row]:
    """The rows of one table; ``split``: the split every row is in (a Hugging Face split folder's metadata);
    ``label_columns``: 0/1 columns, one per label (multi-label), instead of one label column."""
    columns, records = read_records(path)
    if not records:
        raise PipelineError(f"{path} has no rows")
    image = _pick_column(columns, given=image_column, candidates=IMAGE_COLUMNS, what="image", path=path)
    if label_columns:
        for c in label_columns:
            _pick_column(columns, given=c, candidates=(), what="label", path=path)
        label = None
    else:
        label = _pick_column(columns, given=label_column, candidates=LABEL_COLUMNS, what="label", path=path)
    has_split = split is None and "split" in columns
    rows = [
        Row(
            where,
            r.get(image, ""),
            r.get(label, "") if label else "",
            split or (r.get("split", "") if has_split else None),
            folder,
        )  # fmt: skip
        for where, r in records
    ]
    if label_columns:
        bad = []
        for row, (_, r) in zip(rows, records):
            values = {c: r.get(c, "").lower() for c in label_columns}
            if any(v not in TRUE + FALSE for v in values.values()):
                bad.append(row)
            row.labels = [c for c, v in values.items() if v in TRUE]
        if bad:
            raise PipelineError(
                _first_rows(bad, f"rows have a --label-columns value that is not 0 or 1 ({', '.join(label_columns)})")
            )
    return rows


# ------------------------------------------------------------------------------------------ rows -> a Source


class _Stems:
    """Bare ids -> image files: one listing per folder, image files by stem."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, dict[str, list[str]]] = {}

    def candidates(self, path: Path) -> list[str]:
        listing = self._by_dir.get(path.parent)
        if listing is None:
            listing = {}
            try:
                names = sorted(os.listdir(path.parent))
            except OSError:
                names = []
            for name in names:
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMG_EXTENSIONS:
                    listing.setdefault(stem, []).append(name)
            self._by_dir[path.parent] = listing
        return listing.get(path.name, [])


def _resolve(rows: list[Row], root: Path) -> list[str]:
    """Each row's image file, relative to ``root``: as written, or a bare id's one image file of that stem."""
    stems, rel, missing, ambiguous = _Stems(), [], [], []
    for r in rows:
        path = r.folder / r.image
        if not path.is_file() and Path(r.image).suffix.lower() not in IMG_EXTENSIONS:
            found = stems.candidates(path)
            if len(found) > 1:
                ambiguous.append((r, found))
            elif found:
                path = path.parent / found[0]
        if not path.is_file():
            missing.append(r)
        rel.append(os.path.relpath(path, root))
    if ambiguous:
        r, found = ambiguous[0]
        raise PipelineError(
            f"{r.where}: id {r.image!r} matches {len(found)} image files ({', '.join(found)}); write the file name "
            f"with its extension ({len(ambiguous)} such rows)"
        )
    if missing:
        raise PipelineError(
            _first_rows(
                missing, f"rows name images that are not under {root} (pass --images DIR if they live elsewhere)"
            )  # fmt: skip
        )
    return rel


def _multi_hot(
    rows: list[Row], *, delimiter: str, label_columns: list[str] | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(label names, -1 per row, the (rows, labels) uint8 multi-hot matrix) of a multi-label table."""
    names = [r.labels if r.labels is not None else [x.strip() for x in r.label.split(delimiter) if x.strip()]
             for r in rows]  # fmt: skip
    if label_columns:
        classes = list(label_columns)
    else:
        found = sorted({n for ns in names for n in ns})
        numeric = [_looks_numeric(n) for n in found]
        if any(numeric) and not all(numeric):
            raise PipelineError(
                f"labels are numbers ({found[numeric.index(True)]!r}) and text ({found[numeric.index(False)]!r}) "
                "in one multi-label column; make them all one kind"
            )
        classes = sorted(found, key=float) if found and all(numeric) else found
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(rows), len(classes)), dtype=np.uint8)
    for k, ns in enumerate(names):
        matrix[k, [index[n] for n in ns]] = 1
    return classes, np.full(len(rows), -1, dtype=np.int64), matrix


def _class_names(rows: list[Row]) -> tuple[list[str], np.ndarray]:
    """(class names, label index per row). Integers sort as numbers, names as text; a mix of both is refused."""
    empty = [r for r in rows if not r.label]
    if empty:
        raise PipelineError(
            _first_rows(empty, "rows have no label")
            + "; label them or drop them (to get predictions for unlabelled images, run `pipeline predict` on them)"
        )
    numeric = [_looks_numeric(r.label) for r in rows]
    if any(numeric) and not all(numeric):
        text = [r for r, n in zip(rows, numeric) if not n]
        nums = [r for r, n in zip(rows, numeric) if n]
        raise PipelineError(
            f"labels are numbers in {len(nums)} rows ({nums[0].where}: {nums[0].label!r}) and text in {len(text)} "
            f"({', '.join(f'{r.where}: {r.label!r}' for r in text[:SHOWN])}); make them all one kind"
        )
    if all(numeric):
        values = [float(r.label) for r in rows]
        if not all(v.is_integer() for v in values):
            bad = [r for r, v in zip(rows, values) if not v.is_integer()]
            raise PipelineError(
                f"{bad[0].where}: label {bad[0].label!r} is not a whole number; class labels are integers or names "
                "(for numeric targets use --targets FILE.csv)"
            )
        keys = [str(int(v)) for v in values]
        classes = sorted(set(keys), key=int)
    else:
        keys = [r.label for r in rows]
        classes = sorted(set(keys))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[k] for k in keys], dtype=np.int64)


def _looks_numeric(text: str) -> bool:
    return re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text) is not None


def _row_splits(rows: list[Row]) -> list[str] | None:
    """Each row's split (``train`` / ``val``) from its split column or folder, or None when no row has one."""
    if all(r.split is None for r in rows):
        return None
    out, bad = [], []
    for r in rows:
        s = SPLIT_WORDS.get((r.split or "").strip().lower())
        if s is None:
            bad.append(r)
        out.append(s or "")
    if bad:
        raise PipelineError(
            f"{len(bad)} rows have a split that is not train, val or test: "
            + ", ".join(f"{r.where} ({r.split!r})" for r in bad[:SHOWN])
        )
    return out


def rows_source(
    rows: list[Row],
    *,
    root: Path,
    tables: list[Path],
    name: str,
    kind: str,
    val_fraction: float,
    seed: int,
    verify: str,
    label_delimiter: str | None = None,
    label_columns: list[str] | None = None,
) -> Source:
    """Image files named by ``rows`` (checked, resolved under ``root``) as a Source with the folder source's split
    rules and an identity covering the tables' bytes and the image files (``verify``). Multi-label when
    ``label_columns`` or ``label_delimiter`` is given, or a label holds :data:`DEFAULT_DELIMITER`."""
    rel = _resolve(rows, root)
    seen: dict[str, Row] = {}
    dupes = []
    for r, p in zip(rows, rel):
        if p in seen:
            dupes.append(r)
        seen.setdefault(p, r)
    if dupes:
        raise PipelineError(
            _first_rows(dupes, "rows name an image an earlier row already names") + "; each image may appear once"
        )
    delimiter = label_delimiter or DEFAULT_DELIMITER
    multi = bool(label_columns or label_delimiter or any(delimiter in r.label for r in rows))
    if multi:
        classes, labels, matrix = _multi_hot(rows, delimiter=delimiter, label_columns=label_columns)
    else:
        classes, labels = _class_names(rows)
    if len(classes) < 2:
        raise PipelineError(f"{tables[0]} has only one class ({classes[0]}); a classifier needs at least two")
    whole = file_split(root, rel, labels)
    if multi:  # -1 labels: the seeded split below is a plain random one, not stratified by a single label
        whole = replace(whole, multi_hot=matrix)
    row_split = _row_splits(rows)
    if row_split is None:
        splits = stratified_split(whole, val_fraction=val_fraction, seed=seed, root=tables[0])
        how = f"stratified val_fraction={val_fraction} seed={seed}"
    else:
        in_split = {s: np.flatnonzero(np.array(row_split) == s) for s in ("train", "val")}
        empty = [s for s, idx in in_split.items() if not len(idx)]
        if empty:
            raise PipelineError(f"{tables[0]}: no rows are in the {empty[0]} split; a run needs train and val rows")
        splits = {s: whole.subset(idx) for s, idx in in_split.items()}
        how = "split column" if kind == "table" else "split folders"
    files_sha256, digests = file_identity(root, rel, verify=verify)
    identity = {
        "kind": kind,
        "root": str(root.resolve()),
        "tables": {display_name(os.path.relpath(t, root)): _sha256(t) for t in tables},
        "split": how,
        "num_files": len(rel),
        "files_sha256": files_sha256,
    }
    if multi:
        identity["multi_label"] = f"columns:{','.join(label_columns)}" if label_columns else f"delimiter:{delimiter}"
    identity["verify"] = verify  # always: a new kind has no older fingerprints to keep valid
    return Source(name=name, classes=classes, splits=splits, identity=identity, files=digests)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the two layouts


def load_table(
    path: Path,
    *,
    images: Path | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    label_columns: list[str] | None = None,
    label_delimiter: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    verify: str = "stat",
) -> Source:
    """``extract --dataset labels.csv``: image paths relative to ``images`` (default: the table's folder)."""
    path = Path(path)
    root = Path(images) if images is not None else path.parent
    if not root.is_dir():
        raise PipelineError(f"image folder not found: {root} (--images)")
    rows = table_rows(path, folder=root, image_column=image_column, label_column=label_column,
                      label_columns=label_columns)  # fmt: skip
    name = f"{path.resolve().parent.name}-{path.stem}"  # my_images/labels.csv -> my_images-labels
    return rows_source(
        rows, root=root, tables=[path], name=name, kind="table", val_fraction=val_fraction, seed=seed,
        verify=verify, label_delimiter=label_delimiter, label_columns=label_columns,
    )  # fmt: skip


def metadata_files(root: Path) -> list[tuple[Path, str | None]]:
    """Hugging Face imagefolder metadata under ``root``: (file, its split folder's split or None), or []."""
    found = []
    for name in METADATA_NAMES:
        if (root / name).is_file():
            found.append((root / name, None))
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_WORDS):
            for name in METADATA_NAMES:
                if (d / name).is_file():
                    found.append((d / name, d.name))
    return found


def load_imagefolder(
    root: Path,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    label_columns: list[str] | None = None,
    label_delimiter: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    verify: str = "stat",
) -> Source:
    """A Hugging Face ``imagefolder``: ``file_name`` is relative to its metadata file's folder; a split folder
    (train/, validation/ or val/, test/) is the split of its rows; a root metadata file's rows take the split
    folder their path starts with, else a ``split`` column, else ``--val-fraction``. With both validation/ and
    test/, test is left out (this pipeline has one val split)."""
    root = Path(root)
    metas = metadata_files(root)
    rows: list[Row] = []
    for meta, split_dir in metas:
        for r in table_rows(meta, folder=meta.parent, image_column=image_column, label_column=label_column,
                            label_columns=label_columns, split=split_dir):  # fmt: skip
            if r.split is None:  # a root table: the split folder its path starts with, if any
                first = Path(r.image).parts[0] if Path(r.image).parts else ""
                if first.lower() in SPLIT_WORDS and (root / first).is_dir():
                    r.split = first
            rows.append(r)
    named = {r.split.lower() for r in rows if r.split}
    if {"test", "testing"} & named and {"validation", "valid", "val", "dev"} & named:
        dropped = [r for r in rows if (r.split or "").lower() in ("test", "testing")]
        log.info("%s: leaving out the %d test rows (validation/ is the val split)", root, len(dropped))
        rows = [r for r in rows if (r.split or "").lower() not in ("test", "testing")]
    if any(r.split for r in rows) and not all(r.split for r in rows):
        loose = [r for r in rows if not r.split]
        raise PipelineError(_first_rows(loose, "rows are in no split folder while others are"))
    return rows_source(
        rows, root=root, tables=[m for m, _ in metas], name=root.name, kind="imagefolder",
        val_fraction=val_fraction, seed=seed, verify=verify, label_delimiter=label_delimiter,
        label_columns=label_columns,
    )  # fmt: skip
