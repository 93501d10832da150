"""Stage two: train heads on a cached feature file, evaluate them, and compare head types.

Protocol (CLIP appendix A.3, dinov2 ``log_regression.py``): ``val`` is only ever reported. With ``--sweep`` the
hyper-parameter of a head is chosen on a stratified held-out part of ``train``; the head is then refitted on
all of ``train`` with the chosen value. With ``--shots K`` a head trains on K examples per class drawn from the
cached ``train`` split with ``--seed``, so few-shot curves need no re-extraction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import plots
from pipeline.errors import PipelineError
from pipeline.evaluate import classification_metrics, summarize
from pipeline.fileio import write_json, write_text
from pipeline.heads import HEADS, Head, HeadConfig, build_head, save_head, warn_if_tiny
from pipeline.store import FeatureSet, SplitFeatures, read_features

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 0.2  # share of train that --sweep scores the grid on


def default_head_root(features: Path) -> Path:
    return Path("artifacts") / "heads" / Path(features).stem


def few_shot(split: SplitFeatures, *, shots: int, seed: int) -> SplitFeatures:
    """``shots`` rows per class (all of a class that has fewer), drawn with ``seed``, in file order."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(split.labels == c))[:shots] for c in np.unique(split.labels)]
    idx = np.sort(np.concatenate(keep))
    return SplitFeatures(features=split.features[idx], labels=split.labels[idx], ids=split.ids[idx])


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
    """Choose the head's hyper-parameter on a held-out part of ``(X, y)``; the config to refit with + a record."""
    cfg = head.cfg
    grid = type(head).sweep_grid(cfg)
    if not grid:
        return cfg, {"grid": [], "note": f"{cfg.head} has no hyper-parameter to choose"}
    fit, held = stratified_holdout(y, fraction=HELD_OUT_FRACTION, seed=cfg.seed)
    if not len(held) or len(np.unique(y[fit])) < 2:
        log.warning("--sweep skipped for %s: too few training examples per class to hold some out", cfg.head)
        return cfg, {"grid": grid, "skipped": "too few training examples per class to hold some out"}
    t0 = time.perf_counter()
    scores = head.sweep_scores(X[fit], y[fit], (X[held], y[held]), grid=grid)
    best = int(np.argmax(scores))  # the first of equal scores: the grids run from strong to weak regularisation
    record = {
        "grid": grid,
        "held_out_accuracy": scores,
        "chosen": grid[best],
        "held_out_fraction": HELD_OUT_FRACTION,
        "n_fit": len(fit),
        "n_held_out": len(held),
        "seconds": time.perf_counter() - t0,
        **head.sweep_info,
    }
    log.info("sweep %s: chose %s (held-out accuracy %.4f)", cfg.head, grid[best], scores[best])
    return replace(cfg, **grid[best]), record


def fit_and_evaluate(fs: FeatureSet, cfg: HeadConfig) -> tuple[Head, dict[str, Any], list[dict[str, float]]]:
    """Fit one head on ``fs.train`` (or its few-shot sample); metrics on that train and on val.
    Val is never used to choose anything."""
    train = few_shot(fs.train, shots=cfg.shots, seed=cfg.seed) if cfg.shots else fs.train
    X, y = train.features, train.labels
    dims = {"num_classes": len(fs.classes), "feature_dim": fs.feature_dim}
    t0 = time.perf_counter()
    sweep_record = None
    if cfg.sweep:
        cfg, sweep_record = sweep(build_head(cfg, **dims), X, y)
    head = build_head(cfg, **dims)
    if type(head).uses_standardize and not cfg.standardize:
        warn_if_tiny(X, cfg)
    fit = head.fit(X, y, val=(fs.val.features, fs.val.labels))
    fit_seconds = time.perf_counter() - t0
    train_y, train_proba, train_note = head.train_predictions(X, y)
    train_m = classification_metrics(train_y, train_proba, fs.classes)
    val_m = classification_metrics(fs.val.labels, head.predict_proba(fs.val.features), fs.classes)
    extra = {
        "head": cfg.head,
        "class_weight": cfg.class_weight if type(head).uses_class_weight else "n/a",
        "standardize": cfg.standardize if type(head).uses_standardize else "n/a",
        "shots": cfg.shots,
        "n_train_used": len(y),
        **fit.info,
    }
    if train_note is not None:
        extra["train_metrics_note"] = train_note
    if sweep_record is not None:
        extra["sweep"] = sweep_record
    metrics = summarize(train=train_m, val=val_m, fit_seconds=fit_seconds, extra=extra)
    return head, metrics, fit.history


def train_head(features: Path | str, cfg: HeadConfig, *, out: Path | str | None = None) -> dict[str, Any]:
    """Train ``cfg.head`` on a feature file; write metrics.json, config.json, PNGs and the head to ``out``."""
    features = Path(features)
    fs = read_features(features)
    return _train_one(fs, cfg, out=Path(out) if out else default_head_root(features) / cfg.head)


def head_config(fs: FeatureSet, head: Head) -> dict[str, Any]:
    """``config.json`` of a head: its settings (after any sweep) and everything export needs to rebuild the model."""
    return {
        "head": head.cfg.head,
        "head_config": asdict(head.cfg),
        "features": str(fs.path),
        "features_fingerprint": fs.meta.get("fingerprint"),
        "backbone": fs.meta.get("backbone"),
        "weights": fs.meta.get("weights"),
        "extract_config": fs.meta.get("config"),
        "feature_dim": fs.feature_dim,
        "classes": fs.classes,
        "preprocessing": fs.meta.get("preprocessing"),
        "classifier_path": fs.meta.get("classifier_path"),
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    }


def _write_plots(metrics: dict[str, Any], history: list[dict[str, float]], out: Path, *, classes: list[str]) -> None:
    name = metrics["head"]
    plots.confusion_png(
        metrics["confusion_matrix"], classes, out / "confusion.png", title=f"{name}: val confusion (row-normalised)"
    )
    if history:
        plots.curves_png(history, out / "curves.png", title=f"{name}: loss and accuracy per epoch")


def _train_one(fs: FeatureSet, cfg: HeadConfig, *, out: Path) -> dict[str, Any]:
    head, metrics, history = fit_and_evaluate(fs, cfg)
    if history:
        metrics["history"] = history
    try:
        save_head(head, out, config=head_config(fs, head))
        write_json(out / "metrics.json", metrics)
        _write_plots(metrics, history, out, classes=fs.classes)
    except OSError as e:
        raise PipelineError(f"cannot write head to {out}: {e.strerror or e}") from None
    metrics["out"] = str(out)
    return metrics


def parse_heads(spec: str | None) -> list[str]:
    names = list(HEADS) if not spec or spec == "all" else [h.strip() for h in spec.split(",") if h.strip()]
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
)


def _table(header: list[str], body: list[list[str]]) -> str:
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", sep, *("| " + " | ".join(row) + " |" for row in body)])


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of compared heads (also what the CLI prints)."""
    body = [[fmt.format(r[k]) for _, k, fmt in COMPARE_COLUMNS] for r in rows]
    return _table([c for c, _, _ in COMPARE_COLUMNS], body)


def _describe(fs: FeatureSet) -> dict[str, Any]:
    return {
        "features": str(fs.path),
        "backbone": fs.meta.get("backbone"),
        "weights": fs.meta.get("weights"),
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    }


def _header(fs: FeatureSet) -> str:
    return (
        f"Features: `{fs.path}` ({fs.meta.get('backbone')}, {fs.meta.get('weights')}; "
        f"{len(fs.train)} train / {len(fs.val)} val)\n\n"
    )


def compare(
    features: Path | str, *, heads: list[str], base: HeadConfig, out: Path | str | None = None
) -> dict[str, Any]:
    """Train every head in ``heads`` on one feature file (read once); write compare.json/.md/.png."""
    features = Path(features)
    fs = read_features(features)
    root = Path(out) if out else default_head_root(features)
    rows = []
    for name in heads:
        log.info("training %s", name)
        metrics = _train_one(fs, replace(base, head=name), out=root / name)
        rows.append({k: metrics[k] for _, k, _ in COMPARE_COLUMNS} | {"overfitting": metrics["overfitting"]})
    best = max(rows, key=lambda r: r["val_accuracy"])
    result = {**_describe(fs), "rows": rows, "best": best["head"]}
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / "compare.json", result)
        write_text(root / "compare.md", _header(fs) + compare_table(rows) + "\n")
        plots.compare_png(rows, root / "compare.png", title=f"{fs.meta.get('backbone')} features: heads on val")
    except OSError as e:
        raise PipelineError(f"cannot write comparison to {root}: {e.strerror or e}") from None
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
) -> dict[str, Any]:
    """Val accuracy of every head at every number of shots per class; writes shots.json/.md/.png.
    The heads themselves are not saved: this is a curve, not a model."""
    features = Path(features)
    fs = read_features(features)
    root = Path(out) if out else default_head_root(features)
    labels = [_shot_label(s) for s in shots]
    table: dict[str, dict[str, float]] = {name: {} for name in heads}
    runs = []
    for name in heads:
        for k, label in zip(shots, labels):
            _, metrics, _ = fit_and_evaluate(fs, replace(base, head=name, shots=k))
            table[name][label] = metrics["val_accuracy"]
            keep = ("val_accuracy", "balanced_accuracy", "worst_class_recall", "n_train_used", "fit_seconds")
            runs.append({"head": name, "shots": label, **{key: metrics[key] for key in keep}})
    result = {**_describe(fs), "shots": labels, "seed": base.seed, "val_accuracy": table, "runs": runs}
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / "shots.json", result)
        write_text(root / "shots.md", _header(fs) + shots_table(table, labels) + "\n")
        plots.shots_png(table, labels, root / "shots.png", title=f"{fs.meta.get('backbone')} features: few-shot")
    except OSError as e:
        raise PipelineError(f"cannot write the shots comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result
