"""Comparing heads: ``compare`` (several heads on one feature file, one table), ``compare --layers`` (the best head
per stored layer) and ``compare --shots`` (val accuracy against examples per class), with their tables. The rows,
their columns and how they rank are the run's task's (:mod:`pipeline.stage2.tasks`)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import workers
from pipeline.errors import PipelineError
from pipeline.fileio import write_json, write_text
from pipeline.stage2 import plots, thresholds
from pipeline.stage2.evaluate import report_notes
from pipeline.stage2.heads import HEADS, HeadConfig
from pipeline.stage2.heads.tail import require_activations
from pipeline.stage2.report import write_compare_report
from pipeline.stage2.runs import (
    check_heads,
    check_replace,
    default_compare_root,
    default_head_root,
    describe,
    features_label,
    header,
    read_run_features,
    run_settings,
    with_layer,
    writing,
)
from pipeline.stage2.tasks import TASKS, Column, Task, resolve_task, task_of_rows, with_task
from pipeline.stage2.training import fit_and_evaluate, train_heads
from pipeline.store import ALL_LAYERS, FeatureMeta, layer_columns, read_meta, resolve_layer

log = logging.getLogger(__name__)


def parse_heads(spec: str | None, *, task: str = "classify") -> list[str]:
    """Head names from ``--heads``; 'all' = every head meant for ``task`` (ridge only for regression)."""
    everything = [name for name, entry in HEADS.items() if task in entry.in_all]
    names = everything if not spec or spec == "all" else [h.strip() for h in spec.split(",") if h.strip()]
    unknown = [h for h in names if h not in HEADS]
    if unknown:
        raise PipelineError(f"unknown head {unknown[0]!r}; choose from: {', '.join(HEADS)}")
    if not names:
        raise PipelineError("--heads names no head")
    return names


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


def table(header_row: list[str], body: list[list[str]]) -> str:
    """A markdown table, the first column left-aligned and the rest right-aligned."""
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header_row))) + "|"
    return "\n".join(["| " + " | ".join(header_row) + " |", sep, *("| " + " | ".join(row) + " |" for row in body)])


def _rows_table(columns: tuple[Column, ...], rows: list[dict[str, Any]]) -> str:
    body = [[fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in columns] for r in rows]
    return table([c for c, _, _ in columns], body)


def compare_table(rows: list[dict[str, Any]], *, extract_seconds: float | None = None) -> str:
    """Markdown table of compared heads (also what the CLI prints), in the columns of their task, and under it
    what each time column counts (:func:`times_footer`)."""
    columns = task_of_rows(rows).table_columns(rows)
    footer = times_footer(columns, rows, extract_seconds=extract_seconds)
    return _rows_table(columns, rows) + (f"\n\n{footer}" if footer else "")


def times_footer(columns: tuple[Column, ...], rows: list[dict[str, Any]], *, extract_seconds: float | None) -> str:
    """One line per time column of the table, saying what it counts (wall-clock seconds)."""
    said = {
        "fit_seconds": "fit s: training the head (with --sweep: its grid on held-out train, the refit on all of "
        "train and the refit's check)",
        "eval_seconds": "eval s: predicting and scoring train and val",
        "head_seconds": "head s: what you wait per head: fit + eval + writing its folder (plots, predictions.csv, "
        "errors.png); on a CPU two heads train at once, so compare takes less than their sum",
        "total_seconds": "total s: the two-stage cost of that head: the feature file's extraction"
        + ("" if extract_seconds is None else f" ({extract_seconds:.1f} s, run once for every head)")
        + " + head s"
        + ("; the baseline's: its training" if any(r.get("head") == "baseline" for r in rows) else ""),
    }
    return "\n".join(f"- {said[key]}" for _, key, _ in columns if key in said)


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
    started = time.perf_counter()
    features = Path(features)
    meta = read_meta(features)
    base = with_layer(base, meta, features=features)
    root = Path(out) if out else default_compare_root(features, layer=base.layer, sweep=base.sweep)
    heads = usable_heads(heads, meta)
    task = TASKS[resolve_task(base.task, meta)]
    configs = {name: with_task(replace(base, head=name), meta) for name in heads}  # refused before any training
    base = next(iter(configs.values()))
    scratch = None  # read before any head is trained: a refused baseline costs nothing
    if baseline is not None:
        from pipeline.stage2.baseline import baseline_row

        task.refuse("baseline")
        scratch = baseline_row(baseline, dataset_identity=meta.dataset_identity)
    with writing(root, *(root / name for name in heads)):
        check_heads(root, heads=heads, base=base, fingerprint=meta.fingerprint, force=force)
        fs = read_run_features(features, base)
        trained, at_once = train_heads(fs, configs, root=root)
        rows = [task.compare_row(m) | {"head_seconds": s} for m, s in trained]
        ranked_by = task.rank(rows)
        best = max(rows, key=lambda r: r[ranked_by])
        shown = rows + ([scratch] if scratch is not None else [])  # the figure's bars: the scores and intervals
        title = f"heads on val: {features_label(fs)}"
        # compare.png drawn in a forked child, on the core the last head left idle, while the ties are tested and
        # the tables written here: the end of a 60,000 x 1,280 comparison, 0.9 -> 0.5 s
        try:
            with workers.alongside(lambda: plots.compare_png(shown, root / "compare.png", title=title, bars=task.bars)):
                mark_ties(rows, best=best["head"], root=root, task=task)
                hint = standardize_hint(rows, base=base)
                if hint:  # said once, under the table, beside the first head it is about
                    next(r for r in rows if r["head"] in ("linear", "mlp")).setdefault("notes", []).append(hint)
                extract_seconds = fs.meta.extract_seconds
                for row in rows:  # the two-stage cost of each head: the one extraction + all the head cost
                    row["total_seconds"] = None if extract_seconds is None else extract_seconds + row["head_seconds"]
                if scratch is not None:
                    rows.append(scratch)
                result = {**describe(fs), "extract_seconds": extract_seconds, "rows": rows, "best": best["head"]}
                result |= {
                    "best_tied_with": best.get("tied_with", []),
                    "compare_seconds": time.perf_counter() - started,
                }
                result["heads_at_once"] = at_once  # 2: on a CPU, each in a forked worker (pipeline.workers)
                result |= {"layer": fs.layer or ALL_LAYERS, "feature_dim": fs.feature_dim, "best_by": ranked_by}
                result["layer_shown"] = layer_shown(fs.layer, [d["name"] for d in fs.meta.layers or []])  # "final", ...
                result |= {"exclude": run_settings(base)["exclude"]} if base.exclude else {}  # what --exclude left out
                skew = rows[0].get("imbalance")  # train's classes, the same for every head
                if skew:
                    result["imbalance"] = skew | {"line": thresholds.imbalance_line(skew)}
                write_json(root / "compare.json", result)
                took = f"compare took {result['compare_seconds']:.1f} s in all"
                table_md = compare_table(rows, extract_seconds=extract_seconds)
                write_text(root / "compare.md", f"{header(fs)}{table_md}\n\n{took}\n")
            write_compare_report(root, result)  # last: the page shows the files above
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


def layer_shown(name: str | None, stored: list[str]) -> str:
    """A layer as tables show it: its name; ``all (a+b+c)`` for the concatenation of a ``--layers`` file's layers
    (``all (N layers)`` when long); ``final`` for a file without ``--layers`` (the backbone's classifier input)."""
    if not stored:
        return "final"
    if name not in (None, ALL_LAYERS):
        return str(name)
    joined = "+".join(stored)
    return f"all ({joined if len(joined) <= 40 else f'{len(stored)} layers'})"


def _layer_row(name: str, run: dict[str, Any], *, stored: list[str]) -> dict[str, Any]:
    """One line of the layer table: the best head of ``run`` (a :func:`compare` result on layer ``name``)."""
    best = next(r for r in run["rows"] if r["head"] == run["best"])
    keep = ("val_accuracy", "balanced_accuracy", "train_val_gap", "fit_seconds")
    return {
        "layer": name,
        "shown": layer_shown(name, stored),
        "feature_dim": run["feature_dim"],
        "best": run["best"],
        **{k: best.get(k) for k in keep},
        "heads_seconds": sum(r["fit_seconds"] for r in run["rows"] if r.get("fit_seconds") is not None),
        "out": run["out"],
    }


def layers_report(result: dict[str, Any]) -> str:
    """Markdown: the best head per layer, then each layer's table of heads (what the CLI prints, and layers.md)."""
    rows = result["layers"]
    parts = [_rows_table(LAYER_COLUMNS, rows)]
    for row in rows:
        run = result["runs"][row["layer"]]["rows"]
        heads = _rows_table(task_of_rows(run).table_columns(run), run)  # compare_table less its footer
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
        head_line = f"Features: `{features}`: {first['label']}; {first['n_train']} train / {first['n_val']} val\n\n"
        try:
            write_json(root / "layers.json", {k: v for k, v in result.items() if k != "runs"})
            write_text(root / "layers.md", head_line + layers_report(result) + "\n")
        except OSError as e:
            raise PipelineError(f"cannot write the layer comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result


# ------------------------------------------------------------------------------------------ compare --shots


def _shot_label(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def shots_table(scores: dict[str, dict[str, float]], labels: list[str]) -> str:
    """Markdown: one row per head, val accuracy per number of shots."""
    body = [[head] + [f"{by_shots[s]:.4f}" for s in labels] for head, by_shots in scores.items()]
    return table(["head \\ shots", *labels], body)


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
    root = Path(out) if out else default_compare_root(features, layer=base.layer, sweep=base.sweep)
    heads = usable_heads(heads, meta)
    labels = [_shot_label(s) for s in shots]
    settings = {"heads": {name: run_settings(replace(base, head=name)) for name in heads}, "shots": labels}
    TASKS[resolve_task(base.task, meta)].refuse("shots")
    with writing(root):
        what = "a few-shot comparison"
        check_replace(root / "shots.json", settings=settings, fingerprint=meta.fingerprint, what=what, force=force)
        fs = read_run_features(features, base)
        scores: dict[str, dict[str, float]] = {name: {} for name in heads}
        runs, skipped = [], []
        for name in heads:
            for k, label in zip(shots, labels):
                _, metrics, _ = fit_and_evaluate(fs, replace(base, head=name, shots=k))
                scores[name][label] = metrics.val_accuracy
                keep = ("val_accuracy", "balanced_accuracy", "worst_class_recall", "n_train_used", "fit_seconds")
                runs.append({"head": name, "shots": label, **{key: getattr(metrics, key) for key in keep}})
                runs[-1] |= {"shots_short": metrics.shots_short or {}, "notes": report_notes(metrics)}
                if metrics.sweep and "skipped" in metrics.sweep:
                    skipped.append(f"{name} at {label}")
        if skipped:  # one line, not one per head and number of shots
            log.warning("--sweep skipped where too few examples per class were left to hold some out (%s): those "
                        "runs used the heads' own settings", ", ".join(skipped))  # fmt: skip
        result = {**describe(fs), "settings": settings, "seed": base.seed, "shots": labels, "val_accuracy": scores}
        result["runs"] = runs
        try:
            write_json(root / "shots.json", result)
            write_text(root / "shots.md", header(fs) + shots_table(scores, labels) + "\n")
            plots.shots_png(scores, labels, root / "shots.png", title=f"few-shot: {features_label(fs)}")
        except OSError as e:
            raise PipelineError(f"cannot write the shots comparison to {root}: {e.strerror or e}") from None
    result["out"] = str(root)
    return result


def mark_ties(rows: list[dict[str, Any]], *, best: str, root: Path, task: Task) -> None:
    """Each head whose val answers are not significantly different from the best head's (the task's paired test:
    McNemar's for labels, a paired bootstrap of R^2 or of mAP; read back from each head's predictions.csv) gets
    ``tied_with_best: "yes (p=...)"``; the best row lists them in ``tied_with``."""
    from pipeline.stage2 import answers, stats

    def answered(name: str) -> list[dict[str, str]] | None:
        path = root / name / "predictions.csv"
        return answers.read_predictions(path) if path.is_file() else None

    best_rows = answered(best)
    if not best_rows:
        return
    ids = [r["id"] for r in best_rows]
    tied = []
    for row in rows:
        if row["head"] == best:
            continue
        other = answered(row["head"])
        if other is None or [r["id"] for r in other] != ids:
            continue
        p = task.tie_p_value(best_rows, other)
        row["tied_p_value"] = p
        if p >= stats.ALPHA:
            row["tied_with_best"] = f"yes (p={p:.2f})"
            tied.append(row["head"])
    next(r for r in rows if r["head"] == best)["tied_with"] = tied


STANDARDIZE_GAP = 0.05  # linear/mlp this far below logreg on raw features: the scale, not the head, is the matter


def standardize_hint(rows: list[dict[str, Any]], *, base: HeadConfig) -> str | None:
    """One line when linear or mlp, trained on the features as given, trail logreg (which always standardises) by
    more than STANDARDIZE_GAP of val accuracy: inner layers' features have scales Adam's one learning rate does
    not suit (measured 0.60-0.75 against logreg's 0.81-0.88)."""
    if base.standardize:
        return None
    score = {r["head"]: r.get("val_accuracy") for r in rows}
    if score.get("logreg") is None:
        return None
    behind = [h for h in ("linear", "mlp") if score.get(h) is not None and score["logreg"] - score[h] > STANDARDIZE_GAP]
    if not behind:
        return None
    gaps = ", ".join(f"{h} {score[h]:.3f}" for h in behind)
    return (
        f"WARNING: {gaps} trail logreg ({score['logreg']:.3f}, which standardises) by more than "
        f"{100 * STANDARDIZE_GAP:.0f} points on unstandardised features: rerun with --standardize"
    )
