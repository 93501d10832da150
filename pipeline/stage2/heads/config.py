"""``HeadConfig``: one run of a head. Its own fields are the protocol (which head, ``--sweep``, ``--positive``,
``--layer``, ``--task``, few-shot, seed, device); the heads' knobs come from the knob groups their registry entries
name (:mod:`pipeline.stage2.heads.knobs`), mixed in as bases. Each field carries its command-line help (and
choices) as metadata, so ``train-head`` and ``compare`` build their options from this one place. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.devices import DEVICES
from pipeline.errors import PipelineError
from pipeline.exclude import exclude_option
from pipeline.options import option
from pipeline.stage2.heads.knobs import CLASS_WEIGHTS, DEFAULT_BATCH, SOLVERS, one_of
from pipeline.stage2.heads.registry import HEADS, knob_groups

TASKS = ("auto", "classify", "regress", "multilabel")
__all__ = ["CLASS_WEIGHTS", "DEFAULT_BATCH", "SOLVERS", "TASKS", "HeadConfig", "RunOptions"]


@dataclass(frozen=True)
class RunOptions:
    """What a run asks of stage two, whatever the head: the protocol around the fit."""

    head: str = option("linear", "Head type.", cli=False)  # the commands take --head / --heads themselves
    sweep: bool = option(
        False,
        "Choose lr/weight decay (linear, mlp), C (logreg, 45 values), k (knn) or alpha (ridge) on a held-out 20% of "
        "train, then refit on all of train; val is only reported.",
        flag=True,
    )
    positive: str | None = option(
        None,
        "The class that matters: choose a probability threshold for it (with --target-recall or "
        "--target-precision) on a held-out 20% of train; val is only reported. Curves are of this class.",
    )
    target_recall: float | None = option(None, "Recall of --positive the threshold must reach, in (0, 1].")
    target_precision: float | None = option(None, "Precision of --positive the threshold must reach, in (0, 1].")
    layer: str | None = option(
        None,
        "Which stored layer to train on (files made with extract --layers): a layer name, or 'all' (default: "
        "all, their concatenation).",
    )
    task: str = option(
        "auto",
        "classify (labels), regress (the file's --targets) or multilabel (several labels per image); auto = regress "
        "when the file has targets, multilabel when it has several labels per image.",
        choices=TASKS,
    )
    shots: int | None = option(None, "Train on K examples per class (seeded sample).", cli=False)
    seed: int = option(0, "Seed of initialisation, batches and samples.")
    device: str = option("auto", "Where torch heads train.", choices=DEVICES)
    exclude: str | None = exclude_option()  # rows left out when the features are read (runs.read_run_features)

    def check(self) -> None:
        if self.head not in HEADS:
            raise PipelineError(f"unknown head {self.head!r}; choose one of: {', '.join(HEADS)}")
        one_of(self, "task", TASKS)
        self._check_threshold()
        if self.shots is not None and self.shots < 1:
            raise PipelineError(f"--shots must be at least 1, not {self.shots}")

    def _check_threshold(self) -> None:
        targets = [n for n in ("target_recall", "target_precision") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise PipelineError("give --target-recall or --target-precision, not both")
        for name in targets:
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be in (0, 1], not {value}")
        if targets and not self.positive:
            raise PipelineError(f"--{targets[0].replace('_', '-')} needs --positive CLASS: the class it is about")
        # --positive alone is allowed: its curves (two classes) are drawn, and no threshold is chosen

    @property
    def threshold_target(self) -> dict[str, float] | None:
        """``{"target_recall": R}`` or ``{"target_precision": P}`` when a threshold is asked for, else None."""
        for name in ("target_recall", "target_precision"):
            if getattr(self, name) is not None:
                return {name: getattr(self, name)}
        return None


_GROUPS = knob_groups()


@dataclass(frozen=True)
class HeadConfig(RunOptions, *reversed(_GROUPS)):  # type: ignore[misc]  # bases from the registry: knobs first
    """One run of one head: the protocol (:class:`RunOptions`) plus every registered head's knobs; each head reads
    the ones its registry entry names."""

    def __post_init__(self) -> None:
        RunOptions.check(self)
        for group in _GROUPS:
            group.check(self)


def sweep_key(point: dict[str, float]) -> tuple:
    """A ``--sweep`` grid point as a key of ``Head.held_out_logits`` (the held-out outputs of the points a sweep
    fitted, which choice.guard tests), whatever the order of its settings."""
    return tuple(sorted(point.items()))
