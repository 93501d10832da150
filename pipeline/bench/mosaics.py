"""A multi-label set of real images: 2x2 mosaics of the committed digits (data/digits), each labelled with the set
of digits it shows, written as PNGs and a ``labels.csv`` (``file,labels``, ``;``-separated), which ``extract``
reads as several labels per image.

    python -m pipeline.bench.mosaics artifacts/mosaics --n 800
    python -m pipeline.bench.mosaics artifacts/mosaics --n 800 --bench    # + extract, compare every head: val mAP

``--bench`` extracts the mosaics through the real ImageNet MobileNetV2 (``--image-size``, 96 px by default) and runs
``compare`` of every multi-label head with default settings and with ``--sweep``, printing each head's val mAP (the
mAP of a constant score, each label's frequency, beside it as the chance level), micro F1 and Hamming loss.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "data" / "digits"
WEIGHTS = ROOT / "artifacts" / "weights" / "mobilenet_v2_imagenet.pt"


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
        png = io.BytesIO()
        Image.fromarray(np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])).save(png, format="PNG")
        path = root / name
        if not path.is_file() or path.read_bytes() != png.getvalue():  # an unchanged file keeps its time: reuse
            path.write_bytes(png.getvalue())
        truth[name] = {str(d) for d in ds}
        lines.append(f"{name},{';'.join(sorted(truth[name]))}")
    text = "\n".join(lines) + "\n"
    if not (root / "labels.csv").is_file() or (root / "labels.csv").read_text() != text:
        (root / "labels.csv").write_text(text)
    return truth


def bench_heads(root: Path, *, image_size: int) -> str:
    """Extract ``root/labels.csv`` (to ``root/features.h5``, reused when up to date) and compare every multi-label
    head with defaults and with ``--sweep`` (under ``root/compare``); the table of val mAP per head."""
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.comparing import compare, parse_heads, table
    from pipeline.stage2.heads import HeadConfig
    from pipeline.store import read_features

    features = root / "features.h5"
    extract(ExtractConfig(dataset=str(root / "labels.csv"), backbone="mobilenet_v2", weights=str(WEIGHTS),
                          image_size=image_size, out=str(features), progress=False))  # fmt: skip
    fs = read_features(features)
    chance = float(fs.val.multi_hot.mean(0).mean())  # a constant score's AP is its label's frequency
    runs = {}
    for sweep in (False, True):
        result = compare(features, heads=parse_heads(None, task="multilabel"), base=HeadConfig(sweep=sweep),
                         out=root / "compare" / ("sweep" if sweep else "defaults"), force=True)  # fmt: skip
        runs[sweep] = {r["head"]: r for r in result["rows"]}
    body = []
    for head, row in runs[False].items():
        swept = runs[True][head]
        chosen = swept.get("sweep", {}).get("chosen") or {}
        body.append([head, f"{row['val_map']:.4f}", f"{swept['val_map']:.4f}", json.dumps(chosen),
                     f"{swept['val_micro_f1']:.4f}", f"{swept['val_hamming_loss']:.4f}"])  # fmt: skip
    body.sort(key=lambda r: r[1], reverse=True)
    head_row = ["head", "val mAP, defaults", "val mAP, --sweep", "chosen", "micro F1 (--sweep)", "Hamming (--sweep)"]
    return (
        f"{len(fs.train.ids)} train / {len(fs.val.ids)} val mosaics, MobileNetV2 ImageNet at {image_size} px; "
        f"chance (a constant score) val mAP {chance:.4f}\n" + table(head_row, body)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench", action="store_true", help="extract and compare every multi-label head")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    write_mosaics(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} mosaics and {args.out / 'labels.csv'}")
    if args.bench:
        print(bench_heads(args.out, image_size=args.image_size))


if __name__ == "__main__":
    main()
