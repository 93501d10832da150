"""``python -m pipeline.bench.tail``: the tail head (the last block(s) trained on cached activations) against the
linear head, and against fine-tuning the same blocks the usual way, running the frozen backbone every epoch.

Data: the committed ``data/digits`` (1,797 images, 10 classes; extract's stratified 80/20 split) through the
ImageNet MobileNetV2 (``artifacts/weights/mobilenet_v2_imagenet.pt``) at ``--image-size`` px. The feature file is
made by ``extract`` (reused when up to date), and a second one with the activations at ``--node`` by
``extract --cache-at`` (unless ``--features`` names a file that has them).

Rows, each timed on this machine:
- ``linear``: ``train-head --head linear`` on the file's features;
- ``tail``: ``train-head --head tail`` on the cached activations, ``--epochs`` epochs;
- ``recompute``: the same tail head, same settings and loop (:class:`TailHead`), fed by running the frozen front of
  the backbone on the preprocessed images every epoch (train and val), as a fine-tuning loop without a cache does.
  Its images are held in memory as ready uint8 tensors: no decoding is counted, which flatters it.
The speed-up of caching is ``recompute`` seconds over ``tail`` seconds; over ``tail`` plus the one pass that makes
the activations, when counted once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.fileio import write_json
from pipeline.stage2.heads.tail import ActivationRows, SplitActivations, backbone_of

log = logging.getLogger(__name__)
WEIGHTS = Path("artifacts/weights/mobilenet_v2_imagenet.pt")
DIGITS = Path("data/digits")
FRONT_BATCH = 128


def _front(meta: Any, node: str) -> tuple[torch.nn.Module, Any]:
    """The frozen backbone up to ``node`` (``create_feature_extractor``) and its preprocessing."""
    from torchvision.models.feature_extraction import create_feature_extractor

    backbone = backbone_of(meta)
    front = create_feature_extractor(backbone.model, {node: "a"}).eval()
    return front.to(memory_format=torch.channels_last), backbone.preprocess  # as extract runs the backbone


def _images(ids: np.ndarray, *, root: Path, pre: Any) -> torch.Tensor:
    """The images of ``ids`` (paths under ``root``), resized and cropped as extract's loader does: uint8 NCHW."""
    from pipeline.stage1.datasets import load_image

    return torch.stack([pre.geometry(load_image(root / i)) for i in ids])


@torch.inference_mode()
def run_front(front: torch.nn.Module, images: torch.Tensor, *, pre: Any) -> np.ndarray:
    """(N, C, H, W) float32 activations of uint8 images, in batches."""
    out = [front(pre.normalize(images[a : a + FRONT_BATCH]))["a"] for a in range(0, len(images), FRONT_BATCH)]
    return torch.cat(out).float().contiguous().numpy()


class RecomputedActivations(SplitActivations):
    """A split's activations computed by the frozen front from its images at every read: the loop without a cache."""

    def __init__(self, *, images: torch.Tensor, front: torch.nn.Module, pre: Any, meta: Any, split: str):
        super().__init__(None, split, meta, len(images))
        self.images, self.front, self.pre = images, front, pre

    def read(self, rows: np.ndarray) -> np.ndarray:
        return run_front(self.front, self.images[torch.as_tensor(rows)], pre=self.pre)

    @property
    def row_bytes(self) -> int:
        return 0  # one block per epoch: the images are in memory


def _feature_file(args: argparse.Namespace, out_dir: Path) -> tuple[Path, dict[str, float]]:
    """A feature file with activations at ``args.node``, and what making it cost."""
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.store import read_meta

    if args.features:
        return Path(args.features), {}
    base = out_dir / f"digits_mobilenet_v2_img{args.image_size}.h5"
    result = extract(ExtractConfig(dataset=str(DIGITS), backbone="mobilenet_v2", weights=str(WEIGHTS),
                                   image_size=args.image_size, out=str(base), progress=False))  # fmt: skip
    # extract_seconds: of the run that made the file, which a later run reuses (reused: true)
    costs = {"extract_seconds": read_meta(base).extract_seconds or 0.0, "reused": result.reused}
    cached = out_dir / f"{base.stem}_cache_{args.node}.h5"
    extract(ExtractConfig(dataset=str(DIGITS), backbone="mobilenet_v2", weights=str(WEIGHTS), cache_at=args.node,
                          image_size=args.image_size, out=str(cached), progress=False))  # fmt: skip
    # the one pass that makes the features and the activations (extract --cache-at), of the run that made the file
    costs["activations_seconds"] = read_meta(cached).extract_seconds or 0.0
    return cached, costs


def _recompute(path: Path, cfg: Any, *, node: str) -> dict[str, float]:
    """The tail head trained with the front of the backbone run every epoch: seconds and val accuracy."""
    from pipeline.stage2.heads.tail import TailHead
    from pipeline.store import read_features

    fs = read_features(path)
    front, pre = _front(fs.meta, node)
    rows = {}
    for split in ("train", "val"):
        images = _images(fs.splits[split].ids, root=DIGITS, pre=pre)
        source = RecomputedActivations(images=images, front=front, pre=pre, meta=fs.meta, split=split)
        rows[split] = ActivationRows(source, np.arange(len(images)))
    head = TailHead(cfg, num_classes=len(fs.classes), feature_dim=fs.feature_dim)
    t0 = time.perf_counter()
    fit = head.fit(rows["train"], fs.train.labels, val=(rows["val"], fs.val.labels))
    return {"fit_seconds": time.perf_counter() - t0, "val_accuracy": fit.history[-1]["val_accuracy"]}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import train_head

    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    path, costs = _feature_file(args, out_dir)
    common = {"batch_size": args.batch_size, "device": "cpu", "seed": args.seed}
    rows = {}
    # linear at its defaults (15 epochs, lr 1e-3): the head it is compared with, at its best cheap setting
    for name, settings in (("linear", {}), ("tail", {"lr": args.lr, "epochs": args.epochs})):
        cfg = HeadConfig(head=name, **common, **settings)
        m = train_head(path, cfg, out=out_dir / "heads" / name, force=True)
        rows[name] = {"fit_seconds": m["fit_seconds"], "val_accuracy": m["val_accuracy"], "lr": cfg.lr,
                      "epochs": cfg.epochs}  # fmt: skip
    cfg = HeadConfig(head="tail", lr=args.lr, epochs=args.epochs, **common)
    rows["recompute"] = {**_recompute(path, cfg, node=args.node), "lr": cfg.lr, "epochs": cfg.epochs}
    once = costs.get("activations_seconds", 0.0)
    speedup = {
        "fit": rows["recompute"]["fit_seconds"] / rows["tail"]["fit_seconds"],
        "with_activations_pass": rows["recompute"]["fit_seconds"] / (rows["tail"]["fit_seconds"] + once),
    }
    return {"features": str(path), "node": args.node, "image_size": args.image_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), **costs, "rows": rows,
            "speedup": speedup}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    lines = [f"MobileNetV2 (ImageNet) on data/digits at {result['image_size']} px, tail after {result['node']}, "
             f"batch {result['batch_size']}, {result['torch_threads']} threads"]  # fmt: skip
    if "activations_seconds" in result:
        lines.append(f"one-off: extract {result['extract_seconds']:.1f} s, activations pass "
                     f"{result['activations_seconds']:.1f} s")  # fmt: skip
    lines += ["", "| row | epochs | val acc | fit s |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {r['epochs']} | {r['val_accuracy']:.4f} | {r['fit_seconds']:.2f} |"
              for k, r in result["rows"].items()]  # fmt: skip
    s = result["speedup"]
    lines += ["", f"caching speed-up: {s['fit']:.2f}x per fit; {s['with_activations_pass']:.2f}x counting the "
              "activations pass once (target: > 1; the ceiling is the front's share of a training step)"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.tail", description=__doc__.split("\n\n")[0])
    p.add_argument("--node", default="features.16", help="the --cache-at node (default: features.16)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the tail head's learning rate (linear: 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default=None, help="a feature file that already holds activations (extract "
                   "--cache-at); default: made from data/digits")  # fmt: skip
    p.add_argument("--out", default="artifacts/bench/tail/tail.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.features and not WEIGHTS.is_file():
        print(f"needs the ImageNet MobileNetV2 weights at {WEIGHTS} (make weights)", file=sys.stderr)
        return 1
    result = bench(args)
    write_json(Path(args.out), result)
    print(report(result))
    print(f"\nwrote {args.out}")
    log.debug(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
