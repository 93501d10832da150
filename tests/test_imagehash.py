"""The perceptual hash on real images (data/digits, upscaled to a photo-like 96 px as a camera would see a digit):
the same image hashes the same, a one-pixel shift plus a JPEG re-encode moves few bits, different digits many."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.imagehash import hamming, perceptual_hash

DIGITS = Path(__file__).resolve().parents[1] / "data" / "digits"
NEAR = 10  # the usual near-duplicate threshold for a 64-bit DCT hash; unrelated images differ in ~32 bits


def _digits(per_digit: int = 5, size: int = 96) -> dict[int, list[Image.Image]]:
    return {
        d: [
            Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            for p in sorted((DIGITS / str(d)).glob("*.png"))[:per_digit]
        ]  # fmt: skip
        for d in range(10)
    }


def _shift_and_jpeg(img: Image.Image) -> Image.Image:
    shifted = img.transform(img.size, Image.Transform.AFFINE, (1, 0, -1, 0, 1, 0))  # one pixel right
    buf = io.BytesIO()
    shifted.save(buf, "JPEG", quality=75)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_the_same_image_hashes_the_same_in_any_mode() -> None:
    img = _digits(1)[3][0]
    h = perceptual_hash(img)
    assert 0 <= h < 2**64 and h == perceptual_hash(img.copy()) == perceptual_hash(img.convert("L"))
    assert np.array([h], np.uint64)[0] == h  # stored as uint64, all 64 bits kept
    assert hamming(h, h) == 0 and hamming(0, 2**64 - 1) == 64


def test_a_shift_and_a_jpeg_re_encode_move_few_bits() -> None:
    distances = [hamming(perceptual_hash(img), perceptual_hash(_shift_and_jpeg(img)))
                 for imgs in _digits().values() for img in imgs]  # fmt: skip
    assert max(distances) < NEAR, sorted(distances)
    assert np.asarray(_shift_and_jpeg(_digits(1)[0][0])).tobytes() != np.asarray(_digits(1)[0][0]).tobytes()


def test_different_digits_are_far_apart() -> None:
    imgs = _digits()
    distances = [hamming(perceptual_hash(a), perceptual_hash(b))
                 for d in range(10) for e in range(d + 1, 10) for a, b in zip(imgs[d], imgs[e])]  # fmt: skip
    assert min(distances) > NEAR, sorted(distances)[:5]
    assert np.mean(distances) > 24  # near the 32 bits of unrelated hashes


def test_the_hash_module_imports_no_torch() -> None:
    code = "import sys, pipeline.imagehash; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "False"
