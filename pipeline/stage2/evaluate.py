"""Metrics that tell whether features are good: accuracy, balanced accuracy, per-class P/R/F1, confusion; for
regression targets MSE, RMSE, MAE and R^2 per target and averaged."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from pipeline.stage2.heads.registry import HEADS
from pipeline.stage2.stats import balanced_accuracy, confusion_matrix, log_loss, precision_recall_f1
from pipeline.stage2.thresholds import Curves, curves_line, imbalance_line, threshold_line

OVERFIT_GAP = 0.10  # train accuracy this far above val accuracy is flagged as overfitting


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Metrics of predicted class probabilities ``proba`` (N, C) against integer labels."""
    pred = proba.argmax(axis=1)
    p, r, f1, support = precision_recall_f1(y_true, pred, len(classes))
    present = support > 0  # macro averages over the classes this split has
    eps = 1e-7
    clipped = np.clip(proba, eps, 1.0)
    return {
        "accuracy": float((pred == y_true).mean()) if len(y_true) else 0.0,
        "balanced_accuracy": balanced_accuracy(y_true, pred, len(classes)) if len(y_true) else 0.0,
        "loss": log_loss(y_true, clipped / clipped.sum(1, keepdims=True)),
        "macro_precision": float(p[present].mean()),
        "macro_recall": float(r[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": [
            {
                "class": c,
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        ],
        "confusion_matrix": confusion_matrix(y_true, pred, len(classes)).tolist(),
    }


class _Record(Mapping[str, Any]):
    """A frozen metrics dataclass, complete when made: ``metrics.json`` is :meth:`to_json` (every field at the top
    level, ``details`` flattened, an optional field that is None left out, as it has always been written). Library
    code reads the typed fields; the mapping view (``metrics["val_accuracy"]``) is for scripts and older callers."""

    details: dict[str, Any]
    out: str | None
    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "sweep", "history", "threshold", "imbalance", "shots_short", "n_train_used", "curves",
    )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        fixed = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("details", "out") or (f.name in self.OPTIONAL and value is None):
                continue
            fixed[f.name] = value.to_json() if hasattr(value, "to_json") else value
        return {**fixed, **self.details}

    def _view(self) -> dict[str, Any]:
        return {**self.to_json(), **({"out": self.out} if self.out is not None else {})}

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())

    def overfit_words(self) -> str:
        """How the train - val gap reads, for the overfitting warning."""
        raise NotImplementedError


MetricsRecord = _Record  # the base of every task's metrics record (the multilabel task's is in its own module)


@dataclass(frozen=True)
class HeadMetrics(_Record):
    """One classification head's results: the fixed metrics as typed fields, what the run asked for (a sweep, a
    threshold, few-shot) as typed optional fields, and what depends on the head (its settings, the fit's own
    figures) in ``details``."""

    train_accuracy: float
    train_loss: float
    val_accuracy: float
    val_loss: float
    balanced_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    worst_class_recall: float
    worst_class: str
    train_val_gap: float
    overfitting: bool
    fit_seconds: float
    per_class: list[dict[str, Any]]
    confusion_matrix: list[list[int]]
    head: str = ""
    n_train_used: int | None = None  # train rows the head was fitted on (few-shot: the sample)
    shots: int | None = None
    curves: Curves | None = None  # val PR and ROC (absent from a from-scratch baseline's)
    threshold: dict[str, Any] | None = None  # --positive with a target: the threshold and val at it
    imbalance: dict[str, Any] | None = None  # train's class counts when imbalanced
    sweep: dict[str, Any] | None = None  # what --sweep chose, and on what
    shots_short: dict[str, int] | None = None  # --shots K: the classes that had fewer
    history: list[dict[str, float]] | None = None  # per-epoch curves of iterative heads
    details: dict[str, Any] = field(default_factory=dict)
    out: str | None = None  # the folder it was written to: where, not what, so not in metrics.json
    task: ClassVar[str] = "classify"

    def overfit_words(self) -> str:
        return (
            f"train accuracy exceeds val accuracy by {100 * self.train_val_gap:.1f} points (more than "
            f"{100 * OVERFIT_GAP:.0f})"
        )

    def report(self, *, title: str = "") -> str:
        return format_classification_report(self, title=title)


# ------------------------------------------------------------------------------------------ regression


def r2_scores(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column of (N, T) targets (0 for a constant column predicted exactly)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    sse = ((y - pred) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0)
    return np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), np.where(sse > 0, -np.inf, 0.0))


def regression_metrics(y_true: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, Any]:
    """MSE, RMSE, MAE and R^2 of (N, T) predictions, per target and averaged over the targets (in their units)."""
    y_true, pred = np.asarray(y_true, np.float64), np.asarray(pred, np.float64)
    err = pred - y_true
    mse, mae = (err**2).mean(0), np.abs(err).mean(0)
    r2 = r2_scores(y_true, pred)
    per = [
        {"target": n, "mse": float(mse[t]), "rmse": float(np.sqrt(mse[t])), "mae": float(mae[t]), "r2": float(r2[t])}
        for t, n in enumerate(names)
    ]
    return {k: float(np.mean([p[k] for p in per])) for k in ("mse", "rmse", "mae", "r2")} | {"per_target": per}


@dataclass(frozen=True)
class RegressionMetrics(_Record):
    """A regression head's results (``metrics.json``): val and train MSE, RMSE, MAE and R^2 averaged over the
    targets, the train - val R^2 gap, and per target in ``per_target`` (val) and ``train_per_target``."""

    val_r2: float
    val_rmse: float
    val_mae: float
    val_mse: float
    train_r2: float
    train_rmse: float
    train_mae: float
    train_mse: float
    train_val_gap: float  # train R^2 - val R^2
    overfitting: bool
    fit_seconds: float
    per_target: list[dict[str, Any]]
    train_per_target: list[dict[str, Any]]
    task: str = "regress"
    head: str = ""
    n_train_used: int | None = None
    sweep: dict[str, Any] | None = None
    history: list[dict[str, float]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    out: str | None = None

    def overfit_words(self) -> str:
        return f"train R^2 exceeds val R^2 by {self.train_val_gap:.3f} (more than {OVERFIT_GAP:g})"

    def report(self, *, title: str = "") -> str:
        return format_regression_report(self, title=title)


def _typed(extra: dict[str, Any] | None, record: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """``extra`` split into the record's typed fields and the rest (``details``)."""
    names = {f.name for f in fields(record)} - {"details", "out"}
    extra = dict(extra or {})
    return {k: extra.pop(k) for k in list(extra) if k in names}, extra


def summarize_regression(
    *, train: dict[str, Any], val: dict[str, Any], fit_seconds: float, extra: dict[str, Any] | None = None
) -> RegressionMetrics:
    gap = train["r2"] - val["r2"]
    typed, details = _typed(extra, RegressionMetrics)
    return RegressionMetrics(
        **{f"{split}_{k}": m[k] for split, m in (("val", val), ("train", train)) for k in ("r2", "rmse", "mae", "mse")},
        train_val_gap=gap,
        overfitting=bool(gap > OVERFIT_GAP),
        fit_seconds=fit_seconds,
        per_target=val["per_target"],
        train_per_target=train["per_target"],
        **typed,
        details=details,
    )


MAX_TARGETS_SHOWN = 20


def format_regression_report(metrics: RegressionMetrics, *, title: str = "") -> str:
    """What `train-head` prints for regression targets: averaged figures first, then one line per target."""
    m = metrics
    lines = [title] if title else []
    n = len(m.per_target)
    over = f" (mean of {n} targets)" if n > 1 else ""
    for split in ("val", "train"):
        r2, rmse, mae, mse = (getattr(m, f"{split}_{k}") for k in ("r2", "rmse", "mae", "mse"))
        lines.append(f"  {split:<5} R^2 {r2:.4f}   RMSE {rmse:.4g}   MAE {mae:.4g}   MSE {mse:.4g}{over}")
    lines += [
        f"  train - val R^2 gap {m.train_val_gap:+.4f}",
        f"  fit seconds         {m.fit_seconds:.2f}",
        "",
    ]
    width = max(6, *(len(p["target"]) for p in m.per_target))
    lines.append(f"  {'target':<{width}}  val R^2   RMSE        MAE         train R^2")
    for p, t in list(zip(m.per_target, m.train_per_target))[:MAX_TARGETS_SHOWN]:
        lines.append(f"  {p['target']:<{width}}  {p['r2']:.4f}    {p['rmse']:<10.4g}  {p['mae']:<10.4g}  {t['r2']:.4f}")
    if n > MAX_TARGETS_SHOWN:
        lines.append(f"  ... {n - MAX_TARGETS_SHOWN} more targets in metrics.json")
    notes = report_notes(m)
    if notes:
        lines += ["", *(f"  {note}" for note in notes)]
    return "\n".join(lines)


def summarize(
    *, train: dict[str, Any], val: dict[str, Any], fit_seconds: float, extra: dict[str, Any] | None = None
) -> HeadMetrics:
    """The metrics of one head: val metrics at the top level, train accuracy/loss and the gap."""
    gap = train["accuracy"] - val["accuracy"]
    typed, details = _typed(extra, HeadMetrics)
    worst = min((pc for pc in val["per_class"] if pc["support"]), key=lambda pc: pc["recall"], default=None)
    return HeadMetrics(
        train_accuracy=train["accuracy"],
        train_loss=train["loss"],
        val_accuracy=val["accuracy"],
        val_loss=val["loss"],
        balanced_accuracy=val["balanced_accuracy"],
        macro_precision=val["macro_precision"],
        macro_recall=val["macro_recall"],
        macro_f1=val["macro_f1"],
        worst_class_recall=worst["recall"] if worst else 0.0,
        worst_class=worst["class"] if worst else "",
        train_val_gap=gap,
        overfitting=bool(gap > OVERFIT_GAP),
        fit_seconds=fit_seconds,
        per_class=val["per_class"],
        confusion_matrix=val["confusion_matrix"],
        **typed,
        details=details,
    )


def format_report(metrics: HeadMetrics | RegressionMetrics, *, title: str = "") -> str:
    """A readable table of one head's metrics (what `train-head` prints): the record's task says how."""
    return metrics.report(title=title)


def format_classification_report(metrics: HeadMetrics, *, title: str = "") -> str:
    """A classifier's figures, per-class table, confusion matrix and notes."""
    m = metrics
    lines = [title] if title else []
    accuracy = [
        f"  train accuracy    {m.train_accuracy:.4f}   (loss {m.train_loss:.4f})",
        f"  val accuracy      {m.val_accuracy:.4f}   (loss {m.val_loss:.4f})",
    ]
    recall = [
        f"  balanced accuracy {m.balanced_accuracy:.4f}   (mean per-class recall)",
        f"  worst recall      {m.worst_class_recall:.4f}   ({m.worst_class})",
    ]
    if m.imbalance:  # accuracy flatters a head that neglects the small classes: recall leads
        lines += [f"  {imbalance_line(m.imbalance)}", *recall, *accuracy]
    else:
        lines += [*accuracy, *recall]
    lines += [
        f"  macro P / R / F1  {m.macro_precision:.4f} / {m.macro_recall:.4f} / {m.macro_f1:.4f}",
        f"  train - val gap   {m.train_val_gap:+.4f}",
        f"  fit seconds       {m.fit_seconds:.2f}",
        "",
    ]
    width = max(5, *(len(pc["class"]) for pc in m.per_class))
    lines.append(f"  {'class':<{width}}  precision  recall  f1      support")
    for pc in m.per_class:
        lines.append(
            f"  {pc['class']:<{width}}  {pc['precision']:.4f}     {pc['recall']:.4f}  {pc['f1']:.4f}  {pc['support']}"
        )
    lines += ["", format_confusion(m.confusion_matrix, [pc["class"] for pc in m.per_class])]
    notes = report_notes(m)
    if m.curves and m.curves.per_class and not m.curves.positive:
        notes.insert(0, curves_line(m.curves))
    if notes:
        lines += ["", *(f"  {note}" for note in notes)]
    return "\n".join(lines)


def overfitting_warning(metrics: HeadMetrics | RegressionMetrics) -> str | None:
    """One line when train's score exceeds val's by more than OVERFIT_GAP, with advice for that head."""
    if not metrics.overfitting:
        return None
    spec = HEADS.get(metrics.head)  # what reins it in and what --sweep chooses for it are its registry entry's
    advice = spec.advice if spec else "try more regularisation"
    if spec and spec.sweeps and metrics.sweep is None:
        advice += f", or --sweep to choose {spec.sweeps} on held-out train"
    elif metrics.sweep and "chosen" in metrics.sweep:  # the advice knows what was swept, and what it chose
        ran = metrics.sweep.get("defaults") if metrics.sweep.get("kept_defaults") else metrics.sweep["chosen"]
        advice = (
            f"--sweep already chose {spec.sweeps if spec else 'its settings'} on held-out train ({_point(ran)}), "
            "so this is the gap the held-out score preferred: more training rows, or settings outside the sweep's "
            "grid, would narrow it"
        )
    return f"WARNING: {metrics.head}: {metrics.overfit_words()}: the head is overfitting; {advice}"


def _point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())


def sweep_line(sweep: dict[str, Any]) -> str:
    """What ``--sweep`` chose, on what, and whether other grid points scored as well."""
    if "chosen" not in sweep:
        return f"sweep: {sweep.get('skipped') or sweep.get('note') or 'nothing chosen'}"
    verb = "kept the defaults" if sweep.get("kept_defaults") else "chose"
    line = (
        f"sweep: {verb} {_point(sweep['chosen'])} (held-out {sweep.get('metric', 'accuracy')} "
        f"{sweep['chosen_score']:.4f} on "
        f"{sweep['n_held_out']} held-out train rows)"
    )
    if sweep.get("kept_defaults") and sweep.get("not_chosen"):  # the top of the grid did not beat them beyond noise
        return line + f"; {sweep['note']}"
    tied = sweep.get("tied") or []
    if tied:
        shown = "; ".join(_point(p) for p in tied[:3]) + (" ..." if len(tied) > 3 else "")
        taken = "the defaults are kept" if sweep.get("kept_defaults") else "the first in grid order was taken"
        line += f"; a tie of {len(tied)} grid points ({shown}): {taken}"
    return line


def shots_line(shots: int, short: dict[str, int]) -> str:
    """Say that ``--shots K`` used fewer than K images of the classes that had fewer."""
    shown = ", ".join(f"{c} {n}" for c, n in list(short.items())[:5]) + (" ..." if len(short) > 5 else "")
    return f"--shots {shots}: {len(short)} classes had fewer training images and used all they had ({shown})"


def report_notes(metrics: HeadMetrics | RegressionMetrics) -> list[str]:
    """The lines said under a head's figures, by train-head and compare alike: the sweep's choice, a --shots that
    asked for more images than a class had, AP and AUC, a --positive threshold, an overfitting warning."""
    notes = []
    if metrics.sweep is not None:
        notes.append(sweep_line(metrics.sweep))
    short = getattr(metrics, "shots_short", None)
    if short:
        notes.append(shots_line(metrics.shots, short))
    curves = getattr(metrics, "curves", None)
    if curves and curves.positive:  # asked about one class: its AP and AUC beside its threshold
        notes.append(curves_line(curves))
    threshold = getattr(metrics, "threshold", None)
    if threshold:
        notes.append(threshold_line(threshold))
    warning = overfitting_warning(metrics)
    if warning:
        notes.append(warning)
    return notes


def format_confusion(cm: list[list[int]], classes: list[str], *, max_classes: int = 20) -> str:
    if len(classes) > max_classes:
        return f"  confusion matrix: {len(classes)} classes, see metrics.json"
    short = [c[:6] for c in classes]
    w = max(6, max(len(str(v)) for row in cm for v in row))
    head = "  true\\pred " + " ".join(f"{s:>{w}}" for s in short)
    rows = [f"  {short[i]:<9} " + " ".join(f"{v:>{w}}" for v in row) for i, row in enumerate(cm)]
    return "\n".join([head, *rows])
