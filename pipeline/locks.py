"""A process's exclusive lock on an output (``<path>.lock``), and the fork hook that keeps a forked child from
holding it.

Used by the feature file's writer (:mod:`pipeline.store`) and by stage two's head folders: one lock, each user
naming only the line a second writer is refused with (``BUSY``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from pathlib import Path

from pipeline.errors import PipelineError

# Descriptors through which this process holds a lock: a ``.lock`` file, and a feature file's open ``.tmp`` (HDF5
# locks it too). A forked child (a DataLoader worker) inherits them and with them the locks, so after a ``kill -9``
# of the parent its orphaned workers would keep the output locked for seconds more. The child points its copies at
# /dev/null: same numbers (nothing in it can reuse them by accident), no reference to the locked file left.
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


def hold_in_parent_only(fd: int) -> None:
    """Let a forked child not inherit what ``fd`` holds: its copy is pointed at /dev/null when it forks."""
    _install_fork_hook()
    st = os.fstat(fd)
    _LOCK_FDS[fd] = (st.st_dev, st.st_ino)


def forget(fd: int) -> None:
    """``fd`` is about to be closed: no longer redirected in children forked from now on."""
    _LOCK_FDS.pop(fd, None)


class FileLock:
    """An exclusive, non-blocking lock on ``<path>.lock``; the OS drops it when the process dies.

    The holder deletes the lock file when it releases it (no ``.lock`` is left beside finished output). The
    delete happens while the lock is still held, and ``acquire`` checks, after locking, that the file it locked
    is still the one at that path (a process that opened it just before the holder deleted it would otherwise lock
    a deleted file and believe it holds the lock); if not, it tries again on the new file.

    ``BUSY``: the one line a second writer is refused with (``{target}``: the path locked); a user of the lock
    names its own in a subclass.
    """

    BUSY = "another process is writing {target}; wait for it or choose another --out"

    def __init__(self, path: Path):
        path = Path(path)
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
        hold_in_parent_only(fd)

    def release(self) -> None:
        if self._fd is not None:
            forget(self._fd)
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
