"""A multi-label set of real images: 2x2 mosaics of the committed digits (data/digits), each labelled with the set
of digits it shows, written as PNGs and a ``labels.csv`` (``file,labels``, ``;``-separated), which ``extract``
reads as several labels per image.

    python -m pipeline.bench.mosaics artifacts/mosaics --n 800
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DIGITS = Path(__file__).resolve().parents[2] / "data" / "digits"


def write_mosaics(root: Path, *, n: int, seed: int = 0, digits: Path = DIGITS) -> dict[str, set[str]]:
    """``n`` mosaics under ``root`` (created) and its ``labels.csv``; returns each file's set of labels."""
    from PIL import Image

    files = {d: sorted((digits / str(d)).glob("*.png")) for d in range(10)}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth, lines = {}, ["file,labels"]
    for k in range(n):
        ds = rng.integers(0, 10, 4)
        tiles = [np.asarray(Image.open(files[d][rng.integers(len(files[d]))]).convert("L")) for d in ds]
        name = f"m{k:04d}.png"
        Image.fromarray(np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])).save(root / name)
        truth[name] = {str(d) for d in ds}
        lines.append(f"{name},{';'.join(sorted(truth[name]))}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_mosaics(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} mosaics and {args.out / 'labels.csv'}")


if __name__ == "__main__":
    main()
