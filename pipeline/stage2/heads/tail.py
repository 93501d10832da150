"""The tail head: the backbone's last block(s) after the ``--cache-at`` node plus a new linear layer, trained on the
cached activation maps, so the frozen front of the backbone never runs again (issue 17 item 3).

**Initialisation.** The tail is cut (:func:`pipeline.stage1.tail.tail_after`) from the backbone rebuilt from the
feature file's metadata, exactly as ``export`` rebuilds it: the same torchvision weights, the same seeded
initialisation for ``none(seed=S)``, and for a weights file the file at the path ``extract --weights`` named, which
must still be there and hash to the sha256 the file recorded. The new linear layer is drawn with ``--seed``.

**Training.** Adam (``--lr``, ``--epochs``, ``--batch-size``, ``--weight-decay``) on the tail's parameters and the
linear layer, cross-entropy (``--class-weight``). BatchNorm stays in eval mode (the backbone's running statistics,
which the cached activations were normalised against upstream) unless ``--train-bn``; dropout inside the tail (e.g.
MobileNetV2's classifier dropout) is on while training, as in the usual fine-tuning loop.

**Data.** A split's activations (float16 in the file) are read whole and kept for the run when they take at most
``IN_MEMORY_BYTES``; larger ones (CIFAR-10 at ResNet18 ``layer3``, 224 px: 5.9 GB) are read per epoch in blocks of
about ``BLOCK_BYTES`` of consecutive rows, the blocks in shuffled order and the rows shuffled within each block.
Each batch is cast to float32 on the device.

**Saving and export.** ``head.safetensors`` holds the linear layer (``weight``, ``bias``) and the trained tail under
``tail.<backbone name>`` (``tail.layer4.0.conv1.weight``); ``export`` puts the tail back into the rebuilt backbone
(a state_dict update by name) and the linear layer where the classifier sat, so MODEL.safetensors holds it all and
``predict`` loads it as for any linear head.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError
from pipeline.stage2.heads.base import FitResult, Head, balanced_weights, linear_module
from pipeline.stage2.heads.config import HeadConfig
from pipeline.stage2.heads.fitting import Adam
from pipeline.store import FeatureMeta, FeatureSet, SplitFeatures, read_activations

if TYPE_CHECKING:
    from pipeline.stage1.backbones import Backbone

log = logging.getLogger(__name__)
IN_MEMORY_BYTES = 2 << 30  # a split's activations up to this size are read once and held (float16, as stored)
BLOCK_BYTES = 256 << 20  # otherwise: rows read per block, per epoch
TAIL_PREFIX = "tail."  # head.safetensors: the tail's tensors, under the backbone's names after this prefix


# ------------------------------------------------------------------------------------------ the activations


def require_activations(meta: FeatureMeta, path: Path | str) -> dict[str, Any]:
    """The file's ``activations`` record; a file without one is refused with one line."""
    if not meta.activations:
        raise PipelineError(
            f"{path} holds no activation maps, which the tail head trains on; extract with --cache-at NODE first"
        )
    return meta.activations


@dataclass
class SplitActivations:
    """One split's activation maps: in the file (read through :func:`read_activations`) or in memory."""

    path: Path | None
    split: str
    meta: FeatureMeta
    count: int
    array: np.ndarray | None = None  # the whole split, once read (or given: benchmarks, tests)

    @property
    def row_bytes(self) -> int:
        shape = self.meta.activations["shape"]
        return int(np.prod(shape)) * np.dtype(self.meta.activations.get("dtype", "float16")).itemsize

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The maps of ``rows`` (split indices, any order), as stored."""
        if self.array is None and self.count * self.row_bytes <= IN_MEMORY_BYTES:
            self.array = read_activations(self.path, self.split)  # small: read once, held for the run
            if len(self.array) != self.count:
                raise PipelineError(f"{self.path}: /{self.split}/activations has {len(self.array)} rows, the "
                                    f"split {self.count}")  # fmt: skip
        if self.array is not None:
            return self.array[rows]
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        if len(ordered) and ordered[-1] - ordered[0] + 1 == len(ordered):  # consecutive: one slice, the fast read
            data = read_activations(self.path, self.split, rows=slice(int(ordered[0]), int(ordered[-1]) + 1))
        else:  # h5py reads a point selection only in increasing order
            data = read_activations(self.path, self.split, rows=ordered)
        out = np.empty_like(data)
        out[order] = data
        return out


@dataclass
class ActivationRows:
    """Rows of one split's activation maps, read when needed: what the tail head takes where other heads take a
    feature matrix. Indexing with an index array (few-shot samples, the sweep's held-out part) selects rows."""

    source: SplitActivations
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def in_memory(cls, array: np.ndarray, meta: FeatureMeta, *, split: str = "train") -> ActivationRows:
        """Maps held in memory (benchmarks, tests): ``meta`` says which backbone and node made them."""
        return cls(SplitActivations(None, split, meta, len(array), array), np.arange(len(array)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Any) -> ActivationRows:
        return ActivationRows(self.source, self.rows[idx])

    @property
    def meta(self) -> FeatureMeta:
        return self.source.meta

    def blocks(self, *, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(positions, maps)`` covering every row once, at most ``BLOCK_BYTES`` of maps at a time: in order, or
        shuffled with ``rng``: wholly when the split is held in memory; else blocks of consecutive rows (fast reads)
        in random order, the rows shuffled within each."""
        n, row_bytes = len(self.rows), self.source.row_bytes
        step = max(1, BLOCK_BYTES // row_bytes) if row_bytes else max(n, 1)
        held = self.source.array is not None or self.source.count * row_bytes <= IN_MEMORY_BYTES
        if held:
            order = rng.permutation(n) if rng is not None else np.arange(n)
            chunks = [order[a : a + step] for a in range(0, n, step)]
        else:
            starts = np.arange(0, n, step)
            starts = rng.permutation(starts) if rng is not None else starts
            chunks = [np.arange(a, min(n, a + step)) for a in starts]
            chunks = [rng.permutation(c) for c in chunks] if rng is not None else chunks
        for positions in chunks:
            yield positions, self.source.read(self.rows[positions])


def with_activations(fs: FeatureSet) -> FeatureSet:
    """``fs`` with each split's features replaced by its :class:`ActivationRows` (the labels and ids kept)."""
    require_activations(fs.meta, fs.path)
    splits = {}
    for name, split in fs.splits.items():
        source = SplitActivations(Path(fs.path), name, fs.meta, len(split))
        rows = ActivationRows(source, np.arange(len(split)))
        splits[name] = SplitFeatures(features=rows, labels=split.labels, ids=split.ids, targets=split.targets)
    return replace(fs, splits=splits)


# ------------------------------------------------------------------------------------------ the tail


def backbone_of(meta: FeatureMeta) -> Backbone:
    """The frozen backbone that made a feature file, rebuilt from its metadata as ``export`` rebuilds it (a weights
    file must still be where ``extract --weights`` found it, with the recorded sha256)."""
    from pipeline.stage1.backbones import BackboneRecord, rebuild_backbone

    try:
        return rebuild_backbone(BackboneRecord.of_features(meta).plain())
    except PipelineError as e:  # its messages speak of export; say who needed the backbone here
        raise PipelineError(f"the tail head starts from the backbone that made the activations: {e}") from None


def build_tail(meta: FeatureMeta) -> nn.Module:
    """The blocks after the file's ``--cache-at`` node, with the weights of the backbone that made the file."""
    from pipeline.stage1.tail import tail_after

    acts = require_activations(meta, meta.backbone)
    tail = tail_after(backbone_of(meta).model, str(acts["node"]))
    with torch.no_grad():
        out = tail(torch.zeros(1, *acts["shape"]))
    if out.shape != (1, meta.feature_dim):
        raise PipelineError(
            f"the {meta.backbone} blocks after {acts['node']} give {tuple(out.shape[1:])} from the stored "
            f"{tuple(acts['shape'])} maps, not the file's {meta.feature_dim}-d features"
        )
    return tail


def set_train_mode(model: nn.Module, *, train_bn: bool) -> None:
    """Train mode, with BatchNorm kept in eval mode (frozen running statistics) unless ``train_bn``."""
    model.train()
    if not train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _batches(
    X: ActivationRows, y: np.ndarray, *, size: int, device: torch.device, rng: np.random.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for positions, maps in X.blocks(rng=rng):
        for start in range(0, len(positions), size):
            xb = torch.from_numpy(np.ascontiguousarray(maps[start : start + size]))
            xb = xb.to(device=device, dtype=torch.float32)
            yield xb, torch.as_tensor(y[positions[start : start + size]], device=device)


class TailHead(Head):
    """The backbone's blocks after the --cache-at node plus a new nn.Linear(D, C), trained with Adam on the cached
    activation maps (extract --cache-at NODE); export puts the blocks back into the backbone."""

    name = "tail"

    def __init__(self, cfg: HeadConfig, *, num_classes: int, feature_dim: int):
        super().__init__(cfg, num_classes=num_classes, feature_dim=feature_dim)
        self.model: nn.Sequential | None = None  # (tail, linear) after fit; a loaded head has only the tensors
        self.weight = np.zeros((num_classes, feature_dim), np.float32)
        self.bias = np.zeros(num_classes, np.float32)
        self.tail_state: dict[str, np.ndarray] = {}

    def fit(
        self, X: ActivationRows, y: np.ndarray, *, val: tuple[ActivationRows, np.ndarray] | None = None
    ) -> FitResult:
        cfg, device = self.cfg, resolve_device(self.cfg.device)
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)  # the new layer's init and the tail's dropout masks
            linear = nn.Linear(self.feature_dim, self.num_classes)
            # the default layout: channels_last was 25-30% slower here on these small maps (MobileNetV2 at 4 x 4,
            # 2 CPU cores), where it speeds up the whole backbone on images
            model = nn.Sequential(build_tail(X.meta), linear).to(device)
            model.requires_grad_(True)
            weight = balanced_weights(y, self.num_classes) if cfg.class_weight == "balanced" else None
            weight = None if weight is None else torch.as_tensor(weight, device=device)
            opt = Adam([{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}])
            rng = np.random.default_rng(cfg.seed)
            history = []
            for epoch in range(1, cfg.epochs + 1):
                row = {"epoch": epoch, **self._epoch(model, opt, X, y, rng=rng, weight=weight, device=device)}
                if val is not None and len(val[1]):
                    row |= self._val_stats(model, val, weight=weight, device=device)
                history.append(row)
                log.debug("tail epoch %s", row)
        self._keep(model)
        return FitResult(history=history, info={"node": X.meta.activations["node"], "train_bn": cfg.train_bn})

    def _epoch(
        self, model: nn.Module, opt: Adam, X: ActivationRows, y: np.ndarray, *, rng: np.random.Generator,
        weight: torch.Tensor | None, device: torch.device,
    ) -> dict[str, float]:  # fmt: skip
        set_train_mode(model, train_bn=self.cfg.train_bn)
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        batches = 0
        for xb, yb in _batches(X, y, size=self.cfg.rows_per_step, device=device, rng=rng):
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb, weight=weight)
            for p in model.parameters():
                p.grad = None
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == yb).sum()
            batches += 1
        return {"train_loss": float(loss_sum) / max(batches, 1), "train_accuracy": float(correct) / len(y)}

    def _val_stats(
        self, model: nn.Module, val: tuple[ActivationRows, np.ndarray], *, weight: torch.Tensor | None,
        device: torch.device,
    ) -> dict[str, float]:  # fmt: skip
        logits = torch.as_tensor(self._run(model, val[0], device=device))
        yv = torch.as_tensor(val[1])
        w = None if weight is None else weight.cpu()
        loss = nn.functional.cross_entropy(logits, yv, weight=w)
        return {"val_loss": float(loss), "val_accuracy": float((logits.argmax(1) == yv).float().mean())}

    def _run(self, model: nn.Module, X: ActivationRows, *, device: torch.device) -> np.ndarray:
        """(N, C) logits of every row of ``X``, in eval mode."""
        model.eval()
        out = np.empty((len(X), self.num_classes), np.float32)
        with torch.inference_mode():
            for positions, maps in X.blocks():
                for start in range(0, len(positions), self.cfg.rows_per_step):
                    xb = torch.from_numpy(np.ascontiguousarray(maps[start : start + self.cfg.rows_per_step]))
                    xb = xb.to(device=device, dtype=torch.float32)
                    out[positions[start : start + len(xb)]] = model(xb).float().cpu().numpy()
        return out

    def _keep(self, model: nn.Sequential) -> None:
        """The fitted model on the CPU in eval mode, and its tensors as arrays (what ``state`` saves)."""
        self.model = model.cpu().eval().requires_grad_(False)
        tail, linear = model[0], model[1]
        self.weight = linear.weight.detach().numpy().copy()
        self.bias = linear.bias.detach().numpy().copy()
        self.tail_state = {k: v.detach().numpy().copy() for k, v in tail.state_dict().items()}

    def logits(self, X: ActivationRows) -> np.ndarray:
        if not isinstance(X, ActivationRows):
            raise PipelineError("the tail head takes activation maps (extract --cache-at NODE), not feature vectors")
        if self.model is None:  # a loaded head: its tensors into the blocks of the backbone that made X
            tail = build_tail(X.meta)
            tail.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in self.tail_state.items()})
            self.model = nn.Sequential(tail, linear_module(self.weight, self.bias)).eval().requires_grad_(False)
        return self._run(self.model, X, device=torch.device("cpu"))

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, **{TAIL_PREFIX + k: v for k, v in self.tail_state.items()}}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias = state["weight"], state["bias"]
        self.tail_state = {k[len(TAIL_PREFIX) :]: v for k, v in state.items() if k.startswith(TAIL_PREFIX)}
        for k, v in self.tail_state.items():  # save_head stores 0-d arrays as (1,): BatchNorm's step count is 0-d
            if k.endswith("num_batches_tracked") and np.shape(v) == (1,):
                self.tail_state[k] = np.asarray(v).reshape(())
        if not self.tail_state:
            raise KeyError("tail.*")
        self.model = None

    def as_module(self) -> nn.Module:
        """The new linear layer (what goes where the classifier sat); the tail goes back via :meth:`backbone_state`."""
        return linear_module(self.weight, self.bias)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The trained tail's tensors under the backbone's names: ``put_back`` loads them into the backbone."""
        return {k: torch.as_tensor(np.asarray(v)) for k, v in self.tail_state.items()}
