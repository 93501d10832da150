"""Export: the frozen backbone with a trained head as its final layer, as one classifier.

``export_model`` writes three files side by side:

    MODEL.pt2    a self-contained ``torch.export`` program: float (N, 3, S, S) normalised images -> (N, C) logits
    MODEL.pth    its ``state_dict``; for a linear head (linear, logreg, centroid) it loads into the plain
                 ``torchvision.models.get_model(backbone, num_classes=C)`` (``weights_only=True`` is enough)
    MODEL.json   class names, preprocessing, backbone, weights and head: what ``predict`` needs besides the program

The backbone is rebuilt from the head's ``config.json`` exactly as ``extract`` built it (same weights identity,
same crop size), so the exported logits on an image equal the head's logits on that image's cached features.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.backbones import Backbone, file_sha256, load_backbone
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write
from pipeline.heads import Head, load_head

log = logging.getLogger(__name__)
PROGRAM_SUFFIX = ".pt2"
EXPORT_FORMAT = "pipeline.exported-classifier"


@dataclass(frozen=True)
class ExportResult:
    program: Path
    state_dict: Path
    meta: Path
    classes: list[str]
    max_abs_diff: float  # exported program against the eager model on a random batch


def sidecar_paths(program: Path) -> tuple[Path, Path]:
    """(state_dict, metadata) paths beside an exported ``.pt2`` program."""
    return program.with_suffix(".pth"), program.with_suffix(".json")


def _weights_argument(config: dict[str, Any]) -> tuple[str, int]:
    """(the ``--weights`` value, seed) that rebuild the backbone whose weights identity the head records."""
    identity = str(config.get("weights") or "")
    extract_cfg = config.get("extract_config") or {}
    if identity.startswith("none(seed="):
        return "none", int(identity[len("none(seed=") : -1])
    if identity.startswith("file:"):
        if not extract_cfg.get("weights"):
            raise PipelineError("the head's config.json does not say which weights file made the features; retrain it")
        path = Path(str(extract_cfg["weights"]))
        if not path.is_file():
            raise PipelineError(
                f"export needs the backbone weights file the features were made with ({path}); not found"
            )
        if file_sha256(path) != identity[len("file:") :]:
            raise PipelineError(f"{path} has changed since the features were extracted (sha256 differs)")
        return str(path), 0
    if "." in identity:  # e.g. "ResNet18_Weights.IMAGENET1K_V1"
        return identity.rsplit(".", 1)[1], 0
    raise PipelineError(f"cannot tell which backbone weights made these features (weights {identity!r})")


def rebuild_backbone(config: dict[str, Any]) -> Backbone:
    """The frozen backbone a head was trained on, checked against what the feature file recorded."""
    name = config.get("backbone")
    pre = config.get("preprocessing") or {}
    if not name or name == "synthetic" or "crop_size" not in pre:
        raise PipelineError("this head was not trained on features from `pipeline extract`; nothing to export")
    weights, seed = _weights_argument(config)
    backbone = load_backbone(name, weights=weights, image_size=int(pre["crop_size"]), seed=seed)
    if backbone.preprocess.as_dict() != pre:
        raise PipelineError(
            f"rebuilt {name} preprocessing {backbone.preprocess.as_dict()} differs from the features' {pre}"
        )
    if backbone.feature_dim != int(config["feature_dim"]):
        raise PipelineError(
            f"rebuilt {name} gives {backbone.feature_dim}-d features; the head takes {config['feature_dim']}"
        )
    return backbone


def attach_head(backbone: Backbone, layer: nn.Module) -> nn.Module:
    """The backbone with ``layer`` (a head's ``as_module()``) where its original classifier sat (``fc``,
    ``classifier.1``, ...)."""
    model = backbone.model
    model.set_submodule(backbone.classifier_path, layer)
    return model.eval().requires_grad_(False)


def _export_program(model: nn.Module, crop: int) -> Any:
    example = torch.randn(2, 3, crop, crop)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the first line says why
        raise PipelineError(f"torch.export failed for this model: {str(e).splitlines()[0]}") from None


@torch.inference_mode()
def _check_program(program: Any, model: nn.Module, crop: int) -> float:
    x = torch.randn(3, 3, crop, crop)
    return float((program.module()(x) - model(x)).abs().max())


def _meta(config: dict[str, Any], head: Head, layer: nn.Module, backbone: Backbone, program: Path) -> dict[str, Any]:
    linear = isinstance(layer, nn.Linear)
    return {
        "format": EXPORT_FORMAT,
        "program": program.name,
        "classes": config["classes"],
        "preprocessing": config["preprocessing"],
        "input": "float32 (N, 3, crop, crop): resize shorter side, centre crop, /255, normalise with mean/std",
        "backbone": backbone.name,
        "weights": backbone.weights,
        "classifier_path": backbone.classifier_path,
        "head": head.name,
        "head_config": config.get("head_config"),
        "features_fingerprint": config.get("features_fingerprint"),
        "state_dict_loads_into": (
            f"torchvision.models.get_model({backbone.name!r}, num_classes={len(config['classes'])})"
            if linear
            else f"torchvision.models.get_model({backbone.name!r}) with {backbone.classifier_path} replaced by the "
            f"{head.name} head's nn.Sequential"
        ),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def export_model(head_dir: Path | str, out: Path | str) -> ExportResult:
    """Write ``out`` (a ``.pt2`` program) with its ``.pth`` state_dict and ``.json`` metadata beside it."""
    out = Path(out)
    if out.suffix != PROGRAM_SUFFIX:
        raise PipelineError(f"--out must end in {PROGRAM_SUFFIX} (the .pth and .json are written beside it), not {out}")
    head, config = load_head(Path(head_dir))
    layer = head.as_module()  # first: a head that cannot be a layer (knn) is refused before the backbone is built
    backbone = rebuild_backbone(config)
    model = attach_head(backbone, layer)
    crop = int(config["preprocessing"]["crop_size"])
    program = _export_program(model, crop)
    diff = _check_program(program, model, crop)
    state_path, meta_path = sidecar_paths(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda p: torch.export.save(program, p))
        atomic_write(state_path, lambda p: torch.save(model.state_dict(), p))
        meta = _meta(config, head, layer, backbone, out)
        atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    except OSError as e:
        raise PipelineError(f"cannot write {out}: {e.strerror or e}") from None
    return ExportResult(out, state_path, meta_path, list(config["classes"]), diff)
