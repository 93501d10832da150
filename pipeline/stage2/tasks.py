"""What differs between tasks, in one object per task: ``TASKS = {"classify": Classify(), "regress": Regress()}``.

Everything else in stage two (the protocol, training one head, comparing, writing the artefacts) is one code path
that asks the run's :class:`Task`: which part of train is held out and how it is scored, which metrics record the
head gets, the compare table's columns, its rows and how they rank, the figures, what ``config.json`` records (and
so what ``export`` writes) and which options make no sense for the task.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stage2 import answers, plots, stats, thresholds
from pipeline.stage2.evaluate import (
    HeadMetrics,
    RegressionMetrics,
    classification_metrics,
    r2_scores,
    regression_metrics,
    report_notes,
    summarize,
    summarize_regression,
)
from pipeline.stage2.heads import HEADS, HeadConfig, build_head
from pipeline.stage2.multilabel import (
    DEFAULT_THRESHOLD,
    MultiLabelMetrics,
    choose_thresholds,
    map_p_value,
    mean_average_precision,
    multilabel_intervals,
    multilabel_metrics,
    sigmoid,
    stratified_multilabel_holdout,
    summarize_multilabel,
)
from pipeline.stage2.protocol import (
    Fitted,
    choose_threshold,
    few_shot,
    random_holdout,
    shots_short,
    stratified_holdout,
)
from pipeline.store import FeatureMeta, FeatureSet, SplitFeatures, check_classes_have_rows, read_meta

Column = tuple[str, str, str]  # (header, row key, format)
FIT_SECONDS: Column = ("fit s", "fit_seconds", "{:.2f}")
TOTAL_SECONDS: Column = ("total s", "total_seconds", "{:.2f}")  # extraction + fit; a baseline's training time
EVAL_SECONDS: Column = ("eval s", "eval_seconds", "{:.2f}")  # predictions and metrics on train and val
HEAD_SECONDS: Column = ("head s", "head_seconds", "{:.2f}")  # what the user waits per head: fit, eval, writing
INTERVAL = "[{0[0]:.3f}, {0[1]:.3f}]"  # a 95% interval (pipeline.stage2.stats)


class Task(ABC):
    """One kind of answer a head gives. A task implements:

    - ``check(cfg)``: the options and heads that make no sense for it refused in one line (a head can do the tasks
      its registry entry lists in ``tasks``); returns ``cfg`` as it is recorded;
    - ``truth(split)``: what a head learns from a split (labels, targets, a multi-hot matrix) and ``outputs(fs)``,
      the names of the head's outputs (classes, targets, labels);
    - ``train_rows(fs, cfg)``: the train rows a head is fitted on (few-shot sampling where it means something);
    - ``holdout`` and ``held_out_score``: the held-out part of train ``--sweep`` chooses on, and what it maximises;
    - ``evaluate(fitted, fs)``: the metrics record (a frozen dataclass with ``to_json()`` for metrics.json and a
      ``report()`` for the printed text);
    - ``columns``, ``compare_row``, ``rank``: the compare table, its row for one head, how rows rank and the key
      "best" is chosen by; ``bars``: compare.png's bars;
    - ``figure_jobs`` (``write_plots`` runs them) and ``figures``: the PNGs beside a head;
    - ``config_record(fs, metrics)``: what ``config.json`` adds (export reads it: e.g. the target names, or per-label
      thresholds), and ``refuse(option)`` for compare's options that do not apply;
    - ``answer_rows``: ``predictions.csv``'s rows (:mod:`pipeline.stage2.answers`), ``errors``: how ``errors.png``
      captions its images (None: no errors.png), and ``tie_p_value``: the paired test of two heads' val answers
      that ``compare`` marks the heads tied with the best by.

    :class:`MultiLabel` (issue 26) shows what a third task takes: a multi-hot ``truth``, a label-stratified holdout
    scored by mAP, its record (:mod:`pipeline.stage2.multilabel`), per-label thresholds in ``config_record``, and an
    entry in ``TASKS``; heads list it in their registry entry's ``tasks``.
    """

    name: ClassVar[str]
    score: ClassVar[str]  # the record's field (and compare row's key) that ranks heads by default
    score_name: ClassVar[str]  # the held-out score in words, for the sweep's record and log
    columns: ClassVar[tuple[Column, ...]]
    bars: ClassVar[tuple[tuple[str, str], ...]]  # compare.png: (row key, label) pairs
    record: ClassVar[type]  # its metrics record
    errors: ClassVar[str | None] = "classes"  # errors.png's captions (answers.CAPTIONS); None: no errors.png

    def check(self, cfg: HeadConfig) -> HeadConfig:
        if self.name not in HEADS[cfg.head].tasks:
            raise PipelineError(self.wrong_head(cfg.head))
        return cfg

    def wrong_head(self, head: str) -> str:
        able = [name for name, spec in HEADS.items() if self.name in spec.tasks]
        return f"the {head} head does not {self.name}; use {', '.join(able)}"

    def refuse(self, option: str) -> None:
        """Compare's options that do not apply to this task (``--baseline``, ``--shots``): one line. Every option
        applies unless the task says otherwise."""
        return None

    @abstractmethod
    def truth(self, split: SplitFeatures) -> np.ndarray: ...

    @abstractmethod
    def outputs(self, fs: FeatureSet) -> list[str]: ...

    def train_rows(self, fs: FeatureSet, cfg: HeadConfig) -> tuple[Any, np.ndarray]:
        return fs.train.features, self.truth(fs.train)

    @abstractmethod
    def holdout(self, y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        """(fit rows, held-out rows, why none can be held out or None)."""

    @abstractmethod
    def held_out_score(self, y: np.ndarray, pred: np.ndarray) -> float: ...

    def sweep_scores_record(self, scores: list[float]) -> dict[str, Any]:
        return {"metric": self.score_name, f"held_out_{self.score_name}": scores}

    @abstractmethod
    def evaluate(self, fitted: Fitted, fs: FeatureSet) -> Any: ...

    def compare_row(self, metrics: Any) -> dict[str, Any]:
        """One head's line of compare.json: the table's columns and what the CLI says below the table."""
        # a column is a field of the record or one of its details (intervals, eval seconds)
        row = {k: getattr(metrics, k, metrics.details.get(k)) for _, k, _ in self.columns} | {"task": self.name}
        for key, _ in self.bars:  # compare.png's error bars: each bar's interval, where the record has one
            if metrics.details.get(f"{key}_interval") is not None:
                row[f"{key}_interval"] = metrics.details[f"{key}_interval"]
        row |= {"train_val_gap": metrics.train_val_gap, "overfitting": metrics.overfitting}
        row["n_train_used"] = metrics.n_train_used
        if metrics.sweep is not None:
            row["sweep"] = {k: v for k, v in metrics.sweep.items() if k != "grid" and not k.startswith("held_out_")
                            or k == "held_out_fraction"}  # fmt: skip
        return row

    def rank(self, rows: list[dict[str, Any]]) -> str:
        """Sorts ``rows`` in place as the table shows them; returns the key "best" is chosen by."""
        return self.score

    def table_columns(self, rows: list[dict[str, Any]]) -> tuple[Column, ...]:
        return self.columns

    @abstractmethod
    def figure_jobs(self, metrics: Any, out: Path, *, fs: FeatureSet, head: Any, label: str,
                    note: str) -> list[Callable[[], object]]:  # fmt: skip
        """One call per PNG beside a head, in any order or process (``training.train_one`` may draw some in a
        forked child, on a core left idle)."""

    def write_plots(self, metrics: Any, out: Path, *, fs: FeatureSet, head: Any, label: str, note: str) -> None:
        for job in self.figure_jobs(metrics, out, fs=fs, head=head, label=label, note=note):
            job()

    def figures(self, metrics: Any) -> list[str]:
        """The PNGs ``write_plots`` wrote, by name."""
        return ["curves.png"] if metrics.history else []

    def config_record(self, fs: FeatureSet, metrics: Any) -> dict[str, Any]:
        return {}

    @abstractmethod
    def answer_rows(self, fs: FeatureSet, outputs: np.ndarray, metrics: Any) -> list[dict[str, Any]]:
        """``predictions.csv``: one row per val image from ``outputs``, the val outputs ``evaluate`` computed."""

    @abstractmethod
    def tie_p_value(self, best: list[dict[str, str]], other: list[dict[str, str]]) -> float:
        """The p-value that two heads score the same on val, from their ``predictions.csv`` rows (the same images
        in the same order): at least :data:`stats.ALPHA` and they are tied."""


class Classify(Task):
    """Labels: softmax over the classes; accuracy, per-class P/R/F1, confusion, PR/ROC, thresholds, imbalance."""

    name = "classify"
    score = "val_accuracy"
    score_name = "accuracy"
    columns = (
        ("head", "head", "{}"),
        ("train acc", "train_accuracy", "{:.4f}"),
        ("val acc", "val_accuracy", "{:.4f}"),
        ("95% interval", "val_accuracy_interval", INTERVAL),
        ("tied", "tied_with_best", "{}"),
        ("balanced acc", "balanced_accuracy", "{:.4f}"),
        ("worst recall", "worst_class_recall", "{:.4f}"),
        ("macro F1", "macro_f1", "{:.4f}"),
        ("val loss", "val_loss", "{:.4f}"),
        FIT_SECONDS,
        EVAL_SECONDS,
        HEAD_SECONDS,
        TOTAL_SECONDS,
    )
    bars = plots.CLASSIFY_BARS
    record = HeadMetrics

    def truth(self, split: SplitFeatures) -> np.ndarray:
        return split.labels

    def outputs(self, fs: FeatureSet) -> list[str]:
        return fs.classes

    def train_rows(self, fs: FeatureSet, cfg: HeadConfig) -> tuple[Any, np.ndarray]:
        check_classes_have_rows(fs)
        train = few_shot(fs.train, shots=cfg.shots, seed=cfg.seed) if cfg.shots else fs.train
        return train.features, train.labels

    def holdout(self, y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        fit, held = stratified_holdout(y, fraction=fraction, seed=seed)
        too_few = not len(held) or len(np.unique(y[fit])) < 2
        return fit, held, "too few training examples per class" if too_few else None

    def held_out_score(self, y: np.ndarray, pred: np.ndarray) -> float:
        return float((pred.argmax(1) == y).mean())

    def sweep_scores_record(self, scores: list[float]) -> dict[str, Any]:
        return {"held_out_accuracy": scores}  # as metrics.json has always said it

    def evaluate(self, fitted: Fitted, fs: FeatureSet) -> HeadMetrics:
        head, cfg, X, y = fitted.head, fitted.cfg, fitted.X, fitted.y
        t0 = time.perf_counter()
        positive = thresholds.positive_index(cfg.positive, fs.classes) if cfg.positive else None
        train_y, train_proba, train_note = head.train_predictions(X, y)
        val_proba = head.predict_proba(fs.val.features)
        head.val_outputs = val_proba  # kept for predictions.csv (training.train_one): never predicted twice
        spec = head.spec
        extra: dict[str, Any] = {
            "head": cfg.head,
            "class_weight": cfg.class_weight if spec.uses("class_weight") else "n/a",
            "standardize": cfg.standardize if spec.uses("standardize") else "n/a",
            "shots": cfg.shots,
            "n_train_used": len(y),
            **fitted.fit.info,
            "sweep": fitted.sweep,
            "curves": thresholds.curves(fs.val.labels, val_proba, fs.classes, positive=positive),
            "imbalance": thresholds.imbalance(y, fs.classes),
        }
        if cfg.shots:
            extra["shots_short"] = shots_short(fs, shots=cfg.shots)
        if train_note is not None:
            extra["train_metrics_note"] = train_note
        if cfg.threshold_target:
            choice = choose_threshold(X, y, cfg=cfg, dims=fitted.dims, positive=positive)
            report = thresholds.threshold_report(
                fs.val.labels, val_proba, positive=positive, choice=choice, num_classes=len(fs.classes)
            )
            extra["threshold"] = {"positive": cfg.positive, **cfg.threshold_target, **report}
        extra |= stats.classification_intervals(fs.val.labels, val_proba, seed=cfg.seed)
        train_m = classification_metrics(train_y, train_proba, fs.classes)
        val_m = classification_metrics(fs.val.labels, val_proba, fs.classes)
        extra["eval_seconds"] = time.perf_counter() - t0
        return summarize(train=train_m, val=val_m, fit_seconds=fitted.seconds, extra=extra)

    def compare_row(self, metrics: HeadMetrics) -> dict[str, Any]:
        row = super().compare_row(metrics) | {"shots": metrics.shots}
        if metrics.shots_short:
            row["shots_short"] = metrics.shots_short
        row["imbalance"] = metrics.imbalance
        if metrics.threshold:
            row["threshold"] = {k: v for k, v in metrics.threshold.items() if k != "confusion_matrix"}
        return row | {"notes": report_notes(metrics)}

    def rank(self, rows: list[dict[str, Any]]) -> str:
        # train's classes are the same for every head: when imbalanced, balanced accuracy ranks
        return "balanced_accuracy" if rows and rows[0].get("imbalance") else self.score

    def table_columns(self, rows: list[dict[str, Any]]) -> tuple[Column, ...]:
        """When train's classes are imbalanced, balanced accuracy and the worst class's recall lead: accuracy
        flatters a head that neglects the small classes."""
        columns = list(self.columns)
        if any(r.get("imbalance") for r in rows):
            lead = [c for c in columns if c[1] in ("balanced_accuracy", "worst_class_recall")]
            columns = [columns[0], *lead, *(c for c in columns[1:] if c not in lead)]
        return tuple(columns)

    def figure_jobs(self, metrics: HeadMetrics, out: Path, *, fs: FeatureSet, head: Any, label: str,
                    note: str) -> list[Callable[[], object]]:  # fmt: skip
        name = metrics.head
        jobs: list[Callable[[], object]] = [
            lambda: plots.confusion_png(metrics.confusion_matrix, fs.classes, out / "confusion.png",
                                        title=f"{name} head: val confusion\n{label}")
        ]  # fmt: skip
        if metrics.threshold and metrics.threshold.get("confusion_matrix"):  # beside the argmax one
            at = metrics.threshold
            jobs.append(lambda: plots.confusion_png(
                at["confusion_matrix"], fs.classes, out / "confusion_threshold.png",
                title=f"{name} head: val confusion at threshold {at['threshold']:.3f} for {at['positive']!r}\n{label}",
            ))  # fmt: skip
        if metrics.curves and metrics.curves.per_class:
            jobs.append(lambda: plots.pr_roc_png(
                metrics.curves, out / "pr_roc.png", title=f"{name} head: val PR and ROC ({label})",
                mark=metrics.threshold,
            ))  # fmt: skip
        if metrics.history:
            jobs.append(lambda: plots.curves_png(
                metrics.history, out / "curves.png", title=f"{name} head: loss and accuracy per epoch ({label})",
                note=note,
            ))  # fmt: skip
        return jobs

    def config_record(self, fs: FeatureSet, metrics: HeadMetrics) -> dict[str, Any]:
        if not metrics.threshold:
            return {}
        return {"decision": {k: metrics.threshold[k] for k in ("positive", "threshold")}}  # what predict applies

    def answer_rows(self, fs: FeatureSet, outputs: np.ndarray, metrics: HeadMetrics) -> list[dict[str, Any]]:
        return answers.classification_rows(fs.val.ids, fs.val.labels, outputs, self.outputs(fs))

    def tie_p_value(self, best: list[dict[str, str]], other: list[dict[str, str]]) -> float:
        """McNemar's test of the rows each gets right."""
        right = [np.array([r["true"] == r["predicted"] for r in rows]) for rows in (best, other)]
        return stats.mcnemar(*right)

    def figures(self, metrics: HeadMetrics) -> list[str]:
        pr_roc = ["pr_roc.png"] if metrics.curves and metrics.curves.per_class else []
        at = ["confusion_threshold.png"] if metrics.threshold and metrics.threshold.get("confusion_matrix") else []
        return ["confusion.png", *at, *pr_roc, *super().figures(metrics)]


class Regress(Task):
    """Regression targets (``extract --targets``): the head's outputs are the values; MSE, RMSE, MAE and R^2."""

    name = "regress"
    score = "val_r2"
    score_name = "R^2"
    columns = (
        ("head", "head", "{}"),
        ("val R^2", "val_r2", "{:.4f}"),
        ("95% interval", "val_r2_interval", INTERVAL),
        ("tied", "tied_with_best", "{}"),
        ("val RMSE", "val_rmse", "{:.4g}"),
        ("val MAE", "val_mae", "{:.4g}"),
        ("train R^2", "train_r2", "{:.4f}"),
        ("R^2 gap", "train_val_gap", "{:+.4f}"),
        FIT_SECONDS,
        EVAL_SECONDS,
        HEAD_SECONDS,
        TOTAL_SECONDS,
    )
    bars = plots.REGRESS_BARS
    record = RegressionMetrics
    errors = None  # predictions.csv only
    REFUSED = {
        "shots": "--shots draws K examples per class",
        "positive": "--positive chooses a class threshold",
        "baseline": "--baseline compares classifiers",
    }

    def check(self, cfg: HeadConfig) -> HeadConfig:
        super().check(cfg)
        if cfg.shots:
            self.refuse("shots")
        if cfg.positive:
            self.refuse("positive")
        return replace(cfg, task=self.name)

    def wrong_head(self, head: str) -> str:
        able = [name for name, spec in HEADS.items() if self.name in spec.tasks]
        return (
            f"the {head} head classifies labels only; for the regression targets of this file use "
            f"{', '.join(able)} (or --task classify to predict the labels)"
        )

    def refuse(self, option: str) -> None:
        raise PipelineError(f"{self.REFUSED[option]}: not for regression targets (or --task classify)")

    def truth(self, split: SplitFeatures) -> np.ndarray:
        return split.targets

    def outputs(self, fs: FeatureSet) -> list[str]:
        return list(fs.meta.targets["names"])

    def holdout(self, y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        fit, held = random_holdout(len(y), fraction=fraction, seed=seed)
        return fit, held, None if len(held) else "too few training rows"

    def held_out_score(self, y: np.ndarray, pred: np.ndarray) -> float:
        """R^2 averaged over the targets."""
        return float(r2_scores(y, pred).mean())

    def sweep_scores_record(self, scores: list[float]) -> dict[str, Any]:
        return {"metric": "R^2", "held_out_r2": scores}

    def evaluate(self, fitted: Fitted, fs: FeatureSet) -> RegressionMetrics:
        head, cfg, X, Y = fitted.head, fitted.cfg, fitted.X, fitted.y
        t0 = time.perf_counter()
        names = self.outputs(fs)
        extra = {
            "head": cfg.head,
            "targets": names,
            "targets_source": fs.meta.targets.get("source"),
            "standardize": cfg.standardize if head.spec.uses("standardize") else "n/a",
            "n_train_used": len(Y),
            **fitted.fit.info,
            "sweep": fitted.sweep,
        }
        val_pred = head.logits(fs.val.features)
        head.val_outputs = val_pred  # kept for predictions.csv (training.train_one)
        train_m, val_m = (
            regression_metrics(Y, head.logits(X), names),
            regression_metrics(fs.val.targets, val_pred, names),
        )
        extra |= stats.regression_intervals(fs.val.targets, val_pred, seed=cfg.seed)
        extra["eval_seconds"] = time.perf_counter() - t0
        return summarize_regression(train=train_m, val=val_m, fit_seconds=fitted.seconds, extra=extra)

    def compare_row(self, metrics: RegressionMetrics) -> dict[str, Any]:
        row = super().compare_row(metrics) | {"imbalance": None}
        row |= {"val_mse": metrics.val_mse, "per_target": metrics.per_target}
        return row | {"notes": report_notes(metrics)}

    def rank(self, rows: list[dict[str, Any]]) -> str:
        rows.sort(key=lambda r: -r[self.score])  # higher R^2 first
        return self.score

    def figure_jobs(self, metrics: RegressionMetrics, out: Path, *, fs: FeatureSet, head: Any, label: str,
                    note: str) -> list[Callable[[], object]]:  # fmt: skip
        name = metrics.head
        jobs: list[Callable[[], object]] = [lambda: plots.regression_png(
            fs.val.targets, head.logits(fs.val.features), self.outputs(fs), out / "regression.png",
            title=f"{name} head: val predicted vs true, residuals ({label})",
        )]  # fmt: skip
        if metrics.history:
            jobs.append(lambda: plots.curves_png(
                metrics.history, out / "curves.png", title=f"{name} head: loss (MSE of standardised targets) and "
                f"R^2 per epoch ({label})", note=note,
            ))  # fmt: skip
        return jobs

    def figures(self, metrics: RegressionMetrics) -> list[str]:
        return ["regression.png", *super().figures(metrics)]

    def config_record(self, fs: FeatureSet, metrics: Any) -> dict[str, Any]:
        return {"targets": self.outputs(fs)}

    def answer_rows(self, fs: FeatureSet, outputs: np.ndarray, metrics: Any) -> list[dict[str, Any]]:
        return answers.regression_rows(fs.val.ids, fs.val.targets, outputs, self.outputs(fs))

    def tie_p_value(self, best: list[dict[str, str]], other: list[dict[str, str]]) -> float:
        """A paired bootstrap of val R^2."""

        def keys(prefix: str) -> list[str]:
            return [k for k in best[0] if k.startswith(prefix)] if best else []

        values = [answers.columns(rows, keys("predicted_")) for rows in (best, other)]
        return stats.paired_bootstrap(answers.columns(best, keys("true_")), *values)


class MultiLabel(Task):
    """Several labels per image (``label_kind`` "multi"): a multi-hot truth, per-label sigmoid + binary
    cross-entropy (linear, mlp, one-vs-rest logreg; knn's vote shares, centroid's Platt-scaled distances), an
    iteratively stratified held-out part of train scored by mAP, each label's threshold chosen on it (maximum F1)
    and recorded for export and predict."""

    name = "multilabel"
    score = "val_map"
    score_name = "mAP"
    columns = (
        ("head", "head", "{}"),
        ("val mAP", "val_map", "{:.4f}"),
        ("95% interval", "val_map_interval", INTERVAL),
        ("tied", "tied_with_best", "{}"),
        ("micro F1", "val_micro_f1", "{:.4f}"),
        ("micro F1 95%", "val_micro_f1_interval", INTERVAL),
        ("macro F1", "val_macro_f1", "{:.4f}"),
        ("macro F1 95%", "val_macro_f1_interval", INTERVAL),
        ("subset acc", "val_subset_accuracy", "{:.4f}"),
        ("Hamming", "val_hamming_loss", "{:.4f}"),
        ("train mAP", "train_map", "{:.4f}"),
        ("mAP gap", "train_val_gap", "{:+.4f}"),
        FIT_SECONDS,
        EVAL_SECONDS,
        HEAD_SECONDS,
        TOTAL_SECONDS,
    )
    bars = (("val_map", "val mAP"), ("train_map", "train mAP"))
    errors = "label sets"
    REFUSED = {
        "shots": "--shots draws K examples per class",
        "positive": "--positive chooses one class's threshold (each label's is chosen on held-out train)",
        "baseline": "--baseline compares single-label classifiers",
        "class_weight": "--class-weight balanced weights the classes of one label per image",
    }

    record = MultiLabelMetrics

    def check(self, cfg: HeadConfig) -> HeadConfig:
        super().check(cfg)
        if cfg.shots:
            self.refuse("shots")
        if cfg.positive:
            self.refuse("positive")
        if cfg.class_weight == "balanced" and HEADS[cfg.head].uses("class_weight"):
            self.refuse("class_weight")
        return replace(cfg, task=self.name)

    def wrong_head(self, head: str) -> str:
        able = [name for name, spec in HEADS.items() if self.name in spec.tasks]
        return f"the {head} head does not learn several labels per image; use {', '.join(able)}"

    def refuse(self, option: str) -> None:
        raise PipelineError(f"{self.REFUSED[option]}: not for several labels per image")

    def truth(self, split: SplitFeatures) -> np.ndarray:
        return split.multi_hot.astype(np.float32)

    def outputs(self, fs: FeatureSet) -> list[str]:
        return fs.classes

    def holdout(self, y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        # Iteratively stratified: each label with 2+ positives has one on both sides, so its held-out AP counts
        # and its threshold is chosen (a random part left the rare labels out: 0.5 for their thresholds).
        fit, held = stratified_multilabel_holdout(y, fraction=fraction, seed=seed)
        return fit, held, None if len(held) else "too few training rows"

    def held_out_score(self, y: np.ndarray, pred: np.ndarray) -> float:
        return mean_average_precision(y, pred)  # the ranking of logits is that of probabilities

    def sweep_scores_record(self, scores: list[float]) -> dict[str, Any]:
        return {"metric": "mAP", "held_out_map": scores}

    def label_thresholds(self, fitted: Fitted) -> tuple[np.ndarray, str]:
        """Each label's threshold: maximum F1 on a held-out part of train (a head refitted on the rest), or 0.5
        each when too few rows can be held out."""
        X, y = fitted.X, fitted.y
        fit, held, too_few = self.holdout(y, fraction=THRESHOLD_FRACTION, seed=fitted.cfg.seed)
        if too_few or len(held) < MIN_THRESHOLD_ROWS:
            return np.full(y.shape[1], DEFAULT_THRESHOLD), f"default {DEFAULT_THRESHOLD} (too few train rows)"
        head = build_head(fitted.cfg, **fitted.dims)
        head.fit(X[fit], y[fit])
        chosen = choose_thresholds(y[held], sigmoid(head.logits(X[held])))
        return chosen, f"max F1 per label on {len(held)} held-out train rows"

    def evaluate(self, fitted: Fitted, fs: FeatureSet) -> MultiLabelMetrics:
        head, cfg, X, Y = fitted.head, fitted.cfg, fitted.X, fitted.y
        labels = self.outputs(fs)
        t0 = time.perf_counter()
        chosen, source = self.label_thresholds(fitted)  # learnt like the weights, so counted in fit s
        threshold_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        extra = {
            "head": cfg.head,
            "standardize": cfg.standardize if head.spec.uses("standardize") else "n/a",
            "n_train_used": len(Y),
            "holdout": "iteratively stratified by label",
            **fitted.fit.info,
            "sweep": fitted.sweep,
        }
        train_y, train_proba, note = head.train_predictions(X, Y)  # a note: the head scored train its own way (knn)
        if note is None:
            train_y, train_proba = Y, sigmoid(head.logits(X))
        else:
            extra["train_metrics_note"] = note
        val_y, val_proba = self.truth(fs.val), sigmoid(head.logits(fs.val.features))
        head.val_outputs = val_proba  # kept for predictions.csv (training.train_one)
        train_m = multilabel_metrics(train_y, train_proba, labels, thresholds=chosen)
        val_m = multilabel_metrics(val_y, val_proba, labels, thresholds=chosen)
        extra |= multilabel_intervals(val_y, val_proba, chosen, seed=cfg.seed)
        extra |= {"threshold_seconds": threshold_seconds, "eval_seconds": time.perf_counter() - t0}
        return summarize_multilabel(train=train_m, val=val_m, thresholds=chosen, threshold_source=source,
                                    fit_seconds=fitted.seconds + threshold_seconds, extra=extra)  # fmt: skip

    def compare_row(self, metrics: Any) -> dict[str, Any]:
        row = super().compare_row(metrics) | {"imbalance": None, "per_label": metrics.per_label}
        return row | {"notes": report_notes(metrics)}

    def rank(self, rows: list[dict[str, Any]]) -> str:
        rows.sort(key=lambda r: -r[self.score])  # higher mAP first
        return self.score

    def figure_jobs(self, metrics: Any, out: Path, *, fs: FeatureSet, head: Any, label: str,
                    note: str) -> list[Callable[[], object]]:  # fmt: skip
        if not metrics.history:
            return []
        score = stats.format_interval(metrics.val_map, metrics.details.get("val_map_interval"))
        return [lambda: plots.curves_png(
            metrics.history, out / "curves.png", title=f"{metrics.head} head: loss (binary cross-entropy summed "
            f"over labels) and label accuracy per epoch\n{label}\nthe trained head: val mAP {score} (95% interval)",
            note=note,
        )]  # fmt: skip

    def config_record(self, fs: FeatureSet, metrics: Any) -> dict[str, Any]:
        """What export and predict apply: the labels and each label's threshold on its sigmoid probability."""
        return {"labels": self.outputs(fs), "thresholds": list(metrics.thresholds)}

    def answer_rows(self, fs: FeatureSet, outputs: np.ndarray, metrics: Any) -> list[dict[str, Any]]:
        """Each image's true and decided labels, its loss and each label's probability (``outputs``)."""
        return answers.multilabel_rows(fs.val.ids, self.truth(fs.val), outputs, self.outputs(fs),
                                       thresholds=metrics.thresholds)  # fmt: skip

    def tie_p_value(self, best: list[dict[str, str]], other: list[dict[str, str]]) -> float:
        """A paired bootstrap of val mAP over images."""
        _, proba_best, truth = answers.label_sets(best)
        _, proba_other, _ = answers.label_sets(other)
        return map_p_value(truth, proba_best, proba_other)


THRESHOLD_FRACTION = 0.2  # of train, held out to choose each label's threshold
MIN_THRESHOLD_ROWS = 20


TASKS: dict[str, Task] = {"classify": Classify(), "regress": Regress(), "multilabel": MultiLabel()}


def resolve_task(asked: str, meta: FeatureMeta) -> str:
    """``--task`` as run: auto = regress when the file holds targets, multilabel when it holds several labels per
    image, else classify."""
    has, multi = bool(meta.targets), meta.label_kind == "multi"
    if asked == "multilabel" and not multi:
        raise PipelineError("--task multilabel: this feature file holds one label per image; extract a dataset "
                            "with several (a ';'-separated label column, --label-columns)")  # fmt: skip
    if multi and asked == "classify":
        raise PipelineError("--task classify: this feature file holds several labels per image; use --task "
                            "multilabel (or auto)")  # fmt: skip
    if asked == "auto":
        return "regress" if has else "multilabel" if multi else "classify"
    if asked == "regress" and not has:
        raise PipelineError("--task regress: this feature file holds no targets; extract it with --targets FILE.csv")
    return asked


def feature_task(path: Path, asked: str) -> str:
    """The task a run on the feature file ``path`` does (reads only its metadata)."""
    return resolve_task(asked, read_meta(path))


def with_task(cfg: HeadConfig, meta: FeatureMeta) -> HeadConfig:
    """``cfg`` with its task resolved for this file and checked by the task (recorded as "regress" only;
    classification configs stay as they were, so heads saved before regression existed compare equal)."""
    return TASKS[resolve_task(cfg.task, meta)].check(cfg)


def task_of(cfg: HeadConfig) -> Task:
    """The task of a config :func:`with_task` resolved ("auto" and "classify" both classify)."""
    return TASKS.get(cfg.task, TASKS["classify"])


def task_of_rows(rows: list[dict[str, Any]]) -> Task:
    """The task of compare rows (a from-scratch baseline's row classifies)."""
    names = {r.get("task", "classify") for r in rows}
    return TASKS[names.pop() if len(names) == 1 else "classify"]
