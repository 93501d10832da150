"""predict's img/s against extract's on the same folder (data/digits), device and backbone (real MobileNetV2
weights), runs interleaved: the ratio is the figure (target >= 0.9), the shared CPU's noise cancels in it."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from pipeline.deploy.predict import Classifier, collect_images, predict
from pipeline.devices import resolve_device
from pipeline.stage1.backbones import load_backbone
from pipeline.stage1.extract import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "data" / "digits"
WEIGHTS = ROOT / "artifacts" / "weights" / "mobilenet_v2_imagenet.pt"
TARGET = 0.9

log = logging.getLogger(__name__)


def _classifier(device: torch.device) -> Classifier:
    bb = load_backbone("mobilenet_v2", weights=str(WEIGHTS))
    model = torch.nn.Sequential(bb.model, torch.nn.Linear(bb.feature_dim, 10))
    model = model.eval().to(device, memory_format=torch.channels_last)
    return Classifier(model, [str(i) for i in range(10)], bb.preprocess, device)


def measure(*, rounds: int = 3, device: str = "auto") -> dict[str, float]:
    """Best-of-``rounds`` img/s of extract and predict, alternating, on every image of data/digits."""
    dev = resolve_device(device)
    clf = _classifier(dev)
    n = len(collect_images([FOLDER]))
    best = {"extract": 0.0, "predict": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            cfg = ExtractConfig(dataset=str(FOLDER), backbone="mobilenet_v2", weights=str(WEIGHTS), device=device,
                                out=str(Path(tmp) / f"f{r}.h5"), progress=False)  # fmt: skip
            t0 = time.perf_counter()
            extract(cfg)
            best["extract"] = max(best["extract"], n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            predict(clf, [FOLDER], out=Path(tmp) / "p.csv", progress=False)
            best["predict"] = max(best["predict"], n / (time.perf_counter() - t0))
    return {**best, "images": n, "ratio": best["predict"] / best["extract"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    m = measure(rounds=args.rounds, device=args.device)
    print(f"predict vs extract, {m['images']} images of data/digits, MobileNetV2, {resolve_device(args.device)}:")
    print(f"  extract {m['extract']:.0f} img/s   predict {m['predict']:.0f} img/s   "
          f"ratio {m['ratio']:.2f} (target >= {TARGET})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
