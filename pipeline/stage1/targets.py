"""Regression targets for ``extract --targets FILE.csv``: read, checked and matched to the images before any image
is read, so a typo in the CSV costs nothing.

The CSV has a header row: ``id``, then one or more numeric target columns. An id is what the feature file stores
for the image: its path relative to the image folder (``cat/001.png``), or for a torchvision dataset its index
prefixed by its split (``train/123``, ``val/45``; both splits count from 0). Every problem is one line naming the
first few offenders: ids that match no image, images without a row (or, with ``--skip-missing-targets``, left out
of the file and counted), duplicate ids, and values that are empty, not numbers or not finite.

**Design: the targets are not part of the feature fingerprint.** They do not change the features, so a changed
CSV (a typo fixed) re-attaches the new targets to an up-to-date file without running the backbone again: the file
is copied with the new ``/<split>/targets`` and renamed over the old one (:func:`pipeline.store.rewrite_targets`).
What the targets do change is *which rows* a file holds when ``--skip-missing-targets`` leaves images out: that
narrowing is in the dataset identity (so in the fingerprint), and a CSV that covers other images re-extracts.
"""

from __future__ import annotations

import array as array_module
import csv
import hashlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage1.datasets import Source

log = logging.getLogger(__name__)
SHOWN = 5  # offenders named in an error line


def _shown(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


@dataclass(frozen=True)
class TargetTable:
    """The checked CSV: target ``names``, one float64 row per id, and what the file records of it."""

    names: tuple[str, ...]
    values: Mapping[str, np.ndarray]  # id -> (T,) float64 (a TargetRows when read from a CSV)
    source: str  # the CSV's file name
    sha256: str  # of the CSV's bytes
    by_split: bool = False  # ids are "<split>/<id>" (a source whose splits share ids)

    @property
    def info(self) -> dict[str, Any]:
        """``FeatureMeta.targets``: what the file records of these targets."""
        return {"names": list(self.names), "source": self.source, "sha256": self.sha256}

    def key(self, split: str, image_id: str) -> str:
        return f"{split}/{image_id}" if self.by_split else image_id

    def lookup(self, split: str, ids: list[str]) -> np.ndarray:
        """(N, T) float32 targets of the images ``ids`` of ``split``, in that order."""
        try:
            rows = [self.values[self.key(split, i)] for i in ids]
        except KeyError as e:
            raise PipelineError(f"{self.source}: no target for image {e.args[0]}") from None
        return np.asarray(rows, dtype=np.float32).reshape(len(ids), len(self.names))


class TargetRows(Mapping):
    """id -> (T,) float64 targets, held as one (N, T) array and an index: a million rows take tens of MB, where a
    dict of small arrays (and the CSV's lines and cells held at once) peaked at 2 GB for a 47 MB file."""

    def __init__(self, index: dict[str, int], array: np.ndarray):
        self._index, self._array = index, array

    def __getitem__(self, key: str) -> np.ndarray:
        return self._array[self._index[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def read_targets_csv(path: Path | str) -> TargetTable:
    """Parse and check a targets CSV (header ``id,<name>,...``); one-line :class:`PipelineError` on any problem.
    Read as a stream, row by row: memory grows with the number of ids, not with the file's text."""
    path = Path(path)
    try:
        digest = _sha256(path)
        with open(path, encoding="utf-8-sig", newline="") as fh:  # a spreadsheet's byte-order mark is not an id
            names, index, array = _parse(csv.reader(fh), name=path.name)
    except UnicodeDecodeError:
        raise PipelineError(f"{path.name}: not UTF-8 text (save the CSV as UTF-8)") from None
    except csv.Error as e:  # e.g. a field over the csv module's 131,072-character limit
        raise PipelineError(f"--targets {path}: not a readable CSV ({e})") from None
    except OSError as e:
        raise PipelineError(f"cannot read --targets {path}: {e.strerror or e}") from None
    return TargetTable(names=names, values=TargetRows(index, array), source=path.name, sha256=digest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _parse(reader: Iterator[list[str]], *, name: str) -> tuple[tuple[str, ...], dict[str, int], np.ndarray]:
    """(target names, id -> row, (N, T) float64 values) from the CSV's rows, checked as they stream by."""
    rows = ((line, row) for line, row in enumerate(reader, start=1) if any(cell.strip() for cell in row))
    first = next(rows, None)
    if first is None:
        raise PipelineError(f"{name} is empty: expected a header row id,<target>,... and one row per image")
    header = [cell.strip() for cell in first[1]]
    names = tuple(header[1:])
    if header[0].lower() != "id" or not names or not all(names):
        raise PipelineError(
            f"{name}: the header must be id, then one name per target column (found: {','.join(header)[:80]})"
        )
    if len(set(names)) != len(names):
        raise PipelineError(f"{name}: target column names repeat ({','.join(names)[:80]})")
    index: dict[str, int] = {}
    packed = array_module.array("d")  # the values as they come, 8 bytes each
    duplicates, bad, n_bad = [], [], 0
    for line, row in rows:
        if len(row) != len(header):
            raise PipelineError(f"{name}: line {line} has {len(row)} fields, the header has {len(header)}")
        image_id = row[0].strip()
        if image_id in index:
            duplicates.append(image_id)
            continue
        index[image_id] = len(index)
        for target, cell in zip(names, row[1:]):
            value = _number(cell)
            if value is None:
                n_bad += 1
                if len(bad) <= SHOWN:  # the first few are named
                    bad.append(f"line {line} {target} {cell.strip()!r}")
            packed.append(np.nan if value is None else value)
    if not index:
        raise PipelineError(f"{name} has a header but no rows")
    if duplicates:
        raise PipelineError(f"{name}: {len(duplicates)} ids appear more than once ({_shown(duplicates)})")
    if n_bad:
        raise PipelineError(f"{name}: {n_bad} values are empty, not numbers or not finite ({_shown(bad)})")
    return names, index, np.frombuffer(packed, dtype=np.float64).reshape(len(index), len(names))


def _number(cell: str) -> float | None:
    """A finite number that also fits float32 (what the file stores), else None."""
    try:
        value = float(cell.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and abs(value) < np.finfo(np.float32).max else None


def match_targets(table: TargetTable, source: Source, *, skip_missing: bool) -> tuple[TargetTable, Source, dict]:
    """Check ``table`` against the images of ``source``: ``(table keyed as the source needs, source, skipped)``.

    Ids that match no image are refused (unless the source is a ``--limit`` sample: then the rest of the dataset
    is expected in the CSV and ignored). Images without a row are refused, or with ``skip_missing`` left out of the
    source (``skipped``: how many per split), which narrows its identity and so the fingerprint.
    """
    per_split = [set(split.ids) for split in source.splits.values()]
    shared = set.intersection(*per_split) if len(per_split) > 1 else set()
    table = replace(table, by_split=bool(shared))
    known = {table.key(name, i) for name, split in source.splits.items() for i in split.ids}
    unknown = [k for k in table.values if k not in known]
    if unknown and "limit" not in source.identity:
        example = next(iter(sorted(known)), "")
        how = "the split, then the dataset index" if table.by_split else "the path relative to the image folder"
        raise PipelineError(
            f"{table.source}: {len(unknown)} ids match no image ({_shown(unknown)}); an id is {how}, e.g. {example}"
        )
    if unknown:
        log.info("%s: %d ids are outside the --limit sample (ignored)", table.source, len(unknown))
    missing = {
        name: [i for i in split.ids if table.key(name, i) not in table.values] for name, split in source.splits.items()
    }
    n_missing = sum(len(m) for m in missing.values())
    if not n_missing:
        return table, source, {}
    if not skip_missing:
        first = [table.key(s, i) for s, ids in missing.items() for i in ids]
        raise PipelineError(
            f"{n_missing} images have no target in {table.source} ({_shown(first)}); add their rows or pass "
            "--skip-missing-targets to leave them out"
        )
    return table, _narrowed(table, source, missing), {s: len(m) for s, m in missing.items() if m}


def _narrowed(table: TargetTable, source: Source, missing: dict[str, list[str]]) -> Source:
    splits = {}
    for name, split in source.splits.items():
        gone = set(missing[name])
        keep = np.array([k for k, i in enumerate(split.ids) if i not in gone], dtype=np.int64)
        if not len(keep):
            raise PipelineError(f"no {name} image has a target in {table.source}: nothing to extract for {name}")
        splits[name] = split.subset(keep)
    kept = sorted(table.key(s, i) for s, split in splits.items() for i in split.ids)
    # Which images the file holds is part of what its features are of: in the identity, so in the fingerprint.
    digest = hashlib.sha256("\n".join(kept).encode("utf-8", "surrogateescape")).hexdigest()
    identity = {**source.identity, "only_with_targets": {"images": len(kept), "ids_sha256": digest}}
    return replace(source, splits=splits, identity=identity)


def skipped_line(skipped: dict[str, int], source: str) -> str:
    """The summary's count of images ``--skip-missing-targets`` left out."""
    shown = ", ".join(f"{s} {n}" for s, n in skipped.items())
    return f"left out {sum(skipped.values())} images without a target in {source} ({shown}; --skip-missing-targets)"
