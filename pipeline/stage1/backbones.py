"""Frozen torchvision backbones: ``load_backbone`` returns the model and its preprocessing together."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.errors import PipelineError
from pipeline.stage1.config import RESIZE_MODES
from pipeline.store import WeightsIdentity

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision names the final classifier differently per family; the first attribute found is replaced.
CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


TIMM_PREFIX = "timm:"  # --backbone timm:NAME: a timm model (pipeline.stage1.timm_models)


@dataclass(frozen=True)
class Preprocessing:
    """Resize -> centre crop -> scale to [0, 1] -> normalise. Recorded in every feature file.

    ``resize="crop"`` is the weights' recipe: the shorter side to ``resize_size``, then the centre ``crop_size``
    square. ``resize="full"`` resizes the whole image straight to ``crop_size`` x ``crop_size`` and crops nothing
    (``resize_size`` is unused): what reference recipes for low-resolution data do (CIFAR's ``Resize((224, 224))``),
    where a crop would cut 12% of each side of an image that was never larger than its object.
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.crop_size < 1 or self.resize_size < self.crop_size:
            raise PipelineError(f"bad preprocessing sizes: resize {self.resize_size}, crop {self.crop_size}")
        if self.resize not in RESIZE_MODES:
            raise PipelineError(f"unknown resize mode {self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")

    def as_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.resize == "crop":  # absent = the recipe every file had before the option: their fingerprints hold
            del d["resize"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def with_crop(self, crop_size: int) -> Preprocessing:
        """Same recipe at another crop size, keeping the resize/crop ratio (256/224 for ImageNet)."""
        return replace(self, resize_size=round(crop_size * self.resize_size / self.crop_size), crop_size=crop_size)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image after the resize, before the crop. ``crop``: torchvision's
        ``Resize(resize_size)`` rule (shorter side to ``resize_size``, the longer one scaled and truncated)."""
        if self.resize == "full":
            return self.crop_size, self.crop_size
        short, long = sorted((height, width))
        new_long = int(self.resize_size * long / short)
        return (self.resize_size, new_long) if height <= width else (new_long, self.resize_size)

    def geometry(self, img: Any) -> torch.Tensor:
        """PIL image (or uint8 CHW tensor) -> uint8 CHW tensor, resized and cropped. Runs in loader workers."""
        _, height, width = TF.get_dimensions(img)
        interp = InterpolationMode(self.interpolation)
        img = TF.resize(img, list(self.resized_size(height, width)), interpolation=interp, antialias=True)
        img = TF.center_crop(img, [self.crop_size, self.crop_size])
        return img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img)

    def geometry_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (or NHW greyscale) batch -> uint8 NCHW, resized and cropped where it sits (CPU or GPU).

        The device-side twin of :meth:`geometry` for datasets held in memory as arrays, equal to it pixel for
        pixel: PIL's resize as two matrix products (see :func:`pil_resample_matrix`), the crop folded into the
        matrices. Greyscale is resized once and repeated to RGB, as PIL's ``convert("RGB")`` gives three equal
        channels that it resizes alike.
        """
        x = batch.unsqueeze(1) if batch.ndim == 3 else batch
        channels, height, width = x.shape[1:]
        out_h, out_w = self.resized_size(height, width)
        top, left = _crop_offset(out_h, self.crop_size), _crop_offset(out_w, self.crop_size)
        if self.interpolation not in PIL_FILTERS:  # nearest: no PIL twin here; torch's resize, to rounding
            interp = InterpolationMode(self.interpolation)
            y = TF.resize(x.float(), [out_h, out_w], interpolation=interp, antialias=True)
            y = TF.center_crop(y, [self.crop_size, self.crop_size]).round_().clamp_(0, 255).to(torch.uint8)
        else:
            rows = _resample_matrix(height, out_h, top, self.crop_size, self.interpolation, x.device)
            cols = _resample_matrix(width, out_w, left, self.crop_size, self.interpolation, x.device)
            y = x.to(rows.dtype)
            if _vertical_first(height, width, out_h, out_w):  # Pillow's order: it sets the rounding between passes
                y = _pil_pass(_pil_pass(y.transpose(-1, -2), rows).transpose(-1, -2), cols)
            else:
                y = _pil_pass(_pil_pass(y, cols).transpose(-1, -2), rows).transpose(-1, -2)
            y = y.to(torch.uint8)
        return y.expand(-1, 3, -1, -1) if channels == 1 else y

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch -> float normalised batch in ``channels_last`` (the layout the backbones run in).
        Runs on the device, after the (4x smaller) uint8 copy. One conversion into the new layout and two in-place
        ops: the same values as ``(x.float() - mean) / std`` then ``.contiguous(channels_last)``, 40% faster on CPU
        (6.6 against 10.7 ms for 64 x 3 x 96 x 96)."""
        mean, std = _scaled_mean_std(self.mean, self.std, batch.device)
        x = batch.to(torch.float32, memory_format=torch.channels_last, copy=True)  # a copy even if already float
        return x.sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _scaled_mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean*255 and std*255 as (1, C, 1, 1) tensors on ``device``, made once: building them per batch is a blocking
    host-to-device copy, which on CUDA makes the CPU wait for every queued batch (one synchronisation per batch)."""
    to = functools.partial(torch.tensor, device=device, dtype=torch.float32)
    return to(mean).view(1, -1, 1, 1) * 255, to(std).view(1, -1, 1, 1) * 255


# ------------------------------------------------------------------------------------------ PIL's resize on tensors
# Pillow's libImaging/Resample.c, what torchvision's PIL path runs: a separable filter whose support widens with the
# downscale factor (the antialiasing), coefficients normalised per output pixel and rounded to 22-bit fixed point,
# then a horizontal pass and a vertical one, each rounded half up to an integer level and clipped to 0..255.
PRECISION_BITS = 32 - 8 - 2
_ONE = float(1 << PRECISION_BITS)
_F32_054, _F32_046 = (float(np.float32(v)) for v in (0.54, 0.46))  # Resample.c writes them as 0.54f, 0.46f
# Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by more than twice
# what the width does; earlier versions always start with the horizontal one. The order changes the rounding.
_PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# interpolation name (torchvision's InterpolationMode value) -> (support, kernel), as in Resample.c
PIL_FILTERS: dict[str, tuple[float, Callable[[float], float]]] = {
    "box": (0.5, _box),
    "bilinear": (1.0, _bilinear),
    "hamming": (1.0, _hamming),
    "bicubic": (2.0, _bicubic),
    "lanczos": (3.0, _lanczos),
}


def pil_resample_matrix(in_size: int, out_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Pillow's fixed-point coefficients for resizing one axis, as an ``(out_size, in_size)`` integer matrix:
    output ``i`` of a pass is ``(sum_j m[i, j] * x[j] + 2**21) >> 22`` clipped to 0..255.

    Follows ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` operation for operation (same double arithmetic,
    C's truncating casts), so the integers are Pillow's own.
    """
    support, kernel = PIL_FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    ss = 1.0 / filterscale
    m = np.zeros((out_size, in_size), np.int64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [kernel((j - center + 0.5) * ss) for j in range(lo, hi)]
        total = 0.0
        for v in w:  # summed in Pillow's order: the normalisation must round alike
            total += v
        for j, v in zip(range(lo, hi), w, strict=True):
            k = v / total if total != 0.0 else v
            m[i, j] = int(k * _ONE - 0.5) if k < 0 else int(k * _ONE + 0.5)
    return m


@functools.lru_cache(maxsize=64)
def _resample_matrix(
    in_size: int, out_size: int, start: int, count: int, interpolation: str, device: torch.device
) -> torch.Tensor:
    """Rows ``start:start+count`` of :func:`pil_resample_matrix` (the crop folded in), on ``device``, cached.

    float64 holds every product and sum of uint8 levels and 22-bit coefficients exactly (< 2**31), whatever the
    summation order or TF32 setting, so the passes are exact on CPU and CUDA. MPS has no float64: float32 there,
    which may move a level by one where a sum falls within ~1e-5 of a rounding boundary.
    """
    m = pil_resample_matrix(in_size, out_size, interpolation)[start : start + count]
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.from_numpy(m).to(device=device, dtype=dtype)


def _pil_pass(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Resample the last axis of ``x`` with coefficient rows ``m``: fixed-point sums, rounded half up, clipped."""
    return torch.matmul(x, m.T).add_(_ONE / 2).div_(_ONE).floor_().clamp_(0, 255)


def _vertical_first(height: int, width: int, out_h: int, out_w: int) -> bool:
    """Whether Pillow resizes ``height x width`` to ``out_h x out_w`` with the vertical pass first."""
    shrink_h = height - out_h
    return _PILLOW_VERTICAL_FIRST and shrink_h > 0 and shrink_h > 2 * (width - out_w)


def _crop_offset(size: int, crop: int) -> int:
    return int(round((size - crop) / 2.0))  # torchvision's center_crop rounding


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


def available_backbones() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _check_name(name: str) -> None:
    names = available_backbones()
    if name not in names:
        raise PipelineError(f"unknown backbone {name!r}; choose one of: {', '.join(names)}, or timm:NAME")


def is_known_backbone(name: str) -> bool:
    """A torchvision model name or a ``timm:NAME`` (checked against timm's registry when it is built)."""
    return name.startswith(TIMM_PREFIX) or name in available_backbones()


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_state_file(path: Path) -> Any:
    """A ``.safetensors`` file (tensors only), else ``torch.load`` with ``weights_only=True``: never unpickled."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_file(model: nn.Module, path: Path, classifier_path: str) -> None:
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


def _resolve_torchvision_weights(name: str, weights: str) -> Any:
    enum = torchvision.models.get_model_weights(name)
    choices = list(enum.__members__)
    key = weights.upper()
    if key not in choices:
        raise PipelineError(
            f"unknown weights {weights!r} for {name}; choose one of: {', '.join(choices)}, none, or a file path"
        )
    return enum[key]


def _download_message(name: str, w: Any, err: Exception) -> str:
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    return (
        f"cannot download {name} weights {w} ({type(err).__name__}); offline? Put {w.url} at {target}, "
        f"or pass --weights PATH to a local state_dict file"
    )


def looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")) or Path(weights).exists()


def load_backbone(
    name: str = "resnet18",
    *,
    weights: str = "IMAGENET1K_V1",
    image_size: int | None = None,
    seed: int = 0,
    resize: str = "crop",
) -> Backbone:
    """Build a frozen feature extractor and its preprocessing.

    ``weights`` is a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``, ...), ``none`` (random init
    seeded with ``seed``, so two processes get the same model) or a path to a local state_dict (``.safetensors`` or
    a torch file read with ``weights_only=True``). The final
    classifier becomes ``nn.Identity``; the model is in ``eval()`` mode with gradients off. ``resize``: see
    :class:`Preprocessing` (``crop`` = the weights' recipe, ``full`` = the whole image to the crop size).
    ``timm:NAME`` builds a timm model instead (:func:`pipeline.stage1.timm_models.load_timm`).
    """
    if name.startswith(TIMM_PREFIX):
        from pipeline.stage1.timm_models import load_timm  # timm is optional: imported only for timm names

        return load_timm(name, weights=weights, image_size=image_size, seed=seed, resize=resize)
    _check_name(name)
    pre = Preprocessing()
    if weights.lower() == "none":
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = torchvision.models.get_model(name, weights=None)
        identity = WeightsIdentity("none", str(seed))
    elif looks_like_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise PipelineError(f"weights file not found: {path}")
        model = torchvision.models.get_model(name, weights=None)
        identity = WeightsIdentity("file", file_sha256(path))
    else:
        w = _resolve_torchvision_weights(name, weights)
        try:
            model = torchvision.models.get_model(name, weights=w)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated download a RuntimeError
            raise PipelineError(_download_message(name, w, e)) from None
        t = w.transforms()
        pre = Preprocessing(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=t.interpolation.value,
        )
        identity = WeightsIdentity("torchvision", str(w))  # DEFAULT resolves to a concrete version
    classifier_path = strip_classifier(model)
    if identity.kind == "file":
        load_state_file(model, Path(weights), classifier_path)
    if image_size is not None:
        pre = pre.with_crop(image_size)
    pre = replace(pre, resize=resize)
    model.eval().requires_grad_(False)
    feature_dim = probe_dim(model, pre.crop_size, name)
    return Backbone(model, pre, name, str(identity), feature_dim, classifier_path)


@torch.inference_mode()
def probe_dim(model: nn.Module, size: int, name: str) -> int:
    try:
        out = model(torch.zeros(1, 3, size, size))
    except Exception as e:  # noqa: BLE001 - e.g. a ViT asked for another image size
        raise PipelineError(f"{name} cannot run at image size {size}: {str(e).splitlines()[0]}") from None
    return int(out.flatten(1).shape[1])


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
