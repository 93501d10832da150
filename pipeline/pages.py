"""Large arrays whose memory is handed over whole: ``empty`` (numpy) and ``tensor`` (torch).

Why: memory a process touches for the first time is mapped in one 4 KB page at a time, one page fault each, and
on the virtual machines this project runs on a fault costs ~10 us: the first write to a new 307 MB array (60,000 x
1,280 float32) took 0.73 s, nearly all of it faults; the copy that filled it, 0.07 s. Asked for with
``MAP_POPULATE``, the kernel maps the whole range in one call: 0.14 s for the same 307 MB. A comparison makes
several such arrays (the features read, k-NN's normalised copy and similarity block, logreg's standardised copy).

Below :data:`MIN_BYTES`, or where ``MAP_POPULATE`` is missing (not Linux), the usual allocators: small arrays come
from memory the process already holds. The memory is zeroed, private to the process (a forked child shares it
copy-on-write, as any), and returned to the system when the array is gone.
"""

from __future__ import annotations

import math
import mmap
from typing import Any

import numpy as np

MIN_BYTES = 8 << 20  # 2,048 pages: below this the faults cost under 20 ms
_FLAGS = getattr(mmap, "MAP_POPULATE", None)


def _populated(nbytes: int) -> mmap.mmap | None:
    if _FLAGS is None or nbytes < MIN_BYTES:
        return None
    try:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _FLAGS)
    except (OSError, ValueError):  # no room for the mapping: the allocator says so its own way below
        return None


def empty(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """``np.empty(shape, dtype)`` (C order), its memory mapped up front when large (zeroed, not uninitialised)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    buffer = _populated(count * dtype.itemsize)
    if buffer is None:
        return np.empty(shape, dtype)
    return np.frombuffer(buffer, dtype, count).reshape(shape)


def tensor(shape: int | tuple[int, ...], dtype: Any) -> Any:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, its memory mapped up front when large."""
    import torch

    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(shape)
    buffer = _populated(count * torch.empty((), dtype=dtype).element_size())
    if buffer is None:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)
