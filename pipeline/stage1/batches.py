"""Batch sources for stage one: how the samples of one split become uint8 image batches for the backbone.

Each source is one class in :data:`BATCH_SOURCES`; the plan (``extract.plan_extraction``) picks one per split, once,
and its name goes into the fingerprint (the sources agree to rounding, not bit for bit). A new way of making batches
(GPU JPEG decoding, say) is one new class and one registry entry: the extraction loop only sees :class:`Batch`.

    loader  PIL decodes, resizes and crops in DataLoader worker processes; uint8 CHW tensors on the host.
    device  the split is an in-memory uint8 array (CIFAR, MNIST, ...): slices go through a small ring of pinned
            host buffers to the device as they are, on a side CUDA stream, and are resized and cropped there
            (``geometry_on_device``).
    gpu-decode  the split is a folder of image files: threads only read the file bytes; JPEGs are decoded in
            batches by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA) and resized, cropped there.
            Anything the decoder rejects (PNG, CMYK, corrupt files) goes through PIL for that file, as ``loader``.

On CUDA, ``auto`` takes ``device`` for arrays and ``gpu-decode`` for folders; on the CPU it takes ``loader``.

With ``SourceSettings.marks`` (extract sets it) every batch also carries each sample's content digest and perceptual
hash (:class:`Marks`: the feature file's ``digests`` and ``phash`` columns, for the audit), computed where the pixels
already are, once: ``loader`` in its workers, from the bytes each reads once and the image it decodes from them;
``device`` on the host from the array rows, before they go to the device; ``gpu-decode`` in its reading threads,
from the bytes read and a reduced-scale greyscale decode of each JPEG (``draft``: libjpeg's DCT scaling, a fraction
of a full decode), so the decode on the device stays the only full one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import signal
import sys
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import PipelineError
from pipeline.imagehash import hashes_of, perceptual_hash, perceptual_hash_of_bytes, thumbnail
from pipeline.stage1.backbones import Preprocessing
from pipeline.stage1.config import PREPROCESS_MODES
from pipeline.stage1.datasets import Split, check_pixels, decode_image, read_image_file, read_regular_file

log = logging.getLogger(__name__)

# ``--preprocess`` values: ``auto`` or a source name. ``auto`` takes the first source in AUTO_ORDER that can run
# the split on the device (see ``BatchSource.auto_for``).


@dataclass
class Batch:
    """Some consecutive samples of a split: the readable ones as one uint8 tensor, the unreadable ones by reason."""

    # uint8 NCHW (NHW for greyscale arrays), or float NCHW in [0, 255] already resized and cropped (gpu-decode);
    # None when every sample was unreadable
    images: torch.Tensor | None
    indices: list[int]  # split positions of the rows of ``images``, in order
    bad: list[tuple[int, str]] = field(default_factory=list)  # (split position, why it could not be read)
    marks: Marks | None = None  # with ``SourceSettings.marks``: the digest and hash of each row of ``images``

    @property
    def consumed(self) -> int:
        return len(self.indices) + len(self.bad)


@dataclass
class Marks:
    """What the audit needs of each sample, beside its features: the hex sha256 of the bytes it was decoded from (a
    file's or shard member's bytes; an array split's pixel bytes) and the perceptual hash of its decoded pixels
    (before any resize or crop). Named as the feature file's columns (:data:`pipeline.store.AUDIT_COLUMNS`)."""

    digests: list[str] = field(default_factory=list)
    phash: list[int] = field(default_factory=list)


def load_sample(split: Split, i: int) -> tuple[Any, Any]:
    """Sample ``i`` decoded as ``split.load`` decodes it, with the bytes it came from, read once (the digest's
    input): an image file's or shard member's bytes; for an array split, its pixel bytes (the array row)."""
    if split.arrays is not None:
        return split.load(i), np.ascontiguousarray(split.arrays[i])  # hashlib reads an array's buffer
    if split.path is None and split.read_bytes is None:  # a source of decoded images only: their pixel bytes
        img = split.load(i)
        return img, np.ascontiguousarray(np.asarray(img))
    if split.path is not None:
        return read_image_file(split.path(i))  # what load_image reads: the same checks, the same pixels
    data = split.read_bytes(i)
    return decode_image(io.BytesIO(data)), data


def array_marks(rows: np.ndarray) -> Marks:
    """The marks of uint8 array rows (NHW or NHWC): digests of each row's bytes, hashes in one batched DCT."""
    rows = np.ascontiguousarray(rows)
    thumbs = np.stack([thumbnail(Image.fromarray(r)) for r in rows]) if len(rows) else np.zeros((0, 32, 32))
    return Marks([hashlib.sha256(r).hexdigest() for r in rows], [int(h) for h in hashes_of(thumbs)])


@dataclass(frozen=True)
class SourceSettings:
    """What every source needs besides the split; decided in the plan."""

    pre: Preprocessing
    device: torch.device
    batch_size: int
    workers: int  # loader processes (loader) or file-reading threads (gpu-decode)
    pin_memory: bool = False  # page-locked host buffers: asynchronous copies to the device
    prefetch: int = 2  # batches each source prepares ahead of the one being embedded
    marks: bool = False  # also give each sample's content digest and perceptual hash (Batch.marks): extract does

    def recorded(self) -> dict[str, Any]:
        """The resolved values, as the feature file's config records them."""
        return {
            "batch_size": self.batch_size,
            "workers": self.workers,
            "pin_memory": self.pin_memory,
            "prefetch": self.prefetch,
        }


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


_Item = tuple[torch.Tensor | None, int, str | None, tuple[str, int] | None]  # crop, position, error, (digest, hash)


class _Images(Dataset):
    """Samples ``start..`` of a split as uint8 CHW tensors; an unreadable image yields its error instead. With
    ``marks``, each also gives its content digest and perceptual hash, from the bytes and the image decoded here."""

    def __init__(self, split: Split, pre: Preprocessing, start: int, *, marks: bool = False):
        self.split, self.pre, self.start, self.marks = split, pre, start, marks

    def __len__(self) -> int:
        return len(self.split) - self.start

    def __getitem__(self, i: int) -> _Item:
        idx = self.start + i
        try:
            if not self.marks:
                return self.pre.geometry(self.split.load(idx)), idx, None, None
            img, data = load_sample(self.split, idx)
            mark = (hashlib.sha256(data).hexdigest(), perceptual_hash(img))
            return self.pre.geometry(img), idx, None, mark
        except Exception as e:  # noqa: BLE001 - reported per file by the main process
            return None, idx, error_line(e), None


def error_line(e: BaseException) -> str:
    """``Type: first line of the message``: how an unreadable sample is reported."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def _collate(items: list[_Item]) -> Batch:
    ok = [item for item in items if item[2] is None]
    marks = [m for *_, m in ok]
    return Batch(
        images=torch.stack([t for t, *_ in ok]) if ok else None,
        indices=[i for _, i, *_ in ok],
        bad=[(i, err) for _, i, err, _ in items if err is not None],
        marks=Marks([d for d, _ in marks], [h for _, h in marks]) if ok and marks[0] is not None else None,
    )


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    # On CPU the model needs the cores itself; decoding in 2 workers keeps it fed without oversubscribing. On a GPU
    # the cores only feed it: all but one (the main process launches kernels and the writer thread appends), at most
    # 16 (measured on 16 cores, the hand-written PIL loop went from 3,300 to 4,100 images/s between 8 and 16).
    return min(2, cpus) if device.type == "cpu" else max(1, min(cpus - 1, 16))


def default_batch_size(device: torch.device, *, crop_size: int) -> int:
    """64 on the CPU (larger batches buy nothing there); on a GPU 512 at 224 px, scaled by the pixel count and the
    device memory. A power of two: the batch size changes features only at rounding level (kernel choice)."""
    if device.type != "cuda":
        return 64
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    base = 512 if gib >= 32 else 256 if gib >= 12 else 128  # ResNet50 at 224 px needs ~20 MiB per image in bf16
    pixels = base * (224 / crop_size) ** 2
    return int(min(2048, max(32, 2 ** math.floor(math.log2(pixels)))))


def default_prefetch(device: torch.device) -> int:
    return 4 if device.type == "cuda" else 2


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
    # A batch that cannot be put in shared memory (/dev/shm full, `ulimit -f`) fails in the queue's feeder thread,
    # which only printed a traceback and dropped the batch: the main process then waited for it forever. The worker
    # exits instead, with a code the main process recognises (see ``LoaderSource``).
    import multiprocessing.queues

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_feeder_failed)


# The exit code of a loader worker that could not hand a batch over (its shared memory could not be allocated).
EXIT_NO_SHARED_MEMORY = 86


def _feeder_failed(e: BaseException, obj: object) -> None:
    os._exit(EXIT_NO_SHARED_MEMORY)


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
        batch_bytes = s.batch_size * 3 * s.pre.crop_size**2  # one uint8 CHW batch, as a worker hands it over
        prefetch = s.prefetch if s.batch_size < 256 else 2  # at 512 x 224 px a batch is 77 MB
        workers, prefetch = fit_shared_memory(workers=s.workers, prefetch=prefetch, batch_bytes=batch_bytes)
        loader = DataLoader(
            _Images(self.split, s.pre, start, marks=s.marks),
            batch_size=s.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=s.pin_memory,
            prefetch_factor=prefetch if workers else None,  # each worker's batches wait in shared memory
            persistent_workers=False,
            worker_init_fn=_quiet_worker if workers else None,
        )
        it = _start_workers(loader)
        finished = False
        with _workers_reported_here():
            try:
                yield from it
                finished = True
            except (RuntimeError, OSError, EOFError) as e:  # a dead worker's batch fails as any of these
                why = _worker_failure(it, e, batch_bytes=batch_bytes)
                if why is None:
                    raise
                raise PipelineError(why) from None
            finally:
                # Every exit (end, error, interrupt) stops the workers now, not at interpreter exit. A worker blocked
                # in a system call (a path that became a FIFO after the scan) ignores the polite stop and SIGTERM
                # alike, and multiprocessing would wait for it at exit: on an early exit the workers are killed.
                workers_now = list(getattr(it, "_workers", []))
                if not finished:
                    for w in workers_now:
                        with contextlib.suppress(OSError, ValueError):
                            if w.is_alive():
                                os.kill(w.pid, signal.SIGKILL)
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()


SHM = "/dev/shm"  # where torch puts the batches workers hand over (shm_open)


def shared_memory_free() -> int | None:
    """Bytes free in /dev/shm, or None where there is none (not Linux) or it cannot be read."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _file_size_limit() -> int | None:
    """The process's file-size limit (``ulimit -f``) in bytes: one batch is one shared-memory file, bound by it."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


_said: set[str] = set()


def _say_once(line: str) -> None:
    """A warning given once per process, not once per split."""
    if line not in _said:
        _said.add(line)
        log.warning("%s", line)


def fit_shared_memory(*, workers: int, prefetch: int, batch_bytes: int) -> tuple[int, int]:
    """(workers, prefetch) that fit /dev/shm: each worker keeps ``prefetch`` batches there, and the main process
    holds about two more. Fewer prefetched batches when that is enough, else decoding in the main process (no
    shared memory at all), each said in one line. Docker's default /dev/shm (64 MB) is below one default GPU batch."""
    if not workers:
        return workers, prefetch
    free, limit = shared_memory_free(), _file_size_limit()
    if limit is not None and batch_bytes > limit:
        _say_once(
            f"a batch ({_mb(batch_bytes)}) is over this process's file-size limit (ulimit -f, {_mb(limit)}), which "
            "bounds its shared memory: decoding in the main process (--workers 0); a smaller --batch-size keeps workers"
        )
        return 0, prefetch
    if free is None or free >= (workers * prefetch + 2) * batch_bytes:
        return workers, prefetch
    fits, need = (free // batch_bytes - 2) // workers, (workers * prefetch + 2) * batch_bytes
    if fits >= 1:
        _say_once(
            f"{SHM} has {_mb(free)} free, under the {_mb(need)} that {workers} loader workers"
            f" prefetching {prefetch} batches of {_mb(batch_bytes)} need: each prefetches {fits} "
            "(docker run --shm-size gives more room)"
        )
        return workers, int(fits)
    _say_once(
        f"{SHM} has {_mb(free)} free, too little for loader workers to hand over batches of {_mb(batch_bytes)}: "
        "decoding in the main process (--workers 0); a smaller --batch-size or docker run --shm-size keeps workers"
    )
    return 0, prefetch


def _worker_failure(it: Any, e: BaseException, *, batch_bytes: int) -> str | None:
    """The one line for a loader worker that died or could not allocate shared memory, or None for another error.
    A worker killed while the main process fetched a batch from it fails that fetch (connection reset, EOF)."""
    workers = list(getattr(it, "_workers", []))
    if not isinstance(e, RuntimeError):
        for w in workers:
            w.join(timeout=0.5)  # the reset came from a worker dying: let it be reaped, for its exit code
    codes = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
    text = str(e) if isinstance(e, RuntimeError) else ""
    if EXIT_NO_SHARED_MEMORY in codes or "shared memory" in text:
        what = "a loader worker ran out of shared memory"
    elif codes or "exited unexpectedly" in text or "killed by signal" in text:
        died = next((c for c in codes), None)
        how = f"was killed by signal {-died}" if died is not None and died < 0 else "died"
        what = f"a loader worker {how} (out of memory or shared memory?)"
    else:
        return None
    free = shared_memory_free()
    room = f"{SHM} has {_mb(free)} free, " if free is not None else ""
    return (
        f"{what}: {room}a batch takes {_mb(batch_bytes)}; rerun with --workers 0 or a smaller --batch-size (extract "
        "resumes from its last commit), or give shared memory more room (docker run --shm-size=2g)"
    )


@contextlib.contextmanager
def _workers_reported_here() -> Iterator[None]:
    """While batches are read, a worker that dies is reported by the loop reading them (within the loader's 5 s
    status check), not by torch's SIGCHLD handler, which raised its error wherever the main process happened to
    be (mid-commit, say) and bypassed the one-line report."""
    try:
        before = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except (ValueError, AttributeError):  # not the main thread, or no SIGCHLD (Windows)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, before)


# ------------------------------------------------------------------------------------------ in-memory arrays


class HostToDevice:
    """Copies host arrays to the device through a ring of pinned buffers, on a side CUDA stream.

    Pinning is done once per buffer, not per batch (``Tensor.pin_memory()`` on every slice allocates page-locked
    memory each time). A buffer is refilled only after the copy that last read it has finished (its event), and the
    compute stream waits for each copy on the device, never the CPU: no synchronisation per batch. On the CPU it
    hands out the array itself (no copy).
    """

    def __init__(self, device: torch.device, *, slots: int = 3):
        self.device, self.slots = device, slots
        self._cuda = device.type == "cuda"
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._events: list[Any] = [None] * slots
        self._next = 0
        self.stream = torch.cuda.Stream(device) if self._cuda else None

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        if not self._cuda:
            return torch.from_numpy(np.ascontiguousarray(array))
        k, self._next = self._next, (self._next + 1) % self.slots
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy from `slots` batches ago: long done when the GPU keeps up
        buf = self._bufs[k]
        if buf is None or buf.shape[1:] != array.shape[1:] or buf.shape[0] < len(array):
            buf = self._bufs[k] = torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype).pin_memory()
        host = buf[: len(array)]
        host.numpy()[...] = array  # one memcpy into page-locked memory
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            self._events[k] = torch.cuda.Event()
            self._events[k].record(self.stream)
        compute.wait_event(self._events[k])  # the device waits for the copy, the CPU does not
        x.record_stream(compute)  # x's memory belongs to the copy stream; keep it until compute is done with it
        return x


class ArraySource(BatchSource):
    """uint8 slices of an in-memory split, copied to the device as they are (4x fewer bytes than floats).

    No workers and no PIL: slices go through pinned staging buffers (:class:`HostToDevice`) and resizing happens on
    the device."""

    name = "device"
    geometry_on_device = True

    @classmethod
    def supports(cls, split: Split) -> str | None:
        if split.arrays is None:
            return (
                "--preprocess device needs a dataset held in memory as arrays (cifar10, mnist, ...); "
                "this one is decoded from files: use --preprocess loader, gpu-decode or auto"
            )
        return None

    @classmethod
    def auto_for(cls, split: Split, device: torch.device) -> bool:
        return device.type == "cuda" and split.arrays is not None

    def batches(self, start: int) -> Iterator[Batch]:
        s, arrays, n = self.settings, self.split.arrays, len(self.split)
        to_device = HostToDevice(s.device, slots=max(2, s.prefetch))
        bounds = [(lo, min(lo + s.batch_size, n)) for lo in range(start, n, s.batch_size)]
        # The marks are hashed on host threads, ``prefetch`` batches ahead (PIL and numpy release the GIL): about
        # 35 us an image at 32 px on one core, which would otherwise hold up the main thread feeding the device.
        pool = ThreadPoolExecutor(max(1, s.workers), thread_name_prefix="marks") if s.marks else None
        ahead: deque[Future[Marks]] = deque()
        try:
            for k, (lo, hi) in enumerate(bounds):
                while pool is not None and len(ahead) < max(1, s.prefetch) and k + len(ahead) < len(bounds):
                    a, b = bounds[k + len(ahead)]
                    ahead.append(pool.submit(array_marks, arrays[a:b]))
                marks = ahead.popleft().result() if pool is not None else None
                x = to_device(arrays[lo:hi])
                yield Batch(x.permute(0, 3, 1, 2) if x.ndim == 4 else x, list(range(lo, hi)), marks=marks)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ JPEGs decoded on the device

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class _Read:
    """One batch as the reading threads leave it: JPEG bytes for the decoder, PIL crops of the other files."""

    lo: int
    hi: int
    jpegs: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (split position, uint8 file bytes)
    ready: dict[int, torch.Tensor] = field(default_factory=dict)  # split position -> uint8 CHW crop (PIL path)
    bad: dict[int, str] = field(default_factory=dict)
    marks: dict[int, tuple[str, int]] = field(default_factory=dict)  # split position -> (digest, hash)


class GpuDecodeSource(BatchSource):
    """A folder of image files, JPEGs decoded in batches on the device.

    The CPU threads only read bytes (and run PIL for the files that are not JPEGs). ``decode_jpeg`` takes the whole
    batch at once (nvJPEG's batched decoder on CUDA; libjpeg-turbo per image on the CPU, which keeps this path
    testable without a GPU). A batch the decoder refuses is retried file by file; a file it refuses is read by PIL
    (``split.load`` + ``Preprocessing.geometry``), so a CMYK or odd JPEG still gets features and a corrupt one gets
    the same one-line error as with ``loader``. Decoded images differ in size: each group of one size is resized and
    cropped by ``Preprocessing.geometry_batch``, then the batch is put back in split order (float, [0, 255]).
    """

    name = "gpu-decode"

    @classmethod
    def supports(cls, split: Split) -> str | None:
        if split.path is None and split.read_bytes is None:
            return (
                "--preprocess gpu-decode needs a folder of image files; this dataset is held in memory as arrays: "
                "use --preprocess device, loader or auto"
            )
        return None

    @classmethod
    def auto_for(cls, split: Split, device: torch.device) -> bool:
        return device.type == "cuda" and (split.path or split.read_bytes) is not None and split.arrays is None

    def batches(self, start: int) -> Iterator[Batch]:
        s, n = self.settings, len(self.split)
        los = iter(range(start, n, s.batch_size))
        pool = ThreadPoolExecutor(max(1, s.workers), thread_name_prefix="read-bytes")
        pending: deque[Future[_Read]] = deque()

        def submit() -> None:
            lo = next(los, None)
            if lo is not None:
                pending.append(pool.submit(self._read, lo, min(lo + s.batch_size, n)))

        try:
            for _ in range(max(1, s.prefetch)):
                submit()
            while pending:
                raw = pending.popleft().result()
                submit()
                yield self._decode(raw)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # every exit path: no thread outlives the split

    # -- on the reading threads
    def _read(self, lo: int, hi: int) -> _Read:
        raw = _Read(lo, hi)
        for i in range(lo, hi):
            try:
                data = sample_bytes(self.split, i)
            except OSError as e:
                raw.bad[i] = error_line(e)
                continue
            # A JPEG without its end marker is truncated: PIL reports it (nvJPEG may decode it with a grey tail).
            if data.startswith(JPEG_MAGIC) and data.rstrip(b"\0").endswith(b"\xff\xd9"):
                try:
                    check_pixels(*_jpeg_size(data))  # the pixel limit PIL's path applies, before decoding
                except Exception as e:  # noqa: BLE001 - reported per file by the main process
                    raw.bad[i] = error_line(e)
                    continue
                if self.settings.marks:
                    try:  # a reduced-scale greyscale decode: a fraction of the full one the device does
                        raw.marks[i] = (hashlib.sha256(data).hexdigest(), perceptual_hash_of_bytes(data))
                    except Exception:  # noqa: BLE001 - PIL cannot read it: its path decides (features or the error)
                        self._pil(raw, i)
                        continue
                raw.jpegs.append((i, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
            else:
                self._pil(raw, i)
        return raw

    def _pil(self, raw: _Read, i: int) -> None:
        try:
            if not self.settings.marks:
                raw.ready[i] = self.settings.pre.geometry(self.split.load(i))
                return
            img, data = load_sample(self.split, i)
            raw.marks[i] = (hashlib.sha256(data).hexdigest(), perceptual_hash(img))
            raw.ready[i] = self.settings.pre.geometry(img)
        except Exception as e:  # noqa: BLE001 - reported per file by the main process
            raw.bad[i] = error_line(e)

    # -- on the main thread
    def _decode(self, raw: _Read) -> Batch:
        device, pre = self.settings.device, self.settings.pre
        decoded = dict(zip((i for i, _ in raw.jpegs), decode_jpegs([d for _, d in raw.jpegs], device=device)))
        for i, img in decoded.items():
            if img is None:  # the decoder refused it: PIL decides (features, or the one-line error)
                self._pil(raw, i)
        images = {i: img for i, img in decoded.items() if img is not None}
        out: dict[int, torch.Tensor] = {}
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, img in images.items():
            by_size.setdefault(tuple(img.shape), []).append(i)
        for idx in by_size.values():
            for i, crop in zip(idx, pre.geometry_batch(torch.stack([images[i] for i in idx]))):
                out[i] = crop
        for i, crop in raw.ready.items():
            out[i] = crop.to(device, non_blocking=True).float()
        order = sorted(out)
        marks = [raw.marks[i] for i in order] if self.settings.marks else []
        return Batch(
            images=torch.stack([out[i] for i in order]) if order else None,
            indices=order,
            bad=sorted(raw.bad.items()),
            marks=Marks([d for d, _ in marks], [h for _, h in marks]) if self.settings.marks else None,
        )


def sample_bytes(split: Split, i: int) -> bytes:
    """The encoded image of sample ``i``: its file's bytes (a regular file only), or its WebDataset member's
    (``split.read_bytes``)."""
    return split.read_bytes(i) if split.read_bytes is not None else read_regular_file(split.path(i))


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's header, nothing decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode_jpegs(data: list[torch.Tensor], *, device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 CHW images on ``device``, or None where the decoder refused the file.

    One batched call; if it fails (one bad file fails them all), each file is tried alone to find the culprits."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


# ------------------------------------------------------------------------------------------ choosing

BATCH_SOURCES: dict[str, type[BatchSource]] = {
    "loader": LoaderSource,
    "device": ArraySource,
    "gpu-decode": GpuDecodeSource,
}
AUTO_ORDER = ("device", "gpu-decode")  # sources ``auto`` tries in turn before falling back to ``loader``


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
