"""Large arrays whose memory is handed over whole: ``empty`` (numpy) and ``tensor`` (torch).

Why: memory a process touches for the first time is mapped one page at a time, one page fault each, and on the
virtual machines this project runs on a fault costs 3-10 us. The first write to a new 307 MB array (60,000 x 1,280
float32) took 0.03-1.2 s: fast when the kernel had free huge pages for numpy (which asks for them), 0.24 s in 4 KB
pages, up to 1.2 s when it compacted memory to make huge pages; the copy that filled it, 0.07 s. Asked for with
``MAP_POPULATE``, the kernel maps the whole range in one call: 0.11-0.37 s for the same 307 MB, whatever the state
of memory. A comparison makes several such arrays (the features read, k-NN's normalised copy and similarity block,
logreg's standardised copy): its system time went from 4.8-5.3 to 3.4 s.

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
    shape, dtype = _shape(shape), np.dtype(dtype)
    buffer = _populated(math.prod(shape) * dtype.itemsize)
    if buffer is None:
        return np.empty(shape, dtype)
    return np.frombuffer(buffer, dtype, math.prod(shape)).reshape(shape)


def tensor(shape: int | tuple[int, ...], dtype: Any, *, device: Any = "cpu") -> Any:
    """``torch.empty(shape, dtype=dtype, device=device)``, its memory mapped up front when large and on the CPU."""
    import torch

    shape = _shape(shape)
    on_cpu = torch.device(device).type == "cpu"
    buffer = _populated(math.prod(shape) * torch.empty((), dtype=dtype).element_size()) if on_cpu else None
    if buffer is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)


def _shape(shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)
