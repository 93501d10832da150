"""Blocks of committed rows: what a split of a file holds (its progress counters) and its rows read block by block,
every per-row column with them. Shared by the resume (committed rows into a fresh ``.tmp``) and the torchrun merge
(shards into ``<out>``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.store.read import meta_of, open_for_read
from pipeline.store.record import decode_attr


@dataclass(frozen=True)
class Progress:
    """What a file holds of one split: rows written, source samples consumed, ids of the unreadable ones."""

    rows: int = 0
    seen: int = 0
    skipped: tuple[str, ...] = ()


class FeatureReadError(PipelineError):
    """Rows that a file says it holds could not be read back (damaged after it was written)."""


Rows = tuple[np.ndarray, np.ndarray, list[str], dict[str, np.ndarray]]  # features, labels, ids, extra columns


def row_blocks(g: h5py.Group, *, start: int, stop: int, step: int, columns: tuple[str, ...] = ()) -> Iterator[Rows]:
    """The one block iterator: ``(features, labels, ids, {column: rows})`` of rows ``[start, stop)`` of a split
    group, ``step`` rows at a time, with the extra per-row ``columns`` (e.g. ``activations``, ``digests``)."""
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


def progress_of(g: h5py.Group) -> Progress:
    """The committed progress of a split group; ValueError when its columns are shorter than it says."""
    rows, seen = int(g.attrs["n_rows"]), int(g.attrs["n_seen"])
    if any(g[key].shape[0] < rows for key in ("features", "labels", "ids", *columns_in(g))):
        raise ValueError(f"/{g.name} is shorter than its committed {rows} rows")
    return Progress(rows, seen, tuple(json.loads(decode_attr(g.attrs.get("skipped", "[]")))))


def columns_in(g: h5py.Group) -> list[str]:
    """The extra per-row columns a split group holds (datasets beside features, labels and ids)."""
    return [k for k, v in g.items() if isinstance(v, h5py.Dataset) and k not in ("features", "labels", "ids")]


class StoredFile:
    """A complete feature file opened once for copying its rows elsewhere (the shards of a torchrun merge)."""

    def __init__(self, path: Path, *, fingerprint: str):
        self.path = Path(path)
        self.f = open_for_read(self.path)
        try:
            self.meta = meta_of(self.f, self.path)
        except PipelineError:
            self.f.close()
            raise
        if self.meta.fingerprint != fingerprint or not self.meta.complete:
            self.f.close()
            raise PipelineError(f"{self.path} is incomplete or from other settings; rerun the same command")

    def progress(self, split: str) -> Progress:
        try:
            return progress_of(self.f[split])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise FeatureReadError(f"cannot read /{split} of {self.path} ({type(e).__name__}: {e})") from None

    def blocks(self, split: str, *, start: int = 0, step: int, columns: tuple[str, ...] = ()) -> Iterator[Rows]:
        return row_blocks(self.f[split], start=start, stop=self.progress(split).rows, step=step, columns=columns)

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> StoredFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
