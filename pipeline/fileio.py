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


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def digests(files: dict[str, Path]) -> dict[str, str]:
    """``{role: sha256}`` of the files one unit writes (roles, not names: a unit whose files are renamed together
    stays whole), for the file written last to record."""
    return {role: sha256_file(p) for role, p in files.items()}


def check_digests(files: dict[str, Path], recorded: Any, *, unit: str, remedy: str) -> None:
    """Refuse, in one line, a file of ``files`` (role -> path) whose sha256 is not the one ``recorded`` by the file
    written last: a write killed half-way left files of two units. ``recorded`` None: written before digests were
    kept. A file that is absent is not checked (its reader says it is missing, if it needs it)."""
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise PipelineError(f"{unit}: its list of file digests is damaged; {remedy}")
    for role, path in files.items():
        want = recorded.get(role)
        if want is not None and Path(path).is_file() and sha256_file(path) != want:
            raise PipelineError(
                f"{Path(path).name} is not the file written with {unit} (a write was interrupted?); {remedy}"
            )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_directory(path: Path | str, *, owned_by: str) -> Iterator[Path]:
    """Yield an empty sibling folder to write a whole unit into (a head: its weights, config, metrics, plots); on
    success every file is fsynced and the folder takes ``path``'s place in one step, so a reader (or a kill at any
    moment) sees the old unit or the new one, never a mix. The old unit is then removed.

    ``path`` is replaced only if it is absent, empty, or holds ``owned_by`` (the unit's own record, e.g.
    ``config.json``): a folder of other files is refused, never deleted. Where the filesystem cannot swap two names
    in one step, the old folder is renamed aside first and put back by the next write if a kill came in between.
    """
    import shutil

    path = Path(path)
    tmp, aside = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() and aside.is_dir():
            os.replace(aside, path)  # a kill between the two renames of the fallback: the old unit comes back
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / owned_by).is_file())):
            raise PipelineError(f"{path} exists and is not a folder this command wrote (no {owned_by}): choose another")
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed write
        tmp.mkdir()
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            os.replace(tmp, path)
            tmp = aside
        fsync_path(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # the old unit
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PipelineError(f"cannot write {path}: {_why(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
