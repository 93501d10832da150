"""timm backbones (``--backbone timm:NAME``): the model built with ``num_classes=0`` (features = its pooled
pre-logits) and the preprocessing of its own data config, as a :class:`~pipeline.stage1.families.Backbone`;
:class:`TimmFamily` is its entry in :data:`pipeline.stage1.backbones.BACKBONE_FAMILIES`.

timm is optional (``pip install -e '.[timm]'``) and imported only here, inside the functions that need it.

Weights (``--weights``):
    pretrained   the model's pretrained weights: the tag in ``NAME.TAG`` (e.g. ``timm:convnext_tiny.fb_in1k``), else
                 timm's default tag. The default ``IMAGENET1K_V1`` and ``DEFAULT`` mean the same for a timm name.
                 Read from the Hugging Face cache when the file is there (no network at all); otherwise downloaded
                 through timm unless ``HF_HUB_OFFLINE`` is set; a failure is one line saying how to get the file.
    none         random initialisation seeded with ``--seed``.
    PATH         a ``.safetensors`` file, or a torch state_dict read with ``weights_only=True`` (never unpickled).
The feature file records which: ``timm:ARCH.TAG``, ``none(seed=S)`` or ``file:<sha256>`` (:class:`WeightsIdentity`).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
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

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"  # --backbone timm:NAME

# --weights values that mean "the model's pretrained weights" for a timm name (the torchvision default included, so
# `--backbone timm:NAME` alone loads what timm would)
PRETRAINED_WORDS = ("pretrained", "default", "imagenet1k_v1")
INSTALL_HINT = "pip install -e '.[timm]'"


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PipelineError(f"timm:NAME needs timm: {INSTALL_HINT}") from None
    return timm


def _model_name(name: str) -> str:
    """``timm:ARCH[.TAG]`` -> ``ARCH[.TAG]``, checked against timm's registry (close names suggested)."""
    timm = _import_timm()
    arch_tag = name.removeprefix(TIMM_PREFIX)
    arch, tag = timm.models.split_model_name_tag(arch_tag)
    if not arch or not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:6] or difflib.get_close_matches(arch, timm.list_models(), n=6)
        hint = f"; close names: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
        raise PipelineError(f"unknown timm model {arch!r}{hint} (timm.list_models() has them all)")
    if tag:
        try:
            timm.models.get_pretrained_cfg(arch_tag)
        except RuntimeError:
            tags = [TIMM_PREFIX + n for n in timm.list_pretrained(f"{arch}.*")][:8]
            raise PipelineError(f"timm has no tag {tag!r} for {arch}; choose one of: {', '.join(tags)}") from None
    return arch_tag


def _create(model_name: str, **kwargs: Any) -> nn.Module:
    timm = _import_timm()
    return timm.create_model(model_name, num_classes=0, **kwargs)


def _classifier_path(model: nn.Module, name: str) -> str:
    """Where the classifier sat (now ``nn.Identity``: ``num_classes=0``): the model's ``pretrained_cfg['classifier']``,
    e.g. ``head`` (ViT) or ``head.fc`` (ConvNeXt). Export puts the trained head there."""
    path = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not isinstance(path, str):  # e.g. DeiT distilled: ("head", "head_dist"), two heads averaged
        raise PipelineError(f"{name} has no single classifier layer (its config names {path!r}); not supported")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise PipelineError(f"{name}'s classifier {path!r} is not a module of the model") from None
    if not isinstance(module, nn.Identity):
        raise PipelineError(f"{name}'s classifier {path!r} is a {type(module).__name__}, not removed by num_classes=0")
    return path


def _default_size(model: nn.Module) -> tuple[int, int]:
    timm = _import_timm()
    _, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    return int(height), int(width)


def _fit_input_size(model: nn.Module, crop: int) -> None:
    """Models with a fixed input size (ViTs: position embeddings) are resized to ``crop`` (timm's
    ``set_input_size`` resamples the position embeddings); convolutional ones take any size as they are."""
    if _default_size(model) != (crop, crop) and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(crop, crop))


def preprocessing_of(model: nn.Module, name: str, *, image_size: int | None, resize: str) -> Preprocessing:
    """The model's data config as a :class:`Preprocessing`, as timm's eval transform does it: shorter side to
    ``floor(crop / crop_pct)``, centre crop, its interpolation, mean and std. ``image_size`` replaces the crop
    size (the resize follows from ``crop_pct``). timm's ``squash`` and ``border`` crop modes have no twin here: the
    centre-crop recipe is used (``--resize full`` resizes the whole image instead), and a warning says so."""
    timm = _import_timm()
    cfg = timm.data.resolve_model_data_config(model)
    channels, height, width = cfg["input_size"]
    if channels != 3 or len(cfg["mean"]) != 3 or len(cfg["std"]) != 3:
        raise PipelineError(f"{name} takes {channels}-channel images; this pipeline feeds RGB (3 channels)")
    if height != width and image_size is None:
        raise PipelineError(f"{name} expects {height} x {width} images; pass --image-size N for a square input")
    crop = image_size or int(height)
    crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        log.warning("%s's data config asks crop_mode=%r; using the centre-crop recipe (--resize %s)", name, mode,
                    resize)  # fmt: skip
    return Preprocessing(
        resize_size=max(math.floor(crop / crop_pct), crop),  # crop_pct > 1 (none in timm today) would pad: not here
        crop_size=crop,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg["interpolation"]),
        resize=resize,
    )


# ------------------------------------------------------------------------------------------ pretrained weights


def _cached_weights(cfg: dict[str, Any]) -> Path | None:
    """The pretrained file of ``cfg`` if a previous download left it in the Hugging Face (or torch hub) cache."""
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if candidate.is_file():
            return candidate
    return None


def pretrained_tags(name: str) -> list[tuple[str, bool]]:
    """``(timm:ARCH.TAG, cached)`` for every pretrained tag timm has for ``name``'s architecture, in timm's order
    (the first is its default); ``cached``: a previous download left the file here, so it loads offline."""
    timm = _import_timm()
    arch, _ = timm.models.split_model_name_tag(_model_name(name))
    tags = []
    for model_name in timm.list_pretrained(f"{arch}.*"):
        cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
        tags.append((TIMM_PREFIX + model_name, _cached_weights(cfg) is not None))
    return tags


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, also when set after it was imported (it reads it once)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _download_message(name: str, cfg: dict[str, Any], err: str) -> str:
    """The offline message, shaped as torchvision's: where to put the file, or ``--weights PATH``."""
    from huggingface_hub import constants

    if cfg.get("hf_hub_id"):
        repo = str(cfg["hf_hub_id"]).partition("@")[0]
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        where = f"run `hf download {repo}` on a machine with a network and copy its {folder} to the same place here"
    else:
        where = f"put {cfg.get('url')} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
    return f"cannot get {name} pretrained weights ({err}); offline? {where}, or pass --weights PATH to a local file"


def _pretrained(name: str, model_name: str) -> tuple[nn.Module, WeightsIdentity]:
    """The model with its pretrained weights, read from the cache when present (no network), else downloaded."""
    timm = _import_timm()
    cfg = timm.models.get_pretrained_cfg(model_name).to_dict()
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise PipelineError(f"{name} has no pretrained weights in timm; pass --weights none or --weights PATH")
    cached = _cached_weights(cfg)
    if cached is None and _offline():
        raise PipelineError(_download_message(name, cfg, "not in the cache and HF_HUB_OFFLINE is set"))
    overlay = {"file": str(cached)} if cached is not None else None
    if cached is None:
        log.info("downloading %s weights (set HF_HUB_OFFLINE=1 to fail at once without a network)", name)
    try:
        model = _create(model_name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:  # noqa: BLE001 - network, hub and file errors come in many types; the first line says why
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        raise PipelineError(_download_message(name, cfg, reason)) from None
    pcfg = model.pretrained_cfg
    tag = f"{pcfg.get('architecture')}.{pcfg['tag']}" if pcfg.get("tag") else str(pcfg.get("architecture"))
    return model, WeightsIdentity("timm", tag)


# ------------------------------------------------------------------------------------------ the family


class TimmFamily(BackboneFamily):
    """timm models, named ``timm:ARCH[.TAG]``: built with ``num_classes=0`` (features = the pooled pre-logits), the
    preprocessing from the model's own data config; timm imported only when one is built."""

    key = "timm"
    prefix = TIMM_PREFIX
    tracer = "timm's"

    def names(self) -> list[str]:
        return [TIMM_PREFIX + "NAME"]

    def listing(self) -> list[tuple[str, str]]:
        return [(TIMM_PREFIX + "NAME", f"any timm model, e.g. timm:convnext_atto.d2_in1k (needs {INSTALL_HINT})")]

    def weights_choices(self, name: str) -> list[tuple[str, str]]:
        rows = [(f"pretrained (--backbone {tag})", "cached, works offline" if cached else "downloaded on first use")
                for tag, cached in pretrained_tags(name)]  # fmt: skip
        return rows or [("pretrained", "timm has no pretrained weights for this model")]

    def build(self, name: str, *, weights: str, image_size: int | None, seed: int, resize: str) -> Backbone:
        """``weights``: ``pretrained`` (also ``DEFAULT`` and the default ``IMAGENET1K_V1``), ``none`` or a file
        path; see the module docstring. Weights are loaded at the model's own input size, then the model is fitted
        to the crop."""
        model_name = _model_name(name)
        built = unpretrained(weights, seed, lambda: _create(model_name, pretrained=False))
        if built is not None:
            model, identity, path = built
            if path is not None:
                load_state_file(model, path, _classifier_path(model, name))
        elif weights.lower() in PRETRAINED_WORDS:
            model, identity = _pretrained(name, model_name)
        else:
            raise PipelineError(
                f"unknown weights {weights!r} for {name}; choose one of: pretrained, none, or a file path"
            )
        classifier_path = _classifier_path(model, name)
        pre = preprocessing_of(model, name, image_size=image_size, resize=resize)
        _fit_input_size(model, pre.crop_size)
        return frozen(model, preprocess=pre, name=name, weights=str(identity), classifier_path=classifier_path)

    def architecture(self, name: str, *, crop_size: int, seed: int = 0) -> tuple[nn.Module, str]:
        model_name = _model_name(name)
        with seeded(seed):
            model = _create(model_name, pretrained=False)
            _fit_input_size(model, crop_size)
        return model, _classifier_path(model, name)

    def constructor(self, backbone: Backbone, *, num_classes: int | None) -> str:
        sized = hasattr(backbone.model, "set_input_size")  # a fixed input size (ViTs): built at the crop size
        size = f", img_size={backbone.preprocess.crop_size}" if sized else ""
        return f"timm.create_model({backbone.name.removeprefix(TIMM_PREFIX)!r}{size}, num_classes={num_classes or 0})"

    def versions(self) -> dict[str, str]:
        return {"timm": _import_timm().__version__}
