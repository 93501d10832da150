"""The heads by name: ``HEADS`` maps a ``--head`` name to a :class:`HeadSpec`, what can be known of a head without
importing it (torch and the head's module load on first use: ``--help`` and ``list heads`` import neither).

Adding a head is one module and one entry here: the module holds a :class:`~pipeline.stage2.heads.base.Head`
subclass (fit, logits, state, its sweep grid and, if it can become a layer, ``as_module`` / ``layer_record``); the
entry names it as ``"module:Class"`` with a one-line description, the knob groups it reads (dataclasses of
``option(...)`` fields, :mod:`pipeline.stage2.heads.knobs`; a new group is declared beside the entry), the tasks it
does and its overfitting advice. ``HeadConfig``, the command-line options, ``config.json``'s settings, ``list heads``
and the compare table all follow from the entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields

from pipeline.errors import PipelineError
from pipeline.stage2.heads.knobs import (
    AdamKnobs,
    ClassWeightKnobs,
    KNNKnobs,
    LogRegKnobs,
    MLPKnobs,
    RidgeKnobs,
    StandardizeKnobs,
    TailKnobs,
)

PROTOCOL_SETTINGS = ("seed", "device")  # HeadConfig's run fields a head may read as well as its knobs


@dataclass(frozen=True)
class HeadSpec:
    """One head, as far as it can be known without importing it."""

    name: str
    target: str  # "package.module:Class", imported on first use
    description: str  # one line, for `list heads` and --head's help
    knobs: tuple[type, ...] = ()  # the knob groups whose fields it reads
    reads: tuple[str, ...] = ()  # of PROTOCOL_SETTINGS, those it reads (seed: its draws; device: where it runs)
    tasks: tuple[str, ...] = ("classify",)  # what it can do: "classify" (labels), "regress" (targets), "multilabel"
    in_all: tuple[str, ...] = ("classify",)  # the tasks for which `compare --heads all` trains it
    inputs: str = "features"  # what fit/logits take: "features" (N, D) or "activations" (the tail head)
    advice: str = "try more regularisation"  # what reins it in when it overfits: its own options
    sweeps: str = ""  # what --sweep chooses for it, in words ("": nothing; see the class's sweep_grid)
    # Its time beside the other heads' on a CPU (0 a second or two, 4 the longest): compare starts the costliest
    # first, which packs best when two heads train at once (pipeline.workers). On the bench's real features (60,000
    # x 1,280; 50,000 x 512) mlp took 14.2 / 8.3 s, logreg 14.5 / 5.5, k-NN 10.1 / 6.5, linear 4.2 / 3.7, centroid
    # 1.6 / 1.6.
    cost: int = 1
    # Its big matmuls split over the cores free to it (fitting.in_pieces): of two heads of one cost, compare starts
    # the one on one thread first, so that the one that spreads ends later and takes the core the other leaves.
    spreads: bool = False

    @property
    def settings(self) -> tuple[str, ...]:
        """The HeadConfig fields it reads (``config.json`` records only these)."""
        return tuple(f.name for group in self.knobs for f in fields(group)) + self.reads

    def uses(self, name: str) -> bool:
        return name in self.settings

    def load(self) -> type:
        """The head class, a :class:`~pipeline.stage2.heads.base.Head` (imports its module, and torch with it)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


GRADIENT = (AdamKnobs, StandardizeKnobs, ClassWeightKnobs)

HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec(
            "linear", "pipeline.stage2.heads.linear:LinearHead",
            "The reference recipe: nn.Linear(D, C), cross-entropy, Adam, mini-batches over the in-memory matrix",
            knobs=GRADIENT, reads=PROTOCOL_SETTINGS, tasks=("classify", "regress", "multilabel"),
            in_all=("classify", "regress", "multilabel"),
            advice="try fewer --epochs or a --weight-decay", sweeps="lr, weight decay and epochs",
        ),
        HeadSpec(
            "logreg", "pipeline.stage2.heads.logreg:LogRegHead",
            "Multinomial logistic regression (scikit-learn's objective) on standardised features",
            knobs=(LogRegKnobs, ClassWeightKnobs), reads=PROTOCOL_SETTINGS,
            tasks=("classify", "multilabel"), in_all=("classify", "multilabel"),
            advice="try a smaller --C (stronger L2)", sweeps="C", cost=4, spreads=True,
        ),
        HeadSpec(
            "mlp", "pipeline.stage2.heads.mlp:MLPHead",
            "One hidden layer: Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, C), trained like linear",
            knobs=(*GRADIENT, MLPKnobs), reads=PROTOCOL_SETTINGS, tasks=("classify", "regress", "multilabel"),
            in_all=("classify", "regress", "multilabel"),
            advice="try fewer --epochs, a --weight-decay or a higher --dropout",
            sweeps="lr, weight decay and epochs", cost=4,
        ),
        HeadSpec(
            "knn", "pipeline.stage2.heads.knn:KNNHead",
            "k nearest neighbours by cosine similarity on L2-normalised features; votes weighted by exp(sim / 0.07) "
            "(dinov2's k-NN evaluation), and by inverse class frequency with --class-weight balanced",
            knobs=(KNNKnobs, ClassWeightKnobs), reads=PROTOCOL_SETTINGS, advice="try a larger --k", sweeps="k", cost=3,
            tasks=("classify", "multilabel"), in_all=("classify", "multilabel"), spreads=True,
        ),
        HeadSpec(
            "centroid", "pipeline.stage2.heads.centroid:CentroidHead", "Nearest class mean (Euclidean)",
            tasks=("classify", "multilabel"), in_all=("classify", "multilabel"),
            advice="a nearest class mean has nothing to tune; more training examples per class help", cost=0,
        ),
        HeadSpec(
            "ridge", "pipeline.stage2.heads.ridge:RidgeHead",
            "Closed-form ridge regression on standardised features; alpha chosen with --sweep",
            knobs=(RidgeKnobs,), reads=("device",), tasks=("classify", "regress"),
            in_all=("regress",),  # a classification `compare --heads all` keeps its five heads; --heads ridge adds it
            advice="try a larger --alpha", sweeps="alpha",
        ),
        HeadSpec(
            "tail", "pipeline.stage2.heads.tail:TailHead",
            "The backbone's blocks after the --cache-at node plus a new nn.Linear(D, C), trained with Adam on the "
            "cached activation maps (extract --cache-at NODE); export puts the blocks back into the backbone",
            knobs=(AdamKnobs, ClassWeightKnobs, TailKnobs), reads=PROTOCOL_SETTINGS, inputs="activations", cost=5,
        ),
    )
}  # fmt: skip


def spec(name: str) -> HeadSpec:
    """The registry entry of ``name``; an unknown name is one line listing the known ones."""
    try:
        return HEADS[name]
    except KeyError:
        raise PipelineError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}") from None


def head_class(name: str) -> type:
    return spec(name).load()


def knob_groups() -> tuple[type, ...]:
    """Every knob group a registered head reads, each once, in registry order."""
    return tuple(dict.fromkeys(group for s in HEADS.values() for group in s.knobs))
