"""Metrics that tell whether features are good: accuracy, balanced accuracy, per-class P/R/F1, confusion; for
regression targets MSE, RMSE, MAE and R^2 per target and averaged."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
)

from pipeline.stage2.heads.base import r2_scores
from pipeline.stage2.heads.registry import HEADS
from pipeline.stage2.thresholds import curves_line, imbalance_line, threshold_line

OVERFIT_GAP = 0.10  # train accuracy this far above val accuracy is flagged as overfitting


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Metrics of predicted class probabilities ``proba`` (N, C) against integer labels."""
    labels = np.arange(len(classes))
    pred = proba.argmax(axis=1)
    p, r, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    present = support > 0  # macro averages over the classes this split has
    eps = 1e-7
    clipped = np.clip(proba, eps, 1.0)
    return {
        "accuracy": float((pred == y_true).mean()) if len(y_true) else 0.0,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)) if len(y_true) else 0.0,
        "loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels)),
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
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }


class _Record(Mapping[str, Any]):
    """A frozen metrics dataclass read like the dict it is written as (``details`` flattened, ``out`` aside)."""

    details: dict[str, Any]
    out: str | None

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``: every field at the top level (``details`` flattened), as it has always been written."""
        fixed = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("details", "out")}
        return {**fixed, **self.details}

    def _view(self) -> dict[str, Any]:
        return {**self.to_json(), **({"out": self.out} if self.out is not None else {})}

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())


@dataclass(frozen=True)
class HeadMetrics(_Record):
    """One head's results, complete when made (``metrics.json`` is :meth:`to_json`): the fixed metrics as typed
    fields, and what depends on the head or the run (its settings, the fit's own figures, a sweep, the training
    history) in ``details``. Read like the dict it is written as: ``metrics["val_accuracy"]``."""

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
    details: dict[str, Any] = field(default_factory=dict)
    out: str | None = None  # the folder it was written to: where, not what, so not in metrics.json


# ------------------------------------------------------------------------------------------ regression


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
    details: dict[str, Any] = field(default_factory=dict)
    out: str | None = None


def summarize_regression(
    *, train: dict[str, Any], val: dict[str, Any], fit_seconds: float, extra: dict[str, Any] | None = None
) -> RegressionMetrics:
    gap = train["r2"] - val["r2"]
    return RegressionMetrics(
        **{f"{split}_{k}": m[k] for split, m in (("val", val), ("train", train)) for k in ("r2", "rmse", "mae", "mse")},
        train_val_gap=gap,
        overfitting=bool(gap > OVERFIT_GAP),
        fit_seconds=fit_seconds,
        per_target=val["per_target"],
        train_per_target=train["per_target"],
        details=dict(extra or {}),
    )


MAX_TARGETS_SHOWN = 20


def format_regression_report(metrics: Mapping[str, Any], *, title: str = "") -> str:
    """What `train-head` prints for regression targets: averaged figures first, then one line per target."""
    lines = [title] if title else []
    n = len(metrics["per_target"])
    over = f" (mean of {n} targets)" if n > 1 else ""
    for split in ("val", "train"):
        lines.append(
            f"  {split:<5} R^2 {metrics[f'{split}_r2']:.4f}   RMSE {metrics[f'{split}_rmse']:.4g}   "
            f"MAE {metrics[f'{split}_mae']:.4g}   MSE {metrics[f'{split}_mse']:.4g}{over}"
        )
    lines += [
        f"  train - val R^2 gap {metrics['train_val_gap']:+.4f}",
        f"  fit seconds         {metrics['fit_seconds']:.2f}",
        "",
    ]
    width = max(6, *(len(p["target"]) for p in metrics["per_target"]))
    lines.append(f"  {'target':<{width}}  val R^2   RMSE        MAE         train R^2")
    for p, t in list(zip(metrics["per_target"], metrics["train_per_target"]))[:MAX_TARGETS_SHOWN]:
        lines.append(f"  {p['target']:<{width}}  {p['r2']:.4f}    {p['rmse']:<10.4g}  {p['mae']:<10.4g}  {t['r2']:.4f}")
    if n > MAX_TARGETS_SHOWN:
        lines.append(f"  ... {n - MAX_TARGETS_SHOWN} more targets in metrics.json")
    notes = report_notes(metrics)
    if notes:
        lines += ["", *(f"  {note}" for note in notes)]
    return "\n".join(lines)


def summarize(
    *, train: dict[str, Any], val: dict[str, Any], fit_seconds: float, extra: dict[str, Any] | None = None
) -> HeadMetrics:
    """The metrics of one head: val metrics at the top level, train accuracy/loss and the gap."""
    gap = train["accuracy"] - val["accuracy"]
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
        details=dict(extra or {}),
    )


def format_report(metrics: Mapping[str, Any], *, title: str = "") -> str:
    """A readable table of one head's metrics (what `train-head` prints)."""
    if metrics.get("task") == "regress":
        return format_regression_report(metrics, title=title)
    lines = [title] if title else []
    accuracy = [
        f"  train accuracy    {metrics['train_accuracy']:.4f}   (loss {metrics['train_loss']:.4f})",
        f"  val accuracy      {metrics['val_accuracy']:.4f}   (loss {metrics['val_loss']:.4f})",
    ]
    recall = [
        f"  balanced accuracy {metrics['balanced_accuracy']:.4f}   (mean per-class recall)",
        f"  worst recall      {metrics['worst_class_recall']:.4f}   ({metrics['worst_class']})",
    ]
    if metrics.get("imbalance"):  # accuracy flatters a head that neglects the small classes: recall leads
        lines += [f"  {imbalance_line(metrics['imbalance'])}", *recall, *accuracy]
    else:
        lines += [*accuracy, *recall]
    lines += [
        f"  macro P / R / F1  {metrics['macro_precision']:.4f} / {metrics['macro_recall']:.4f} / "
        f"{metrics['macro_f1']:.4f}",
        f"  train - val gap   {metrics['train_val_gap']:+.4f}",
        f"  fit seconds       {metrics['fit_seconds']:.2f}",
        "",
    ]
    width = max(5, *(len(pc["class"]) for pc in metrics["per_class"]))
    lines.append(f"  {'class':<{width}}  precision  recall  f1      support")
    for pc in metrics["per_class"]:
        lines.append(
            f"  {pc['class']:<{width}}  {pc['precision']:.4f}     {pc['recall']:.4f}  {pc['f1']:.4f}  {pc['support']}"
        )
    lines += ["", format_confusion(metrics["confusion_matrix"], [pc["class"] for pc in metrics["per_class"]])]
    notes = report_notes(metrics)
    if metrics.get("curves", {}).get("per_class") and not metrics["curves"].get("positive"):
        notes.insert(0, curves_line(metrics["curves"]))
    if notes:
        lines += ["", *(f"  {note}" for note in notes)]
    return "\n".join(lines)


def overfitting_warning(metrics: Mapping[str, Any]) -> str | None:
    """One line when train accuracy exceeds val accuracy by more than OVERFIT_GAP, with advice for that head."""
    if not metrics.get("overfitting"):
        return None
    head = metrics.get("head", "")
    spec = HEADS.get(head)  # what reins it in and what --sweep chooses for it are its registry entry's
    advice = spec.advice if spec else "try more regularisation"
    if spec and spec.sweeps and "sweep" not in metrics:
        advice += f", or --sweep to choose {spec.sweeps} on held-out train"
    if metrics.get("task") == "regress":
        return (
            f"WARNING: {head}: train R^2 exceeds val R^2 by {metrics['train_val_gap']:.3f} (more than "
            f"{OVERFIT_GAP:g}): the head is overfitting; {advice}"
        )
    return (
        f"WARNING: {head}: train accuracy exceeds val accuracy by {100 * metrics['train_val_gap']:.1f} points "
        f"(more than {100 * OVERFIT_GAP:.0f}): the head is overfitting; {advice}"
    )


def _point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())


def sweep_line(sweep: dict[str, Any]) -> str:
    """What ``--sweep`` chose, on what, and whether other grid points scored as well."""
    if "chosen" not in sweep:
        return f"sweep: {sweep.get('skipped') or sweep.get('note') or 'nothing chosen'}"
    line = (
        f"sweep: chose {_point(sweep['chosen'])} (held-out {sweep.get('metric', 'accuracy')} "
        f"{sweep['chosen_score']:.4f} on "
        f"{sweep['n_held_out']} held-out train rows)"
    )
    tied = sweep.get("tied") or []
    if tied:
        shown = "; ".join(_point(p) for p in tied[:3]) + (" ..." if len(tied) > 3 else "")
        line += f"; a tie of {len(tied)} grid points ({shown}): the first in grid order was taken"
    return line


def shots_line(shots: int, short: dict[str, int]) -> str:
    """Say that ``--shots K`` used fewer than K images of the classes that had fewer."""
    shown = ", ".join(f"{c} {n}" for c, n in list(short.items())[:5]) + (" ..." if len(short) > 5 else "")
    return f"--shots {shots}: {len(short)} classes had fewer training images and used all they had ({shown})"


def report_notes(metrics: Mapping[str, Any]) -> list[str]:
    """The lines said under a head's figures, by train-head and compare alike: the sweep's choice, a --shots that
    asked for more images than a class had, AP and AUC, a --positive threshold, an overfitting warning."""
    notes = []
    if "sweep" in metrics:
        notes.append(sweep_line(metrics["sweep"]))
    if metrics.get("shots_short"):
        notes.append(shots_line(metrics["shots"], metrics["shots_short"]))
    if metrics.get("curves", {}).get("positive"):  # asked about one class: its AP and AUC beside its threshold
        notes.append(curves_line(metrics["curves"]))
    if "threshold" in metrics:
        notes.append(threshold_line(metrics["threshold"]))
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
