"""A perceptual hash of an image: 64 bits that stay (nearly) the same when an image is re-encoded, shifted by a
pixel or slightly resized, and differ in about half their bits between unrelated images. Compared by Hamming
distance (:func:`hamming`). Pure numpy and Pillow (no torch): loader workers and the audit compute it cheaply.

The DCT hash ("pHash"): the image in greyscale at 32 x 32, its 2-D DCT-II, the 8 x 8 lowest frequencies; each bit
says whether that coefficient exceeds their median. Bit ``63 - (8 * row + col)`` holds coefficient (row, col), so
the integer reads row by row, most significant bit first (the layout of the ``imagehash`` package's hex string).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8 x 8 = 64 bits
_SIDE = 4 * HASH_SIZE  # the image is hashed at 32 x 32


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` transforms the columns of ``x``."""
    k = np.arange(n)[:, None]
    m = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * m + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


def perceptual_hash(img: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``img`` (any mode), as an int in [0, 2**64): store it as ``uint64``."""
    grey = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    d = _dct_matrix(_SIDE)
    low = (d @ pixels @ d.T)[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """How many of the 64 bits of two hashes differ (0: the same picture, as far as the hash can tell)."""
    return (int(a) ^ int(b)).bit_count()
