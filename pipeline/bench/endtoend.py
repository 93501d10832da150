"""``make bench`` / ``python -m pipeline.bench``: speed and memory, measured side by side in one run.

Every figure is a ratio of two timings taken in the same process, on the same machine and the same data, a few
seconds apart, so a busy or slow machine moves both sides. Full numbers go to ``artifacts/bench/`` as JSON.

1. two-stage (``extract`` once + ``train-head --epochs 15``) against the classic loop (frozen ResNet18 with a new
   ``fc`` trained by Adam, the backbone re-run over train and val every epoch);
2. extraction images/s against the bare backbone forward on ready-made tensors;
3. heads on a 50,000 x 512 feature file (load, linear, logreg, compare), each against one classic-loop epoch;
4. peak RSS of ``train-head`` against the feature bytes, and of ``extract`` at two dataset sizes (fresh children);
5. on CUDA only: ResNet18 at 224 px on CIFAR-10-sized uint8 arrays, against the FLOP ceiling of the GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.fileio import write_text

log = logging.getLogger(__name__)

CLASSES = 10
SEED = 0


@dataclass(frozen=True)
class BenchConfig:
    n_images: int = 2000  # items 1-2: synthetic JPEGs, 80% train / 20% val
    source_size: int = 112  # stored image side; resized and cropped to image_size like real photos
    image_size: int = 96
    batch_size: int = 64
    epochs: int = 15
    classic_epochs: int = 15  # fewer: per-epoch time measured and extrapolated to `epochs` (said in the output)
    head_train: int = 50_000
    head_val: int = 10_000
    head_dim: int = 512
    # Extraction RSS at two dataset sizes (images, 32 px). The native allocators move peak RSS by up to ~8 MB from
    # run to run, whatever the size; 19,000 more images are 39 MB more features, so an accumulation (ratio >= 1)
    # stands well clear of that noise (with 1,000 -> 8,000, 14 MB, one run in three read 0.54).
    rss_sizes: tuple[int, int] = (1_000, 20_000)
    rss_image_size: int = 32
    forward_batches: int = 6
    head_repeats: int = 3  # the linear and logreg fits are timed this many times; the median is reported
    # The two-stage run and the bare forward are repeated this many times, spread between the classic epochs,
    # so both sides of each ratio see the same machine load (this box is shared; load moves over minutes).
    rounds: int = 3
    compare_heads: tuple[str, ...] | None = None  # None: every registered head
    # Threads: torch's default everywhere. The heads train their small steps on 1 thread themselves
    # (heads.fitting_threads: 2 OpenMP threads were up to 30x slower on this shared 2-core box); forcing 1 around
    # all of head training would also slow k-NN's big similarity matmuls (compare: 28-32 s against 23-24 s).
    out_dir: str = "artifacts/bench"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, not {self.rounds}")
        if not 1 <= self.classic_epochs <= self.epochs:
            raise ValueError(f"classic_epochs must be in 1..{self.epochs}, not {self.classic_epochs}")
        if self.n_images < 5 * CLASSES or self.rss_sizes[0] >= self.rss_sizes[1]:
            raise ValueError("too few images, or rss_sizes not increasing")


QUICK = BenchConfig(
    n_images=50,
    source_size=40,
    image_size=32,
    batch_size=16,
    classic_epochs=1,
    head_train=400,
    head_val=100,
    rss_sizes=(20, 60),
    forward_batches=1,
    head_repeats=1,
    compare_heads=("linear", "logreg"),
)


# ------------------------------------------------------------------------------------------ data


def write_image_folder(root: Path, *, n: int, size: int, seed: int = SEED, fmt: str = "JPEG") -> Path:
    """``root/{train,val}/<class>/*``: noisy class colours, ``n`` images in all, 20% of each class in val."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (CLASSES, 3))
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for i in range(n):
        c = i % CLASSES
        split = "val" if (i // CLASSES) % 5 == 4 else "train"
        folder = root / split / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (colours[c] + rng.normal(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}{ext}", fmt)
    return root


def write_feature_file(path: Path, *, n_train: int, n_val: int, dim: int, seed: int = SEED) -> int:
    """A valid feature file of ReLU-like synthetic features (10 overlapping classes); returns the feature bytes."""
    from pipeline.store import FeatureWriter

    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (CLASSES, dim)).astype(np.float32)
    meta = {"fingerprint": f"bench-synthetic-{seed}", "backbone": "synthetic", "weights": "none"}
    meta |= {"feature_dim": dim, "num_classes": CLASSES, "dataset": "synthetic", "preprocessing": {}}
    names = [f"class_{c}" for c in range(CLASSES)]
    w = FeatureWriter(path, meta=meta, classes=names, sizes={"train": n_train, "val": n_val}, feature_dim=dim)
    for split, n in (("train", n_train), ("val", n_val)):
        for lo in range(0, n, 10_000):
            y = np.arange(lo, min(n, lo + 10_000)) % CLASSES
            X = np.maximum(means[y] + rng.normal(0, 2.0, (len(y), dim)).astype(np.float32), 0)
            w.append(split, X, y.astype(np.int64), [str(i) for i in range(lo, lo + len(y))], seen=len(y))
    w.finish()
    return (n_train + n_val) * dim * 4


# ------------------------------------------------------------------------------------------ 1. the classic loop


def classic_loop(root: Path, *, cfg: BenchConfig, between: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The tutorial recipe: frozen ResNet18, new ``fc``, Adam 1e-3, the backbone run over train+val every epoch.

    Kept as one function on purpose: it is the loop users write without this tool, measured as they write it.

    Same images, size, batch, loader workers and channels_last as the pipeline, so the ratio measures the
    design (one backbone pass instead of ``epochs``), not a handicap. The backbone stays in ``eval()``: the
    tutorial's ``model.train()`` would also move its BatchNorm statistics, so the features drift every epoch.
    ``between()`` runs (untimed) before each of ``cfg.rounds`` equal chunks of epochs.
    """
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets, models, transforms

    from pipeline.stage1.backbones import Preprocessing
    from pipeline.stage1.batches import default_workers

    pre = Preprocessing().with_crop(cfg.image_size)
    tf = transforms.Compose(
        [
            transforms.Resize(pre.resize_size),
            transforms.CenterCrop(pre.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    workers = default_workers(torch.device("cpu"))
    train = DataLoader(datasets.ImageFolder(root / "train", tf), cfg.batch_size, shuffle=True, num_workers=workers)
    val = DataLoader(datasets.ImageFolder(root / "val", tf), cfg.batch_size, num_workers=workers)
    torch.manual_seed(SEED)
    model = models.resnet18(weights=None)  # random weights: the timing is the same as ImageNet's
    model.requires_grad_(False)
    model.fc = nn.Linear(model.fc.in_features, CLASSES)
    model = model.to(memory_format=torch.channels_last).eval()
    opt = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    epoch_s, val_acc = [], 0.0
    rounds = min(cfg.rounds, cfg.classic_epochs)
    chunk_starts = {round(i * cfg.classic_epochs / rounds) for i in range(rounds)}
    for epoch in range(cfg.classic_epochs):
        if epoch in chunk_starts:
            between()
        t0 = time.perf_counter()
        _classic_train_epoch(model, train, opt)
        val_acc = _classic_val(model, val)
        epoch_s.append(time.perf_counter() - t0)
        log.info("classic epoch %d/%d: %.1f s", len(epoch_s), cfg.classic_epochs, epoch_s[-1])
    n = len(train.dataset) + len(val.dataset)
    per_epoch = float(np.mean(epoch_s))
    extrapolated = cfg.classic_epochs < cfg.epochs
    total = per_epoch * cfg.epochs if extrapolated else float(sum(epoch_s))
    return {
        "epochs_run": cfg.classic_epochs,
        "epochs_reported": cfg.epochs,
        "extrapolated": extrapolated,
        "epoch_seconds": [round(s, 3) for s in epoch_s],
        "seconds": total,
        "seconds_per_image_epoch": per_epoch / n,
        "images_per_epoch": n,
        "val_accuracy": val_acc,
    }


def _classic_train_epoch(model: torch.nn.Module, loader: Any, opt: torch.optim.Optimizer) -> None:
    for x, y in loader:
        out = model(x.contiguous(memory_format=torch.channels_last))
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def _classic_val(model: torch.nn.Module, loader: Any) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------------ 1-2. two stages


def two_stage(root: Path, work: Path, *, cfg: BenchConfig) -> dict[str, Any]:
    """``extract`` once, then ``train-head --epochs 15`` (library calls: no interpreter start-up on either side)."""
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.train import train_head

    ecfg = ExtractConfig(
        dataset=str(root),
        backbone="resnet18",
        weights="none",
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        device="cpu",
        out=str(work / "two_stage.h5"),
        force=True,
        progress=False,
    )
    t0 = time.perf_counter()
    res = extract(ecfg)
    t1 = time.perf_counter()
    metrics = train_head(
        res.path,
        HeadConfig(head="linear", epochs=cfg.epochs, batch_size=cfg.batch_size, device="cpu"),
        out=work / "head",
    )
    t2 = time.perf_counter()
    return {
        "extract_seconds": t1 - t0,
        "extract_images_per_second": res.images_per_second,
        "images": sum(res.counts.values()),
        "train_head_seconds": t2 - t1,
        "seconds": t2 - t0,
        "val_accuracy": metrics.get("val_accuracy"),
    }


def interleaved(root: Path, work: Path, *, cfg: BenchConfig) -> tuple[dict, dict, dict]:
    """Items 1-2: the classic loop, with the two-stage run and the bare forward repeated between its epochs."""
    two_runs, bare_runs = [], []
    cpu = torch.device("cpu")

    def between() -> None:
        size, batch, n = cfg.image_size, cfg.batch_size, cfg.forward_batches
        bare_runs.append(bare_forward(image_size=size, batch_size=batch, batches=n, device=cpu))
        two_runs.append(two_stage(root, work, cfg=cfg))
        bare_runs.append(bare_forward(image_size=size, batch_size=batch, batches=n, device=cpu))
        log.info(
            "two-stage %.1f s (extract %.0f img/s); bare forward %.0f img/s",
            two_runs[-1]["seconds"],
            two_runs[-1]["extract_images_per_second"],
            bare_runs[-1]["images_per_second"],
        )

    classic = classic_loop(root, cfg=cfg, between=between)
    images = sum(r["images"] for r in two_runs)
    two = {
        "runs": two_runs,
        "seconds": float(np.mean([r["seconds"] for r in two_runs])),
        "extract_images_per_second": images / sum(r["extract_seconds"] for r in two_runs),
        "images": two_runs[0]["images"],
        "val_accuracy": two_runs[-1]["val_accuracy"],
    }
    seconds = sum(r["seconds"] for r in bare_runs)
    bare = {"runs": bare_runs, "images_per_second": sum(r["images"] for r in bare_runs) / seconds}
    return classic, two, {**bare, "batch": cfg.batch_size, "dtype": bare_runs[0]["dtype"]}


@torch.inference_mode()
def bare_forward(*, image_size: int, batch_size: int, batches: int, device: torch.device) -> dict[str, Any]:
    """Images/s of the prepared backbone alone on ready-made normalised tensors (same batch and dtype)."""
    from pipeline.stage1.backbones import load_backbone
    from pipeline.stage1.extract import prepare_model

    model = prepare_model(load_backbone("resnet18", weights="none", image_size=image_size), device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    model(x)  # warm-up (allocator, kernels)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        model(x).float().cpu()  # the pipeline copies every batch of features back too
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "images_per_second": batches * batch_size / seconds,
        "images": batches * batch_size,
        "seconds": seconds,
        "batch": batch_size,
        "dtype": str(x.dtype),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ 3. heads


def heads_on_file(
    path: Path, work: Path, *, epochs: int, heads: tuple[str, ...] | None, repeats: int = 1
) -> dict[str, Any]:
    """Load time, fit times of the linear and logreg heads (median of ``repeats``, every time kept), and ``compare``
    of all heads, in this process."""
    from pipeline.stage2.heads import HEADS, HeadConfig
    from pipeline.stage2.train import compare, fit_and_evaluate
    from pipeline.store import read_features

    t0 = time.perf_counter()
    fs = read_features(path)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"rows": len(fs.train), "val_rows": len(fs.val), "dim": fs.feature_dim, "load_s": load_s}
    for head in ("linear", "logreg"):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, metrics, _ = fit_and_evaluate(fs, HeadConfig(head=head, epochs=epochs, device="cpu"))
            runs.append(time.perf_counter() - t0)
        out[f"{head}_s"], out[f"{head}_runs_s"] = float(np.median(runs)), runs
        out[f"{head}_fit_s"] = metrics.get("fit_seconds")
        out[f"{head}_val_accuracy"] = metrics.get("val_accuracy")
    names = list(heads or HEADS)
    t0 = time.perf_counter()
    compare(path, heads=names, base=HeadConfig(head=names[0], epochs=epochs, device="cpu"), out=work / "compare")
    out["compare_s"] = time.perf_counter() - t0  # includes its own read of the file
    out["compare_heads"] = names
    return out


# ------------------------------------------------------------------------------------------ 4. memory


# Runs in each child: its own peak RSS (VmHWM) written to argv[1] at exit. Not ru_maxrss: Linux carries the
# forking parent's high-water mark across exec into the child's, so every child would report the bench's own size.
_HWM_WRAPPER = """
import atexit, runpy, sys
def _hwm(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    with open(path, "w") as f:
        f.write(str(kib * 1024))
atexit.register(_hwm)
if sys.argv[2] == "-c":
    exec(sys.argv[3])
else:
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def children_peak_rss(commands: dict[str, list[str]], *, work: Path) -> dict[str, dict[str, Any]]:
    """Peak RSS of each fresh child ``python -m MODULE args...`` or ``python -c CODE`` (``["-c", CODE]``).

    The children run side by side (only memory is read from them, never time); each reports the high-water
    mark of its own main process (loader workers are separate processes and are not counted).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the children share 2 cores; RSS does not depend on threads
    procs = {}
    for name, args in commands.items():
        report = work / f"hwm_{name}.txt"
        cmd = [sys.executable, "-c", _HWM_WRAPPER, str(report), *(args if args[0] == "-c" else args[1:])]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env), report)
    out = {}
    for name, (proc, report) in procs.items():
        _, err = proc.communicate()
        if proc.returncode != 0 or not report.exists():
            raise RuntimeError(f"bench child {name} failed ({proc.returncode}): {err.decode()[-2000:]}")
        out[name] = {"peak_rss_bytes": int(report.read_text())}
    return out


def memory(features: Path, feature_bytes: int, work: Path, *, cfg: BenchConfig) -> dict[str, Any]:
    """Peak RSS of train-head vs feature bytes, and of extract at two sizes (each a fresh process)."""
    root = write_image_folder(work / "rss_images", n=cfg.rss_sizes[1], size=cfg.rss_image_size, fmt="PNG")
    commands = {
        "baseline": ["-c", "import torch, sklearn.linear_model, pipeline.cli, pipeline.stage2.train"],
        "train_head": ["-m", "pipeline", "train-head", "--features", str(features), "--head", "linear"]
        + ["--device", "cpu", "--out", str(work / "rss_head")],
    }
    for n in cfg.rss_sizes:
        per_split = n * 4 // 5  # --limit caps each split; train holds 80%
        commands[f"extract_{n}"] = (
            ["-m", "pipeline", "extract", "--dataset", str(root), "--weights", "none", "--device", "cpu"]
            + ["--image-size", str(cfg.rss_image_size), "--limit", str(per_split), "--no-progress", "--force"]
            + ["--out", str(work / f"rss_{n}.h5")]
        )
    rss = children_peak_rss(commands, work=work)
    base = rss["baseline"]["peak_rss_bytes"]
    extract = {str(n): {**rss[f"extract_{n}"], "feature_bytes": n * 512 * 4} for n in cfg.rss_sizes}
    small, large = (extract[str(n)] for n in cfg.rss_sizes)
    growth = large["peak_rss_bytes"] - small["peak_rss_bytes"]
    return {
        "baseline_rss_bytes": base,
        "feature_bytes": feature_bytes,
        "train_head_rss_bytes": rss["train_head"]["peak_rss_bytes"],
        "train_head_over_features": (rss["train_head"]["peak_rss_bytes"] - base) / feature_bytes,
        "extract": extract,
        "extract_rss_growth_bytes": growth,
        "extract_growth_over_feature_growth": growth / (large["feature_bytes"] - small["feature_bytes"]),
    }


# ------------------------------------------------------------------------------------------ 5. GPU


def flops_per_image(image_size: int) -> float:
    """Forward FLOPs of ResNet18 (no classifier) per image, counted by torch (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.stage1.backbones import load_backbone

    model = load_backbone("resnet18", weights="none", image_size=image_size).model
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, *, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul FLOP/s: the ceiling a conv net can approach on this GPU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def array_source(sizes: dict[str, int], *, side: int = 32, seed: int = SEED) -> Any:
    """CIFAR-10-shaped synthetic uint8 arrays held in memory, as ``datasets.load_torchvision`` builds them."""
    from pipeline.stage1.datasets import Source, array_split

    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in sizes.items():
        splits[name] = array_split(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), np.arange(n) % CLASSES)
    return Source("cifar10-synthetic", [str(c) for c in range(CLASSES)], splits, {"kind": "bench", **sizes})


def accelerator_throughput(
    work: Path,
    *,
    device: torch.device,
    sizes: dict[str, int],
    image_size: int = 224,
    batch_size: int = 256,
    matmul_n: int = 8192,
) -> dict[str, Any]:
    """Extraction images/s with preprocessing on ``device`` and bf16 autocast, against its FLOP ceiling."""
    from pipeline.stage1.extract import ExtractConfig, extract, plan_extraction

    cfg = ExtractConfig(dataset="cifar10-synthetic", weights="none", image_size=image_size, batch_size=batch_size)
    cfg = replace(cfg, device=device.type, out=str(work / "gpu.h5"), force=True, progress=False, preprocess="device")
    res = extract(cfg, plan=plan_extraction(cfg, source=array_source(sizes)))
    flops, rate = flops_per_image(image_size), matmul_rate(device, n=matmul_n)
    return {
        "status": "measured",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "images": sum(res.counts.values()),
        "image_size": image_size,
        "images_per_second": res.images_per_second,
        "batch": batch_size,
        "dtype": "bf16 autocast, float32 stored" if device.type == "cuda" else "float32",
        "preprocess": "device",
        "flops_per_image": flops,
        "bf16_matmul_flops_per_second": rate,
        "ceiling_images_per_second": rate / flops,
        "fraction_of_ceiling": res.images_per_second / (rate / flops),
    }


def gpu(work: Path, *, quick: bool) -> dict[str, Any]:
    """ResNet18 at 224 px on CIFAR-10-sized (50,000 + 10,000) synthetic uint8 arrays; only where CUDA is."""
    if not torch.cuda.is_available():
        return {"status": "not measured: no CUDA device in this run"}
    sizes = {"train": 2_000, "val": 500} if quick else {"train": 50_000, "val": 10_000}
    return accelerator_throughput(work, device=torch.device("cuda"), sizes=sizes)


# ------------------------------------------------------------------------------------------ the run


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _row(name: str, value: float, fmt: str, target: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"measure": name, "value": value, "shown": fmt.format(value), "target": target, "met": met, "note": note}


def summary_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratios (and the few absolute times the issue sets limits on), each with its target."""
    classic, two, heads, mem = r["classic"], r["two_stage"], r["heads"], r["memory"]
    est_epoch = classic["seconds_per_image_epoch"] * heads["rows"]  # one classic epoch over the same rows, estimated
    ext = f"classic extrapolated from {classic['epochs_run']} epochs" if classic["extrapolated"] else "all epochs run"
    speedup = classic["seconds"] / two["seconds"]
    overhead = two["extract_images_per_second"] / r["bare_forward"]["images_per_second"]
    rows = [
        _row("two-stage vs classic loop, end to end (x)", speedup, "{:.1f}", ">= 12 (limit ~15)", speedup >= 12, ext),
        _row("extraction / bare forward images/s", overhead, "{:.2f}", ">= 0.9", overhead >= 0.9),
        _row(f"load {heads['rows']:,} x {heads['dim']} (s)", heads["load_s"], "{:.2f}", "", None),
    ]
    for head, label, limit in (("linear", "linear head, 15 epochs", 2), ("logreg", "logreg head", 5)):
        value, runs = heads[f"{head}_s"], heads.get(f"{head}_runs_s", [])
        note = f"median of {len(runs)}: " + ", ".join(f"{t:.2f}" for t in runs) if len(runs) > 1 else ""
        rows.append(_row(f"{label} (s)", value, "{:.2f}", f"<= {limit}", value <= limit, note))
    rows.append(_row("compare, all heads (s)", heads["compare_s"], "{:.1f}", "<= 30", heads["compare_s"] <= 30))
    for key, label in (("load_s", "load"), ("linear_s", "linear"), ("logreg_s", "logreg"), ("compare_s", "compare")):
        rows.append(
            _row(f"{label} / one classic epoch on {heads['rows']:,} images", heads[key] / est_epoch, "{:.4f}", "", None)
        )
    rows[-1]["note"] = f"classic epoch estimated: {est_epoch:.0f} s from the measured per-image cost"
    head_ratio, growth = mem["train_head_over_features"], mem["extract_growth_over_feature_growth"]
    rows.append(_row("train-head RSS above baseline / feature bytes", head_ratio, "{:.2f}", "<= 2", head_ratio <= 2))
    sizes = " -> ".join(f"{int(n):,}" for n in mem["extract"])
    rows.append(
        _row(f"extract RSS growth / feature growth ({sizes} images)", growth, "{:.2f}", "~0 (flat)", growth <= 0.5)
    )
    g = r["gpu"]
    if g.get("status") == "measured":
        frac = g["fraction_of_ceiling"]
        rows.append(
            _row("GPU images/s / FLOP ceiling", frac, "{:.2f}", "", None, f"{g['images_per_second']:.0f} img/s")
        )
    else:
        rows.append(
            {"measure": "GPU (ResNet18 224 px, bf16)", "shown": "OPEN", "target": "", "met": None, "note": g["status"]}
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| measure | value | target | met | note |", "|---|---:|---|---|---|"]
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['measure']} | {r['shown']} | {r['target']} | {met} | {r.get('note', '')} |")
    return "\n".join(lines)


def run(cfg: BenchConfig, *, quick: bool = False) -> dict[str, Any]:
    """Every measurement, in order; returns the full result (also written as JSON by :func:`main`)."""
    result: dict[str, Any] = {"machine": machine(), "config": asdict(cfg), "quick": quick}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        work = Path(tmp)
        root = write_image_folder(work / "images", n=cfg.n_images, size=cfg.source_size)
        log.info(
            "1-2/5 classic loop (%d epochs) on %d images, two stages and bare forward between",
            cfg.classic_epochs,
            cfg.n_images,
        )
        result["classic"], result["two_stage"], result["bare_forward"] = interleaved(root, work, cfg=cfg)
        log.info("3/5 heads on %d x %d features", cfg.head_train, cfg.head_dim)
        features = work / "heads.h5"
        feature_bytes = write_feature_file(features, n_train=cfg.head_train, n_val=cfg.head_val, dim=cfg.head_dim)
        result["heads"] = heads_on_file(
            features, work, epochs=cfg.epochs, heads=cfg.compare_heads, repeats=cfg.head_repeats
        )
        log.info("4/5 memory (fresh child processes)")
        result["memory"] = memory(features, feature_bytes, work, cfg=cfg)
        log.info("5/5 GPU")
        result["gpu"] = gpu(work, quick=quick)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    result["summary"] = summary_rows(result)
    return result


def write_result(result: dict[str, Any], out_dir: Path) -> Path:
    """``bench-<UTC time>.json`` plus ``latest.json`` (the one BENCHMARKS.md quotes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result["created"] = stamp
    text = json.dumps(result, indent=2, default=str) + "\n"
    path = out_dir / f"bench-{stamp}{'-quick' if result.get('quick') else ''}.json"
    write_text(path, text)
    write_text(out_dir / ("latest-quick.json" if result.get("quick") else "latest.json"), text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the bench runs (no timings)")
    p.add_argument("--classic-epochs", type=int, default=None, help="run fewer and extrapolate to 15 (stated)")
    p.add_argument("--images", type=int, default=None, help="images for the classic-vs-two-stage comparison")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default artifacts/bench)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = QUICK if args.quick else BenchConfig()
    changes = {"classic_epochs": args.classic_epochs, "n_images": args.images, "out_dir": args.out_dir}
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    result = run(cfg, quick=args.quick)
    path = write_result(result, Path(cfg.out_dir))
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}; load average {m['load_average_at_start'][0]:.1f}")
    print(format_table(result["summary"]))
    print(f"\nfull numbers: {path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
