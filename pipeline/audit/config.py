"""``AuditConfig``: the options of ``python -m pipeline audit``, each written once (torch-free: the CLI builds its
options from these fields to print ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.devices import DEVICES
from pipeline.errors import PipelineError
from pipeline.options import option
from pipeline.stage2.heads.registry import HEADS

# The score pass's default head: the label pass's model (the logreg objective at C = 1 on the features' first 256
# principal directions) fitted on train; see pipeline.audit.score.
PCA_LOGREG = "pca-logreg"


@dataclass(frozen=True)
class AuditConfig:
    threshold: float | None = option(
        None,
        "Evidence from which mutual nearest neighbours are called copies: the evidence score (similarity + the "
        "smaller margin of the two images over their second neighbour), or with --near-rule ranks the rank "
        "statistic. Default: chosen from the file's own distribution (median + 2.5, or 3.25, robust deviations), "
        "printed.",
    )
    near_rule: str = option(
        "score",
        "How near copies are called: 'score' (similarity + margin) or 'ranks' (Fisher's combination of the "
        "similarity, margin and perceptual-hash ranks; needs the phash column). ranks found more planted copies at "
        "0 false flags on one plant (8 against 5 of 20) but flagged 15 pairs of distinct digits in the clean demo "
        "set, against 1: see docs/audit.md.",
        choices=("score", "ranks"),
    )
    k: int = option(10, "Neighbours kept per image (near-duplicates, outliers).")
    search_dim: int = option(
        64, "Search neighbours on the features projected to this many principal directions (0: all columns); the "
        "candidates are then re-scored exactly on all columns.",
    )  # fmt: skip
    folds: int = option(5, "K of the K-fold out-of-sample probabilities (fewer when a class has fewer images).")
    head: str = option(
        "best",
        "The head scored with and without the leaked val images: 'best' (the default: the best of compare's table "
        "for this file, as compare saved it, so the score is the one compare showed; 'pca-logreg' when compare has "
        "not been run), 'pca-logreg' (the label pass's model fitted on train: no new fit on all columns), or a head "
        "by name, loaded when compare or train-head saved it for this file, else fitted with its default settings.",
    )
    compare: str | None = option(
        None,
        "compare's output folder whose best head '--head best' scores (default: compare's default folder for "
        "this file; a sweep's compare may be elsewhere).",
    )
    top: int = option(100, "Images listed per section of the report (label issues, outliers).")
    thumbnails: bool = option(True, "Thumbnails in report.html, read from the source images or arrays.")
    seed: int = option(0, "Seed of the folds and the projection.")
    device: str = option("auto", "Where the neighbour search and the folds run (as the heads).", choices=DEVICES)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise PipelineError(f"--k must be at least 2, not {self.k}")
        if self.folds < 2:
            raise PipelineError(f"--folds must be at least 2, not {self.folds}")
        heads = (PCA_LOGREG, "best", *(name for name, spec in HEADS.items() if spec.inputs == "features"))
        if self.head not in heads:
            raise PipelineError(f"--head must be one of {', '.join(heads)}, not {self.head!r}")
        if self.search_dim < 0 or self.top < 1:
            raise PipelineError("--search-dim must be >= 0 and --top >= 1")
