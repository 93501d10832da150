"""``python -m pipeline audit``: every pass on one feature file, and the report folder.

Passes (each timed): neighbours (one blocked top-k search over all rows) -> duplicates and leaks -> out-of-fold
probabilities and label issues -> outliers -> the score with and without the leaked val images -> the report.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.config import PCA_LOGREG, AuditConfig
from pipeline.audit.duplicates import Rows, find_pairs
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write, write_json, write_text
from pipeline.store import FeatureSet, read_features

log = logging.getLogger(__name__)

AUDIT_ROOT = Path("artifacts/audits")
# What the near-duplicate threshold is on (pipeline.audit.duplicates): the evidence score, or with --near-rule ranks
# (and hashes in the file) the rank statistic.
RULES = {"ranks": "rank statistic of similarity, margin and hash", "score": "evidence score, similarity + margin"}


def default_audit_dir(features: Path) -> Path:
    return AUDIT_ROOT / Path(features).stem


def file_rows(fs: FeatureSet) -> Rows:
    """Every row's id and split, with the content digests and perceptual hashes when every split has them."""
    parts = list(fs.splits.values())
    digests = np.concatenate([s.digests for s in parts]) if all(s.digests is not None for s in parts) else None
    phash = np.concatenate([s.phash for s in parts]) if all(s.phash is not None for s in parts) else None
    return Rows(
        ids=np.concatenate([s.ids for s in parts]).astype(str),
        split=np.concatenate([np.full(len(s), name) for name, s in fs.splits.items()]),
        digests=digests,
        phash=phash,
    )


def _clock() -> tuple[float, float]:
    """(wall, CPU seconds of this process, all threads): on a shared machine the wall time says little alone."""
    return time.perf_counter(), time.process_time()


def _timed(seconds: dict[str, float], name: str, t0: tuple[float, float], cpu: dict[str, float]) -> tuple[float, float]:
    """Records pass ``name``'s wall and CPU seconds since ``t0``; returns now (the next pass's start)."""
    now = _clock()
    seconds[name] = round(now[0] - t0[0], 3)
    cpu[name] = round(now[1] - t0[1], 3)
    return now


def audit(features: Path, cfg: AuditConfig, *, out: Path | None = None) -> dict[str, Any]:
    """Run every pass on ``features`` and write audit.json, audit.md, report.html and the out-of-fold
    probabilities under ``out`` (default :func:`default_audit_dir`). Returns the report."""
    import torch

    from pipeline.audit.labels import confident_issues, out_of_fold
    from pipeline.audit.neighbours import nearest, normalise
    from pipeline.audit.outliers import outlier_scores, ranked_outliers
    from pipeline.audit.score import best_compared_head, leak_free_score, saved_head_dir
    from pipeline.devices import resolve_device

    features = Path(features)
    out = Path(out) if out is not None else default_audit_dir(features)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t = _clock()
    fs = read_features(features)
    if fs.meta.targets:
        raise PipelineError(f"{features} holds regression targets: the audit needs class labels")
    rows = file_rows(fs)
    X = np.concatenate([s.features for s in fs.splits.values()])
    y = np.concatenate([s.labels for s in fs.splits.values()])
    if len(X) < 3:
        raise PipelineError(f"{features} has {len(X)} images: the audit needs at least 3")
    device = resolve_device(cfg.device)
    t = _timed(seconds, "read", t, cpu)
    nb = nearest(X, k=cfg.k, device=device, search_dim=cfg.search_dim, seed=cfg.seed)
    t = _timed(seconds, "neighbours", t, cpu)
    unit = normalise(torch.as_tensor(X).float()).numpy()
    leaks, dups, dup_info = find_pairs(nb, rows, unit=unit, threshold=cfg.threshold, rule=cfg.near_rule)
    t = _timed(seconds, "duplicates", t, cpu)
    oof = out_of_fold([s.features for s in fs.splits.values()], [s.labels for s in fs.splits.values()],
                      num_classes=len(fs.classes), device=device, folds=cfg.folds, seed=cfg.seed)  # fmt: skip
    issue_rows, suggested, scores = confident_issues(oof.proba, y)
    label_issues = [
        {"id": str(rows.ids[i]), "split": str(rows.split[i]), "given": fs.classes[y[i]],
         "suggested": fs.classes[s], "score": round(float(sc), 4), "row": int(i)}
        for i, s, sc in zip(issue_rows[: cfg.top], suggested, scores)
    ]  # fmt: skip
    t = _timed(seconds, "labels", t, cpu)
    outliers = ranked_outliers(outlier_scores(nb), rows.ids, rows.split, top=cfg.top)
    t = _timed(seconds, "outliers", t, cpu)
    head = cfg.head if cfg.head != "best" else (best_compared_head(features, cfg.compare) or PCA_LOGREG)
    saved = saved_head_dir(features, fs, head=head, compare=cfg.compare) if head != PCA_LOGREG else None
    leaked = {p["id"] for p in leaks if p["split"] == "val"}
    score = leak_free_score(fs, leaked_val_ids=leaked, head=head, device=cfg.device, seed=cfg.seed, oof=oof,
                            saved=saved)  # fmt: skip
    t = _timed(seconds, "score", t, cpu)
    report = {
        "features": str(features),
        "summary": summary(fs, leaks=leaks, dups=dups, issues=len(issue_rows), info=dup_info, oof=oof, score=score),
        "leaks": leaks,
        "duplicates": dups,
        "label_issues": label_issues,
        "outliers": outliers,
        "score": score,
        "near_duplicates": dup_info,
        "folds": oof.folds,
        "folds_note": oof.note,
        "config": {**cfg.__dict__},
        "seconds": seconds,
        "cpu_seconds": cpu,
    }
    write_report(report, out=out, fs=fs, rows=rows, proba=oof.proba, thumbnails=cfg.thumbnails)
    _timed(seconds, "report", t, cpu)
    write_json(out / "audit.json", report)
    report["out"] = str(out)
    return report


def summary(fs: FeatureSet, *, leaks: list, dups: list, issues: int, info: dict, oof: Any, score: dict) -> dict:
    y = np.concatenate([s.labels for s in fs.splits.values()])
    oof_acc = float((oof.proba.argmax(1) == y).mean())
    how = "--threshold" if info["threshold_given"] else "chosen from this file"
    sizes = ", ".join(f"{name} {len(s)}" for name, s in fs.splits.items())
    exact = (
        "yes (sha256 of each image: exact copies)"
        if info["digests"]
        else "none in this file: the near-duplicate pass alone"
    )
    return {
        "images": sizes,
        "leaks (val images with a copy in train)": len({p["id"] for p in leaks}),
        "duplicate pairs within a split": len(dups),
        "exact copies": sum(p["exact"] for p in leaks + dups),
        "content digests": exact,
        "perceptual hashes": "yes" if info["phash"] else "none in this file",
        "near-duplicate threshold": f"{info['threshold']:.4f} ({how}; {RULES[info['rule']]})",
        "likely wrong labels": issues,
        "out-of-fold accuracy": f"{oof_acc:.4f} ({oof.folds} folds)",
        "scored head": f"{score['head']}: {score['head_is']}",
        f"val accuracy ({score['head']})": f"{score['val_accuracy']:.4f} on {score['n_val']}",
        "val accuracy without the leaks": "n/a" if score["val_accuracy_without_leaks"] is None
        else f"{score['val_accuracy_without_leaks']:.4f} on {score['n_val_without_leaks']}",
    }  # fmt: skip


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_report(report: dict, *, out: Path, fs: FeatureSet, rows: Rows, proba: np.ndarray, thumbnails: bool) -> None:
    from pipeline.audit.report import collect_thumbnails, render_html, render_markdown, thumbnail_reader

    atomic_write(out / "oof_probabilities.npy", lambda p: p.write_bytes(_npy_bytes(proba)))
    write_json(out / "oof_ids.json", {"classes": fs.classes, "ids": rows.ids.tolist(), "splits": rows.split.tolist()})
    read = thumbnail_reader(fs.meta) if thumbnails else (lambda split, sample: None)
    thumbs, missing = collect_thumbnails(report, read)
    if missing and thumbnails:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        report["missing_images"] = missing
        log.warning(
            "%d image(s) not found (moved since extraction?), left blank in report.html: %s", len(missing), shown
        )
    write_text(out / "audit.md", render_markdown(report))
    write_text(out / "report.html", render_html(report, thumbs, missing=missing if thumbnails else []))


def print_lines(report: dict[str, Any]) -> list[str]:
    """What the command prints."""
    lines = [f"audit of {report['features']}"] + [f"  {k}: {v}" for k, v in report["summary"].items()]
    s = report["near_duplicates"]["scores"]
    if s.get("pairs"):
        lines.append(
            f"  {RULES[report['near_duplicates']['rule']]} of mutual nearest pairs: median {s['median']:.4f}, "
            f"robust sd {s['robust_sd']:.4f}, "
            f"p90 {s['p90']:.4f}, p99 {s['p99']:.4f}"
        )
    if report.get("folds_note"):
        lines.append(f"  {report['folds_note']}")
    lines.append("  seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    lines.append("  CPU seconds: " + ", ".join(f"{k} {v}" for k, v in report.get("cpu_seconds", {}).items()))
    return lines


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
