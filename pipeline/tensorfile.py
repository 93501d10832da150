"""The one writer of safetensors files: a head's ``head.safetensors`` and an exported model's tensors.

The format (huggingface/safetensors): the header's length (8 bytes, little-endian), a JSON header (each tensor's
dtype, shape and byte range in the data, and ``__metadata__``), then the tensors back to back. The ``safetensors``
library reads it back (``load_file``, ``safe_open``); it lays tensors out by dtype size, then name, as here, so
each starts at a multiple of its element size.

Why not the library's writer: a k-NN head holds train's features (307 MB at 60,000 x 1,280). Written through the
page cache, that file cost 0.9-1.1 s of system time on this project's virtual machines (the kernel takes fresh
memory for the cache, a few microseconds a page), and it was the last thing a comparison waited for. Written
with ``O_DIRECT`` from an aligned buffer it costs 0.02 s of CPU and 0.23 s of waiting on the disk (measured side
by side, 307 MB). For that the header is padded with spaces, which the format allows, so that the data starts on
a :data:`ALIGN` boundary. Small files, and filesystems that refuse ``O_DIRECT`` (tmpfs), are written as usual.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 4096  # offsets, lengths and memory of O_DIRECT writes: a multiple of any disk's logical block size
DIRECT_BYTES = 8 << 20  # from this size a file is written with O_DIRECT (below, the page cache costs little)
BOUNCE_BYTES = 8 << 20  # the aligned buffer the bytes go through on their way to the disk

_NUMPY_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
    "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_TORCH_CODES = {f"torch.{name}": code for name, code in _NUMPY_CODES.items()} | {"torch.bfloat16": "BF16"}


def write_safetensors(
    path: Path | str, tensors: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (numpy arrays or torch tensors, by name) and ``metadata`` (strings) to ``path``, a
    temporary name of :func:`pipeline.fileio.atomic_write` (which fsyncs and renames it)."""
    items = sorted((_entry(name, value) for name, value in tensors.items()), key=lambda e: (-e[3], e[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    end = 0
    for name, code, shape, _, data in items:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [end, end + data.nbytes]}
        end += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    direct = end >= DIRECT_BYTES and hasattr(os, "O_DIRECT")
    start = _round_up(8 + len(text), ALIGN if direct else 8)
    text += b" " * (start - 8 - len(text))
    parts = [memoryview(struct.pack("<Q", len(text)) + text), *(data for *_, data in items)]
    if direct and _write_direct(Path(path), parts, size=start + end):
        return
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)


def _entry(name: str, value: Any) -> tuple[str, str, list[int], int, memoryview]:
    """``(name, dtype code, shape, element size, bytes)`` of a numpy array or torch tensor."""
    if type(value).__module__.startswith("torch"):
        import torch

        t = value.detach().cpu().contiguous()
        code = _TORCH_CODES.get(str(t.dtype))
        if code is None:
            raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
        return name, code, list(t.shape), t.element_size(), data
    a = np.asarray(value)
    a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes a 0-d array 1-d)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    code = _NUMPY_CODES.get(a.dtype.name)
    if code is None:
        raise ValueError(f"cannot write array {name!r} of dtype {a.dtype} to safetensors")
    return name, code, list(a.shape), a.dtype.itemsize, memoryview(a.reshape(-1).view(np.uint8))


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _write_direct(path: Path, parts: list[memoryview], *, size: int) -> bool:
    """``parts`` to ``path`` with ``O_DIRECT`` through an aligned buffer, the last block padded and the file then cut
    to ``size``; False (nothing kept) where this filesystem refuses ``O_DIRECT``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        raw = np.empty(BOUNCE_BYTES + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        bounce, fill = memoryview(raw[start : start + BOUNCE_BYTES]), 0  # aligned, as O_DIRECT needs
        for part in parts:
            at = 0
            while at < len(part):
                n = min(BOUNCE_BYTES - fill, len(part) - at)
                bounce[fill : fill + n] = part[at : at + n]
                fill, at = fill + n, at + n
                if fill == BOUNCE_BYTES:
                    _write_all(fd, bounce)
                    fill = 0
        if fill:
            padded = _round_up(fill, ALIGN)
            bounce[fill:padded] = bytes(padded - fill)
            _write_all(fd, bounce[:padded])
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno == errno.EINVAL:  # opened, but the writes refused: this filesystem's O_DIRECT is not ours
            return False
        raise
    finally:  # on every exit, an interrupt included
        os.close(fd)
    return True


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
