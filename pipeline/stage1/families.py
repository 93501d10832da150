"""What a backbone family is: the interface every family of models implements (torchvision's in
:mod:`pipeline.stage1.torchvision_models`, timm's in :mod:`pipeline.stage1.timm_models`), the :class:`Backbone` it
builds, the :class:`BackboneRecord` a feature file or an export keeps of it, and the helpers families share
(weights files, seeded initialisation, probing the feature width).

The registry of families and the one door to build or rebuild a backbone is :mod:`pipeline.stage1.backbones`
(``BACKBONE_FAMILIES``, ``load_backbone``, ``rebuild_backbone``). Adding a family is one subclass of
:class:`BackboneFamily` and one entry there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.stage1.preprocessing import Preprocessing
from pipeline.store import FeatureMeta, WeightsIdentity


@dataclass
class Backbone:
    model: nn.Module
    preprocess: Preprocessing
    name: str
    weights: str  # str(WeightsIdentity): torchvision name, "none(seed=S)", "file:<sha256>" or "timm:ARCH.TAG"
    feature_dim: int
    classifier_path: str  # where the original classifier sat, e.g. "fc" or "classifier.1" (used by export)
    # Set by with_outputs (--layers, --cache-at); None: the model returns the classifier's input only.
    layers: list[dict[str, Any]] | None = None  # [{"name": node, "dim": D}, ...]: features = their pooled outputs
    activations: dict[str, Any] | None = None  # {"node", "shape": [C, H, W], "dtype"}: the model's second output


@dataclass(frozen=True)
class BackboneRecord:
    """What a feature file, a head trained on one, or an export keeps of the backbone: enough to build it again
    (:func:`pipeline.stage1.backbones.rebuild_backbone`) and to check that what was built is what was recorded."""

    name: str
    preprocessing: Preprocessing
    # str(WeightsIdentity) of the weights that made the features; None: the architecture only (random init, seeded),
    # for tensors loaded into it afterwards (an export's MODEL.safetensors)
    weights: str | None = None
    weights_source: str | None = None  # the --weights path a "file:<sha256>" identity came from
    feature_dim: int | None = None  # what the rebuilt backbone must give (None: not checked)
    layers: tuple[str, ...] | None = None  # pooled nodes (extract --layers), in order; None: the classifier's input
    layer_dims: tuple[int, ...] | None = None  # their widths as recorded (None: only their sum is checked)
    classifier_path: str | None = None  # where the classifier sat, as recorded (None: not checked)
    expects: str = "the head takes"  # who set the widths, in messages: "the head takes", "the file records"

    @classmethod
    def of_features(cls, meta: FeatureMeta) -> BackboneRecord:
        """A feature file's record of the backbone that made it."""
        layers = meta.layers or []
        return cls(
            name=meta.backbone,
            preprocessing=Preprocessing.from_dict(meta.preprocessing),
            weights=meta.weights,
            weights_source=(meta.config or {}).get("weights"),
            feature_dim=meta.feature_dim,
            layers=tuple(str(e.get("name")) for e in layers) or None,
            layer_dims=tuple(int(e.get("dim", 0)) for e in layers) or None,
            classifier_path=meta.classifier_path,
            expects="the file records",
        )

    def plain(self) -> BackboneRecord:
        """The same backbone giving the classifier's input (not the pooled layers): what the tail head cuts."""
        if not self.layers:
            return self
        return replace(self, layers=None, layer_dims=None, feature_dim=None)


class BackboneFamily:
    """One family of models (torchvision's, timm's, ...): everything that differs between them.

    ``prefix``: names of the family start with it (``timm:``); a family without one owns the names
    :meth:`names` lists. A subclass implements :meth:`names`, :meth:`build` and :meth:`architecture`; the rest has
    defaults that fit most families.
    """

    key: str = ""  # its entry in BACKBONE_FAMILIES
    prefix: str = ""
    tracer: str = "torchvision's"  # whose create_feature_extractor traces it (export's notes)

    def owns(self, name: str) -> bool:
        """Whether ``name`` (a ``--backbone`` value) belongs to this family (not whether it exists: see build)."""
        return name.startswith(self.prefix) if self.prefix else name in self.names()

    def names(self) -> list[str]:
        """The names this family lists (``list backbones``)."""
        raise NotImplementedError

    def listing(self) -> list[tuple[str, str]]:
        """``(name, note)`` rows for ``list backbones``."""
        return [(name, "") for name in self.names()]

    def weights_choices(self, name: str) -> list[tuple[str, str]]:
        """``(--weights value, note)`` rows for ``list weights`` besides ``none`` and local files."""
        return []

    def build(self, name: str, *, weights: str, image_size: int | None, seed: int, resize: str) -> Backbone:
        """The frozen backbone ``--backbone name --weights weights`` asks for: the classifier replaced by
        ``nn.Identity``, its data config as the preprocessing, ``eval()`` mode, gradients off."""
        raise NotImplementedError

    def architecture(self, name: str, *, crop_size: int, seed: int = 0) -> tuple[nn.Module, str]:
        """The bare model of ``name`` fitted to ``crop_size``, randomly initialised with ``seed`` (the caller's RNG
        untouched), its classifier replaced by ``nn.Identity``, and the classifier's dotted path."""
        raise NotImplementedError

    def weights_argument(self, identity: WeightsIdentity) -> str | None:
        """The ``--weights`` value that loads ``identity`` again (None for a file: the caller knows its path)."""
        return identity.argument

    def constructor(self, backbone: Backbone, *, num_classes: int | None) -> str:
        """The plain call other tools build this architecture with (MODEL.json's ``state_dict_loads_into``):
        with ``num_classes`` outputs, or (None) without the classifier this pipeline replaced."""
        return f"{type(self).__name__}().architecture({backbone.name!r}, crop_size={backbone.preprocess.crop_size})"

    def versions(self) -> dict[str, str]:
        """Library versions to record beside an export of this family's models (besides torch, torchvision)."""
        return {}


# ------------------------------------------------------------------------------------------ helpers families share


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random initialisation drawn from ``seed`` without disturbing the caller's RNG (two processes that build
    ``none(seed=S)`` get the same model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def unpretrained(
    weights: str, seed: int, create: Callable[[], nn.Module]
) -> tuple[nn.Module, WeightsIdentity, Path | None] | None:
    """The two ``--weights`` every family reads the same way: ``none`` (random initialisation seeded with ``seed``)
    and a file path (the architecture built by ``create``, the caller then loads the file into it with
    :func:`load_state_file` once it knows where its classifier sits). ``(model, identity, path or None)``; ``None``
    for any other value, which names the family's own pretrained weights."""
    if weights.lower() == "none":
        with seeded(seed):
            return create(), WeightsIdentity("none", str(seed)), None
    if looks_like_path(weights):
        path = weights_file(weights)
        with torch.random.fork_rng(devices=[]):  # every tensor is then overwritten from the file
            return create(), WeightsIdentity("file", file_sha256(path)), path
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(weights).exists()


def weights_file(weights: str) -> Path:
    """``--weights PATH`` as a path to an existing file (else one line)."""
    path = Path(weights)
    if not path.is_file():
        raise PipelineError(f"weights file not found: {path}")
    return path


def _read_state_file(path: Path) -> Any:
    """A ``.safetensors`` file (tensors only), else ``torch.load`` with ``weights_only=True``: never unpickled."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_file(model: nn.Module, path: Path, classifier_path: str) -> None:
    """Load a weights file into ``model`` (whose classifier is already ``nn.Identity``); keys of the classifier in
    the file are ignored, anything else that does not fit is one line."""
    try:
        state = _read_state_file(path)
    except Exception as e:  # noqa: BLE001 - any unpickling/format problem is the user's file
        raise PipelineError(f"cannot load weights file {path}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path} is not a state_dict (a mapping of names to tensors)")
    # The classifier was already replaced: its keys in the file are expected and ignored.
    prefix = classifier_path + "."
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise PipelineError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise PipelineError(
            f"{path} does not fit: {k} has shape {tuple(state[k].shape)}, model expects {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state, strict=False)


@torch.inference_mode()
def probe_dim(model: nn.Module, size: int, name: str) -> int:
    """The width of the model's output on one blank ``size`` x ``size`` image (one line if it cannot run there)."""
    try:
        out = model(torch.zeros(1, 3, size, size))
    except Exception as e:  # noqa: BLE001 - e.g. a ViT asked for another image size
        raise PipelineError(f"{name} cannot run at image size {size}: {str(e).splitlines()[0]}") from None
    return int(out.flatten(1).shape[1])


def frozen(model: nn.Module, *, preprocess: Preprocessing, name: str, weights: str, classifier_path: str) -> Backbone:
    """``model`` (classifier already replaced) as a frozen :class:`Backbone`: ``eval()``, gradients off, its
    feature width probed at the crop size."""
    model.eval().requires_grad_(False)
    dim = probe_dim(model, preprocess.crop_size, name)
    return Backbone(model, preprocess, name, weights, dim, classifier_path)
