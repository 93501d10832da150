"""Export: the frozen backbone with a trained head as its final layer, as one classifier.

``export_model`` writes three files side by side:

    MODEL.pt2          a ``torch.export`` program, float (N, 3, S, S) normalised images -> (N, C) logits, for other
                       tools. ``torch.export.load`` unpickles parts of such an archive: load only ones you trust.
                       ``predict`` never opens it.
    MODEL.safetensors  the whole model's ``state_dict`` (backbone and head), tensors only; what ``predict`` loads.
                       For a linear head (linear, logreg, centroid, and tail, whose trained blocks
                       replace the backbone's by name) it loads into the plain
                       ``torchvision.models.get_model(backbone, num_classes=C)``. A head trained on pooled inner
                       layers (``extract --layers``, ``train-head --layer``) sits after the traced backbone that
                       computes them instead: ``backbone.*`` and ``head.*`` (:func:`classifier_model`).
    MODEL.json         class names, preprocessing, backbone, where the head sits and what it is, and the pooled layers
                       it takes, if any (:class:`ExportMeta`)

A regression head (``extract --targets``) exports the same way: its outputs are the predicted targets in their own
units (ridge, linear and mlp fold the standardisation of features and targets into their layers), and MODEL.json
says ``"task": "regress"`` and the ``targets`` names in place of ``classes``.

``predict`` rebuilds the model from MODEL.json (the backbone family's bare architecture, through
:func:`~pipeline.stage1.backbones.rebuild_backbone` with :meth:`ExportMeta.backbone_record`; the head's layer put where
the classifier was, or after the pooled layers traced as export traced them) and loads the tensors: no pickle is
read, so a crafted file cannot run code.

The backbone is rebuilt from the head's ``config.json`` (its record of the feature file's backbone) exactly as
``extract`` built it, through the same door (same weights identity, same crop size), so the exported logits on an
image equal the head's logits on that image's cached features.
"""

from __future__ import annotations

import errno
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write, digests, write_json
from pipeline.stage1.backbones import (
    Backbone,
    BackboneRecord,
    Preprocessing,
    family_of,
    is_known_backbone,
    rebuild_backbone,
)
from pipeline.stage1.tail import put_back
from pipeline.stage2.heads import HEADS, head_class, load_head
from pipeline.stage2.heads.base import Head
from pipeline.store import ALL_LAYERS
from pipeline.tensorfile import write_safetensors

log = logging.getLogger(__name__)
PROGRAM_SUFFIX = ".pt2"
EXPORT_FORMAT = "pipeline.exported-classifier"
EXPORT_VERSION = 2  # 2: MODEL.safetensors + head_layer in MODEL.json (1 had MODEL.pth, read through the program)
IDENTITY_KEY = "pipeline.deploy.export"  # the safetensors metadata entry that repeats what MODEL.json says the model is
LAYERS_BODY, LAYERS_HEAD = "backbone", "head"  # a model on pooled layers: the traced backbone, then the head's layer


@dataclass(frozen=True)
class ExportResult:
    program: Path
    state_dict: Path
    meta: Path
    classes: list[str]  # empty for a regression model
    max_abs_diff: float  # exported program against the eager model on a random batch
    targets: list[str] = field(default_factory=list)  # a regression model's outputs, in order


def sidecar_paths(program: Path) -> tuple[Path, Path]:
    """(tensors, metadata) paths beside an exported ``.pt2`` program."""
    return program.with_suffix(".safetensors"), program.with_suffix(".json")


# ------------------------------------------------------------------------------------------ MODEL.json


def _int(value: Any, what: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PipelineError(f"{what} must be an integer >= {low}, not {value!r}")
    return value


@dataclass(frozen=True)
class HeadLayer:
    """The head's layer, enough to rebuild it: one ``nn.Linear`` (``type`` "linear"), or a head type's own module
    (``type`` its name, e.g. the ``mlp`` head's ``nn.Sequential``) shaped by the knobs the head records
    (:meth:`~pipeline.stage2.heads.base.Head.layer_record`: the mlp's ``hidden`` and ``dropout``), written beside
    ``type`` in MODEL.json."""

    type: str  # "linear" | a head name
    in_features: int
    out_features: int
    knobs: dict[str, Any] = field(default_factory=dict)  # what shapes a head type's own module (empty: linear)

    def __post_init__(self) -> None:
        if self.type != "linear" and self.type not in HEADS:
            raise PipelineError(f"head_layer.type must be 'linear' or a head name ({', '.join(HEADS)}), "
                                f"not {self.type!r}")  # fmt: skip
        _int(self.in_features, "head_layer.in_features")
        _int(self.out_features, "head_layer.out_features")
        if self.type != "linear":
            self.head()  # the knobs are the head's own: its config checks them

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadLayer:
        d = dict(d)
        try:
            return cls(d.pop("type"), d.pop("in_features"), d.pop("out_features"), d)
        except KeyError as e:
            raise PipelineError(f"head_layer lacks {e}") from None

    @classmethod
    def of(cls, head: Head, layer: nn.Module) -> HeadLayer:
        if isinstance(layer, nn.Linear):
            return cls("linear", layer.in_features, layer.out_features)
        knobs = head.layer_record()
        if not knobs:
            raise PipelineError(f"cannot describe a {head.name} head's layer ({type(layer).__name__}) for export")
        return cls(head.name, head.feature_dim, head.num_classes, knobs)

    def head(self) -> Head:
        """A head of this type, shaped by the recorded knobs (its tensors not loaded yet)."""
        return head_class(self.type).from_layer_record(
            self.knobs, in_features=self.in_features, out_features=self.out_features
        )

    def build(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The layer with ``state`` (its tensors, named as in the layer) loaded; names or shapes that do not fit
        are a :class:`PipelineError`. A head type's own module has the head's own layout (its ``load_state``)."""
        if self.type != "linear":
            head = self.head()
            try:
                head.load_state({k: v.numpy() for k, v in state.items()})
            except KeyError as e:
                raise PipelineError(f"the head's tensors lack {e} that a {self.type} layer needs") from None
            return head.as_module()
        layer = nn.Linear(self.in_features, self.out_features)
        wanted = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != wanted:
            raise PipelineError(f"the head's tensors {got} do not fit a linear layer {wanted}")
        layer.load_state_dict(state)
        return layer

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "in_features": self.in_features, "out_features": self.out_features, **self.knobs}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate ("\\udcff" in JSON) cannot be written to the CSV
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Decision:
    """A threshold for the class that matters (``train-head --positive``): that class where its probability reaches
    ``threshold``, else the most probable other class (:func:`pipeline.stage2.thresholds.thresholded_predictions`)."""

    positive: str
    threshold: float

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise PipelineError(f"decision threshold must be a probability in [0, 1], not {self.threshold!r}")

    @classmethod
    def from_dict(cls, d: Any) -> Decision | None:
        if d is None:
            return None
        try:
            return cls(**d)
        except TypeError as e:
            raise PipelineError(f"decision: {e}") from None


@dataclass(frozen=True)
class ExportMeta:
    """What MODEL.json says the model is: all ``predict`` needs to rebuild it besides the tensors."""

    classes: tuple[str, ...]
    preprocessing: Preprocessing
    backbone: str
    classifier_path: str
    head_layer: HeadLayer
    decision: Decision | None = None  # None: argmax
    targets: tuple[str, ...] = ()  # a regression model's outputs (MODEL.json's "task": "regress"); classes empty
    layers: tuple[str, ...] | None = None  # the pooled nodes the head takes, in order (extract --layers); None: the
    # classifier's input, the head where the classifier was
    files: dict[str, str] | None = None  # {file name: sha256} of the program and tensors (by role) written with it
    # Several labels per image (MODEL.json's "task": "multilabel"): each label's threshold on its sigmoid
    # probability, in the order of ``classes`` (MODEL.json's "labels"); empty for the other tasks.
    thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_layers(self.layers)
        self._check_outputs()
        if not isinstance(self.backbone, str) or not is_known_backbone(self.backbone):
            raise PipelineError(f"unknown backbone {self.backbone!r}")
        if not isinstance(self.classifier_path, str) or not self.classifier_path:
            raise PipelineError(f"classifier_path must be a module path such as 'fc', not {self.classifier_path!r}")
        if self.decision is not None and self.decision.positive not in self.classes:
            raise PipelineError(f"decision: positive class {self.decision.positive!r} is not one of the classes")

    @property
    def outputs(self) -> tuple[str, ...]:
        """What the model's output columns are: the class names, or a regression model's target names."""
        return self.targets or self.classes

    def _check_outputs(self) -> None:
        what, names = ("targets", self.targets) if self.targets else ("classes", self.classes)
        if not names or not all(isinstance(c, str) and c and _utf8(c) for c in names) or len(set(names)) != len(names):
            raise PipelineError(f"{what} must be a non-empty list of distinct names, not {list(names)!r}")
        if len(names) != self.head_layer.out_features:
            noun = "target" if self.targets else "class"
            raise PipelineError(f"{len(names)} {noun} names for a head with {self.head_layer.out_features} outputs")
        if self.targets and (self.classes or self.decision is not None):
            raise PipelineError("a regression model (targets) has no classes and no decision threshold")
        valid = all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in self.thresholds)
        if self.thresholds and (len(self.thresholds) != len(self.classes) or self.decision is not None or not valid):
            raise PipelineError(
                f"a multi-label model needs one threshold in [0, 1] per label ({len(self.classes)}) and no "
                f"decision, not {list(self.thresholds)!r}"
            )

    @property
    def multilabel(self) -> bool:
        return bool(self.thresholds)

    def identity(self) -> dict[str, Any]:
        """The facts that must agree between MODEL.json and the tensors file (class names may be edited; a
        regression model's task and target names may not: they say what each output is)."""
        regress = {"task": "regress", "targets": list(self.targets)} if self.targets else {}
        if self.thresholds:
            regress = {"task": "multilabel", "labels": list(self.classes)}
        layers = {"layers": list(self.layers)} if self.layers else {}  # no layers: no entry, as before
        plain = {
            "backbone": self.backbone,
            "classifier_path": self.classifier_path,
            "preprocessing": self.preprocessing.as_dict(),
            "head_layer": self.head_layer.as_dict(),
        }
        return plain | regress | layers

    def backbone_record(self) -> BackboneRecord:
        """The backbone this model is built on, as :func:`rebuild_backbone` takes it: the bare architecture (the
        tensors are loaded into it), at the recorded crop, traced to the recorded layers, as wide as the head."""
        return BackboneRecord(self.backbone, self.preprocessing, feature_dim=self.head_layer.in_features,
                              layers=self.layers, classifier_path=self.classifier_path)  # fmt: skip

    @property
    def head_path(self) -> str:
        """Where the head's layer sits in the model (its tensors are named ``<head_path>.*``)."""
        return LAYERS_HEAD if self.layers else self.classifier_path

    @classmethod
    def from_dict(cls, d: Any) -> ExportMeta:
        """MODEL.json, checked field by field; anything wrong is a one-line :class:`PipelineError`."""
        if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT:
            raise PipelineError("not written by `pipeline export` (no 'format' entry)")
        if d.get("format_version") != EXPORT_VERSION:
            raise PipelineError(
                f"written by another version of `pipeline export` (format_version {d.get('format_version')!r}, "
                f"this one reads {EXPORT_VERSION}); export the head again"
            )
        names = _output_names_key(d)
        missing = [k for k in (names, "preprocessing", "backbone", "classifier_path", "head_layer") if k not in d]
        if missing:
            raise PipelineError(f"no {', '.join(missing)} entry")
        if not isinstance(d[names], list) or not isinstance(d["head_layer"], dict):
            raise PipelineError(f"{names} must be a list and head_layer a mapping")
        try:
            layer = HeadLayer.from_dict(d["head_layer"])
        except TypeError as e:
            raise PipelineError(f"head_layer: {e}") from None
        pre = Preprocessing.from_dict(d["preprocessing"])
        decision = Decision.from_dict(d.get("decision"))
        layers = d.get("layers")
        if layers is not None and not isinstance(layers, list):
            raise PipelineError(f"layers must be a list of node names, not {layers!r}")
        layers = None if layers is None else tuple(layers)
        files = d.get("files")
        if names == "labels":
            thresholds = d.get("thresholds")
            if not isinstance(thresholds, list) or not thresholds:
                raise PipelineError("a multi-label model needs a list of thresholds, one per label")
            return cls(tuple(d["labels"]), pre, d["backbone"], d["classifier_path"], layer, decision,
                       layers=layers, files=files, thresholds=tuple(thresholds))  # fmt: skip
        if names == "targets":
            classes = tuple(d.get("classes") or ())  # none: a file that also names classes is refused
            return cls(classes, pre, d["backbone"], d["classifier_path"], layer, decision, tuple(d["targets"]),
                       layers=layers, files=files)  # fmt: skip
        return cls(tuple(d["classes"]), pre, d["backbone"], d["classifier_path"], layer, decision, layers=layers,
                   files=files)  # fmt: skip


def _output_names_key(d: dict[str, Any]) -> str:
    """Which MODEL.json entry names the outputs: ``classes``, ``targets`` where ``task`` is "regress", ``labels``
    where it is "multilabel"."""
    task = d.get("task", "classify")  # classification MODEL.json files have no "task" entry
    if task not in ("classify", "regress", "multilabel"):
        raise PipelineError(f"task must be 'classify' or 'regress' (or 'multilabel'), not {task!r}")
    return {"regress": "targets", "multilabel": "labels"}.get(task, "classes")


def read_export_meta(path: Path) -> ExportMeta:
    """The one reader of MODEL.json."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested beyond Python's stack
        raise PipelineError(f"cannot read {path.name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    try:
        return ExportMeta.from_dict(d)
    except PipelineError as e:
        raise PipelineError(f"{path.name}: {e}") from None


def _meta(config: dict[str, Any], head: Head, layer: nn.Module, backbone: Backbone, out: Path) -> dict[str, Any]:
    """The one writer of MODEL.json: :class:`ExportMeta`'s fields plus what produced the model."""
    meta = _export_meta(config, head, layer, backbone)
    family = family_of(backbone.name)
    linear = meta.head_layer.type == "linear"
    loads_into = (
        _layers_loads_into(backbone, meta)
        if meta.layers
        else _loads_into(backbone, head=head.name, classes=len(meta.outputs), linear=linear)
    )
    d = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "program": out.name,
        "tensors": sidecar_paths(out)[0].name,
        "classes": list(meta.classes),
        **meta.identity(),
        "decision": None if meta.decision is None else vars(meta.decision),  # None: argmax
        "input": "float32 (N, 3, crop, crop): resize shorter side, centre crop, /255, normalise with mean/std",
        "weights": backbone.weights,
        "head": head.name,
        "head_config": config.get("head_config"),
        "features_fingerprint": config.get("features_fingerprint"),
        "state_dict_loads_into": loads_into,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, **family.versions()},
    }
    if meta.multilabel:
        return _multilabel_entries(d, meta)
    return _regression_entries(d, meta) if meta.targets else d


def _export_meta(config: dict[str, Any], head: Head, layer: nn.Module, backbone: Backbone) -> ExportMeta:
    """MODEL.json's record from the head's config.json: its task's entries (a classifier's classes and decision,
    a regression head's targets: what the task's ``config_record`` wrote) and the layer."""
    layers = tuple(e["name"] for e in backbone.layers) if backbone.layers else None  # the traced pooled layers
    targets = config.get("targets", []) if head.regress else []
    if not isinstance(targets, list) or (head.regress and not targets):
        raise PipelineError("the regression head's config.json has no list of targets; train it again")
    classes = () if targets else tuple(config["classes"])
    thresholds = tuple(config.get("thresholds") or ()) if head.cfg.task == "multilabel" else ()
    if head.cfg.task == "multilabel" and not thresholds:
        raise PipelineError("the multi-label head's config.json has no thresholds; train it again")
    return ExportMeta(classes, backbone.preprocess, backbone.name, backbone.classifier_path, HeadLayer.of(head, layer),
                      Decision.from_dict(config.get("decision")), targets=tuple(targets), layers=layers,
                      thresholds=thresholds)  # fmt: skip


def _multilabel_entries(d: dict[str, Any], meta: ExportMeta) -> dict[str, Any]:
    """A multi-label model's MODEL.json: ``labels`` (in its identity) and their ``thresholds`` in place of classes
    and a decision."""
    out = {k: v for k, v in d.items() if k not in ("classes", "decision")}
    n = len(meta.classes)
    return out | {
        "thresholds": list(meta.thresholds),
        "output": f"float32 (N, {n}): one logit per label; sigmoid gives its probability, the label is decided where "
        "that probability is at least its threshold",
    }


def _regression_entries(d: dict[str, Any], meta: ExportMeta) -> dict[str, Any]:
    """A regression model's MODEL.json: no classes and no decision; its identity already says the task and the
    target names, and "output" says what the numbers are."""
    out = {k: v for k, v in d.items() if k not in ("classes", "decision")}
    n = len(meta.targets)
    return out | {"output": f"float32 (N, {n}): the predicted targets in their own units, in the order of targets"}


def _loads_into(backbone: Backbone, *, head: str, classes: int, linear: bool) -> str:
    """MODEL.json's note on which plain model MODEL.safetensors loads into (for other tools)."""
    family = family_of(backbone.name)
    if linear:
        return family.constructor(backbone, num_classes=classes)
    return (
        f"{family.constructor(backbone, num_classes=None)} with {backbone.classifier_path} replaced by the "
        f"{head} head's nn.Sequential (head_layer)"
    )


def _layers_loads_into(backbone: Backbone, meta: ExportMeta) -> str:
    """MODEL.json's note for a head on pooled layers: no plain model has that shape, so say how it is built."""
    family = family_of(backbone.name)
    return (
        f"{family.constructor(backbone, num_classes=None)} traced with {family.tracer} "
        f"create_feature_extractor(return_nodes={list(meta.layers)}) as {LAYERS_BODY}.body, each node's "
        f"output averaged over its spatial positions (or tokens) and concatenated in that order, then the "
        f"{meta.head_layer.type} head's layer as {LAYERS_HEAD} (pipeline.deploy.export.classifier_model)"
    )


# ------------------------------------------------------------------------------------------ the model


def check_layers(layers: Any) -> None:
    """``layers`` is None or a non-empty tuple of distinct node names (MODEL.json's ``layers``)."""
    ok = layers is None or (
        isinstance(layers, tuple)
        and bool(layers)
        and all(isinstance(n, str) and n.strip() == n and n for n in layers)
        and len(set(layers)) == len(layers)
    )
    if not ok:
        shown = list(layers) if isinstance(layers, tuple) else layers
        raise PipelineError(f"layers must be a non-empty list of distinct node names, not {shown!r}")


def layer_names(config: dict[str, Any]) -> list[str] | None:
    """The pooled layers a head takes, in the order of its input, from its config.json: for ``train-head --layer
    NAME`` that one, for ``all`` the file's layers in file order (``layers`` records them as the head saw them);
    None for a head on the classifier's input (a file made without ``--layers``)."""
    layers, layer = config.get("layers"), config.get("layer")
    if not layers:
        return None
    names = [e.get("name") if isinstance(e, dict) else None for e in layers] if isinstance(layers, list) else [None]
    if not all(isinstance(n, str) and n for n in names):
        raise PipelineError(f"the head's config.json has a damaged 'layers' entry: {json.dumps(layers)[:120]}")
    if layer not in (None, ALL_LAYERS) and names != [layer]:
        raise PipelineError(f"the head's config.json says layer {layer!r} but layers {names}; train it again")
    return names


def classifier_model(backbone: Backbone, layer: nn.Module) -> nn.Module:
    """The classifier export writes and predict rebuilds: ``layer`` (a head's ``as_module()``) where the backbone's
    classifier sat; or, for a backbone on pooled layers (:func:`with_outputs`), the traced backbone as
    ``backbone`` followed by ``layer`` as ``head``. In ``eval()`` mode with gradients off."""
    if not backbone.layers:
        return attach_head(backbone.model, backbone.classifier_path, layer)
    model = nn.Sequential(OrderedDict([(LAYERS_BODY, backbone.model), (LAYERS_HEAD, layer)]))
    return model.eval().requires_grad_(False)


def _head_record(config: dict[str, Any], *, layers: list[str] | None) -> BackboneRecord:
    """The backbone a head was trained on, from its config.json (which repeats the feature file's record); with
    ``layers``, the pooled nodes it took, as wide as recorded."""
    name = config.get("backbone")
    pre = config.get("preprocessing") or {}
    if not isinstance(name, str) or not is_known_backbone(name) or "crop_size" not in pre:
        raise PipelineError("this head was not trained on features from `pipeline extract`; nothing to export")
    dims = tuple(int(e.get("dim", 0)) for e in config["layers"]) if layers else None
    return BackboneRecord(
        name,
        Preprocessing.from_dict(pre),
        weights=str(config.get("weights") or ""),
        weights_source=(config.get("extract_config") or {}).get("weights"),
        feature_dim=int(config["feature_dim"]),
        layers=tuple(layers) if layers else None,
        layer_dims=dims,
    )


def attach_head(model: nn.Module, classifier_path: str, layer: nn.Module) -> nn.Module:
    """``model`` with ``layer`` (a head's ``as_module()``) where its original classifier sat (``fc``,
    ``classifier.1``, ...), in ``eval()`` mode with gradients off."""
    model.set_submodule(classifier_path, layer)
    return model.eval().requires_grad_(False)


def non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


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


def _save_tensors(model: nn.Module, path: Path, identity: dict[str, Any]) -> None:
    write_safetensors(path, model.state_dict(), metadata={IDENTITY_KEY: json.dumps(identity, sort_keys=True)})


def _save_program(program: Any, path: Path) -> None:
    """``torch.export.save``, whose failures to write (a read-only or full filesystem) are RuntimeErrors: made
    OSErrors, so ``atomic_write`` reports them in one line naming the file."""
    try:
        torch.export.save(program, path)
    except RuntimeError as e:
        raise OSError(errno.EIO, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None


def export_model(head_dir: Path | str, out: Path | str) -> ExportResult:
    """Write ``out`` (a ``.pt2`` program) with its ``.safetensors`` tensors and ``.json`` metadata beside it."""
    out = Path(out)
    if out.suffix != PROGRAM_SUFFIX:
        raise PipelineError(
            f"--out must end in {PROGRAM_SUFFIX} (the .safetensors and .json are written beside it), not {out}"
        )
    head, config = load_head(Path(head_dir))
    layer = head.as_module()  # first: a head that cannot be a layer (knn) is refused before the backbone is built
    bad = non_finite(layer.state_dict())
    if bad is not None:
        raise PipelineError(f"the head in {head_dir} has NaN or infinite values (in {bad}); train it again")
    # pooled inner layers (extract --layers): the backbone is traced to compute them. Not for the tail head, which
    # takes the activations and ends where the classifier sat whatever else the file stored
    layers = None if head.inputs == "activations" else layer_names(config)
    backbone = rebuild_backbone(_head_record(config, layers=layers))
    if head.inputs == "activations":  # the tail head: its trained blocks go back into the backbone, by name
        put_back(backbone.model, head.backbone_state())
    meta = _meta(config, head, layer, backbone, out)
    model = classifier_model(backbone, layer)
    bad = non_finite(model.state_dict())
    if bad is not None:
        raise PipelineError(f"the backbone's weights have NaN or infinite values (in {bad}); nothing exported")
    crop = backbone.preprocess.crop_size
    program = _export_program(model, crop)
    diff = _check_program(program, model, crop)
    tensors_path, meta_path = sidecar_paths(out)
    identity = ExportMeta.from_dict(meta).identity()
    # One unit in three files: MODEL.json goes last and records the sha256 of the other two, so after a kill between
    # them the files of two exports are refused on load (predict), never run together.
    atomic_write(out, lambda p: _save_program(program, p))
    atomic_write(tensors_path, lambda p: _save_tensors(model, p, identity))
    write_json(meta_path, {**meta, "files": digests({"program": out, "tensors": tensors_path})})
    targets = meta.get("targets", [])
    return ExportResult(out, tensors_path, meta_path, [] if targets else list(config["classes"]), diff, targets=targets)
