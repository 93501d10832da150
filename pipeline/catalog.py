"""The names a user can pass to the commands, for ``pipeline list``: backbones, weights, datasets and heads.

Each list is read from the registry that checks the name (``BACKBONE_FAMILIES``, the dataset table,
``HEADS``), so a name shown here is a name the command accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
DEFAULT_WEIGHTS_DIR = Path("artifacts") / "weights"


@dataclass(frozen=True)
class Entry:
    """One name a user can pass, with a short note (empty when there is nothing to say)."""

    name: str
    note: str = ""


def backbones() -> list[Entry]:
    """Every family's backbones (``BACKBONE_FAMILIES``): torchvision's models with their pretrained weights names,
    and the pattern of a prefixed family (``timm:NAME``)."""
    from pipeline.stage1.backbones import BACKBONE_FAMILIES

    return [Entry(name, note) for family in BACKBONE_FAMILIES.values() for name, note in family.listing()]


def local_weight_files(weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> list[Path]:
    """state_dict files under ``weights_dir`` (e.g. the demo's converted MobileNetV2)."""
    if not weights_dir.is_dir():
        return []
    return sorted(p for p in weights_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights(backbone: str = "resnet18", *, weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> list[Entry]:
    """``--weights`` values for ``backbone``: its family's (torchvision's weights names; timm's pretrained tags),
    ``none`` and the local state_dict files under ``weights_dir`` that load into it."""
    from pipeline.errors import PipelineError
    from pipeline.stage1.backbones import family_of, is_known_backbone

    if not is_known_backbone(backbone):
        raise PipelineError(f"unknown backbone {backbone!r}; `python -m pipeline list backbones` shows the names")
    entries = [Entry(value, note) for value, note in family_of(backbone).weights_choices(backbone)]
    entries.append(Entry("none", "random initialisation seeded by --seed (for tests and baselines)"))
    entries += [Entry(str(p), f"local weights file, {p.stat().st_size / 2**20:.0f} MiB")
                for p in local_weight_files(weights_dir) if _fits(backbone, p)]  # fmt: skip
    return entries


def _fits(backbone: str, path: Path) -> bool:
    """Whether ``--backbone backbone --weights path`` loads: asked of load_backbone, which decides it for extract."""
    from pipeline.errors import PipelineError
    from pipeline.stage1.backbones import load_backbone

    try:
        load_backbone(backbone, weights=str(path))
    except PipelineError:
        return False
    return True


def _looks_like_image_folder(root: Path) -> bool:
    """PATH/<class>/<image> or PATH/train/<class>/<image>: checks a few entries, not every file."""
    from pipeline.stage1.datasets import IMG_EXTENSIONS

    base = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root
    classes = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(classes) < 2:
        return False
    # rglob is lazy: any() stops at the first image of each class folder
    return all(any(p.suffix.lower() in IMG_EXTENSIONS for p in d.rglob("*")) for d in classes[:3])


def datasets(*, data_root: Path = Path("data")) -> list[Entry]:
    """torchvision dataset names and the image folders found directly under ``data_root``."""
    from pipeline.stage1.datasets import available_datasets

    entries = [Entry(name, "torchvision (downloaded to --data-root on first use)") for name in available_datasets()]
    if data_root.is_dir():
        for folder in sorted(p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _looks_like_image_folder(folder):
                entries.append(Entry(str(folder), "image folder"))
    return entries


def heads() -> list[Entry]:
    """``--head`` names, each with its registry entry's one-line description (no head module is imported)."""
    from pipeline.stage2.heads.registry import HEADS

    return [Entry(name, spec.description) for name, spec in HEADS.items()]


LISTS: dict[str, Callable[..., list[Entry]]] = {
    "backbones": backbones,
    "weights": weights,
    "datasets": datasets,
    "heads": heads,
}


def format_entries(entries: list[Entry]) -> str:
    width = max((len(e.name) for e in entries), default=0)
    return "\n".join(f"{e.name:<{width}}  {e.note}".rstrip() for e in entries)
