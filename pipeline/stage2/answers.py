"""Per-image answers of a trained head on val, with no backbone run: ``predictions.csv`` (each val image's id, its
true and predicted class, the predicted class's probability and the top k; for regression the true and predicted
values) and ``errors.png`` (the worst-predicted val images, highest loss first, read back from the source images by
their stored ids: files under a folder dataset's root, or the arrays of a torchvision set)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fileio import atomic_write, write_text

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


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """``predictions.csv``, written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def source_images(identity: dict[str, Any], ids: list[str], *, split: str = "val") -> tuple[list[Any], list[str]]:
    """The images of ``ids`` (PIL, or None where unreadable) and the ids that could not be read, from what the
    feature file recorded of its dataset: a folder's files by relative path, a torchvision set's arrays by index."""
    from pipeline.stage1.datasets import load_image

    kind, root = identity.get("kind"), Path(str(identity.get("root", "")))
    images: list[Any] = []
    missing: list[str] = []
    arrays = None
    if kind == "torchvision":
        try:
            from pipeline.stage1.datasets import load_torchvision

            arrays = load_torchvision(identity["name"], root=root, download=False).splits[split]
        except Exception as e:  # noqa: BLE001 - any failure to reopen the set means: these images are not readable
            log.debug("cannot reopen %s: %s", identity.get("name"), e)
    for i in ids:
        try:
            if kind == "folder":
                images.append(load_image(root / i))
            elif arrays is not None:
                images.append(arrays.load(int(i)))
            else:
                raise ValueError("no source")
        except (OSError, ValueError, IndexError):
            images.append(None)
            missing.append(i)
    return images, missing


def write_errors_png(
    path: Path, rows: list[dict[str, Any]], *, identity: dict[str, Any], count: int = ERROR_IMAGES
) -> str | None:
    """A grid of the ``count`` highest-loss rows' images, each titled true -> predicted (probability). Returns a
    one-line note when some images could not be read (the rest are drawn), or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    cols = min(5, len(shown))
    rows_n = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.2 * cols, 2.5 * rows_n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (r, im) in zip(axes.flat, shown):
        ax.imshow(np.asarray(im))
        if "true" in r:
            ax.set_title(f"{r['true']} -> {r['predicted']}\n({r['probability']:.2f})", fontsize=8)
        else:
            ax.set_title(f"loss {r['loss']:.3g}", fontsize=8)
    fig.suptitle("worst-predicted val images (highest loss first): true -> predicted", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)
    return note
