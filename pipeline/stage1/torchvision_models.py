"""torchvision backbones (``--backbone NAME``, any classification model of ``torchvision.models``): the family
:class:`TorchvisionFamily` of :data:`pipeline.stage1.backbones.BACKBONE_FAMILIES`.

Weights (``--weights``): a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...), ``none`` (random init
seeded with ``--seed``) or a path to a local state_dict (``.safetensors``, or a torch file read with
``weights_only=True``). The preprocessing is the weights' own transforms (ImageNet's recipe without weights).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.stage1.families import (
    Backbone,
    BackboneFamily,
    frozen,
    load_state_file,
    seeded,
    unpretrained,
)
from pipeline.stage1.preprocessing import Preprocessing
from pipeline.store import WeightsIdentity

# torchvision names the final classifier differently per family; the first attribute found is replaced.
CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


def strip_classifier(model: nn.Module) -> str:
    """Replace the final linear classifier with ``nn.Identity`` and return its dotted path."""
    for attr in CLASSIFIER_ATTRS:
        module = getattr(model, attr, None)
        if module is None:
            continue
        if isinstance(module, nn.Linear):
            setattr(model, attr, nn.Identity())
            return attr
        if isinstance(module, nn.Sequential):
            # keep what precedes the last Linear (e.g. ConvNeXt's LayerNorm + Flatten, VGG's fc6/fc7)
            for idx in reversed(range(len(module))):
                if isinstance(module[idx], nn.Linear):
                    module[idx] = nn.Identity()
                    return f"{attr}.{idx}"
    raise PipelineError(f"{type(model).__name__} has no final linear classifier to replace")


def cached_checkpoint(url: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint (the place the offline message names)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _resolve_weights(name: str, weights: str) -> Any:
    enum = torchvision.models.get_model_weights(name)
    choices = list(enum.__members__)
    key = weights.upper()
    if key not in choices:
        raise PipelineError(
            f"unknown weights {weights!r} for {name}; choose one of: {', '.join(choices)}, none, or a file path"
        )
    return enum[key]


def _download_message(name: str, w: Any, err: Exception) -> str:
    return (
        f"cannot download {name} weights {w} ({type(err).__name__}); offline? Put {w.url} at "
        f"{cached_checkpoint(w.url)}, or pass --weights PATH to a local state_dict file"
    )


def _weights_preprocessing(w: Any) -> Preprocessing:
    """The data config of torchvision weights: their ``transforms()`` as a :class:`Preprocessing`."""
    t = w.transforms()
    return Preprocessing(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )


def _weights_note(w: Any) -> str:
    meta = getattr(w, "meta", {})
    top1 = next((m["acc@1"] for m in meta.get("_metrics", {}).values() if "acc@1" in m), None)
    parts = [f"{w.transforms().crop_size[0]} px"]
    if top1 is not None:
        parts.append(f"ImageNet top-1 {top1:.1f}")
    parts.append("cached, works offline" if cached_checkpoint(w.url).is_file() else "downloaded on first use")
    return ", ".join(parts)


class TorchvisionFamily(BackboneFamily):
    """Every classification model of ``torchvision.models``, by its bare name (``resnet18``)."""

    key = "torchvision"

    def names(self) -> list[str]:
        return torchvision.models.list_models(module=torchvision.models)

    def listing(self) -> list[tuple[str, str]]:
        rows = []
        for name in self.names():
            members = [k for k in torchvision.models.get_model_weights(name).__members__ if k != "DEFAULT"]
            rows.append((name, ", ".join(members) if members else "no pretrained weights"))
        return rows

    def weights_choices(self, name: str) -> list[tuple[str, str]]:
        enum = torchvision.models.get_model_weights(name)
        return [(k, f"= {w.name}" if k == "DEFAULT" else _weights_note(w)) for k, w in enum.__members__.items()]

    def build(self, name: str, *, weights: str, image_size: int | None, seed: int, resize: str) -> Backbone:
        pre = Preprocessing()
        built = unpretrained(weights, seed, lambda: torchvision.models.get_model(name, weights=None))
        if built is not None:
            model, identity, path = built
        else:
            path = None
            w = _resolve_weights(name, weights)
            try:
                model = torchvision.models.get_model(name, weights=w)
            except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated download a RuntimeError
                raise PipelineError(_download_message(name, w, e)) from None
            pre = _weights_preprocessing(w)
            identity = WeightsIdentity("torchvision", str(w))  # DEFAULT resolves to a concrete version
        classifier_path = strip_classifier(model)
        if path is not None:
            load_state_file(model, path, classifier_path)
        if image_size is not None:
            pre = pre.with_crop(image_size)
        pre = replace(pre, resize=resize)
        return frozen(model, preprocess=pre, name=name, weights=str(identity), classifier_path=classifier_path)

    def architecture(self, name: str, *, crop_size: int, seed: int = 0) -> tuple[nn.Module, str]:
        with seeded(seed):
            model = torchvision.models.get_model(name, weights=None)
        return model, strip_classifier(model)

    def constructor(self, backbone: Backbone, *, num_classes: int | None) -> str:
        classes = "" if num_classes is None else f", num_classes={num_classes}"
        return f"torchvision.models.get_model({backbone.name!r}{classes})"
