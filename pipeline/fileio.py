"""The one way a file a user keeps is written: ``atomic_write``.

Write to a temporary name in the same folder, fsync it, rename it over the final name, fsync the folder. A crash
at any point leaves the old file or the new one, never a torn one; a failed write leaves no temporary behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def tmp_name(path: Path) -> Path:
    """``dir/name.tmp.ext``: the same folder (so the rename is atomic) and the same suffix (``torch.export.save``
    and ``savefig`` choose the format from it). Hidden in no way: a leftover is visible and named after its file."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tmp{path.suffix}")


def fsync_path(path: Path) -> None:
    """fsync a file or folder by name (some filesystems cannot fsync a folder; the rename is atomic anyway)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process's umask (read once: ``os.umask`` can only be read by setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(path: Path) -> None:
    """Give a file the mode a plain ``open()`` would have: ``0o666 & ~umask``. Some writers create their file
    private (safetensors' ``save_file`` makes it 0600), which would leave one output of a run unreadable to others."""
    os.chmod(path, 0o666 & ~_umask())


def _why(e: OSError) -> str:
    return e.strerror or str(e)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it is fsynced and renamed to ``path``.

    The file gets the mode of a plain ``open()`` (``0o666 & ~umask``), whatever mode its writer created it with.
    Any exception removes the temporary and leaves an existing ``path`` untouched; an OSError (read-only folder,
    full disk) becomes a one-line :class:`PipelineError` naming ``path``.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        normal_mode(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise PipelineError(f"cannot write {path}: {_why(e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path | str, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
