"""Stage two: train heads on a cached feature file, evaluate them, and compare head types.

Protocol (CLIP appendix A.3, dinov2 ``log_regression.py``): ``val`` is only ever reported. With ``--sweep`` the
hyper-parameter of a head is chosen on a stratified held-out part of ``train``; the head is then refitted on
all of ``train`` with the chosen value. With ``--shots K`` a head trains on K examples per class drawn from the
cached ``train`` split with ``--seed``, so few-shot curves need no re-extraction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import write_json, write_text
from pipeline.stage2 import choice, plots, thresholds
from pipeline.stage2.evaluate import (
    HeadMetrics,
    RegressionMetrics,
    classification_metrics,
    regression_metrics,
    report_notes,
    summarize,
    summarize_regression,
)
from pipeline.stage2.heads import HEADS, FitResult, Head, HeadConfig, build_head, save_head, warn_if_tiny
from pipeline.stage2.heads.tail import require_activations, with_activations
from pipeline.stage2.regression import random_holdout, resolve_task, with_task
from pipeline.store import (
    ALL_LAYERS,
    FeatureMeta,
    FeatureSet,
    FileLock,
    SplitFeatures,
    WeightsIdentity,
    check_classes_have_rows,
    layer_columns,
    read_features,
    read_meta,
    resolve_layer,
)

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 0.2  # share of train that --sweep scores the grid on


def default_head_root(features: Path, *, layer: str | None = None) -> Path:
    """Where ``train-head`` puts ``<head>/`` by default; heads on one stored layer (``--layer``) in ``<layer>/``."""
    root = Path("artifacts") / "heads" / Path(features).stem
    return root / layer if layer else root


def default_compare_root(features: Path, *, layer: str | None = None) -> Path:
    """Where ``compare`` puts its run by default: its own folder, so that it never replaces a head that
    ``train-head`` trained (with other settings, say ``--class-weight balanced``) beside it."""
    return default_head_root(features, layer=layer) / "compare"


def with_layer(cfg: HeadConfig, meta: FeatureMeta, *, features: Path) -> HeadConfig:
    """``cfg`` with ``--layer`` in its canonical form for this file (None: the whole stored row; see
    :func:`pipeline.store.resolve_layer`), so equal choices record equal settings; an unknown layer is one line."""
    return replace(cfg, layer=resolve_layer(meta, cfg.layer, path=features))


# ------------------------------------------------------------------------------------------ who wrote a folder


def used_settings(cfg: HeadConfig) -> dict[str, Any]:
    """The HeadConfig fields ``cfg.head`` reads (the head class lists them), with the head's name (and the task when
    it regresses: absent for classification, as in heads saved before regression existed)."""
    settings = {"head": cfg.head, **{name: getattr(cfg, name) for name in HEADS[cfg.head].settings}}
    return settings | ({"task": "regress"} if cfg.task == "regress" else {})


def run_settings(cfg: HeadConfig) -> dict[str, Any]:
    """What a run asked for, as far as it changes the head: the settings it uses (not where it ran), ``--sweep``,
    ``--shots`` and the seed they draw with. Two runs with equal run settings on one feature file train the same
    head, so one may replace the other's folder; any other run must be asked to (``--force``)."""
    settings = used_settings(cfg)
    settings.pop("device", None)
    if cfg.sweep or cfg.shots or cfg.threshold_target:
        settings["seed"] = cfg.seed
    if cfg.positive:  # recorded only when asked, so heads saved before these options still compare equal
        settings |= {"positive": cfg.positive, **(cfg.threshold_target or {})}
    if cfg.layer:  # one stored layer (canonical, see with_layer); the whole row is recorded as before
        settings["layer"] = cfg.layer
    return {**settings, "sweep": cfg.sweep, "shots": cfg.shots}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in {**old, **new} if old.get(k) != new.get(k)]


def check_replace(record: Path, *, settings: dict[str, Any], fingerprint: str, what: str, force: bool) -> None:
    """Refuse to replace ``record`` (a head's config.json, a shots.json) written by a run with other settings or on
    other features, unless ``force``. A record from a run with the same settings is replaced: nothing is lost."""
    if force or not record.is_file():
        return
    try:
        old = json.loads(record.read_text())
        # A head saved before "settings" was recorded: its head_config holds the same keys.
        old_settings = old.get("settings") or {k: old.get("head_config", {}).get(k) for k in settings}
    except (OSError, ValueError, AttributeError):
        old, old_settings = {}, {"unreadable": record.name}
    changes = _changes(old_settings, settings)
    if old.get("features_fingerprint", fingerprint) != fingerprint:
        changes.insert(0, "features re-extracted since")
    if changes:
        shown = ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise PipelineError(
            f"{record.parent} holds {what} made with other settings ({shown}); pass --force to replace it or "
            "choose another --out"
        )


class _FolderLock(FileLock):
    BUSY = "another train-head or compare is writing {target}; wait for it or choose another --out"


@contextlib.contextmanager
def writing(*folders: Path) -> Iterator[None]:
    """Hold ``<folder>.lock`` for each folder while a run writes them: a second writer is refused, one line."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise PipelineError(f"cannot write to {folder.parent}: {e.strerror or e}") from None
            stack.enter_context(_FolderLock(folder))
        yield


# ------------------------------------------------------------------------------------------ training


def few_shot(split: SplitFeatures, *, shots: int, seed: int) -> SplitFeatures:
    """``shots`` rows per class (all of a class that has fewer), drawn with ``seed``, in file order."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(split.labels == c))[:shots] for c in np.unique(split.labels)]
    idx = np.sort(np.concatenate(keep))
    return SplitFeatures(features=split.features[idx], labels=split.labels[idx], ids=split.ids[idx])


def shots_short(fs: FeatureSet, *, shots: int) -> dict[str, int]:
    """The classes that have fewer than ``shots`` train rows, with how many they have (all of which were used)."""
    counts = np.bincount(fs.train.labels, minlength=len(fs.classes))
    return {fs.classes[c]: int(n) for c, n in enumerate(counts) if n < shots}


def stratified_holdout(y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices: ``fraction`` of each class that has 2+ rows is held out (at least one)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_held = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(fraction * len(rows))))
        held.append(rows[:n_held])
        fit.append(rows[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def sweep(head: Head, X: np.ndarray, y: np.ndarray) -> tuple[HeadConfig, dict[str, Any]]:
    """Choose the head's hyper-parameter on a held-out part of ``(X, y)``; the config to refit with + a record.
    Labels: a stratified part, scored by accuracy; regression targets: a random part, scored by R^2."""
    cfg = head.cfg
    grid = type(head).sweep_grid(cfg)
    if not grid:
        return cfg, {"grid": [], "note": f"{cfg.head} has no hyper-parameter to choose"}
    if head.regress:
        fit, held = random_holdout(len(y), fraction=HELD_OUT_FRACTION, seed=cfg.seed)
        too_few = not len(held)
    else:
        fit, held = stratified_holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
        too_few = not len(held) or len(np.unique(y[fit])) < 2
    if too_few:
        why = "too few training rows" if head.regress else "too few training examples per class"
        log.warning("--sweep skipped for %s: %s to hold some out", cfg.head, why)
        return cfg, {"grid": grid, "skipped": f"{why} to hold some out"}
    t0 = time.perf_counter()
    grid, own = choice.with_own_point(head, grid)
    scores = head.sweep_scores(X[fit], y[fit], (X[held], y[held]), grid=grid)
    best, guarded = choice.guard(head, X, y, held=held, grid=grid, scores=scores, own=own)
    tied = [point for point, score in zip(grid, scores) if score == scores[best]]
    metric = {"metric": "R^2", "held_out_r2": scores} if head.regress else {"held_out_accuracy": scores}
    record = {
        "grid": grid,
        **metric,
        "chosen": grid[best],
        "chosen_score": scores[best],
        "tied": tied if len(tied) > 1 else [],  # grid points that scored as well as the chosen one
        "held_out_fraction": HELD_OUT_FRACTION,
        "n_fit": len(fit),
        "n_held_out": len(held),
        "seconds": time.perf_counter() - t0,
        **head.sweep_info,
        **guarded,
    }
    log.info("sweep %s: chose %s (held-out %s %.4f)", cfg.head, grid[best], metric.get("metric", "accuracy"),
             scores[best])  # fmt: skip
    return replace(cfg, **grid[best]), record


def choose_threshold(
    X: np.ndarray, y: np.ndarray, *, cfg: HeadConfig, dims: dict[str, int], positive: int
) -> dict[str, Any]:
    """The threshold for class ``positive`` that meets ``cfg``'s target on a stratified held-out 20% of train,
    scored by a head fitted on the other 80% (its probabilities are those of a head that has not seen the rows,
    as the refitted head's are on new data; scoring train rows the head was fitted on would flatter them)."""
    fit, held = stratified_holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
    if not (y[held] == positive).any():
        raise PipelineError(
            f"--positive {cfg.positive!r}: too few train rows of that class to hold some out and choose a threshold"
        )
    head = build_head(cfg, **dims)
    head.fit(X[fit], y[fit])
    score = head.predict_proba(X[held])[:, positive]
    choice = thresholds.choose_threshold(y[held] == positive, score, **cfg.threshold_target)
    return {**choice, "held_out_fraction": HELD_OUT_FRACTION, "n_held_out": len(held)}


def _fit(
    cfg: HeadConfig, X: Any, y: np.ndarray, *, val: tuple[Any, np.ndarray], dims: dict[str, int]
) -> tuple[Head, FitResult, HeadConfig, dict[str, Any] | None, float]:
    """The one fit of both tasks: the --sweep's choice (held-out train) if asked, then the head on all of ``X``.
    Returns the head, its fit, the config it was fitted with, the sweep's record and the seconds all that took."""
    t0 = time.perf_counter()
    sweep_record = None
    if cfg.sweep:
        cfg, sweep_record = sweep(build_head(cfg, **dims), X, y)
    head = build_head(cfg, **dims)
    if type(head).uses_standardize and not cfg.standardize:
        warn_if_tiny(X, cfg)
    fit = head.fit(X, y, val=val)
    return head, fit, cfg, sweep_record, time.perf_counter() - t0


def fit_and_evaluate(fs: FeatureSet, cfg: HeadConfig) -> tuple[Head, HeadMetrics, list[dict[str, float]]]:
    """Fit one head on ``fs.train`` (or its few-shot sample); metrics on that train and on val.
    Val is never used to choose anything. A file with regression targets is regressed (``--task``, see
    :mod:`pipeline.stage2.regression`). A head that takes activation maps (tail) gets them in place of features."""
    cfg = with_task(cfg, fs.meta)
    if cfg.task == "regress":
        return fit_and_evaluate_regression(fs, cfg)
    check_classes_have_rows(fs)
    if HEADS[cfg.head].inputs == "activations":
        fs = with_activations(fs)
    positive = thresholds.positive_index(cfg.positive, fs.classes) if cfg.positive else None
    train = few_shot(fs.train, shots=cfg.shots, seed=cfg.seed) if cfg.shots else fs.train
    X, y = train.features, train.labels
    dims = {"num_classes": len(fs.classes), "feature_dim": fs.feature_dim}
    head, fit, cfg, sweep_record, fit_seconds = _fit(cfg, X, y, val=(fs.val.features, fs.val.labels), dims=dims)
    train_y, train_proba, train_note = head.train_predictions(X, y)
    train_m = classification_metrics(train_y, train_proba, fs.classes)
    val_proba = head.predict_proba(fs.val.features)
    val_m = classification_metrics(fs.val.labels, val_proba, fs.classes)
    extra = {
        "head": cfg.head,
        "class_weight": cfg.class_weight if type(head).uses_class_weight else "n/a",
        "standardize": cfg.standardize if type(head).uses_standardize else "n/a",
        "shots": cfg.shots,
        "n_train_used": len(y),
        **fit.info,
    }
    if cfg.shots:
        extra["shots_short"] = shots_short(fs, shots=cfg.shots)
    if train_note is not None:
        extra["train_metrics_note"] = train_note
    if sweep_record is not None:
        extra["sweep"] = sweep_record
    extra["curves"] = thresholds.curves(fs.val.labels, val_proba, fs.classes, positive=positive)
    skew = thresholds.imbalance(y, fs.classes)
    if skew is not None:
        extra["imbalance"] = skew
    if cfg.threshold_target:
        choice = choose_threshold(X, y, cfg=cfg, dims=dims, positive=positive)
        report = thresholds.threshold_report(
            fs.val.labels, val_proba, positive=positive, choice=choice, num_classes=len(fs.classes)
        )
        extra["threshold"] = {"positive": cfg.positive, **cfg.threshold_target, **report}
    metrics = summarize(train=train_m, val=val_m, fit_seconds=fit_seconds, extra=extra)
    return head, metrics, fit.history


def fit_and_evaluate_regression(
    fs: FeatureSet, cfg: HeadConfig
) -> tuple[Head, RegressionMetrics, list[dict[str, float]]]:
    """Fit one head on train's regression targets; MSE, RMSE, MAE and R^2 on train and val (val never chooses)."""
    names = list(fs.meta.targets["names"])
    X, Y = fs.train.features, fs.train.targets
    dims = {"num_classes": len(names), "feature_dim": fs.feature_dim}
    head, fit, cfg, sweep_record, fit_seconds = _fit(cfg, X, Y, val=(fs.val.features, fs.val.targets), dims=dims)
    train_m = regression_metrics(Y, head.logits(X), names)
    val_m = regression_metrics(fs.val.targets, head.logits(fs.val.features), names)
    extra = {
        "head": cfg.head,
        "targets": names,
        "targets_source": fs.meta.targets.get("source"),
        "standardize": cfg.standardize if type(head).uses_standardize else "n/a",
        "n_train_used": len(Y),
        **fit.info,
    }
    if sweep_record is not None:
        extra["sweep"] = sweep_record
    return head, summarize_regression(train=train_m, val=val_m, fit_seconds=fit_seconds, extra=extra), fit.history


def train_head(
    features: Path | str, cfg: HeadConfig, *, out: Path | str | None = None, force: bool = False
) -> HeadMetrics:
    """Train ``cfg.head`` on a feature file; write metrics.json, config.json, PNGs and the head to ``out``.
    A head there trained with other settings is replaced only with ``force``."""
    features = Path(features)
    meta = read_meta(features)  # a missing or foreign file, or an unknown --layer, is refused before any folder
    cfg = with_task(with_layer(cfg, meta, features=features), meta)
    out = Path(out) if out else default_head_root(features, layer=cfg.layer) / cfg.head
    if HEADS[cfg.head].inputs == "activations":
        require_activations(meta, features)
    with writing(out):
        check_replace(out / "config.json", settings=run_settings(cfg), fingerprint=meta.fingerprint, what="a head",
                      force=force)  # fmt: skip
        return _train_one(read_features(features, layer=cfg.layer), cfg, out=out)


def weights_label(meta: FeatureMeta) -> str:
    """The weights by name: a torchvision name, 'random init (seed=S)', or a file's name and a short hash."""
    try:
        identity = WeightsIdentity.parse(meta.weights)
    except PipelineError:
        return meta.weights or "?"  # not from `extract` (a hand-made file): shown as it is
    return identity.label(meta.config.get("weights"))


def features_label(fs: FeatureSet) -> str:
    """What a figure or table is about, by name: dataset, backbone, weights."""
    return f"{fs.meta.dataset or fs.path.stem}, {fs.meta.backbone}, {weights_label(fs.meta)}"


def head_config(fs: FeatureSet, head: Head, *, settings: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a head: the settings it uses (after any sweep: what export rebuilds it from), the run's
    settings as asked (what a later run into this folder is checked against) and what produced its features."""
    return {
        "head": head.cfg.head,
        "head_config": used_settings(head.cfg),
        "settings": settings,
        "features": str(fs.path),
        "features_fingerprint": fs.meta.fingerprint,
        "dataset": fs.meta.dataset,
        "backbone": fs.meta.backbone,
        "weights": fs.meta.weights,
        "weights_label": weights_label(fs.meta),
        "extract_config": fs.meta.config,
        "feature_dim": fs.feature_dim,
        "layer": fs.layer or ALL_LAYERS,  # what the head takes: one stored layer, or the whole row
        "layers": fs.meta.layers,  # the pooled layers in that input (extract --layers); None: the classifier's input
        "classes": fs.classes,
        "preprocessing": fs.meta.preprocessing,
        "classifier_path": fs.meta.classifier_path,
        "activations": fs.meta.activations,  # the --cache-at node a tail head starts after
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    } | ({"targets": list(fs.meta.targets["names"])} if head.regress else {})


def curves_note(cfg: HeadConfig) -> str:
    """How the curves were measured, under their title: train during each epoch (the table's train accuracy is the
    finished head's), and with dropout on where the head has dropout."""
    dropout = "dropout" in HEADS[cfg.head].settings and cfg.dropout > 0
    train = "train: mean over each epoch's batches while training" + (
        f", dropout {cfg.dropout:g} on" if dropout else ""
    )
    return f"{train}; val: after each epoch{', dropout off' if dropout else ''}"


def _write_plots(
    metrics: HeadMetrics, history: list[dict[str, float]], out: Path, *, fs: FeatureSet, head: Head
) -> None:
    name, label, cfg = metrics["head"], features_label(fs), head.cfg
    if head.regress:
        names = list(fs.meta.targets["names"])
        plots.regression_png(
            fs.val.targets, head.logits(fs.val.features), names, out / "regression.png",
            title=f"{name} head: val predicted vs true, residuals ({label})",
        )  # fmt: skip
        if history:
            plots.curves_png(
                history, out / "curves.png", title=f"{name} head: loss (MSE of standardised targets) and R^2 per "
                f"epoch ({label})", note=curves_note(cfg),
            )  # fmt: skip
        return
    plots.confusion_png(
        metrics["confusion_matrix"], fs.classes, out / "confusion.png", title=f"{name} head: val confusion\n{label}"
    )
    if metrics["curves"]["per_class"]:
        plots.pr_roc_png(metrics["curves"], out / "pr_roc.png", title=f"{name} head: val PR and ROC ({label})")
    if history:
        plots.curves_png(
            history, out / "curves.png", title=f"{name} head: loss and accuracy per epoch ({label})",
            note=curves_note(cfg),
        )  # fmt: skip


def _train_one(fs: FeatureSet, cfg: HeadConfig, *, out: Path) -> HeadMetrics:
    head, metrics, history = fit_and_evaluate(fs, cfg)
    on = {"layer": fs.layer or ALL_LAYERS, "feature_dim": fs.feature_dim}  # what the head was trained on
    metrics = replace(metrics, details={**metrics.details, **on, **({"history": history} if history else {})})
    try:
        config = head_config(fs, head, settings=run_settings(cfg))
        if "threshold" in metrics:  # what `export` records and `predict` applies
            config["decision"] = {k: metrics["threshold"][k] for k in ("positive", "threshold")}
        save_head(head, out, config=config)
        write_json(out / "metrics.json", metrics.to_json())
        _write_plots(metrics, history, out, fs=fs, head=head)
    except OSError as e:
        raise PipelineError(f"cannot write head to {out}: {e.strerror or e}") from None
    return replace(metrics, out=str(out))


def parse_heads(spec: str | None, *, task: str = "classify") -> list[str]:
    """Head names from ``--heads``; 'all' = every head meant for ``task`` (ridge only for regression)."""
    everything = [name for name, cls in HEADS.items() if task in cls.in_all]
    names = everything if not spec or spec == "all" else [h.strip() for h in spec.split(",") if h.strip()]
    unknown = [h for h in names if h not in HEADS]
    if unknown:
        raise PipelineError(f"unknown head {unknown[0]!r}; choose from: {', '.join(HEADS)}")
    if not names:
        raise PipelineError("--heads names no head")
    return names


def parse_shots(spec: str) -> list[int | None]:
    """``"1,5,10,all"`` -> ``[1, 5, 10, None]`` (None: every training example)."""
    values: list[int | None] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "all":
            values.append(None)
        elif part.isdigit() and int(part) > 0:
            values.append(int(part))
        else:
            raise PipelineError(f"--shots takes positive integers or 'all', comma-separated, not {part!r}")
    if not values:
        raise PipelineError("--shots names no value")
    return values


COMPARE_COLUMNS = (
    ("head", "head", "{}"),
    ("train acc", "train_accuracy", "{:.4f}"),
    ("val acc", "val_accuracy", "{:.4f}"),
    ("balanced acc", "balanced_accuracy", "{:.4f}"),
    ("worst recall", "worst_class_recall", "{:.4f}"),
    ("macro F1", "macro_f1", "{:.4f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("fit s", "fit_seconds", "{:.2f}"),
    ("total s", "total_seconds", "{:.2f}"),  # extraction + fit; a from-scratch baseline's training time
)


def _table(header: list[str], body: list[list[str]]) -> str:
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", sep, *("| " + " | ".join(row) + " |" for row in body)])


REGRESS_COLUMNS = (
    ("head", "head", "{}"),
    ("val R^2", "val_r2", "{:.4f}"),
    ("val RMSE", "val_rmse", "{:.4g}"),
    ("val MAE", "val_mae", "{:.4g}"),
    ("train R^2", "train_r2", "{:.4f}"),
    ("R^2 gap", "train_val_gap", "{:+.4f}"),
    ("fit s", "fit_seconds", "{:.2f}"),
    ("total s", "total_seconds", "{:.2f}"),
)


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of compared heads (also what the CLI prints). When train's classes are imbalanced, balanced
    accuracy and the worst class's recall lead: accuracy flatters a head that neglects the small classes.
    Regression rows show R^2, RMSE and MAE (averaged over the targets)."""
    if rows and all(r.get("task") == "regress" for r in rows):
        body = [[fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in REGRESS_COLUMNS] for r in rows]
        return _table([c for c, _, _ in REGRESS_COLUMNS], body)
    columns = list(COMPARE_COLUMNS)
    if any(r.get("imbalance") for r in rows):
        lead = [c for c in columns if c[1] in ("balanced_accuracy", "worst_class_recall")]
        columns = [columns[0], *lead, *(c for c in columns[1:] if c not in lead)]
    body = [[fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in columns] for r in rows]
    return _table([c for c, _, _ in columns], body)


def _describe(fs: FeatureSet) -> dict[str, Any]:
    return {
        "features": str(fs.path),
        "features_fingerprint": fs.meta.fingerprint,
        "dataset": fs.meta.dataset,
        "backbone": fs.meta.backbone,
        "weights": fs.meta.weights,
        "label": features_label(fs),
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    }


def _header(fs: FeatureSet) -> str:
    layer = f"; layer {fs.layer} ({fs.feature_dim}-d)" if fs.layer else ""
    return f"Features: `{fs.path}`: {features_label(fs)}{layer}; {len(fs.train)} train / {len(fs.val)} val\n\n"


def _compare_row(metrics: HeadMetrics) -> dict[str, Any]:
    """One head's line of compare.json: the table's columns and what the CLI says below the table."""
    if metrics.get("task") == "regress":
        row = {k: metrics.get(k) for _, k, _ in REGRESS_COLUMNS} | {"task": "regress", "imbalance": None}
        row |= {k: metrics[k] for k in ("val_mse", "overfitting", "n_train_used", "per_target")}
        if "sweep" in metrics:
            row["sweep"] = {k: v for k, v in metrics["sweep"].items() if k not in ("grid", "held_out_r2")}
        return row | {"notes": report_notes(metrics)}
    row = {k: metrics.get(k) for _, k, _ in COMPARE_COLUMNS}  # total_seconds: set by compare
    row |= {k: metrics[k] for k in ("train_val_gap", "overfitting", "shots", "n_train_used")}
    if "sweep" in metrics:
        row["sweep"] = {k: v for k, v in metrics["sweep"].items() if k not in ("grid", "held_out_accuracy")}
    if metrics.get("shots_short"):
        row["shots_short"] = metrics["shots_short"]
    row["imbalance"] = metrics.get("imbalance")
    if "threshold" in metrics:
        row["threshold"] = {k: v for k, v in metrics["threshold"].items() if k != "confusion_matrix"}
    row["notes"] = report_notes(metrics)
    return row


def check_heads(root: Path, *, heads: list[str], base: HeadConfig, fingerprint: str, force: bool) -> None:
    """:func:`check_replace` for each head folder a comparison writes under ``root``: all checked before any head
    is trained, so a refusal costs nothing."""
    for name in heads:
        check_replace(root / name / "config.json", settings=run_settings(replace(base, head=name)),
                      fingerprint=fingerprint, what=f"a {name} head", force=force)  # fmt: skip


def usable_heads(heads: list[str], meta: FeatureMeta) -> list[str]:
    """``heads`` less those that need activation maps when the file has none (said in the log); none left is an
    error."""
    if meta.activations:
        return heads
    usable = [h for h in heads if HEADS[h].inputs == "features"]
    if len(usable) < len(heads):
        log.info("skipped %s: the file holds no activation maps (extract --cache-at NODE)",
                 ", ".join(h for h in heads if h not in usable))  # fmt: skip
    if not usable:
        require_activations(meta, "the feature file")
    return usable


def compare(
    features: Path | str,
    *,
    heads: list[str],
    base: HeadConfig,
    out: Path | str | None = None,
    force: bool = False,
    baseline: Path | str | None = None,
) -> dict[str, Any]:
    """Train every head in ``heads`` on one feature file (read once); write each head to ``<out>/<head>/`` and
    compare.json/.md/.png to ``out`` (default: its own folder, see :func:`default_compare_root`). The folders are
    locked while the run writes them, and a head there trained with other settings is replaced only with ``force``.
    ``baseline``: a folder from ``python -m pipeline baseline`` on the same images, added as the last row."""
    features = Path(features)
    meta = read_meta(features)
    base = with_layer(base, meta, features=features)
    root = Path(out) if out else default_compare_root(features, layer=base.layer)
    fingerprint = meta.fingerprint
    heads = usable_heads(heads, meta)
    task = resolve_task(base.task, meta)
    for name in heads:  # a head that cannot do the task is refused before anything is trained
        with_task(replace(base, head=name), meta)
    base = replace(base, task="regress") if task == "regress" else base
    scratch = None  # read before any head is trained: a refused baseline costs nothing
    if baseline is not None and task == "regress":
        raise PipelineError("--baseline compares classifiers: not for regression targets (or --task classify)")
    if baseline is not None:
        from pipeline.stage2.baseline import baseline_row

        scratch = baseline_row(baseline, dataset_identity=meta.dataset_identity)
    with writing(root, *(root / name for name in heads)):
        check_heads(root, heads=heads, base=base, fingerprint=fingerprint, force=force)
        fs = read_features(features, layer=base.layer)
        rows = []
        for name in heads:
            log.info("training %s", name)
            rows.append(_compare_row(_train_one(fs, replace(base, head=name), out=root / name)))
        skew = rows[0]["imbalance"]  # train's classes, the same for every head
        ranked_by = "val_r2" if task == "regress" else "balanced_accuracy" if skew else "val_accuracy"
        if task == "regress":  # sorted by val R^2, higher better
            rows.sort(key=lambda r: -r["val_r2"])
        best = max(rows, key=lambda r: r[ranked_by])
        extract_seconds = fs.meta.extract_seconds
        for row in rows:  # the two-stage cost of each head: the one extraction + its own fit
            row["total_seconds"] = None if extract_seconds is None else extract_seconds + row["fit_seconds"]
        if scratch is not None:
            rows.append(scratch)
        result = {**_describe(fs), "extract_seconds": extract_seconds, "rows": rows, "best": best["head"]}
        result |= {"layer": fs.layer or ALL_LAYERS, "feature_dim": fs.feature_dim}
        result["best_by"] = ranked_by
        if skew:
            result["imbalance"] = skew | {"line": thresholds.imbalance_line(skew)}
        try:
            write_json(root / "compare.json", result)
            write_text(root / "compare.md", _header(fs) + compare_table(rows) + "\n")
            bars = plots.REGRESS_BARS if task == "regress" else plots.CLASSIFY_BARS
            plots.compare_png(rows, root / "compare.png", title=f"heads on val: {features_label(fs)}", bars=bars)
        except OSError as e:
            raise PipelineError(f"cannot write comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result


# ------------------------------------------------------------------------------------------ compare --layers

LAYER_COLUMNS = (
    ("layer", "shown", "{}"),
    ("dim", "feature_dim", "{}"),
    ("best head", "best", "{}"),
    ("val acc", "val_accuracy", "{:.4f}"),
    ("balanced acc", "balanced_accuracy", "{:.4f}"),
    ("gap", "train_val_gap", "{:+.4f}"),
    ("fit s", "fit_seconds", "{:.2f}"),  # the best head's
    ("all heads s", "heads_seconds", "{:.2f}"),
)


def parse_layers(spec: str, meta: FeatureMeta, *, features: Path) -> list[str]:
    """``compare --layers``: ``all``, every stored layer, or comma-separated names (each checked), in the file's
    order; then ``all`` (their concatenation, the whole stored row) when the file holds more than one layer."""
    columns = layer_columns(meta, path=features)
    asked = [n.strip() for n in spec.split(",") if n.strip()]
    if not asked:
        raise PipelineError("--layers names no layer; give 'all' or comma-separated layer names")
    for name in asked:
        resolve_layer(meta, name, path=features)  # an unknown name: one line listing the file's layers
    names = list(columns) if ALL_LAYERS in asked else [n for n in columns if n in asked]
    return names + ([ALL_LAYERS] if len(columns) > 1 else [])


def _layer_row(name: str, run: dict[str, Any], *, stored: list[str]) -> dict[str, Any]:
    """One line of the layer table: the best head of ``run`` (a :func:`compare` result on layer ``name``)."""
    best = next(r for r in run["rows"] if r["head"] == run["best"])
    joined = "+".join(stored)
    keep = ("val_accuracy", "balanced_accuracy", "train_val_gap", "fit_seconds")
    return {
        "layer": name,
        "shown": name if name != ALL_LAYERS else f"all ({joined if len(joined) <= 40 else f'{len(stored)} layers'})",
        "feature_dim": run["feature_dim"],
        "best": run["best"],
        **{k: best.get(k) for k in keep},
        "heads_seconds": sum(r["fit_seconds"] for r in run["rows"] if r.get("fit_seconds") is not None),
        "out": run["out"],
    }


def layers_report(result: dict[str, Any]) -> str:
    """Markdown: the best head per layer, then each layer's table of heads (what the CLI prints, and layers.md)."""
    rows = result["layers"]
    body = [[fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in LAYER_COLUMNS] for r in rows]
    parts = [_table([c for c, _, _ in LAYER_COLUMNS], body)]
    for row in rows:
        heads = compare_table(result["runs"][row["layer"]]["rows"])
        parts.append(f"{row['shown']}, {row['feature_dim']}-d, per head:\n\n{heads}")
    return "\n\n".join(parts)


def compare_layers(
    features: Path | str,
    *,
    layers: str,
    heads: list[str],
    base: HeadConfig,
    out: Path | str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """``compare --layers``: :func:`compare` the ``heads`` on each stored layer apart (``layers``: ``all`` or names,
    see :func:`parse_layers`) and on their concatenation, each run in ``<out>/<layer>/``; then the best head per
    layer in one table, written as layers.json and layers.md to ``out`` (default: ``compare-layers/`` beside
    ``compare/``). Every head folder is checked before any head is trained."""
    features = Path(features)
    meta = read_meta(features)
    names = parse_layers(layers, meta, features=features)
    root = Path(out) if out else default_head_root(features) / "compare-layers"
    with writing(root):
        for name in names:
            on_layer = with_layer(replace(base, layer=name), meta, features=features)
            check_heads(root / name, heads=heads, base=on_layer, fingerprint=meta.fingerprint, force=force)
        runs = {}
        for name in names:
            log.info("layer %s", name)
            runs[name] = compare(features, heads=heads, base=replace(base, layer=name), out=root / name, force=force)
        stored = list(layer_columns(meta, path=features))
        rows = [_layer_row(name, run, stored=stored) for name, run in runs.items()]
        ranked_by = runs[names[0]]["best_by"]  # train's classes, the same for every layer
        best = max(rows, key=lambda r: r[ranked_by])
        first = runs[names[0]]
        result = {k: first[k] for k in ("features", "features_fingerprint", "dataset", "backbone", "weights", "label")}
        result |= {"n_train": first["n_train"], "n_val": first["n_val"], "heads": heads, "layers": rows}
        result |= {"best_layer": best["layer"], "best_head": best["best"], "best_by": ranked_by, "runs": runs}
        header = f"Features: `{features}`: {first['label']}; {first['n_train']} train / {first['n_val']} val\n\n"
        try:
            write_json(root / "layers.json", {k: v for k, v in result.items() if k != "runs"})
            write_text(root / "layers.md", header + layers_report(result) + "\n")
        except OSError as e:
            raise PipelineError(f"cannot write the layer comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result


def _shot_label(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def shots_table(table: dict[str, dict[str, float]], labels: list[str]) -> str:
    """Markdown: one row per head, val accuracy per number of shots."""
    body = [[head] + [f"{scores[s]:.4f}" for s in labels] for head, scores in table.items()]
    return _table(["head \\ shots", *labels], body)


def compare_shots(
    features: Path | str,
    *,
    heads: list[str],
    base: HeadConfig,
    shots: list[int | None],
    out: Path | str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Val accuracy of every head at every number of shots per class; writes shots.json/.md/.png.
    The heads themselves are not saved: this is a curve, not a model."""
    features = Path(features)
    meta = read_meta(features)
    base = with_layer(base, meta, features=features)
    root = Path(out) if out else default_compare_root(features, layer=base.layer)
    heads = usable_heads(heads, meta)
    labels = [_shot_label(s) for s in shots]
    settings = {"heads": {name: run_settings(replace(base, head=name)) for name in heads}, "shots": labels}
    if resolve_task(base.task, meta) == "regress":
        raise PipelineError("--shots draws K examples per class: not for regression targets (or --task classify)")
    with writing(root):
        what = "a few-shot comparison"
        check_replace(root / "shots.json", settings=settings, fingerprint=meta.fingerprint, what=what, force=force)
        fs = read_features(features, layer=base.layer)
        table: dict[str, dict[str, float]] = {name: {} for name in heads}
        runs = []
        for name in heads:
            for k, label in zip(shots, labels):
                _, metrics, _ = fit_and_evaluate(fs, replace(base, head=name, shots=k))
                table[name][label] = metrics["val_accuracy"]
                keep = ("val_accuracy", "balanced_accuracy", "worst_class_recall", "n_train_used", "fit_seconds")
                runs.append({"head": name, "shots": label, **{key: metrics[key] for key in keep}})
                runs[-1] |= {"shots_short": metrics.get("shots_short", {}), "notes": report_notes(metrics)}
        result = {**_describe(fs), "settings": settings, "seed": base.seed, "shots": labels, "val_accuracy": table}
        result["runs"] = runs
        try:
            write_json(root / "shots.json", result)
            write_text(root / "shots.md", _header(fs) + shots_table(table, labels) + "\n")
            plots.shots_png(table, labels, root / "shots.png", title=f"few-shot: {features_label(fs)}")
        except OSError as e:
            raise PipelineError(f"cannot write the shots comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result
