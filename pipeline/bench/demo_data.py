"""The committed demo dataset: UCI handwritten digits (from scikit-learn's bundled copy) as an image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path | str = Path("data/digits")) -> int:
    """Write ``root/<digit>/<index>.png`` (8x8 greyscale, 0..16 scaled to 0..255); returns the image count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for i, (img, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img * 255 / 16).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png", optimize=True)
    return len(digits.images)
