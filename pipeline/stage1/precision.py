"""Numeric precision of the backbone during extraction: the one place that parses, resolves and applies it.

fp32  float32 everywhere; on CUDA TF32 is off (cuDNN convolutions and matmuls), so the features are the
      reference ones (PyTorch runs fp32 convolutions as TF32 on CUDA by default: ~1e-2 relative off).
tf32  float32 tensors, TF32 tensor cores on for convolutions and matmuls (CUDA; the same as fp32 elsewhere).
bf16  bfloat16 autocast; TF32 flags left as they are (autocast runs the convolutions in bf16).
fp16  float16 autocast, likewise.
auto  bf16 on CUDA, fp32 elsewhere: what ``--amp`` always did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.stage1.config import PRECISIONS, check_precision  # noqa: F401 (PRECISIONS: for importers)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    name: str  # one of PRECISIONS but auto
    autocast: torch.dtype | None  # autocast dtype for the backbone, None: no autocast
    tf32: bool | None  # TF32 flags for the extraction on CUDA; None: left as they are
    label: str  # the value in the feature file's fingerprint ("precision")


def from_amp_option(precision: str, amp: bool | None) -> str:
    """``--precision`` with the old ``--amp/--no-amp`` as an alias (``--amp`` = auto, ``--no-amp`` = fp32)."""
    if amp is None:
        return precision
    alias = "auto" if amp else "fp32"
    if precision not in ("auto", alias):
        raise PipelineError(f"--{'' if amp else 'no-'}amp contradicts --precision {precision}; pass only --precision")
    return alias


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision that runs on ``device`` for option value ``name``.

    Fingerprint labels keep the values files had before the option ("bf16-autocast" for the CUDA default, "fp32"
    on CPU), so those files stay valid. fp32 on CUDA is labelled "fp32-no-tf32": files the old ``--no-amp`` wrote
    there ran with TF32 convolutions and are not the same features.
    """
    check_precision(name)
    cuda = device.type == "cuda"
    if name == "auto":
        name = "bf16" if cuda else "fp32"
    if name == "tf32" and not cuda:
        name = "fp32"  # TF32 is a CUDA tensor-core mode; elsewhere fp32 is what runs
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, None, "bf16-autocast")
    if name == "fp16":
        return Precision("fp16", torch.float16, None, "fp16-autocast")
    if name == "tf32":
        return Precision("tf32", None, True, "tf32")
    return Precision("fp32", None, False, "fp32-no-tf32" if cuda else "fp32")


@contextmanager
def precision_context(precision: Precision, device: torch.device) -> Iterator[None]:
    """Run the backbone at ``precision``: autocast, and on CUDA the TF32 flags, restored on exit."""
    saved = None
    if device.type == "cuda" and precision.tf32 is not None:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision.tf32
    autocast = (
        torch.autocast(device.type, dtype=precision.autocast) if precision.autocast is not None else nullcontext()
    )
    try:
        with autocast:
            yield
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
