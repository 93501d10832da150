"""The audit's three files: ``audit.json`` (for tools), ``audit.md`` (to read) and ``report.html`` (to look at).

report.html is one self-contained page: inline CSS, thumbnails as base64 PNG data, no script, nothing fetched.
Thumbnails are read from the source images by their stored ids (an image folder, a labels table, an imagefolder)
or from the arrays (a torchvision set); an image moved or deleted since extraction is named once and its cell left
blank (shards: no file per image, so blank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PIL import Image

from pipeline.html import esc, grid, image_uri, page, table
from pipeline.store import FeatureMeta

log = logging.getLogger(__name__)

THUMB = 64  # px, the longer side; small images are scaled up (nearest) to this


def thumbnail_reader(meta: FeatureMeta) -> Callable[[str, str], Image.Image | None]:
    """``(split, id) -> PIL image or None`` (unreadable or moved) for the file's dataset: the images errors.png reads
    (:class:`pipeline.stage2.answers.SourceImages`: folders, labels tables, imagefolders, torchvision arrays)."""
    from pipeline.stage2.answers import SourceImages

    return SourceImages(meta.dataset_identity).read


def encode_thumbnail(img: Image.Image) -> str:
    """A PNG data URI of ``img`` fitted into THUMB x THUMB."""
    scale = THUMB / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return image_uri(img.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR))


def _cell(thumbs: dict[tuple[str, str], str | None], split: str, sample: str) -> str:
    uri = thumbs.get((split, sample))
    if uri is None:
        return '<span class="blank" title="not found"></span>'
    return f'<img src="{uri}" alt="{esc(sample)}">'


def _pairs_html(pairs: list[dict[str, Any]], thumbs: dict) -> str:
    cards = []
    for p in pairs:
        exact = ' <span class="exact">exact</span>' if p["exact"] else ""
        cards.append(
            f'<div class="card">{_cell(thumbs, p["split"], p["id"])} '
            f"{_cell(thumbs, p['other_split'], p['other_id'])}"
            f'<div class="cap">cos {p["similarity"]:.3f}{exact}<br>{p["split"]}: {esc(p["id"])}<br>'
            f'{p["other_split"]}: {esc(p["other_id"])}<br><span class="note">{", ".join(p["evidence"])}'
            "</span></div></div>"
        )
    return grid(cards)


def _items_html(items: list[dict[str, Any]], thumbs: dict, caption: Callable[[dict[str, Any]], str]) -> str:
    cards = [
        f'<div class="card">{_cell(thumbs, it["split"], it["id"])}<div class="cap">{caption(it)}</div></div>'
        for it in items
    ]
    return grid(cards)


def collect_thumbnails(
    report: dict[str, Any], read: Callable[[str, str], Image.Image | None]
) -> tuple[dict, list[str]]:
    """Data URIs of every image the report shows, and the ids that could not be read."""
    wanted: list[tuple[str, str]] = []
    for p in report["leaks"] + report["duplicates"]:
        wanted += [(p["split"], p["id"]), (p["other_split"], p["other_id"])]
    wanted += [(it["split"], it["id"]) for it in report["label_issues"] + report["outliers"]]
    thumbs: dict[tuple[str, str], str | None] = {}
    missing = []
    for key in dict.fromkeys(wanted):
        img = read(*key)
        thumbs[key] = encode_thumbnail(img) if img is not None else None
        if img is None:
            missing.append(key[1])
    return thumbs, missing


def render_html(report: dict[str, Any], thumbs: dict, *, missing: list[str]) -> str:
    s = report["summary"]
    rows = table(s.items(), row_headers=True)
    moved = ""
    if missing:
        moved = f'<p class="note">{len(missing)} image(s) not found (moved since extraction?): ' + esc(
            ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")) + "</p>"  # fmt: skip
    labels = _items_html(report["label_issues"], thumbs, lambda it: (
        f'given <b>{esc(it["given"])}</b> &rarr; suggested <b>{esc(it["suggested"])}</b><br>score {it["score"]:.3f}'
        f'<br>{it["split"]}: {esc(it["id"])}'))  # fmt: skip
    outliers = _items_html(report["outliers"], thumbs,
                           lambda it: f'score {it["score"]:.3f}<br>{it["split"]}: {esc(it["id"])}')  # fmt: skip
    name = esc(report["features"])
    leaks, dups = _pairs_html(report["leaks"], thumbs), _pairs_html(report["duplicates"], thumbs)
    return page(
        f"Audit: {report['features']}",
        f"""<h1>Audit of {name}</h1>{rows}{moved}
<h2 id="leaks">Leaks: val images with a copy in train ({len(report["leaks"])})</h2>{leaks}
<h2 id="duplicates">Duplicates within a split ({len(report["duplicates"])})</h2>{dups}
<h2 id="labels">Likely wrong labels ({len(report["label_issues"])})</h2>{labels}
<h2 id="outliers">Outliers (top {len(report["outliers"])})</h2>{outliers}""",
    )


def render_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"# Audit of {report['features']}", ""] + [f"- {k}: {v}" for k, v in s.items()]
    for title, pairs in (("Leaks (val - train)", report["leaks"]), ("Duplicates within a split", report["duplicates"])):
        lines += ["", f"## {title}: {len(pairs)}", ""]
        if pairs:
            lines += [
                "| id | split | other id | other split | cosine | exact | evidence |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [f"| {p['id']} | {p['split']} | {p['other_id']} | {p['other_split']} | {p['similarity']:.3f} | "
                      f"{'yes' if p['exact'] else ''} | {', '.join(p['evidence'])} |" for p in pairs]  # fmt: skip
    lines += ["", f"## Likely wrong labels: {len(report['label_issues'])}", ""]
    if report["label_issues"]:
        lines += ["| rank | id | split | given | suggested | score |", "|---|---|---|---|---|---|"]
        lines += [f"| {r} | {it['id']} | {it['split']} | {it['given']} | {it['suggested']} | {it['score']:.3f} |"
                  for r, it in enumerate(report["label_issues"], 1)]  # fmt: skip
    lines += [
        "",
        f"## Outliers: top {len(report['outliers'])}",
        "",
        "| rank | id | split | score |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r} | {it['id']} | {it['split']} | {it['score']:.3f} |" for r, it in enumerate(report["outliers"], 1)]
    return "\n".join(lines) + "\n"
