"""The building blocks of the self-contained pages the pipeline writes (the audit's and compare's ``report.html``):
one skeleton, one stylesheet, images inlined as ``data:`` URIs, tables from rows, and escaping. A page holds no
script and fetches nothing: it opens the same from a laptop, a mail attachment or a CI artifact."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px;margin:14px 0 6px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:11px;width:150px;background:#fafafa}
.card img,.blank{width:64px;height:64px;image-rendering:pixelated;background:#eee;display:inline-block}
.cap{overflow-wrap:anywhere;margin-top:4px}.exact{color:#b00;font-weight:bold}.note{color:#666}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
table.rows td{text-align:right;white-space:nowrap}table.rows td:first-child{text-align:left}
table.rows tr.best{background:#eef6ee}
.figure{margin:0;max-width:760px}.figure img{max-width:100%;border:1px solid #eee}
.figure figcaption{font-size:12px;color:#666}
.figures{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.figures .figure{flex:1 1 380px;max-width:580px}
.warn{color:#b00}.best-line{font-size:16px}
"""


def esc(value: Any) -> str:
    """``value`` as text safe in HTML content and in double-quoted attributes."""
    return escape(str(value))


def data_uri(data: bytes, *, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_uri(image: Any) -> str:
    """A PIL image as a PNG data URI."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return data_uri(buf.getvalue())


def file_uri(path: Path) -> str | None:
    """A PNG file as a data URI; None when it cannot be read (the page says so instead of showing a broken image)."""
    try:
        return data_uri(Path(path).read_bytes())
    except OSError:
        return None


def figure(path: Path, *, caption: str | None = None, alt: str | None = None) -> str:
    """``path`` inlined with its caption (default: its file name); a line saying so when it cannot be read."""
    uri = file_uri(path)
    name = esc(caption if caption is not None else Path(path).name)
    if uri is None:
        return f'<p class="note">{esc(Path(path).name)}: not found</p>'
    return (f'<figure class="figure"><img src="{uri}" alt="{esc(alt or Path(path).name)}">'
            f"<figcaption>{name}</figcaption></figure>")  # fmt: skip


def table(
    body: Iterable[Sequence[Any]],
    *,
    header: Sequence[Any] | None = None,
    row_headers: bool = False,
    cls: str | None = None,
    row_classes: Sequence[str | None] | None = None,
) -> str:
    """A table of escaped cells; ``row_headers``: each row's first cell is a ``th`` (key-value tables);
    ``row_classes``: a class per body row (None for none)."""
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>" if header is not None else ""
    rows = []
    for n, row in enumerate(body):
        cells = [f"<th>{esc(c)}</th>" if row_headers and i == 0 else f"<td>{esc(c)}</td>" for i, c in enumerate(row)]
        rc = row_classes[n] if row_classes is not None else None
        rows.append(f'<tr class="{esc(rc)}">' if rc else "<tr>")
        rows[-1] += "".join(cells) + "</tr>"
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}>{head}{''.join(rows)}</table>"


def grid(cards: Sequence[str]) -> str:
    """Cards side by side, wrapping; a line saying so when there are none."""
    return '<div class="grid">' + "".join(cards) + "</div>" if cards else "<p>None found.</p>"


def page(title: str, body: str, *, css: str = CSS) -> str:
    """The whole document: ``title`` (plain text) and ``body`` (HTML) in the one skeleton and stylesheet."""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{css}</style></head><body>
{body}
</body></html>
"""
