"""The options of ``baseline``, torch-free: the CLI builds the command's options from this dataclass to print
``--help`` without importing torch (:mod:`pipeline.stage2.baseline` trains with it)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.devices import DEVICES
from pipeline.errors import PipelineError
from pipeline.options import option
from pipeline.stage1.config import RESIZE_MODES, SourceOptions

__all__ = ["BaselineConfig"]


@dataclass(frozen=True)
class BaselineConfig(SourceOptions):
    """Everything ``baseline`` takes; the image options are extract's own (:class:`SourceOptions`), so the rows are
    the same images; each field's help is the command's option help."""

    backbone: str = option("resnet18", "Architecture to train from random initialisation (any torchvision model).")
    image_size: int | None = option(None, "Crop size in pixels, 16-1024 (default 224); use extract's value.")
    resize: str = option("crop", "crop or full, as extract's --resize.", choices=RESIZE_MODES)
    epochs: int = option(10, "Passes over train (not in the checkpoint key: more epochs continue a run).")
    batch_size: int = option(64, "Images per training step.")
    lr: float = option(1e-3, "Peak learning rate of AdamW (cosine decay to 0 over --epochs).")
    weight_decay: float = option(0.05, "AdamW weight decay.")
    seed: int = option(0, "Seed of the initialisation, batch order and augmentation.")
    device: str = option("auto", "auto picks cuda, then mps, then cpu.", choices=DEVICES)
    out: str | None = option(
        None, "Output folder (default: artifacts/baselines/<dataset>_<backbone>_img<N>[_n<limit>]/).", path="dir"
    )
    force: bool = option(False, "Start afresh over a checkpoint made with other settings.", flag=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise PipelineError(f"--lr must be > 0 and --weight-decay >= 0, not {self.lr} and {self.weight_decay}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise PipelineError(f"--image-size must be between 16 and 1024, not {self.image_size}")
        if self.device not in DEVICES:
            raise PipelineError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
