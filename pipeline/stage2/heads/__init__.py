"""Stage-two heads trained on cached features. Adding a head type is one module plus one entry in ``HEADS``
(:mod:`pipeline.stage2.heads.registry`, which says how).

A head is fitted on ``(X, y)`` arrays, gives class logits and probabilities, and round-trips through a dict of
plain arrays (saved as safetensors: loading a head never unpickles, so it never runs code). Heads that are a
function of the features a torch layer can compute (``linear``, ``logreg``, ``centroid``, ``mlp``) also turn
into an ``nn.Module`` (``as_module``), which is what ``export`` puts on top of the backbone.

Layout: ``registry`` (HEADS: names -> "module:Class", descriptions, knobs; torch-free), ``knobs`` (the knob
groups), ``config`` (HeadConfig), ``base`` (the Head interface, standardisation), ``fitting`` (optimiser, data on
the device, mini-batch loops), ``lbfgs`` (full-batch logistic regression in torch), one module per head type.
Importing this package imports neither torch nor any head: a head's module loads when it is first built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write, write_json
from pipeline.stage2.heads.config import HeadConfig
from pipeline.stage2.heads.registry import HEADS, HeadSpec, head_class

if TYPE_CHECKING:
    from pipeline.stage2.heads.base import Head

HEAD_FILE = "head.safetensors"

__all__ = ["HEADS", "HEAD_FILE", "HeadConfig", "HeadSpec", "build_head", "head_class", "load_head", "save_head"]

# Names this package re-exported when it imported every head; resolved on first use (PEP 562), so that importing
# the package stays torch-free.
_LAZY = {
    "FitResult": "base", "Head": "base", "balanced_weights": "base", "warn_if_tiny": "base",
    "CentroidHead": "centroid", "KNNHead": "knn", "LinearHead": "linear", "LogRegHead": "logreg",
    "MLPHead": "mlp", "RidgeHead": "ridge", "TailHead": "tail",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def build_head(cfg: HeadConfig, *, num_classes: int, feature_dim: int) -> Head:
    return head_class(cfg.head)(cfg, num_classes=num_classes, feature_dim=feature_dim)


def save_head(head: Head, out_dir: Path, *, config: dict[str, Any]) -> None:
    """``head.safetensors`` (arrays only) + ``config.json`` (what produced it). Into a folder of its own: a head
    folder is written as one unit by ``fileio.atomic_directory`` (see ``training.train_one``)."""
    from pipeline.tensorfile import write_safetensors

    state = head.state()
    atomic_write(out_dir / HEAD_FILE, lambda p: write_safetensors(p, state))
    write_json(out_dir / "config.json", config)


def load_head(head_dir: Path) -> tuple[Head, dict[str, Any]]:
    """Load a saved head and its config; refuses anything that is not plain arrays in safetensors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    head_dir = Path(head_dir)
    cfg_path, tensors = head_dir / "config.json", head_dir / HEAD_FILE
    if not cfg_path.is_file() or not tensors.is_file():
        raise PipelineError(f"{head_dir} is not a trained head folder (needs config.json and {HEAD_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
        head_cfg = HeadConfig(**config["head_config"])
        outputs = len(config["targets"]) if head_cfg.task == "regress" else len(config["classes"])
        head = build_head(head_cfg, num_classes=outputs, feature_dim=int(config["feature_dim"]))
        state = load_file(str(tensors))
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        raise PipelineError(f"cannot load head from {head_dir}: {type(e).__name__}: {e}") from None
    weight = state.get("weight")
    if weight is not None and weight.shape != (head.num_classes, head.feature_dim):
        raise PipelineError(
            f"{tensors} holds a {weight.shape[1]}-d head for {weight.shape[0]} classes; its config says "
            f"{head.feature_dim}-d, {head.num_classes} classes"
        )
    try:
        head.load_state(state)
    except KeyError as e:
        raise PipelineError(f"{tensors} lacks the array {e} that a {head.name} head needs") from None
    return head, config
