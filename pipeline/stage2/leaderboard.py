"""``compare --features A.h5 --features B.h5 ...``: the heads trained on each feature file (each stored layer too,
with ``--layers``), one table sorted by the val score, and a plot. Files of another dataset or split are refused
before any training: their val scores would be of other images, so their rows would not be comparable."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.fileio import write_json, write_text
from pipeline.stage2.heads import HeadConfig
from pipeline.stage2.report import write_leaderboard_report
from pipeline.stage2.tasks import TASKS, resolve_task
from pipeline.store import FeatureMeta, read_meta

log = logging.getLogger(__name__)
COLUMNS = (
    ("backbone", "backbone", "{}"),
    ("weights", "weights", "{}"),
    ("layer", "layer", "{}"),
    ("dim", "feature_dim", "{}"),
    ("image", "image", "{}"),
    ("head", "head", "{}"),
    ("val", "val", "{:.4f}"),
    ("95% interval", "interval", "[{0[0]:.3f}, {0[1]:.3f}]"),
    ("extract s", "extract_seconds", "{:.1f}"),
    ("head s", "head_seconds", "{:.2f}"),
)
IDENTITY_IGNORED = ("root", "verify")  # where the images sit and how their files were checked: not what they are


def comparable_identity(meta: FeatureMeta, classes: int | None = None) -> dict[str, Any]:
    """What must match for two files' val rows to be the same images: the dataset identity (its files' digest and
    split; not its folder's location) and the classes."""
    identity = {k: v for k, v in dict(meta.dataset_identity or {}).items() if k not in IDENTITY_IGNORED}
    return {"dataset": meta.dataset, "identity": identity, "num_classes": meta.num_classes}


def _stat_copies(a: FeatureMeta, b: FeatureMeta) -> bool:
    """Two folders checked by file stat (``verify=stat``: sizes and times) at different places: a copy or another
    checkout of the same images has other times, so its files' digest cannot tell; the rest of the identity can."""
    ia, ib = dict(a.dataset_identity or {}), dict(b.dataset_identity or {})
    return ia.get("verify") == ib.get("verify") == "stat" and ia.get("root") != ib.get("root")


def check_same_dataset(features: list[Path], metas: list[FeatureMeta]) -> None:
    for path, meta in zip(features[1:], metas[1:]):
        first, other = comparable_identity(metas[0]), comparable_identity(meta)
        if _stat_copies(metas[0], meta):
            first["identity"].pop("files_sha256", None)
            other["identity"].pop("files_sha256", None)
        if other != first:
            differ = sorted(
                k for k in set(first["identity"]) | set(other["identity"])
                if first["identity"].get(k) != other["identity"].get(k)
            ) or [k for k in ("dataset", "num_classes") if first[k] != other[k]]  # fmt: skip
            raise PipelineError(
                f"{path} is of another dataset or split than {features[0]} ({', '.join(differ)} differ): its val "
                "scores would not be comparable; compare files extracted from the same images and split"
            )


def image_words(meta: FeatureMeta) -> str:
    """``112 px crop``: the size the backbone saw and how the image was brought to it."""
    pre = dict(meta.preprocessing or {})
    size = pre.get("crop_size")
    return f"{size} px {pre.get('resize', 'crop')}" if size else "-"


def leaderboard(
    features: list[Path],
    *,
    heads: list[str],
    base: HeadConfig,
    out: Path | str | None = None,
    force: bool = False,
    layers: str | None = None,
) -> dict[str, Any]:
    """Every head on every file (and on each stored layer with ``layers``), one sorted table; written to ``out``
    (default ``artifacts/heads/leaderboard/``) as leaderboard.json/.md/.png, each run's folder below it."""
    from pipeline.stage2.comparing import STANDARDIZE_GAP, compare, layer_shown, parse_layers, standardize_hint
    from pipeline.stage2.runs import weights_label

    features = [Path(f) for f in features]
    seen: dict[Path, Path] = {}
    for f in features:
        if (twin := seen.setdefault(f.resolve(), f)) is not f:
            raise PipelineError(f"{f} is given twice (as {twin} too): each file's rows would be listed twice")
    metas = [read_meta(f) for f in features]
    check_same_dataset(features, metas)
    task = TASKS[resolve_task(base.task, metas[0])]
    root = Path(out) if out else Path("artifacts/heads/leaderboard")
    rows: list[dict[str, Any]] = []
    unstandardised: list[str] = []  # the runs where linear or mlp trailed logreg (compare's standardize hint)
    for n, (path, meta) in enumerate(zip(features, metas)):
        names = parse_layers(layers, meta, features=path) if layers and meta.layers else [base.layer]
        for layer in names:
            folder = root / f"{n}_{path.stem}" / (layer or "all")
            result = compare(path, heads=heads, base=replace(base, layer=layer), out=folder, force=force)
            shown = layer_shown(layer, [d["name"] for d in meta.layers or []])
            if standardize_hint(result["rows"], base=base):
                unstandardised.append(f"{path.name} {shown}")
            for r in result["rows"]:
                rows.append({
                    "features": str(path), "backbone": meta.backbone, "weights": weights_label(meta),
                    "layer": shown,
                    "feature_dim": result.get("feature_dim"), "image": image_words(meta), "head": r["head"],
                    "val": r.get(task.score), "interval": r.get(f"{task.score}_interval"),
                    "extract_seconds": meta.extract_seconds, "head_seconds": r.get("head_seconds"),
                })  # fmt: skip
    rows.sort(key=lambda r: -(r["val"] if r["val"] is not None else float("-inf")))
    result = {"score": task.score, "rows": rows, "out": str(root), "features": [str(f) for f in features]}
    if unstandardised:
        result["notes"] = [
            f"linear or mlp trail logreg by more than {100 * STANDARDIZE_GAP:.0f} points on unstandardised features "
            f"in {len(unstandardised)} of the runs ({', '.join(unstandardised[:4])}"
            f"{', ...' if len(unstandardised) > 4 else ''}): rerun with --standardize"
        ]
    write_json(root / "leaderboard.json", result)
    notes = "".join(f"\nWARNING: {n}\n" for n in result.get("notes", []))
    write_text(root / "leaderboard.md", leaderboard_table(rows) + "\n" + notes)
    _plot(rows, root / "leaderboard.png", score=task.score)
    write_leaderboard_report(root, result, columns=COLUMNS)
    return result


def leaderboard_table(rows: list[dict[str, Any]]) -> str:
    from pipeline.stage2.comparing import table
    from pipeline.stage2.report import cells

    return table([c for c, _, _ in COLUMNS], cells(COLUMNS, rows))


def _plot(rows: list[dict[str, Any]], path: Path, *, score: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.fileio import atomic_write

    labels = [f"{r['backbone']} {r['weights']} {r['layer']} {r['image']}: {r['head']}" for r in rows][::-1]
    values = [r["val"] or 0.0 for r in rows][::-1]

    def reach(r: dict[str, Any], side: int) -> float:
        if not r.get("interval"):
            return 0.0
        return max(0.0, (r["val"] or 0.0) - r["interval"][0] if side == 0 else r["interval"][1] - (r["val"] or 0.0))

    errs = [[reach(r, 0) for r in rows][::-1], [reach(r, 1) for r in rows][::-1]]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, xerr=errs, color="tab:blue", ecolor="grey")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel(f"{score.replace('_', ' ')} (95% interval)")
    lo = min((v for v in values), default=0.0)
    ax.set_xlim(max(0.0, lo - 0.1), 1.0 if score != "val_r2" else None)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90, bbox_inches="tight"))  # long labels whole
    plt.close(fig)
