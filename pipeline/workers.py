"""Independent jobs (a comparison's heads) run two at a time in forked child processes, on a CPU.

Why processes: most of a head's time is one core's (its small steps run on one thread, see
:func:`pipeline.stage2.heads.fitting.fitting_threads`), so on a 2-core CPU two heads at once take about the time of
the longer, where one after the other took the sum. A fork shares the features already read, copy-on-write.

What keeps it safe:
- A child runs torch (and any BLAS) with one thread: GNU OpenMP deadlocks in a forked child whose parent has used
  its threads (measured: a 2-thread matmul in such a child never returned). Its big matmuls still use the cores
  through :func:`pipeline.stage2.heads.fitting.in_pieces` (Python threads, made anew in each process).
- A child dies with its parent (``PR_SET_PDEATHSIG``, SIGKILL): after a ``kill -9`` of the parent none keeps writing
  into a folder whose lock died with the parent. What it had written is in its unit's temporary folder, which the
  next write removes.
- Ctrl-C or SIGTERM of the parent: its children are stopped (SIGTERM: each raises KeyboardInterrupt, so its unit's
  temporary folder is removed) and waited for before the parent goes on stopping.
- The parent keeps its output locks (:mod:`pipeline.locks` points a child's copies at /dev/null).
- An exception in a child comes back to the parent and is raised there: a PipelineError as its one line, anything
  else as a PipelineError carrying the child's traceback.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PipelineError, on_stop_signal

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_WAIT_S = 10.0  # how long stopped children get to remove their temporary folders before SIGKILL


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# How many jobs run now, in a page shared with the forked children (anonymous mmap, MAP_SHARED): the parent writes it
# as jobs start and end, a child reads it (:func:`share_of_cores`). None outside :func:`run_jobs`.
_RUNNING: Any = None


def share_of_cores() -> int:
    """The cores this process's work may use: all of them, or in a child of :func:`run_jobs` its share while other
    jobs run beside it. A job whose big matmuls split by this (``fitting.in_pieces``) takes both cores once the
    other job has ended, and one while both run: two threads beside another worker's made 3 runnable threads on 2
    cores, so the heads on one thread (mlp, linear) got two thirds of a core and ended last."""
    return max(1, cores() // max(1, _running()))


def idle_core() -> bool:
    """Whether a core is left idle while this process works: more than one core, and this process the only job
    running (in a child of :func:`run_jobs` whose other jobs have ended, or outside one)."""
    return cores() >= 2 and _running() <= 1


def _running() -> int:
    """How many jobs of :func:`run_jobs` run now (0 outside it)."""
    return _RUNNING[0] if _RUNNING is not None else 0


def _forks() -> bool:
    """Whether this system forks children the way :func:`run_jobs` and :func:`alongside` do (Linux)."""
    return hasattr(os, "fork") and sys.platform == "linux"


def _set_running(count: int) -> None:
    if _RUNNING is not None:
        _RUNNING[0] = min(count, 255)


# A head's working memory, in copies of the features it trains on, with room to spare: logreg's standardised copy
# (one, transposed, from 1,024-d), k-NN's normalised copy, its projection and its similarity blocks. Two heads at
# once need twice that beside the shared features.
HEAD_MEMORY = 3


def worker_count(jobs: int, *, device: Any, data_bytes: int = 0) -> int:
    """How many jobs run at once: two on a CPU of two or more cores where fork is available, a forked child can
    train (:func:`fork_can_train`) and the memory available holds two heads' working memory beside ``data_bytes``
    of features; else one (a GPU: a CUDA context does not survive a fork, and its heads take seconds anyway)."""
    if getattr(device, "type", str(device)) != "cpu" or not _forks():
        return 1
    ways = max(1, min(2, jobs, cores()))
    if ways < 2:
        return ways
    free = available_memory()
    if free is not None and (1 + 2 * HEAD_MEMORY) * data_bytes > free:
        log.info("heads train one after another: two at once would need more memory than the %.1f GB available",
                 free / 1e9)  # fmt: skip
        return 1
    return 2 if fork_can_train() else 1


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_jobs(
    jobs: Sequence[Callable[[], T]],
    *,
    ways: int,
    order: Sequence[int] | None = None,
    warm: Callable[[], object] | None = None,
) -> list[T]:
    """Each job's result, in the order of ``jobs``. With ``ways`` > 1, up to ``ways`` jobs at a time, each in a
    forked child, started in ``order`` (longest first packs best; default: as given); else one after another here.
    ``warm`` (imports every job will need) runs here once the first child has started, on the core it leaves free,
    so that the children forked after it inherit what it loaded; one after another, it runs first."""
    if ways < 2 or len(jobs) < 2:
        if warm is not None:
            warm()
        return [job() for job in jobs]
    global _RUNNING
    import mmap

    pending = list(order if order is not None else range(len(jobs)))
    results: dict[int, T] = {}
    running: dict[int, tuple[int, int, bytearray]] = {}  # pid -> (job, read end of its pipe, bytes so far)
    _RUNNING = mmap.mmap(-1, mmap.PAGESIZE)  # shared with the children forked below
    # The objects made so far out of the collector's reach (Python's advice for fork without exec): a collection
    # in a child, or here while children run, wrote into every object it visited, copying their shared pages.
    gc.freeze()
    try:
        while pending or running:
            # how many run from now on: set before a fork (the child reads its share) and after a job ends
            _set_running(min(ways, len(running) + len(pending)))
            while pending and len(running) < ways:
                i = pending.pop(0)
                pid, fd = _start(jobs[i])
                running[pid] = (i, fd, bytearray())
                if warm is not None:  # once, beside the first child
                    warm()
                    warm = None
            _read_some(running, results)
    except BaseException:
        _stop(running)
        raise
    finally:
        gc.unfreeze()
        _RUNNING.close()
        _RUNNING = None
    return [results[i] for i in range(len(jobs))]


@contextlib.contextmanager
def alongside(job: Callable[[], object]) -> Iterator[None]:
    """``job()`` in a forked child while the block runs here; waited for when the block ends, and the child's
    exception raised then (the block's own first; the child stopped). For the end of a comparison, where one core
    is idle: its figure drawn beside the ties tested and the tables written. Where a child cannot be forked (one
    core, no ``fork``, this process has used CUDA), ``job()`` runs here after the block."""
    import torch

    if cores() < 2 or not _forks() or torch.cuda.is_initialized():
        yield
        job()
        return
    pid, fd = _start(job)
    running = {pid: (0, fd, bytearray())}
    try:
        yield
        while running:
            _read_some(running, {})
    except BaseException:
        _stop(running)
        raise


def fork_can_train() -> bool:
    """Whether a child forked now can train a head: not once this process has initialised CUDA, nor once it has run
    autograd's backward (PyTorch then refuses autograd in a forked child: "Unable to handle autograd's threading in
    combination with fork-based multiprocessing"; the CLI never does, a Python session that trained something may
    have). A forked child tries a one-element backward (a few milliseconds); where it cannot, the jobs run here."""
    import torch

    if torch.cuda.is_initialized():
        log.info("heads train one after another: this process has used CUDA, which a forked worker cannot")
        return False
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _die_with(parent)
            torch.set_num_threads(1)
            torch.ones(1, requires_grad=True).sum().backward()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    works = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    if not works:
        log.info("heads train one after another: this process has run autograd, which a forked worker then cannot")
    return works


def _start(job: Callable[[], Any]) -> tuple[int, int]:
    parent = os.getpid()
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        _child(job, write, parent)
    os.close(write)
    return pid, read


def _child(job: Callable[[], Any], write: int, parent: int) -> None:
    code = 0
    try:
        _die_with(parent)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, on_stop_signal)  # the parent stops a child with SIGTERM: clean up, exit
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        with threadpool_limits(limits=1):
            payload = pickle.dumps(("ok", job()))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        code = 1
        payload = pickle.dumps(("error", _portable(e)))
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(write, view) :]
    except OSError:
        code = 1
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _die_with(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``); exit now if it already has."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:
        os._exit(1)


def _portable(e: BaseException) -> BaseException:
    """``e`` as it can cross the pipe: a PipelineError or KeyboardInterrupt as it is, anything else a PipelineError
    with the child's traceback (it would be lost with the child)."""
    if isinstance(e, (PipelineError, KeyboardInterrupt)):
        try:
            pickle.loads(pickle.dumps(e))
            return e
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its line
            return PipelineError(str(e)) if isinstance(e, PipelineError) else KeyboardInterrupt()
    detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip()
    return PipelineError(f"a worker process failed: {type(e).__name__}: {e}\n{detail}")


def _read_some(running: dict[int, tuple[int, int, bytearray]], results: dict[int, Any]) -> None:
    """Read what the children have sent; a child whose pipe is closed is reaped and its result kept (or its
    exception raised)."""
    fds = {fd: pid for pid, (_, fd, _) in running.items()}
    ready, _, _ = select.select(list(fds), [], [])
    for fd in ready:
        pid = fds[fd]
        i, _, got = running[pid]
        chunk = os.read(fd, 1 << 20)
        if chunk:
            got += chunk
            continue
        os.close(fd)
        del running[pid]
        _, status = os.waitpid(pid, 0)
        if not got:
            raise PipelineError(f"a worker process died ({_status(status)}) before it answered")
        kind, value = pickle.loads(bytes(got))
        if kind == "error":
            raise value
        results[i] = value


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _stop(running: dict[int, tuple[int, int, bytearray]]) -> None:
    """SIGTERM every running child, wait up to STOP_WAIT_S for them to clean up and exit, then SIGKILL."""
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for pid, (_, fd, _) in running.items():
        with contextlib.suppress(OSError):
            os.close(fd)
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
    running.clear()
