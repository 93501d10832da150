"""Batch sources for stage one: how the samples of one split become uint8 image batches for the backbone.

Each source is one class in :data:`BATCH_SOURCES`; the plan (``extract.plan_extraction``) picks one per split, once,
and its name goes into the fingerprint (the sources agree to rounding, not bit for bit). A new way of making batches
(GPU JPEG decoding, say) is one new class and one registry entry: the extraction loop only sees :class:`Batch`.

    loader  PIL decodes, resizes and crops in DataLoader worker processes; uint8 CHW tensors on the host.
    device  the split is an in-memory uint8 array (CIFAR, MNIST, ...): slices are copied to the device as they are
            and resized and cropped there (``geometry_on_device``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.backbones import Preprocessing
from pipeline.datasets import Split
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# ``--preprocess`` values: ``auto`` or a source name. ``auto`` takes the first source in AUTO_ORDER that can run
# the split on the device (see ``BatchSource.auto_for``).
PREPROCESS_MODES = ("auto", "loader", "device")


@dataclass
class Batch:
    """Some consecutive samples of a split: the readable ones as one uint8 tensor, the unreadable ones by reason."""

    images: torch.Tensor | None  # uint8 NCHW (NHW for greyscale arrays); None when every sample was unreadable
    indices: list[int]  # split positions of the rows of ``images``, in order
    bad: list[tuple[int, str]] = field(default_factory=list)  # (split position, why it could not be read)

    @property
    def consumed(self) -> int:
        return len(self.indices) + len(self.bad)


@dataclass(frozen=True)
class SourceSettings:
    """What every source needs besides the split; decided in the plan."""

    pre: Preprocessing
    device: torch.device
    batch_size: int
    workers: int


class BatchSource(ABC):
    """Makes :class:`Batch` es of one split, from sample ``start`` on, in order."""

    name: ClassVar[str]
    geometry_on_device: ClassVar[bool] = False  # True: batches are not yet resized/cropped (the device does it)

    def __init__(self, split: Split, settings: SourceSettings):
        self.split, self.settings = split, settings

    @classmethod
    @abstractmethod
    def supports(cls, split: Split) -> str | None:
        """None if this source can read ``split``, else why not (one line)."""

    @classmethod
    def auto_for(cls, split: Split, device: torch.device) -> bool:
        """Whether ``--preprocess auto`` should pick this source for ``split`` on ``device``."""
        return False

    @abstractmethod
    def batches(self, start: int) -> Iterator[Batch]: ...


# ------------------------------------------------------------------------------------------ PIL in workers


class _Images(Dataset):
    """Samples ``start..`` of a split as uint8 CHW tensors; an unreadable image yields its error instead."""

    def __init__(self, split: Split, pre: Preprocessing, start: int):
        self.split, self.pre, self.start = split, pre, start

    def __len__(self) -> int:
        return len(self.split) - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        idx = self.start + i
        try:
            return self.pre.geometry(self.split.load(idx)), idx, None
        except Exception as e:  # noqa: BLE001 - reported per file by the main process
            return None, idx, error_line(e)


def error_line(e: BaseException) -> str:
    """``Type: first line of the message``: how an unreadable sample is reported."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _collate(items: list[tuple[torch.Tensor | None, int, str | None]]) -> Batch:
    good = [t for t, _, err in items if err is None]
    return Batch(
        images=torch.stack(good) if good else None,
        indices=[i for _, i, err in items if err is None],
        bad=[(i, err) for _, i, err in items if err is not None],
    )


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    # On CPU the model needs the cores itself; decoding in 2 workers keeps it fed without oversubscribing.
    return min(2, cpus) if device.type == "cpu" else min(8, cpus)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _quiet_worker(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which commits and then stops them.

    A terminal's Ctrl-C reaches the whole process group. A worker that died of it could take down the channel a
    batch was travelling through, and the main process then failed on that batch (exit 1, a traceback) instead of
    stopping cleanly (exit 130, "rerun to resume"): seen once in about 25 interrupts under load. Workers still exit
    when the main process goes, by DataLoader's own parent watchdog. The signals were blocked while the worker was
    forked (see ``_start_workers``), so one that arrived in between is discarded here, not raised in the worker.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    default_hook = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        # multiprocessing's fd-sharing thread reports here when the main process hung up in the middle of fetching
        # a batch: it is stopping, and says so itself.
        if not issubclass(exc_type, (EOFError, ConnectionError)):
            default_hook(exc_type, exc, tb)

    sys.excepthook = hook


def _start_workers(batches: Any) -> Iterator:
    """``iter(batches)``, forking loader workers with Ctrl-C and SIGTERM held back; the main process gets any that
    arrived in the meantime as soon as they are forked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(batches)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class LoaderSource(BatchSource):
    name = "loader"

    @classmethod
    def supports(cls, split: Split) -> str | None:
        return None

    def batches(self, start: int) -> Iterator[Batch]:
        s = self.settings
        loader = DataLoader(
            _Images(self.split, s.pre, start),
            batch_size=s.batch_size,
            shuffle=False,
            num_workers=s.workers,
            collate_fn=_collate,
            pin_memory=s.device.type == "cuda",
            prefetch_factor=4 if s.workers else None,
            persistent_workers=False,
            worker_init_fn=_quiet_worker if s.workers else None,
        )
        it = _start_workers(loader)
        try:
            yield from it
        finally:
            # Every exit (end, error, interrupt) stops the workers now, not at interpreter exit.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


# ------------------------------------------------------------------------------------------ in-memory arrays


class ArraySource(BatchSource):
    """uint8 slices of an in-memory split, copied to the device as they are (4x fewer bytes than floats).

    No workers and no PIL: the slice is pinned and copied without blocking, and resizing happens on the device."""

    name = "device"
    geometry_on_device = True

    @classmethod
    def supports(cls, split: Split) -> str | None:
        if split.arrays is None:
            return (
                "--preprocess device needs a dataset held in memory as arrays (cifar10, mnist, ...); "
                "this one is decoded from files: use --preprocess loader or auto"
            )
        return None

    @classmethod
    def auto_for(cls, split: Split, device: torch.device) -> bool:
        return device.type == "cuda" and split.arrays is not None

    def batches(self, start: int) -> Iterator[Batch]:
        arrays, device, step = self.split.arrays, self.settings.device, self.settings.batch_size
        for lo in range(start, len(self.split), step):
            hi = min(lo + step, len(self.split))
            x = torch.from_numpy(np.ascontiguousarray(arrays[lo:hi]))
            if device.type == "cuda":
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
            yield Batch(x.permute(0, 3, 1, 2) if x.ndim == 4 else x, list(range(lo, hi)))


# ------------------------------------------------------------------------------------------ choosing

BATCH_SOURCES: dict[str, type[BatchSource]] = {"loader": LoaderSource, "device": ArraySource}
AUTO_ORDER = ("device",)  # sources ``auto`` tries in turn before falling back to ``loader``


def choose_source(mode: str, split: Split, device: torch.device) -> str:
    """``--preprocess`` value -> the name of the source that will read ``split`` (a one-line error if it cannot)."""
    if mode == "auto":
        return next((n for n in AUTO_ORDER if BATCH_SOURCES[n].auto_for(split, device)), "loader")
    if mode not in BATCH_SOURCES:
        raise PipelineError(f"unknown preprocess mode {mode!r}; choose one of: {', '.join(PREPROCESS_MODES)}")
    why = BATCH_SOURCES[mode].supports(split)
    if why:
        raise PipelineError(why)
    return mode


def open_source(name: str, split: Split, settings: SourceSettings) -> BatchSource:
    return BATCH_SOURCES[name](split, settings)
