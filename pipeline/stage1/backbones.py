"""The one door to a backbone: the registry of backbone families (:data:`BACKBONE_FAMILIES`, as
``BATCH_SOURCES`` is for batch sources), :func:`load_backbone` (the model and its preprocessing together, for
``extract``), :func:`rebuild_backbone` (the backbone a feature file, a head or an export records, for the tail head,
``export`` and ``predict``), and the named layers a backbone can output instead of its classifier's input
(``--layers``, ``--cache-at``).

A name belongs to the first family that owns it: a prefixed family by its prefix (``timm:NAME``), else the family
that lists the name (torchvision's). What a family is: :mod:`pipeline.stage1.families`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.stage1.families import (
    Backbone,
    BackboneFamily,
    BackboneRecord,
    file_sha256,
    probe_dim,
)
from pipeline.stage1.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, pil_resample_matrix
from pipeline.stage1.timm_models import TimmFamily
from pipeline.stage1.torchvision_models import TorchvisionFamily
from pipeline.store import WeightsIdentity

log = logging.getLogger(__name__)

# Re-exported: the names stage one's callers have always imported from here.
__all__ = [
    "BACKBONE_FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneFamily",
    "BackboneRecord",
    "Preprocessing",
    "available_backbones",
    "file_sha256",
    "family_of",
    "is_known_backbone",
    "load_backbone",
    "pil_resample_matrix",
    "rebuild_backbone",
    "with_outputs",
]

# Every family of backbones, by key. Prefixed families are asked first; adding a family is one entry here.
BACKBONE_FAMILIES: dict[str, BackboneFamily] = {"torchvision": TorchvisionFamily(), "timm": TimmFamily()}


def _families() -> list[BackboneFamily]:
    families = list(BACKBONE_FAMILIES.values())
    return [f for f in families if f.prefix] + [f for f in families if not f.prefix]


def family_of(name: str) -> BackboneFamily:
    """The family ``name`` (a ``--backbone`` value) belongs to; an unknown name is one line listing the choices."""
    family = next((f for f in _families() if f.owns(name)), None)
    if family is None:
        raise PipelineError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    return family


def available_backbones() -> list[str]:
    """The names ``list backbones`` shows, every family's (a prefixed family shows its pattern, e.g. timm:NAME)."""
    return [n for f in BACKBONE_FAMILIES.values() for n in f.names()]


def is_known_backbone(name: str) -> bool:
    """Whether a family owns ``name`` (a prefixed name is checked against its family's models when it is built)."""
    return any(f.owns(name) for f in _families())


def load_backbone(
    name: str = "resnet18",
    *,
    weights: str = "IMAGENET1K_V1",
    image_size: int | None = None,
    seed: int = 0,
    resize: str = "crop",
) -> Backbone:
    """Build a frozen feature extractor and its preprocessing, by the family that owns ``name``.

    ``weights`` is a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...; ``pretrained`` for timm),
    ``none`` (random init seeded with ``seed``, so two processes get the same model) or a path to a local state_dict
    (``.safetensors`` or a torch file read with ``weights_only=True``). The final classifier becomes
    ``nn.Identity``; the model is in ``eval()`` mode with gradients off. ``image_size`` replaces the crop size;
    ``resize``: see :class:`Preprocessing` (``crop`` = the weights' recipe, ``full`` = the whole image to the crop).
    """
    return family_of(name).build(name, weights=weights, image_size=image_size, seed=seed, resize=resize)


# ------------------------------------------------------------------------------------------ rebuilding


def weights_argument(record: BackboneRecord) -> tuple[str, int]:
    """(the ``--weights`` value, seed) that build the weights ``record`` names again; a weights file must still be
    where ``extract --weights`` found it, with the recorded sha256."""
    identity = WeightsIdentity.parse(str(record.weights or ""))
    if identity.kind != "file":
        return str(family_of(record.name).weights_argument(identity)), identity.seed
    if not record.weights_source:
        raise PipelineError("the record does not say which weights file made the features; extract them again")
    path = Path(str(record.weights_source))
    if not path.is_file():
        raise PipelineError(f"rebuilding {record.name} needs the weights file the features were made with ({path}); "
                            "not found")  # fmt: skip
    if file_sha256(path) != identity.value:
        raise PipelineError(f"{path} has changed since the features were extracted (sha256 differs)")
    return str(path), 0


def rebuild_backbone(record: BackboneRecord) -> Backbone:
    """The backbone ``record`` describes (a feature file's :meth:`BackboneRecord.of_features`, a head's or an
    export's), checked against it: its weights (or, with ``record.weights`` None, the bare architecture, for
    tensors loaded afterwards), the recorded preprocessing and crop, classifier place, pooled layers and widths."""
    family = family_of(record.name)
    pre = record.preprocessing
    if record.weights is None:
        model, where = family.architecture(record.name, crop_size=pre.crop_size)
        model.eval().requires_grad_(False)
        backbone = Backbone(model, pre, record.name, "", probe_dim(model, pre.crop_size, record.name), where)
    else:
        weights, seed = weights_argument(record)
        backbone = family.build(record.name, weights=weights, image_size=pre.crop_size, seed=seed, resize=pre.resize)
        _check_weights(backbone, record)
    if record.classifier_path is not None and backbone.classifier_path != record.classifier_path:
        raise PipelineError(f"{record.name}'s classifier is {backbone.classifier_path!r}, not "
                            f"{record.classifier_path!r}")  # fmt: skip
    if record.layers:
        backbone = with_outputs(backbone, layers=list(record.layers))
    _check_width(backbone, record)
    return backbone


def _check_weights(backbone: Backbone, record: BackboneRecord) -> None:
    if backbone.preprocess != record.preprocessing:
        raise PipelineError(f"rebuilt {record.name} preprocessing {backbone.preprocess.as_dict()} differs from the "
                            f"features' {record.preprocessing.as_dict()}")  # fmt: skip
    if backbone.weights != record.weights:  # e.g. timm's default tag for a name has changed since
        raise PipelineError(f"rebuilt {record.name} has weights {backbone.weights}; the features were made with "
                            f"{record.weights}")  # fmt: skip


def _check_width(backbone: Backbone, record: BackboneRecord) -> None:
    """The rebuilt features as wide as recorded: each pooled layer (when the record knows their widths), the sum."""
    dims = [e["dim"] for e in backbone.layers or []]
    if record.layers and record.layer_dims is not None and tuple(dims) != record.layer_dims:
        raise PipelineError(f"rebuilt {record.name} gives the layers {backbone.layers}; {record.expects} "
                            f"{list(zip(record.layers, record.layer_dims))}")  # fmt: skip
    if record.feature_dim is None or backbone.feature_dim == record.feature_dim:
        return
    if record.layers:
        parts = " + ".join(f"{e['name']} {e['dim']}" for e in backbone.layers or [])
        raise PipelineError(f"the layers give {backbone.feature_dim} features ({parts}); {record.expects} "
                            f"{record.feature_dim}")  # fmt: skip
    raise PipelineError(f"rebuilt {record.name} gives {backbone.feature_dim}-d features; {record.expects} "
                        f"{record.feature_dim}")  # fmt: skip


# ------------------------------------------------------------------------------------------ named layers (issue 17)

ACTIVATION_DTYPE = "float16"  # --cache-at maps: half the bytes of float32, and what the tail head trains on


def _tracer(model: nn.Module) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(create_feature_extractor, get_graph_node_names) for ``model``: timm's for timm models (its tracer knows
    the functions and modules of timm that FX cannot trace), torchvision's for every other nn.Module."""
    if type(model).__module__.startswith("timm."):
        try:
            from timm.models import _features_fx as timm_fx

            return timm_fx.create_feature_extractor, timm_fx.get_graph_node_names
        except ImportError:  # a timm model without timm importable cannot happen; fall back all the same
            pass
    from torchvision.models import feature_extraction as tv_fx

    return tv_fx.create_feature_extractor, tv_fx.get_graph_node_names


def graph_nodes(model: nn.Module) -> list[str]:
    """The node names ``--layers`` and ``--cache-at`` accept (eval-mode graph, in execution order); a module's
    name (e.g. ``layer3``) is accepted too and means its last node."""
    _, names = _tracer(model)
    try:
        return list(names(model)[1])
    except Exception as e:  # noqa: BLE001 - FX cannot trace every model (data-dependent control flow)
        raise PipelineError(f"cannot trace {type(model).__name__} to list its nodes: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _unknown_node(model: nn.Module, name: str, nodes: list[str], *, backbone: str) -> PipelineError:
    import difflib

    modules = [n for n, _ in model.named_modules() if n]
    near = difflib.get_close_matches(name, list(dict.fromkeys([*modules, *nodes])), n=5, cutoff=0.5)
    top = [n for n, _ in model.named_children()]
    shown = ", ".join(near or top[:12])
    return PipelineError(
        f"{backbone} has no node {name!r}; {'near it' if near else 'its top-level modules'}: {shown} "
        "(`pipeline inspect --nodes BACKBONE` lists them all)"
    )


TOKEN_POOLS = ("mean", "cls", "cls+mean")  # --layers NODE[:POOL] for token outputs (B, N, C)


def split_layer(spec: str) -> tuple[str, str]:
    """``NODE[:POOL]`` -> (node, pool); no suffix is ``mean``. The pooling is part of the layer's name, so the
    feature file, the heads, export and predict all carry it without a separate record."""
    node, _, how = spec.partition(":")
    how = how or "mean"
    if how not in TOKEN_POOLS:
        choices = ", ".join(f"NODE:{p}" for p in TOKEN_POOLS)
        raise PipelineError(f"--layers {spec}: unknown pooling {how!r}; choose NODE (the mean) or {choices}")
    return node, how


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens of a ViT's sequence precede the patch tokens (class and register tokens): timm's
    ``num_prefix_tokens``, torchvision's one ``class_token``; 0 when the model does not say."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return 1 if isinstance(getattr(model, "class_token", None), torch.Tensor) else 0


def channels_last_maps(model: nn.Module) -> bool:
    """Whether the model's feature maps are NHWC (timm's ``output_fmt``: Swin and its kin keep C last inside)."""
    return str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")


def pool(y: torch.Tensor, how: str = "mean", *, prefix: int = 0, nhwc: bool = False) -> torch.Tensor:
    """One node's output as a vector per image: a map -> mean over H, W (NCHW, or NHWC when ``nhwc``); (B, N, C)
    tokens of a ViT -> ``mean``: the mean of the patch tokens (the ``prefix`` class/register tokens left out),
    ``cls``: the class token (the first), ``cls+mean``: both side by side, as dinov2's linear evaluation probes;
    (B, D) as it is."""
    if y.ndim == 4:
        return y.mean(dim=(1, 2) if nhwc else (2, 3))
    if y.ndim == 3:
        patches = y[:, prefix:].mean(dim=1)
        if how == "mean":
            return patches
        return y[:, 0] if how == "cls" else torch.cat([y[:, 0], patches], dim=1)
    return y.flatten(1)


class _Outputs(nn.Module):
    """The traced backbone returning ``features`` (the pooled ``layers``, concatenated in order; or the model's own
    output) and, with ``cache_at``, the activation map there: a tuple ``(features, activations)``."""

    def __init__(
        self, body: nn.Module, *, layers: list[str], output: str, cache_at: str | None, prefix: int = 0,
        nhwc: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.body, self.output, self.cache_at, self.prefix, self.nhwc = body, output, cache_at, prefix, nhwc
        self.layers = [split_layer(spec) for spec in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.body(x)
        pooled = [pool(out[node], how, prefix=self.prefix, nhwc=self.nhwc) for node, how in self.layers]
        feats = torch.cat(pooled, dim=1) if pooled else out[self.output].flatten(1)
        return feats if self.cache_at is None else (feats, out[self.cache_at])


def _layer_dim(spec: str, shape: tuple[int, ...] | None, *, backbone: Backbone, prefix: int, nhwc: bool) -> int:
    """The pooled width of ``spec`` (NODE[:POOL]) whose node gives ``shape`` per image; a pooling that does not fit
    the node or the model is one line."""
    node, how = split_layer(spec)
    if shape is None or len(shape) not in (1, 2, 3):
        raise PipelineError(f"node {node!r} of {backbone.name} gives {_shape_text(shape)}, not a feature map")
    if how != "mean" and len(shape) != 2:
        raise PipelineError(f"--layers {spec}: :{how} pools the tokens of a transformer block (N x C); {node} gives "
                            f"{_shape_text(shape)}: use {node} alone")  # fmt: skip
    if how != "mean" and prefix < 1:
        raise PipelineError(f"--layers {spec}: {backbone.name} has no class token to take; use {node} (the mean)")
    width = shape[-1] if len(shape) == 2 or (len(shape) == 3 and nhwc) else shape[0]
    return 2 * width if how == "cls+mean" else width


def with_outputs(backbone: Backbone, *, layers: list[str] | None = None, cache_at: str | None = None) -> Backbone:
    """``backbone`` whose model returns the pooled outputs of ``layers`` (nodes, concatenated in the order given)
    instead of the classifier's input, and with ``cache_at`` also the raw activation map at that node (a tuple).
    Records ``layers`` [{"name", "dim"}] and ``activations`` {"node", "shape", "dtype"}; ``feature_dim`` is the
    concatenated dimension. Unchanged when neither is given."""
    layers = list(dict.fromkeys(layers or []))  # a layer named twice is stored once
    if not layers and cache_at is None:
        return backbone
    create, _ = _tracer(backbone.model)
    nodes = graph_nodes(backbone.model)
    layer_nodes = [split_layer(spec)[0] for spec in layers]
    # the model's own output only when it is the features: asking for it would keep the blocks after the layers
    wanted = list(dict.fromkeys([*layer_nodes, *([cache_at] if cache_at else []), *([] if layers else [nodes[-1]])]))
    try:
        body = create(backbone.model, return_nodes=wanted)
    except ValueError as e:  # torchvision: "node: 'x' is not present in model. Hint: use get_graph_node_names ..."
        bad = next((n for n in wanted if f"'{n}'" in str(e)), wanted[0])
        raise _unknown_node(backbone.model, bad, nodes, backbone=backbone.name) from None
    except Exception as e:  # noqa: BLE001 - tracing failed for another reason
        raise PipelineError(f"cannot trace {backbone.name} for --layers/--cache-at: {_first_line(e)}") from None
    body.eval().requires_grad_(False)
    shapes = _probe_shapes(body, backbone.preprocess.crop_size, backbone.name)
    prefix, nhwc = prefix_tokens(backbone.model), channels_last_maps(backbone.model)
    width = {spec: _layer_dim(spec, shapes[split_layer(spec)[0]], backbone=backbone, prefix=prefix, nhwc=nhwc)
             for spec in layers}  # fmt: skip
    dims = [{"name": spec, "dim": width[spec]} for spec in layers]
    if cache_at is not None and (shapes[cache_at] is None or len(shapes[cache_at]) != 3):
        raise PipelineError(
            f"--cache-at {cache_at}: that node gives {_shape_text(shapes[cache_at])}, not a C x H x W map"
        )
    model = _Outputs(body, layers=layers, output=nodes[-1], cache_at=cache_at, prefix=prefix, nhwc=nhwc).eval()
    acts = {"node": cache_at, "shape": list(shapes[cache_at]), "dtype": ACTIVATION_DTYPE} if cache_at else None
    dim = sum(d["dim"] for d in dims) if layers else backbone.feature_dim
    return replace(backbone, model=model, feature_dim=dim, layers=dims or None, activations=acts)


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "no tensor" if shape is None else "a scalar per image" if not shape else f"shape {list(shape)} per image"


@torch.inference_mode()
def _probe_shapes(body: nn.Module, size: int, name: str) -> dict[str, tuple[int, ...] | None]:
    """Per-image shape of each returned node at crop ``size`` (None for an output that is not a batch tensor).
    The 3-D token output (B, N, C) of a ViT pools to C, so its dim is the last axis; NCHW pools to C."""
    try:
        out = body(torch.zeros(1, 3, size, size))
    except Exception as e:  # noqa: BLE001 - e.g. a ViT asked for another image size
        raise PipelineError(f"{name} cannot run at image size {size}: {_first_line(e)}") from None
    return {k: tuple(v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim else None for k, v in out.items()}


def node_shapes(backbone: Backbone) -> list[tuple[str, tuple[int, ...] | None]]:
    """Every node of the backbone's graph with its per-image output shape at the crop size (``inspect --nodes``)."""
    create, _ = _tracer(backbone.model)
    nodes = graph_nodes(backbone.model)
    body = create(backbone.model, return_nodes=nodes).eval()
    shapes = _probe_shapes(body, backbone.preprocess.crop_size, backbone.name)
    return [(n, shapes.get(n)) for n in nodes]
