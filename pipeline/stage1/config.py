"""The options of ``extract`` (and the image-source options ``baseline`` shares), torch-free: the CLI builds its
options from these dataclasses to print ``--help``, which must not wait seconds for torch. The choice tuples live
here for the same reason; the modules that act on them (backbones, batches, datasets, precision, store) import them
from here."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.devices import DEVICES
from pipeline.errors import PipelineError
from pipeline.exclude import exclude_option
from pipeline.options import option

RESIZE_MODES = ("crop", "full")
PREPROCESS_MODES = ("auto", "loader", "device", "gpu-decode")
# How image files are identified in the fingerprint: by path, size and modification time (fast), or by their bytes.
VERIFY_MODES = ("stat", "content")
PRECISIONS = ("auto", "bf16", "fp16", "tf32", "fp32")
FEATURE_DTYPES = ("float32", "float16")

__all__ = ["ExtractConfig", "SourceOptions", "FEATURE_DTYPES", "PRECISIONS", "PREPROCESS_MODES", "RESIZE_MODES",
           "VERIFY_MODES"]  # fmt: skip


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise PipelineError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class SourceOptions:
    """Which images, and how they are split into train and val: the options ``extract`` and ``baseline`` share, so
    that both see the same rows. Each field's help is their option help (see :mod:`pipeline.options`)."""

    dataset: str = option(
        "cifar10",
        "torchvision dataset name (cifar10, cifar100, mnist, fashionmnist, kmnist, svhn, stl10); a folder of "
        "images: PATH/train/<class>/*, PATH/val/<class>/*, or PATH/<class>/*, or a Hugging Face imagefolder "
        "(PATH/metadata.csv or .jsonl); a labels table (labels.csv, .tsv, .jsonl, .parquet); or WebDataset shards "
        "('shards/train-{00000..00041}.tar', a glob, or a .txt list of shards).",
    )
    data_root: str = option("data", "Where torchvision datasets live.", path="dir")
    download: bool = option(True, "Download a torchvision dataset when it is missing.")
    val_fraction: float = option(0.2, "Validation share of a PATH/<class>/* folder (stratified, seeded).")
    split_seed: int = option(0, "Seed of the folder split and of the --limit sample.")
    limit: int | None = option(None, "Only the first N samples of each split (a seeded sample for folders).")
    images: str | None = option(
        None, "Folder a labels table's image paths are relative to (default: the table's folder).", path="dir"
    )
    image_column: str | None = option(
        None, "A labels table's image column (default: the first of path, file_name, filename, file, image, id)."
    )
    label_column: str | None = option(
        None, "A labels table's label column (default: the first of label, labels, class, target)."
    )
    label_delimiter: str | None = option(
        None, "Several labels per image in a table's label column, separated by this (default: ';' where any has one)."
    )
    label_columns: str | None = option(
        None, "Comma-separated 0/1 columns of a labels table, one per label: several labels per image."
    )
    val_dataset: str | None = option(
        None, "WebDataset shards of the val split (same patterns as --dataset); default: --val-fraction by key."
    )
    label_key: str | None = option(
        None, "The field of each WebDataset sample's .json that is its label (default: .cls, .txt, then 'label')."
    )
    verify: str = option(
        "stat",
        "How a folder's images are identified for reuse: 'stat' (path, size, modification time) or 'content' "
        "(a hash of every file's bytes: slower, catches edits that keep size and time).",
        choices=VERIFY_MODES,
    )

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise PipelineError(f"--limit must be at least 1, not {self.limit}")
        if not 0 < self.val_fraction < 1:
            raise PipelineError(f"--val-fraction must be between 0 and 1, not {self.val_fraction}")
        if not 0 <= self.split_seed < 2**32:
            raise PipelineError(f"--split-seed must be between 0 and 2**32 - 1, not {self.split_seed}")
        if self.verify not in VERIFY_MODES:
            raise PipelineError(f"unknown --verify {self.verify!r}; choose one of: {', '.join(VERIFY_MODES)}")


@dataclass(frozen=True)
class ExtractConfig(SourceOptions):
    """Everything ``extract`` takes; each field's help is the ``extract`` command's option help."""

    backbone: str = option(
        "resnet18",
        "Any torchvision classification model, or timm:NAME for a timm model (needs pip install -e '.[timm]').",
    )
    weights: str = option(
        "IMAGENET1K_V1",
        "torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), 'none' (random init), or a state_dict path "
        "(.safetensors, or a torch file read without unpickling). For timm:NAME: 'pretrained' (also the default and "
        "DEFAULT: the tag in NAME.TAG or timm's default, from the Hugging Face cache), 'none', or a path.",
    )
    image_size: int | None = option(None, "Crop size in pixels, 16-1024 (default: the weights' own).")
    device: str = option("auto", "auto picks cuda, then mps, then cpu.", choices=DEVICES)
    batch_size: int | None = option(None, "Images per batch (default: by device: 64 on CPU, 512 at 224 px on a GPU).")
    workers: int | None = option(None, "Loader processes or reading threads (default: by device and CPU count).")
    out: str | None = option(
        None, "Output .h5 (default: artifacts/features/<dataset>_<backbone>_<weights>[_img<N>][_n<limit>].h5).",
        path="file",
    )  # fmt: skip
    force: bool = option(
        False,
        "Redo the extraction even if --out is up to date; discard a whole or partial (.tmp) file of other settings.",
        flag=True,
    )
    dtype: str = option("float32", "Stored feature dtype (float16 halves the file).", choices=FEATURE_DTYPES)
    precision: str = option(
        "auto",
        "Backbone arithmetic: fp32 = TF32 off (the reference), tf32, bf16 or fp16 autocast; auto = bf16 on CUDA, "
        "else fp32. Recorded in the fingerprint; features are stored in --dtype regardless.",
        choices=PRECISIONS,
    )
    resize: str = option(
        "crop",
        "crop = the weights' recipe (shorter side to 256/224 x crop, centre crop); full = the whole image straight "
        "to crop x crop (the usual recipe for CIFAR-sized images). Recorded in the fingerprint.",
        choices=RESIZE_MODES,
    )
    skip_bad: bool = option(False, "Skip unreadable images (listed in the file and the summary).", flag=True)
    seed: int = option(0, "Initialisation seed for --weights none.")
    progress: bool = option(True, "Show a progress bar.")
    preprocess: str = option(
        "auto",
        "Where to decode/resize/crop: 'device' moves uint8 batches of in-memory datasets (CIFAR, MNIST) to the GPU "
        "first; 'gpu-decode' decodes the JPEGs of a folder on the GPU; 'loader' uses PIL in worker processes; "
        "'auto' = device or gpu-decode on CUDA, loader on CPU. Recorded in the fingerprint.",
        choices=PREPROCESS_MODES,
    )
    compile: bool | None = option(
        None,
        "torch.compile the backbone (default: only on CUDA runs of at least COMPILE_BREAK_EVEN_IMAGES images, "
        "which earn the compile time back).",
    )
    layers: str | None = option(
        None,
        "Comma-separated nodes whose outputs are stored, each globally average-pooled (e.g. layer3,layer4 for a "
        "ResNet; `pipeline inspect --nodes BACKBONE` lists them; a ViT block's patch tokens are averaged, NODE:cls "
        "takes its class token, NODE:cls+mean both); features = their concatenation, each also stored apart "
        "(train-head --layer). Default: the input of the final classifier.",
    )
    cache_at: str | None = option(
        None,
        "Also store the activation map at this node (e.g. layer3), float16, so `train-head --head tail` trains the "
        "blocks after it without running the frozen part. Large: C*H*W*2 bytes per image (ResNet18 layer3 at "
        "224 px: 98 KB, ~5.9 GB for CIFAR-10's 60,000 images); refused up front when the disk lacks room.",
    )
    targets: str | None = option(
        None,
        "CSV of regression targets: a column id (as stored: path relative to the image folder, or dataset index), "
        "then one or more numeric columns; stored beside the features (train-head then regresses).",
        path="file",
    )
    skip_missing_targets: bool = option(
        False, "Leave out images that have no row in --targets (counted in the summary) instead of refusing.",
        flag=True,
    )  # fmt: skip
    exclude: str | None = exclude_option()  # --exclude, defined once for extract and stage two

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.skip_missing_targets and not self.targets:
            raise PipelineError("--skip-missing-targets needs --targets FILE.csv")
        check_precision(self.precision)
        if not 0 <= self.seed < 2**32:
            raise PipelineError(f"--seed must be between 0 and 2**32 - 1, not {self.seed}")
        if self.resize not in RESIZE_MODES:
            raise PipelineError(f"unknown resize mode {self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if self.preprocess not in PREPROCESS_MODES:
            raise PipelineError(
                f"unknown preprocess mode {self.preprocess!r}; choose one of: {', '.join(PREPROCESS_MODES)}"
            )
        if self.device not in DEVICES:
            raise PipelineError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)}")
        if self.dtype not in FEATURE_DTYPES:
            raise PipelineError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(FEATURE_DTYPES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PipelineError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise PipelineError(f"--image-size must be between 16 and 1024, not {self.image_size}")
        if self.workers is not None and self.workers < 0:
            raise PipelineError(f"--workers must be 0 or more, not {self.workers}")
        if self.layers is not None and not self.layer_list:
            raise PipelineError("--layers needs one or more node names, comma-separated (e.g. layer3,layer4)")
        if self.cache_at is not None and not self.cache_at.strip():
            raise PipelineError("--cache-at needs a node name (e.g. layer3)")

    @property
    def layer_list(self) -> list[str]:
        """``--layers`` as node names, in the order given (empty: the classifier's input)."""
        return [n.strip() for n in (self.layers or "").split(",") if n.strip()]
