"""The from-scratch baseline: the same architecture trained end to end from random initialisation, on the same
images as ``extract`` (same :func:`~pipeline.stage1.datasets.load_source`, split options and dataset identity).

It lives in stage two because it is what the two-stage result is compared against (``compare --baseline DIR``);
it shares stage one's data and preprocessing code, not its feature file.

Protocol: images resized and cropped once with the backbone's own :class:`Preprocessing` at ``--image-size``, held
as uint8; each batch gets a random crop (zero padding of 1/8 of the side) and a horizontal flip; AdamW with a cosine
schedule stepped per epoch. Resumable per epoch: ``checkpoint.pt`` (model, optimiser, scheduler, epoch, RNG states,
history) is written atomically after every epoch. Its key leaves out ``--epochs`` (and the device): a rerun with
more epochs continues the same run, the cosine then decays over the new total from where it stopped. A run
extended from E to E' epochs equals a fresh E'-epoch run exactly only when E = 1 (the first epoch's rate is the
base rate under any length); otherwise its first E epochs decayed faster. Any other change is refused unless
``--force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError, raise_if_stopped
from pipeline.fileio import atomic_write, write_json
from pipeline.stage1.backbones import Preprocessing, load_backbone
from pipeline.stage1.datasets import SourceOptions, Split  # noqa: F401 (SourceOptions: for importers)
from pipeline.stage1.sources import load_options
from pipeline.stage2 import plots
from pipeline.stage2.baseline_config import BaselineConfig
from pipeline.stage2.evaluate import HeadMetrics, classification_metrics, summarize
from pipeline.store.record import complete

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# Settings that do not change what is trained: a checkpoint made with other values of these is continued.
NOT_IN_KEY = ("epochs", "device", "out", "force")


# ------------------------------------------------------------------------------------------ data


@dataclass
class SplitImages:
    """A split's images as uint8 tensors: files decoded and resized once (``resized``); arrays held as they are
    (CIFAR at 224 px would be 7.5 GB resized) and resized per batch on the device, as ``extract`` does them."""

    data: torch.Tensor  # NCHW at the crop size when resized, else the raw NCHW / NHW arrays
    pre: Preprocessing
    resized: bool

    def __len__(self) -> int:
        return len(self.data)

    def take(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows ``idx`` as uint8 NCHW at the crop size on ``device``."""
        x = self.data[idx].to(device, non_blocking=True)
        return x if self.resized else self.pre.geometry_batch(x)


def split_images(split: Split, pre: Preprocessing) -> SplitImages:
    """A whole split, resized and cropped as ``extract`` does it (arrays on the batch path, files through PIL one
    by one). An unreadable image is a one-line error: the baseline must see extract's rows."""
    if split.arrays is not None:
        arrays = torch.from_numpy(np.ascontiguousarray(split.arrays))
        return SplitImages(arrays.permute(0, 3, 1, 2) if arrays.ndim == 4 else arrays, pre, resized=False)
    images = []
    for i in range(len(split)):
        try:
            images.append(pre.geometry(split.load(i)))
        except Exception as e:  # noqa: BLE001 - any decoding problem is the user's file
            raise PipelineError(f"cannot read {split.ids[i]}: {str(e).splitlines()[0]}") from None
    return SplitImages(torch.stack(images), pre, resized=True)


def augment(x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the side, CIFAR's 4 px at 32) and horizontal flip of a uint8 batch."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


# ------------------------------------------------------------------------------------------ model and state


def build_model(cfg: BaselineConfig, num_classes: int) -> tuple[nn.Module, Preprocessing]:
    """The backbone as ``extract --weights none --seed S`` builds it (same initialisation and preprocessing), with
    a seeded linear classifier in its classifier's place, every layer trainable."""
    backbone = load_backbone(cfg.backbone, weights="none", image_size=cfg.image_size, seed=cfg.seed, resize=cfg.resize)
    model = backbone.model
    *parents, last = backbone.classifier_path.split(".")
    owner = model
    for name in parents:
        owner = getattr(owner, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        setattr(owner, last, nn.Linear(backbone.feature_dim, num_classes))
    return model.requires_grad_(True), backbone.preprocess


def checkpoint_key(cfg: BaselineConfig, dataset_identity: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be continued: the settings that change training, and the images."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    return {"settings": settings, "dataset_identity": dataset_identity}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def default_out(cfg: BaselineConfig, dataset_name: str, crop_size: int) -> Path:
    name = f"{dataset_name}_{cfg.backbone.replace(':', '-')}_img{crop_size}" + (f"_n{cfg.limit}" if cfg.limit else "")
    return Path("artifacts") / "baselines" / name


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically: an interruption while writing leaves the previous epoch's checkpoint."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, *, digest: str, key: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The checkpoint to continue, None to start afresh; one with another key is refused unless ``force``."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old_digest, old_key = state["key_digest"], state["key"]
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        if force:
            return None
        raise PipelineError(f"cannot read {path} ({type(e).__name__}); pass --force to start afresh") from None
    if old_digest == digest:
        return state
    if force:
        log.warning("--force: discarding %s (made with other settings)", path)
        return None
    old, new = (
        {**old_key["settings"], "dataset": old_key["dataset_identity"]},
        {**key["settings"], "dataset": key["dataset_identity"]},
    )
    changed = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    raise PipelineError(
        f"{path} was made with other settings ({', '.join(changed) or 'format'} differ); pass --force to start "
        "afresh or choose another --out"
    )


# The entries of each epoch's line of the history (``_Training.epoch``), all finite numbers.
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def unusable(state: dict[str, Any], model: nn.Module) -> str | None:
    """Why a checkpoint whose key matches cannot be continued (a damaged or edited file), or None. Checked before
    anything is restored: the model's tensors (names, shapes, finite), the epoch count against the history, each
    line of the history, and that the optimiser, schedule and RNG states are there."""
    missing = [k for k in ("epoch", "history", "model", "optimizer", "scheduler", "rng") if k not in state]
    if missing:
        return f"no {', '.join(missing)}"
    history, epoch = state["history"], state["epoch"]
    if not isinstance(history, list) or isinstance(epoch, bool) or not isinstance(epoch, int) or epoch != len(history):
        return f"its epoch count {epoch!r} does not match its history"
    for line in history:
        if not isinstance(line, dict) or not all(isinstance(line.get(k), (int, float)) for k in HISTORY_KEYS):
            return f"a line of its history lacks one of {', '.join(HISTORY_KEYS)}"
    weights, want = state["model"], model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(want):
        return "its model's tensors are not this model's"
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor) or t.shape != want[name].shape:
            return f"its model's {name} has shape {getattr(t, 'shape', None)}, this model's {tuple(want[name].shape)}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"its model's {name} holds NaN or infinite values"
    if not isinstance(state["scheduler"], dict):
        return "its schedule state is not a mapping"
    rng, fresh = state["rng"], torch.get_rng_state()
    for name in ("generator", "torch"):
        t = rng.get(name) if isinstance(rng, dict) else None
        if not isinstance(t, torch.Tensor) or t.dtype != fresh.dtype or t.shape != fresh.shape:
            return f"its {name} RNG state is not one torch can restore"
    return None


def _restore(run: _Training, state: dict[str, Any], *, path: Path) -> list[dict[str, float]]:
    """``run.restore``; what the checks above cannot see (an optimiser or RNG state of the wrong form) is one line."""
    try:
        return run.restore(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PipelineError(f"{path} is damaged ({type(e).__name__}: {first}); delete it to start afresh") from None


# ------------------------------------------------------------------------------------------ training


def _batches(n: int, size: int, *, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    idx = order if order is not None else torch.arange(n)
    return [idx[i : i + size] for i in range(0, n, size)]


@torch.inference_mode()
def predict_proba(model: nn.Module, images: SplitImages, *, pre: Preprocessing, device: torch.device,
                  batch_size: int) -> np.ndarray:  # fmt: skip
    model.eval()
    out = [
        torch.softmax(model(pre.normalize(images.take(b, device))).float(), dim=1).cpu()
        for b in _batches(len(images), batch_size)
    ]
    return torch.cat(out).numpy()


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: SplitImages, labels: torch.Tensor, *,
                pre: Preprocessing, device: torch.device, batch_size: int, generator: torch.Generator
                ) -> tuple[float, float]:  # fmt: skip
    """One pass in a seeded order with augmentation; (mean loss, accuracy) over its batches, while training."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for b in _batches(len(images), batch_size, order=torch.randperm(len(images), generator=generator)):
        raise_if_stopped()
        if len(b) < 2 and seen:  # BatchNorm cannot train on one image: a last batch of one is left out
            continue
        x = pre.normalize(augment(images.take(b, device), generator=generator))
        y = labels[b].to(device)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += float(loss.detach()) * len(b)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(b)
    return total_loss / seen, correct / seen


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])  # dropout (MobileNetV2's classifier) draws from the global generator
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class BaselineResult:
    metrics: HeadMetrics
    out: Path
    resumed_from: int  # epochs the checkpoint already held (0: a fresh run)


@dataclass
class _Training:
    """The state one run trains and checkpoints: model, AdamW, its cosine schedule and the RNGs."""

    cfg: BaselineConfig
    model: nn.Module
    pre: Preprocessing
    device: torch.device
    opt: torch.optim.Optimizer = field(init=False)
    sched: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device).to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        # Rebuilt from --epochs on every run: a longer rerun decays over the new total from the saved epoch.
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.cosine)
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def cosine(self, epoch: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * epoch / self.cfg.epochs))

    def restore(self, state: dict[str, Any]) -> list[dict[str, float]]:
        """Continue from a checkpoint; its history."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        # The saved rate is the old schedule's (0 after its last epoch): set the rate of this run's schedule.
        for group, base_lr in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base_lr * self.cosine(self.sched.last_epoch)
        _set_rng_state(state["rng"], self.generator, self.device)
        return list(state["history"])

    def epoch(self, images: dict[str, SplitImages], labels: dict[str, torch.Tensor], *, classes: list[str]
              ) -> dict[str, float]:  # fmt: skip
        """One epoch of training, then val; its line of the history."""
        t0, lr = time.perf_counter(), self.opt.param_groups[0]["lr"]
        train_loss, train_acc = train_epoch(
            self.model, self.opt, images["train"], labels["train"], pre=self.pre, device=self.device,
            batch_size=self.cfg.batch_size, generator=self.generator,
        )  # fmt: skip
        self.sched.step()
        val = classification_metrics(labels["val"].numpy(), self.proba(images["val"]), classes)
        return {"lr": lr, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val["loss"],
                "val_accuracy": val["accuracy"], "seconds": time.perf_counter() - t0}  # fmt: skip

    def proba(self, images: SplitImages) -> np.ndarray:
        size = max(self.cfg.batch_size, 256)
        return predict_proba(self.model, images, pre=self.pre, device=self.device, batch_size=size)

    def state(self, *, history: list[dict[str, float]], **record: Any) -> dict[str, Any]:
        return {
            **record, "epoch": len(history), "history": history, "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": _rng_state(self.generator, self.device),
        }  # fmt: skip


def train_baseline(cfg: BaselineConfig) -> BaselineResult:
    """Train ``cfg.backbone`` from scratch; write checkpoint.pt per epoch, then metrics.json, config.json and
    curves.png to the output folder."""
    source = load_options(cfg)
    if any(split.multi_hot is not None for split in source.splits.values()):
        raise PipelineError(f"{cfg.dataset} has several labels per image: the from-scratch baseline trains one "
                            "label per image (train-head and compare train the multilabel task)")  # fmt: skip
    device = resolve_device(cfg.device)
    model, pre = build_model(cfg, len(source.classes))
    out = Path(cfg.out) if cfg.out else default_out(cfg, source.name, pre.crop_size)
    key = checkpoint_key(cfg, source.identity)
    digest = key_digest(key)
    state = load_checkpoint(out / CHECKPOINT, digest=digest, key=key, force=cfg.force)
    why = None if state is None else unusable(state, model)
    if why is not None:
        if not cfg.force:
            raise PipelineError(f"{out / CHECKPOINT} is damaged ({why}); pass --force to start afresh")
        log.warning("--force: discarding %s (%s)", out / CHECKPOINT, why)
        state = None
    if state is not None and state["epoch"] > cfg.epochs:
        raise PipelineError(
            f"{out / CHECKPOINT} already holds {state['epoch']} epochs, more than --epochs {cfg.epochs}; pass "
            f"--epochs {state['epoch']} (or more) or --force to start afresh"
        )
    images = {s: split_images(source.splits[s], pre) for s in ("train", "val")}
    labels = {s: torch.as_tensor(source.splits[s].labels) for s in ("train", "val")}
    run = _Training(cfg, model, pre, device)
    # The global RNG (dropout) is seeded, saved and restored inside, and the caller's put back after.
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        history = _restore(run, state, path=out / CHECKPOINT) if state is not None else []
        start = len(history)
        for epoch in range(start, cfg.epochs):
            history.append({"epoch": epoch + 1, **run.epoch(images, labels, classes=source.classes)})
            log.info("epoch %d/%d: val accuracy %.4f", epoch + 1, cfg.epochs, history[-1]["val_accuracy"])
            save_checkpoint(out / CHECKPOINT, run.state(history=history, key=key, key_digest=digest))
    metrics = _final_metrics(run, images, labels, classes=source.classes, history=history, resumed_from=start)
    _write_outputs(out, metrics, history, cfg=cfg, source=source, pre=pre, digest=digest)
    return BaselineResult(metrics=metrics, out=out, resumed_from=start)


def _final_metrics(run: _Training, images: dict[str, SplitImages], labels: dict[str, torch.Tensor], *,
                   classes: list[str], history: list[dict[str, float]], resumed_from: int) -> HeadMetrics:  # fmt: skip
    """Train and val metrics of the finished model, both without augmentation (the gap is then overfitting)."""
    m = {s: classification_metrics(labels[s].numpy(), run.proba(images[s]), classes) for s in ("train", "val")}
    cfg, device = run.cfg, run.device
    epoch_seconds = [h["seconds"] for h in history]
    extra = {
        "head": f"from scratch ({cfg.backbone})",
        "backbone": cfg.backbone,
        "epochs": len(history),
        "epoch_seconds": epoch_seconds,
        "train_seconds": sum(epoch_seconds),
        "resumed_from_epoch": resumed_from,
        "device": str(device),
        "n_train": len(labels["train"]),
        "n_val": len(labels["val"]),
        "history": history,
    }
    return summarize(train=m["train"], val=m["val"], fit_seconds=sum(epoch_seconds), extra=extra)


def _write_outputs(out: Path, metrics: HeadMetrics, history: list[dict[str, float]], *, cfg: BaselineConfig,
                   source: Any, pre: Preprocessing, digest: str) -> None:  # fmt: skip
    config = {
        "kind": "baseline",
        "config": asdict(cfg),
        "key_digest": digest,
        "dataset": source.name,
        "dataset_identity": source.identity,
        "classes": source.classes,
        "preprocessing": pre.as_dict(),
        "augmentation": "random crop (zero padding 1/8 of the side) + horizontal flip",
        "optimizer": f"AdamW(lr={cfg.lr}, weight_decay={cfg.weight_decay}), cosine per epoch over --epochs",
    }
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics.to_json())
    plots.curves_png(
        history, out / "curves.png", title=f"{cfg.backbone} from scratch on {source.name}: loss and accuracy",
        note="train: mean over each epoch's augmented batches while training; val: after each epoch",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ compare


def _completed(identity: Any) -> Any:
    """A dataset identity with the defaults a feature file's reader fills in (``verify`` of a folder): a baseline
    records the identity as the source gives it, a feature file as its versioned reader completes it."""
    return complete({"dataset_identity": identity})["dataset_identity"] if isinstance(identity, dict) else identity


def baseline_row(folder: Path | str, *, dataset_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """A baseline folder as a row of ``compare``'s table. ``dataset_identity``: the feature file's; a baseline
    trained on other images is refused (the rows would not be comparable)."""
    folder = Path(folder)
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"--baseline {folder}: no readable metrics.json/config.json ({e})") from None
    if config.get("kind") != "baseline":
        raise PipelineError(f"--baseline {folder} is not a baseline folder (made by `python -m pipeline baseline`)")
    if dataset_identity and _completed(config.get("dataset_identity")) != _completed(dataset_identity):
        raise PipelineError(
            f"--baseline {folder} was trained on other images than the feature file's (dataset, split or limit "
            "differ); train it with extract's dataset options"
        )
    row = {k: metrics[k] for k in ("head", "train_accuracy", "val_accuracy", "balanced_accuracy",
                                   "worst_class_recall", "macro_f1", "val_loss", "fit_seconds",
                                   "train_val_gap", "overfitting")}  # fmt: skip
    row |= {"shots": None, "n_train_used": metrics.get("n_train"), "total_seconds": metrics["train_seconds"]}
    row |= {"baseline": str(folder), "epochs": metrics.get("epochs"), "notes": []}
    return row
