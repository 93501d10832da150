"""Per-image answers of a trained head on val, with no backbone run: ``predictions.csv`` (each val image's id, its
true and predicted class, the predicted class's probability and the top k; for regression the true and predicted
values; for several labels per image the true and decided label sets and each label's probability) and
``errors.png`` (the worst-predicted val images, highest loss first, read back from the source images by their stored
ids: files under a folder dataset's root, or the arrays of a torchvision set)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fileio import atomic_write, write_text
from pipeline.stage2.plots import PNG_LEVEL

log = logging.getLogger(__name__)
TOP_K = 3  # classes listed per row of predictions.csv
ERROR_IMAGES = 25  # images in errors.png (a 5 x 5 grid)


def classification_rows(
    ids: Any, y: np.ndarray, proba: np.ndarray, classes: list[str], *, top_k: int = TOP_K
) -> list[dict[str, Any]]:
    """One row per image: ``id, true, predicted, probability, top_k`` (``"cat:0.91 dog:0.05 ..."``), ``loss``."""
    proba = np.asarray(proba, np.float64)
    pred = proba.argmax(1)
    order = np.argsort(-proba, axis=1, kind="stable")[:, : min(top_k, proba.shape[1])]
    loss = -np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0))
    return [
        {
            "id": str(ids[i]),
            "true": classes[y[i]],
            "predicted": classes[pred[i]],
            "probability": float(proba[i, pred[i]]),
            "top_k": " ".join(f"{classes[c]}:{proba[i, c]:.4f}" for c in order[i]),
            "loss": float(loss[i]),
        }
        for i in range(len(y))
    ]


def regression_rows(ids: Any, y: np.ndarray, pred: np.ndarray, targets: list[str]) -> list[dict[str, Any]]:
    """One row per image: its id, and per target ``true_<name>`` and ``predicted_<name>``; ``loss`` the squared
    error summed over the targets."""
    y, pred = np.asarray(y, np.float64).reshape(len(y), -1), np.asarray(pred, np.float64).reshape(len(y), -1)
    rows = []
    for i in range(len(y)):
        row: dict[str, Any] = {"id": str(ids[i])}
        for t, name in enumerate(targets):
            row[f"true_{name}"], row[f"predicted_{name}"] = float(y[i, t]), float(pred[i, t])
        row["loss"] = float(((y[i] - pred[i]) ** 2).sum())
        rows.append(row)
    return rows


PROBABILITY = "p_"  # a multi-label predictions.csv: the column of label L's probability is p_L
SEP = ";"  # between the labels of one image, as extract reads them and predict writes them


def multilabel_rows(
    ids: Any, y: np.ndarray, proba: np.ndarray, labels: list[str], *, thresholds: Any
) -> list[dict[str, Any]]:
    """One row per image: ``id``, ``true`` (its labels, ``;``-joined), ``predicted`` (the labels whose probability
    reaches their threshold: the decisions ``predict`` makes through the exported model), ``loss`` (binary
    cross-entropy summed over the labels), then ``p_<label>``, each label's probability, in the labels' order.

    One column per label rather than one ``a:0.91 b:0.05`` cell: ``pd.read_csv(...).filter(regex="^p_")`` is the
    (N, L) matrix to threshold, sort or plot as it is, with no parsing; the prefix keeps a label named ``id`` or
    ``loss`` from overwriting a fixed column."""
    from pipeline.stage2.multilabel import decide

    y, proba = np.asarray(y).astype(bool), np.asarray(proba, np.float64)
    on = decide(proba, thresholds).astype(bool)
    p = np.clip(proba, 1e-12, 1 - 1e-12)
    loss = -np.where(y, np.log(p), np.log1p(-p)).sum(1)
    names = np.array(labels, dtype=object)
    return [
        {"id": str(ids[i]), "true": SEP.join(names[y[i]]), "predicted": SEP.join(names[on[i]]), "loss": float(loss[i]),
         **{f"{PROBABILITY}{name}": float(proba[i, j]) for j, name in enumerate(labels)}}
        for i in range(len(y))
    ]  # fmt: skip


def label_sets(rows: list[dict[str, str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A multi-label predictions.csv read back: its labels, the (N, L) probabilities and the (N, L) truth."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith(PROBABILITY)]
    labels = [k[len(PROBABILITY) :] for k in keys]
    index = {name: j for j, name in enumerate(labels)}
    truth = np.zeros((len(rows), len(labels)), bool)
    for i, r in enumerate(rows):
        truth[i, [index[name] for name in r["true"].split(SEP) if name]] = True
    return labels, columns(rows, keys), truth


def columns(rows: list[dict[str, str]], keys: list[str]) -> np.ndarray:
    """The (N, len(keys)) float values of ``keys`` in predictions.csv rows read back."""
    return np.array([[float(r[k]) for k in keys] for r in rows], np.float64).reshape(len(rows), len(keys))


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """``predictions.csv``, written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_predictions(path: Path) -> list[dict[str, str]]:
    """Each row as ``{column: text}`` (``csv.DictReader``'s rows, 1.4x faster: 10,000 rows in 25 against 36 ms)."""
    with open(path, newline="") as f:
        rows = csv.reader(f)
        names = next(rows, None)
        return [] if names is None else [dict(zip(names, row)) for row in rows]


FILE_KINDS = ("folder", "table", "imagefolder")  # datasets whose ids are image paths relative to their root


class SourceImages:
    """The dataset's images by stored id, from what the feature file recorded of it (its ``dataset_identity``): a
    folder's (or a table's, or a Hugging Face imagefolder's) files by relative path, a torchvision set's arrays by
    index (the set reopened once per split). ``read(split, id)`` is a PIL RGB image, or None where it cannot be
    read any more (moved, deleted, a source with no files of its own such as shards). One reader for errors.png and
    the audit's thumbnails."""

    def __init__(self, identity: dict[str, Any] | None):
        self.identity = dict(identity or {})
        self.kind, self.root = self.identity.get("kind"), Path(str(self.identity.get("root", "")))
        self._splits: dict[str, Any] = {}

    def _arrays(self, split: str) -> Any:
        if split not in self._splits:
            self._splits[split] = None
            try:
                from pipeline.stage1.datasets import load_torchvision

                source = load_torchvision(self.identity["name"], root=self.root, download=False)
                self._splits.update(source.splits)
            except Exception as e:  # noqa: BLE001 - any failure to reopen the set means: these images are not readable
                log.debug("cannot reopen %s: %s", self.identity.get("name"), e)
        return self._splits.get(split)

    def read(self, split: str, sample: str) -> Any:
        from pipeline.stage1.datasets import load_image

        try:
            if self.kind in FILE_KINDS:
                return load_image(self.root / sample)
            arrays = self._arrays(split) if self.kind == "torchvision" else None
            return None if arrays is None else arrays.load(int(sample))
        except (OSError, ValueError, IndexError):
            return None


def source_images(identity: dict[str, Any], ids: list[str], *, split: str = "val") -> tuple[list[Any], list[str]]:
    """The images of ``ids`` (PIL, or None where unreadable; :class:`SourceImages`) and the ids that could not be
    read."""
    reader = SourceImages(identity)
    images = [reader.read(split, i) for i in ids]
    return images, [i for i, im in zip(ids, images) if im is None]


def _short(labels: str, width: int = 24) -> str:
    shown = labels.replace(SEP, " ") or "(none)"
    return shown if len(shown) <= width else shown[: width - 3] + "..."


CAPTIONS = {  # errors.png of a task (Task.errors): each image's caption, and the figure's title
    "classes": (
        lambda r: f"{r['true']} -> {r['predicted']}\n({r['probability']:.2f})",
        "worst-predicted val images (highest loss first): true -> predicted",
    ),
    "label sets": (
        lambda r: f"true {_short(r['true'])}\npred {_short(r['predicted'])}\nloss {r['loss']:.2f}",
        "worst-predicted val images (highest loss first: binary cross-entropy summed over labels): true and "
        "predicted label sets",
    ),
}


def write_errors_png(
    path: Path, rows: list[dict[str, Any]], *, identity: dict[str, Any], count: int = ERROR_IMAGES,
    captions: str = "classes",
) -> str | None:  # fmt: skip
    """A grid of the ``count`` highest-loss rows' images, each captioned as :data:`CAPTIONS` ``[captions]`` says
    (true -> predicted (probability); true and predicted label sets). Returns a one-line note when some images could
    not be read (the rest are drawn), or None."""
    worst = sorted(rows, key=lambda r: -r["loss"])[:count]
    if not worst:
        return None
    images, missing = source_images(identity, [r["id"] for r in worst])
    shown = [(r, im) for r, im in zip(worst, images) if im is not None]
    note = None
    if missing:
        where = identity.get("root", "the dataset")
        note = f"errors.png: {len(missing)} of {len(worst)} images could not be read from {where} (e.g. {missing[0]})"
    if not shown:
        return note
    caption, title = CAPTIONS[captions]
    picture = image_grid([im for _, im in shown], [caption(r) for r, _ in shown], title=title)
    atomic_write(Path(path), lambda p: picture.save(p, format="PNG", compress_level=PNG_LEVEL))
    return note


CELL = 160  # px: each image fitted into a square this wide
CELL_MAX = 320  # px: a cell's width at most, however long its caption (longer lines are cut with "...")
FONT_PX = 13


def image_grid(images: list[Any], captions: list[str], *, title: str, columns: int = 5) -> Any:
    """The images (PIL) in a grid of ``columns``, each fitted into a :data:`CELL` square (an image smaller than a
    third of it scaled up without smoothing, so its pixels stay visible) with its caption centred below, and the
    title above; white, drawn by PIL in matplotlib's DejaVu Sans. matplotlib's 5 x 5 axes, their titles and
    tight_layout took 1.1-1.4 s a head on the demo's digits; this takes ~0.03 s."""
    from PIL import Image, ImageDraw

    font, title_font = _font(FONT_PX), _font(FONT_PX + 1)
    pad, line = 8, sum(font.getmetrics()) + 2
    lines = max(c.count("\n") + 1 for c in captions)
    widest = max(font.getlength(part) for c in captions for part in c.split("\n"))
    cell_w = int(min(CELL_MAX, max(CELL, widest))) + 2 * pad
    cell_h = CELL + lines * line + 2 * pad
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    title_lines = _wrap(title, title_font, cols * cell_w - 2 * pad)
    top = pad + len(title_lines) * (sum(title_font.getmetrics()) + 2) + pad
    picture = Image.new("RGB", (cols * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(picture)
    draw.multiline_text((picture.width // 2, pad), "\n".join(title_lines), fill="black", font=title_font,
                        anchor="ma", align="center")  # fmt: skip
    for i, (im, text) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell_w, top + (i // cols) * cell_h
        im = im.convert("RGB")
        scale = min(CELL / im.width, CELL / im.height)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.NEAREST if scale >= 3 else Image.Resampling.BICUBIC)
        picture.paste(im, (x + (cell_w - size[0]) // 2, y + pad + (CELL - size[1]) // 2))
        shown = "\n".join(_cut(part, font, cell_w - 2 * pad) for part in text.split("\n"))
        draw.multiline_text((x + cell_w // 2, y + pad + CELL + 4), shown, fill="black", font=font, anchor="ma",
                            align="center")  # fmt: skip
    return picture


def _font(px: int) -> Any:
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), px)


def _cut(text: str, font: Any, width: float) -> str:
    """``text``, cut short with "..." where it is wider than ``width`` px."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font: Any, width: float) -> list[str]:
    """``text`` in lines of at most ``width`` px, broken between words."""
    out: list[str] = []
    for word in text.split():
        if out and font.getlength(out[-1] + " " + word) <= width:
            out[-1] += " " + word
        else:
            out.append(word)
    return out or [""]
