"""Which reader a ``--dataset`` value names, and the one call that loads it (:func:`load_options`).

    cifar10, mnist, ...            a torchvision dataset (:func:`pipeline.stage1.datasets.load_torchvision`)
    labels.csv / .tsv / .jsonl / .parquet   a labels table (:func:`pipeline.stage1.tables.load_table`)
    'shards/train-{0000..0041}.tar', a glob, a .txt list   WebDataset shards (:mod:`pipeline.stage1.shards`)
    FOLDER with metadata.csv / .jsonl   a Hugging Face imagefolder (:func:`pipeline.stage1.tables.load_imagefolder`)
    FOLDER                         one folder per class (:func:`pipeline.stage1.datasets.load_folder`)

Every reader returns the same :class:`~pipeline.stage1.datasets.Source`, so ``--limit``, the split, resume,
torchrun and the fingerprint work the same on all of them.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.stage1.config import SourceOptions
from pipeline.stage1.datasets import Source, limited, load_source
from pipeline.stage1.shards import is_url, load_shards, looks_like_shards
from pipeline.stage1.tables import TABLE_SUFFIXES, load_imagefolder, load_table, metadata_files


def load_dataset(
    dataset: str,
    *,
    data_root: Path = Path("data"),
    download: bool = True,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
    verify: str = "stat",
    images: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    val_dataset: str | None = None,
    label_key: str | None = None,
    label_columns: str | None = None,
    label_delimiter: str | None = None,
) -> Source:
    """The Source ``dataset`` names (see the module docstring), ``limit`` applied to each split."""
    kind = dataset_kind(dataset)
    _check_options(kind, images=images, val_dataset=val_dataset, label_key=label_key,
                   columns=image_column or label_column or label_columns or label_delimiter)  # fmt: skip
    names = [c.strip() for c in (label_columns or "").split(",") if c.strip()]
    if label_columns is not None and len(names) < 2:
        raise PipelineError("--label-columns needs two or more column names, comma-separated (e.g. cat,dog,bird)")
    columns = {"image_column": image_column, "label_column": label_column, "label_columns": names or None,
               "label_delimiter": label_delimiter}  # fmt: skip
    split = {"val_fraction": val_fraction, "seed": split_seed, "verify": verify}
    if kind == "table":
        source = load_table(Path(dataset), images=Path(images) if images else None, **columns, **split)
    elif kind == "shards":
        source = load_shards(dataset, val_spec=val_dataset, label_key=label_key, **split)
    elif kind == "imagefolder":
        source = load_imagefolder(Path(dataset), **columns, **split)
    else:
        return load_source(
            dataset, data_root=data_root, download=download, val_fraction=val_fraction, split_seed=split_seed,
            limit=limit, verify=verify,
        )  # fmt: skip
    return limited(source, limit, seed=split_seed) if limit is not None else source


def dataset_kind(dataset: str) -> str:
    """``table``, ``shards``, ``imagefolder`` or ``other`` (a torchvision name or a class folder)."""
    if not is_url(dataset) and Path(dataset).suffix.lower() in TABLE_SUFFIXES:
        return "table"
    if is_url(dataset) or looks_like_shards(dataset):
        return "shards"
    if Path(dataset).is_dir() and metadata_files(Path(dataset)):
        return "imagefolder"
    return "other"


def _check_options(kind: str, *, images: str | None, val_dataset: str | None, label_key: str | None,
                   columns: str | None) -> None:  # fmt: skip
    """Options that only one kind of dataset reads are refused elsewhere, not silently ignored."""
    if images and kind != "table":
        raise PipelineError("--images is for a labels table (--dataset labels.csv): where its image paths start")
    if (val_dataset or label_key) and kind != "shards":
        flag = "--val-dataset" if val_dataset else "--label-key"
        raise PipelineError(f"{flag} is for WebDataset shards (--dataset 'shards/train-{{000..009}}.tar')")
    if columns and kind not in ("table", "imagefolder"):
        raise PipelineError(
            "--image-column, --label-column, --label-columns and --label-delimiter are for a labels table or a "
            "Hugging Face imagefolder"
        )


def load_options(opts: SourceOptions) -> Source:
    """The source ``extract``'s (and ``baseline``'s) image options pick: :func:`load_dataset` on their fields."""
    return load_dataset(
        opts.dataset,
        data_root=Path(opts.data_root),
        download=opts.download,
        val_fraction=opts.val_fraction,
        split_seed=opts.split_seed,
        limit=opts.limit,
        verify=opts.verify,
        images=opts.images,
        image_column=opts.image_column,
        label_column=opts.label_column,
        val_dataset=opts.val_dataset,
        label_key=opts.label_key,
        label_columns=opts.label_columns,
        label_delimiter=opts.label_delimiter,
    )
