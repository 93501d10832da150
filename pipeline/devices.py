"""The one device resolver: ``auto|cpu|cuda|mps`` (or ``cuda:N``) -> a usable ``torch.device``, or a one-line error.

Extraction, heads and predict all go through :func:`resolve_device`, so "auto" means the same everywhere and a
device that is not there is the same one-line error everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    import torch  # here, not at the top: the CLI imports this module to print --help (torch costs seconds)

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is a :class:`PipelineError`."""
    import torch

    kind = name.split(":", 1)[0]
    if kind not in DEVICES or (kind != name and kind != "cuda"):
        raise PipelineError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"--device {name} requested but no CUDA GPU is available (use --device auto or cpu)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PipelineError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if kind == "mps" and not mps_available():
        raise PipelineError("--device mps requested but MPS is not available (use --device auto or cpu)")
    return torch.device(name)
