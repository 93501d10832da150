"""A perceptual hash of an image: 64 bits that stay (nearly) the same when an image is re-encoded, shifted by a
pixel or slightly resized, and differ in about half their bits between unrelated images. Compared by Hamming
distance (:func:`hamming`). Pure numpy and Pillow (no torch): loader workers and the audit compute it cheaply.

The DCT hash ("pHash"): the image in greyscale at 32 x 32, its 2-D DCT-II, the 8 x 8 lowest frequencies; each bit
says whether that coefficient exceeds their median. Bit ``63 - (8 * row + col)`` holds coefficient (row, col), so
the integer reads row by row, most significant bit first (the layout of the ``imagehash`` package's hex string).

Cheap on large images: an image of 128 px or more (shorter side) is first box-averaged by a whole factor to 64 to
127 px (``Image.reduce``, one pass) before the Lanczos resize to 32 x 32, so a 12-megapixel photo costs about what a
thumbnail does; a JPEG given as bytes (:func:`perceptual_hash_of_bytes`) is decoded straight at 1/2 to 1/8 scale in
greyscale (libjpeg's DCT scaling), never at full size.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8 x 8 = 64 bits
_SIDE = 4 * HASH_SIZE  # the image is hashed at 32 x 32
_REDUCED = 2 * _SIDE  # larger images are first box-reduced to at least this many px (shorter side)


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` transforms the columns of ``x``."""
    k = np.arange(n)[:, None]
    m = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * m + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


def thumbnail(img: Image.Image) -> np.ndarray:
    """What is hashed: ``img`` (any mode) in greyscale at 32 x 32, float64."""
    factor = min(img.size) // _REDUCED
    if factor > 1:
        img = img.reduce(factor)  # a box average by a whole factor: one cheap pass, then Lanczos on few pixels
    grey = img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    return np.asarray(grey, dtype=np.float64)


def hashes_of(thumbnails: np.ndarray) -> np.ndarray:
    """The hashes of ``(N, 32, 32)`` thumbnails (:func:`thumbnail`) at once, as ``(N,)`` uint64."""
    d = _dct_matrix(_SIDE)
    low = (d @ np.asarray(thumbnails, dtype=np.float64) @ d.T)[:, :HASH_SIZE, :HASH_SIZE].reshape(len(thumbnails), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def perceptual_hash(img: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``img`` (any mode), as an int in [0, 2**64): store it as ``uint64``."""
    return int(hashes_of(thumbnail(img)[None])[0])


def perceptual_hash_of_bytes(data: bytes) -> int:
    """:func:`perceptual_hash` of an encoded image; a JPEG is decoded at reduced scale (``draft``), never in full."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (_REDUCED, _REDUCED))  # JPEG only: the smallest DCT scale still >= 64 px, in greyscale
        return perceptual_hash(img)


def hamming(a: int, b: int) -> int:
    """How many of the 64 bits of two hashes differ (0: the same picture, as far as the hash can tell)."""
    return (int(a) ^ int(b)).bit_count()
