"""``report.html`` of a compare folder and of a leaderboard: one self-contained page each (the blocks of
:mod:`pipeline.html`: inline CSS, every figure inlined as PNG data, no script, nothing fetched).

A compare page shows the table in its task's columns (val score, 95% interval, tied marks, the seconds), the
"best on val" line, ``compare.png``, and per head its worst-predicted images (``errors.png``), the other figures its
folder holds and links to its ``predictions.csv``, ``metrics.json`` and ``config.json``. The page is a view of the
folder: it shows the figures the heads wrote, whatever their task drew."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.fileio import write_text
from pipeline.html import esc, figure, page, table
from pipeline.stage2.answers import CAPTIONS
from pipeline.stage2.tasks import Column, task_of_rows

ERRORS = "errors.png"  # the worst-predicted val images (pipeline.stage2.answers), shown first under each head
LINKED = ("predictions.csv", "metrics.json", "config.json")  # a head's files the page links to, where present


def cells(columns: tuple[Column, ...], rows: list[dict[str, Any]]) -> list[list[str]]:
    """Each row's cells in ``columns`` (header, key, format): ``-`` where a row has no value."""
    return [[fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in columns] for r in rows]


def tied_words(result: dict[str, Any]) -> str:
    """`` (tied with linear, mlp: not significantly different on val, p >= 0.05)`` when heads tie with the best."""
    tied = result.get("best_tied_with") or []
    return f" (tied with {', '.join(tied)}: not significantly different on val, p >= 0.05)" if tied else ""


def best_line(result: dict[str, Any]) -> str:
    """``best on val: logreg (tied with ...)``, as compare prints it."""
    return f"best on val: {result['best']}{tied_words(result)}"


def _links(folder: Path, names: tuple[str, ...], *, prefix: str) -> str:
    present = [n for n in names if (folder / n).is_file()]
    return " &middot; ".join(f'<a href="{quote(f"{prefix}/{n}")}">{esc(n)}</a>' for n in present)


def _head_section(root: Path, name: str, *, best: bool, errors: str) -> str:
    """One head: links to its files, its worst-predicted images (captioned ``errors``: what errors.png's title says
    of them), then the other figures its folder holds."""
    folder = root / name
    links = _links(folder, LINKED, prefix=name)
    parts = [f'<h2 id="head-{esc(name)}">{esc(name)}{" (best on val)" if best else ""}</h2>']
    parts += [f"<p>{links}</p>"] if links else []
    worst = f"{name}/{ERRORS}: {errors}"
    shown = [figure(folder / ERRORS, caption=worst)] if (folder / ERRORS).is_file() else []
    shown += [figure(p, caption=f"{name}/{p.name}") for p in sorted(folder.glob("*.png")) if p.name != ERRORS]
    parts += [f'<div class="figures">{"".join(shown)}</div>'] if shown else []
    return "\n".join(parts)


def _summary(result: dict[str, Any]) -> list[tuple[str, Any]]:
    items = [
        ("features", result.get("features")),
        ("images", f"{result.get('n_train')} train / {result.get('n_val')} val"),
        ("layer", result.get("layer_shown", result.get("layer"))),
        ("feature dim", result.get("feature_dim")),
        ("ranked by", str(result.get("best_by", "")).replace("_", " ")),
        ("extraction s", None if result.get("extract_seconds") is None else f"{result['extract_seconds']:.1f}"),
        ("compare s", None if result.get("compare_seconds") is None else f"{result['compare_seconds']:.1f}"),
    ]
    return [(k, v) for k, v in items if v is not None]


def render_compare(root: Path, result: dict[str, Any]) -> str:
    """The compare page of ``result`` (what compare.json holds), its figures read from ``root``."""
    rows = result["rows"]
    task = task_of_rows(rows)
    columns = task.table_columns(rows)
    errors = CAPTIONS[task.errors][1] if task.errors else ""  # the task's errors.png title
    marks = ["best" if r["head"] == result["best"] else None for r in rows]
    body = [f"<h1>Heads compared on val: {esc(result.get('label', result.get('features', '')))}</h1>"]
    body.append(table(_summary(result), row_headers=True))
    if result.get("imbalance"):
        body.append(f'<p class="warn">{esc(result["imbalance"]["line"])}</p>')
    body.append('<h2 id="table">Heads</h2>')
    body.append(table(cells(columns, rows), header=[c for c, _, _ in columns], cls="rows", row_classes=marks))
    body.append(f'<p class="best-line"><b>{esc(best_line(result))}</b></p>')
    notes = [(r["head"], n) for r in rows for n in r.get("notes") or []]
    body += [f'<p class="{"warn" if n.startswith("WARNING") else "note"}">{esc(h)}: {esc(n)}</p>' for h, n in notes]
    if (root / "compare.png").is_file():
        body.append(figure(root / "compare.png", caption="compare.png"))
    heads = " &middot; ".join(f'<a href="#head-{esc(r["head"])}">{esc(r["head"])}</a>' for r in rows
                              if (root / r["head"]).is_dir())  # fmt: skip
    if heads:
        body.append(f"<p>Per head: {heads}</p>")
    body += [_head_section(root, r["head"], best=r["head"] == result["best"], errors=errors)
             for r in rows if (root / r["head"]).is_dir()]  # a baseline's row has no folder here  # fmt: skip
    return page(f"Compare: {result.get('label', result.get('features', ''))}", "\n".join(body))


def write_compare_report(root: Path, result: dict[str, Any]) -> Path:
    """``<root>/report.html`` of a compare run (``result``: what compare.json holds)."""
    path = Path(root) / "report.html"
    write_text(path, render_compare(Path(root), result))
    return path


def render_leaderboard(root: Path, result: dict[str, Any], *, columns: tuple[Column, ...]) -> str:
    """The leaderboard page: its table (in ``columns``), leaderboard.png and a link to each run's compare page."""
    rows = result["rows"]
    body = [f"<h1>Leaderboard of {len(result['features'])} feature files by {esc(result['score'].replace('_', ' '))}"
            "</h1>", table([("features", f) for f in result["features"]], row_headers=True)]  # fmt: skip
    marks = ["best" if n == 0 else None for n in range(len(rows))]
    body.append('<h2 id="table">Every head on every file, best first</h2>')
    body.append(table(cells(columns, rows), header=[c for c, _, _ in columns], cls="rows", row_classes=marks))
    body += [f"<p><strong>Warning:</strong> {esc(note)}</p>" for note in result.get("notes", [])]
    if (root / "leaderboard.png").is_file():
        body.append(figure(root / "leaderboard.png", caption="leaderboard.png"))
    runs = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("*/*/report.html"))
    if runs:
        links = "".join(f'<li><a href="{quote(f"{r}/report.html")}">{esc(r)}</a></li>' for r in runs)
        body.append(f'<h2 id="runs">Each run\'s compare page</h2><ul>{links}</ul>')
    return page("Leaderboard", "\n".join(body))


def write_leaderboard_report(root: Path, result: dict[str, Any], *, columns: tuple[Column, ...]) -> Path:
    """``<root>/report.html`` of a leaderboard (``result``: what leaderboard.json holds; ``columns``: its table's)."""
    path = Path(root) / "report.html"
    write_text(path, render_leaderboard(Path(root), result, columns=columns))
    return path
