"""Stage two: train heads on a cached feature file, evaluate them, and compare head types."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.evaluate import classification_metrics, summarize
from pipeline.heads import HEADS, HeadConfig, build_head, save_head
from pipeline.store import FeatureSet, read_features

log = logging.getLogger(__name__)


def default_head_root(features: Path) -> Path:
    return Path("artifacts") / "heads" / Path(features).stem


def fit_and_evaluate(fs: FeatureSet, cfg: HeadConfig) -> tuple[Any, dict[str, Any], list[dict[str, float]]]:
    """Fit one head on ``fs.train``; metrics on train and val. Val is never used to choose anything."""
    head = build_head(cfg, num_classes=len(fs.classes), feature_dim=fs.feature_dim)
    X, y = fs.train.features, fs.train.labels
    t0 = time.perf_counter()
    fit = head.fit(X, y, val=(fs.val.features, fs.val.labels))
    fit_seconds = time.perf_counter() - t0
    train_m = classification_metrics(y, head.predict_proba(X), fs.classes)
    val_m = classification_metrics(fs.val.labels, head.predict_proba(fs.val.features), fs.classes)
    metrics = summarize(train=train_m, val=val_m, fit_seconds=fit_seconds, extra={"head": cfg.head, **fit.info})
    return head, metrics, fit.history


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def train_head(features: Path | str, cfg: HeadConfig, *, out: Path | str | None = None) -> dict[str, Any]:
    """Train ``cfg.head`` on a feature file; write metrics.json, config.json and the head to ``out``."""
    features = Path(features)
    fs = read_features(features)
    return _train_one(fs, cfg, out=Path(out) if out else default_head_root(features) / cfg.head)


def _train_one(fs: FeatureSet, cfg: HeadConfig, *, out: Path) -> dict[str, Any]:
    head, metrics, history = fit_and_evaluate(fs, cfg)
    if history:
        metrics["history"] = history
    config = {
        "head": cfg.head,
        "head_config": asdict(cfg),
        "features": str(fs.path),
        "features_fingerprint": fs.meta.get("fingerprint"),
        "backbone": fs.meta.get("backbone"),
        "weights": fs.meta.get("weights"),
        "feature_dim": fs.feature_dim,
        "classes": fs.classes,
        "preprocessing": fs.meta.get("preprocessing"),
        "classifier_path": fs.meta.get("classifier_path"),
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    }
    try:
        save_head(head, out, config=config)
        _write_json(out / "metrics.json", metrics)
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


COMPARE_COLUMNS = (
    ("head", "head", "{}"),
    ("train acc", "train_accuracy", "{:.4f}"),
    ("val acc", "val_accuracy", "{:.4f}"),
    ("balanced acc", "balanced_accuracy", "{:.4f}"),
    ("macro F1", "macro_f1", "{:.4f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("fit s", "fit_seconds", "{:.2f}"),
)


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of compared heads (also what the CLI prints)."""
    header = "| " + " | ".join(c for c, _, _ in COMPARE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COMPARE_COLUMNS))) + "|"
    body = ["| " + " | ".join(fmt.format(r[k]) for _, k, fmt in COMPARE_COLUMNS) + " |" for r in rows]
    return "\n".join([header, sep, *body])


def compare(
    features: Path | str, *, heads: list[str], base: HeadConfig, out: Path | str | None = None
) -> dict[str, Any]:
    """Train every head in ``heads`` on one feature file (read once); write compare.json and compare.md."""
    features = Path(features)
    fs = read_features(features)
    root = Path(out) if out else default_head_root(features)
    rows = []
    for name in heads:
        log.info("training %s", name)
        metrics = _train_one(fs, replace(base, head=name), out=root / name)
        rows.append({k: metrics[k] for _, k, _ in COMPARE_COLUMNS} | {"overfitting": metrics["overfitting"]})
    best = max(rows, key=lambda r: r["val_accuracy"])
    result = {
        "features": str(features),
        "backbone": fs.meta.get("backbone"),
        "weights": fs.meta.get("weights"),
        "n_train": len(fs.train),
        "n_val": len(fs.val),
        "rows": rows,
        "best": best["head"],
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / "compare.json", result)
        (root / "compare.md").write_text(
            f"Features: `{features}` ({fs.meta.get('backbone')}, {fs.meta.get('weights')}; "
            f"{len(fs.train)} train / {len(fs.val)} val)\n\n" + compare_table(rows) + "\n"
        )
    except OSError as e:
        raise PipelineError(f"cannot write comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result
