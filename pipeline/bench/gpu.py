"""``make bench-gpu`` / ``python -m pipeline.bench.gpu``: the GPU path against its ceilings, in under 5 minutes.

Sections (each caught on its own: a failure is recorded in the JSON and the table, and the next one runs):

    ceiling    measured bf16 matmul rate / FLOPs per image (torch.utils.flop_counter), per backbone
    bare       bare forward on ready device tensors: ResNet18, MobileNetV2, ResNet50, channels_last + bf16, batch
               256 and 512, cuDNN autotuning on (MobileNetV2 also with it off: what the autotuner buys)
    arrays     ``extract`` of ResNet18 at 224 px on 60,000 CIFAR-sized uint8 arrays (real digits, augmented), with the
               defaults and at each batch size; the best one; synchronising calls per batch (CUDA sync debug mode)
    families   ``extract`` of MobileNetV2 (the real ImageNet weights when present) on 60,000 28 px greyscale arrays
               and ResNet50 on 20,000 CIFAR-sized ones, each against its bare forward
    jpeg       a temp folder of 20,000 photo-sized JPEGs (375 x 500, ~100 KB; augmented digits + texture noise),
               ``--preprocess gpu-decode`` against ``loader`` (PIL), and the agreement of their features
    torchrun   ``python -m pipeline extract`` against ``torchrun --nproc-per-node 1`` of the same command (wall times)
    startup    where a fresh process spends its time before the first batch (imports, CUDA, model, cuDNN autotune)
    compile    ``--compile`` in a child process: compile time, compiled against eager images/s, the break-even run
               size (``extract.COMPILE_BREAK_EVEN_IMAGES`` is set from it)
    heads      ``pipeline.bench.heads.heads_bench`` on the GPU, when that module exists
    fidelity   ``pipeline.bench.fidelity.fidelity_bench`` (its quick size): tf32 / bf16 / fp16, the device resize and
               nvJPEG against PIL fp32, with logreg accuracy per row

Without CUDA it says so in one line and exits 0; ``--quick`` runs every section at toy sizes on whatever device there
is (that is how its code is tested on the CPU; its figures then mean nothing).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # the checkout: pipeline/bench/gpu.py -> .
DIGITS = REPO / "data" / "digits"
MOBILENET_WEIGHTS = Path("artifacts/weights/mobilenet_v2_imagenet.pt")
BACKBONES = ("resnet18", "mobilenet_v2", "resnet50")
# Measured on an H200 before this work (FACTS.md, issue 13): what each row is compared with.
BEFORE = {"arrays_defaults": 13_000, "mobilenet_v2_arrays": 7_550, "jpeg_loader": 1_900, "compile_run": 3_200}


@dataclass(frozen=True)
class GpuBenchConfig:
    image_size: int = 224
    array_images: int = 60_000  # ResNet18 arrays (CIFAR-sized, 32 px RGB): 50,000 train + 10,000 val
    batch_sizes: tuple[int, ...] = (256, 512, 1024)
    mobilenet_images: int = 60_000  # 28 px greyscale arrays
    resnet50_images: int = 20_000
    jpeg_images: int = 20_000
    jpeg_size: tuple[int, int] = (375, 500)
    torchrun_limit: int = 4_000  # per split, on the JPEG folder
    bare_batches: int = 20
    bare_batch_sizes: tuple[int, ...] = (256, 512)
    matmul_n: int = 8192
    compile_images: int = 30_000
    sync_batches: int = 6
    budget_s: float = 270.0  # sections that would start after this are skipped (the lead's limit is 5 minutes)
    compile_timeout_s: float = 150.0
    child_timeout_s: float = 120.0


QUICK = GpuBenchConfig(
    image_size=32,
    array_images=40,
    batch_sizes=(8, 16),
    mobilenet_images=24,
    resnet50_images=16,
    jpeg_images=24,
    jpeg_size=(40, 48),
    torchrun_limit=6,
    bare_batches=2,
    bare_batch_sizes=(8,),
    matmul_n=128,
    compile_images=16,
    sync_batches=2,
    budget_s=600.0,
    compile_timeout_s=60.0,
    child_timeout_s=120.0,
)


@dataclass
class Context:
    cfg: GpuBenchConfig
    device: torch.device
    work: Path
    quick: bool
    results: dict[str, Any] = field(default_factory=dict)
    digits: tuple[np.ndarray, np.ndarray] | None = None  # (N, 8, 8) uint8, labels

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------ data


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The committed real digits (data/digits): (1797, 8, 8) uint8 and their labels."""
    from PIL import Image

    files = sorted(DIGITS.glob("*/*.png"))
    if not files:
        raise RuntimeError(f"no digits under {DIGITS}")
    images = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    return images, np.array([int(f.parent.name) for f in files], dtype=np.int64)


def augmented_digits(ctx: Context, n: int, *, side: int, rgb: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real digits upscaled to ``side`` px, shifted, tinted (rgb) and with grain: uint8 NHWC (or NHW)."""
    if ctx.digits is None:
        ctx.digits = load_digits()
    images, labels = ctx.digits
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(images), n)
    x = torch.from_numpy(images[pick]).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()
    shift = rng.integers(-side // 8, side // 8 + 1, (2,))
    x = np.roll(x, tuple(int(s) for s in shift), axis=(1, 2))
    if rgb:
        tint = rng.uniform(0.4, 1.0, (n, 1, 1, 3)).astype(np.float32)
        x = x[..., None] * tint + rng.uniform(0, 80, (n, 1, 1, 3)).astype(np.float32)
    x = x + rng.normal(0, 8, x.shape).astype(np.float32)
    return x.clip(0, 255).astype(np.uint8), labels[pick]


def array_source(arrays: np.ndarray, labels: np.ndarray, name: str) -> Any:
    """Five sixths train, one sixth val (CIFAR-10's 50,000 / 10,000), held in memory as arrays."""
    from pipeline.stage1.datasets import Source, array_split

    cut = len(arrays) * 5 // 6
    splits = {"train": array_split(arrays[:cut], labels[:cut]), "val": array_split(arrays[cut:], labels[cut:])}
    return Source(name, [str(c) for c in range(10)], splits, {"kind": "bench", "name": name, "n": len(arrays)})


def write_jpeg_folder(ctx: Context, root: Path, *, n: int, size: tuple[int, int]) -> dict[str, Any]:
    """``root/<digit>/*.jpg``: real digits upscaled to photo size, tinted, over texture noise; written by threads
    (PIL's encoder releases the GIL)."""
    from PIL import Image

    if ctx.digits is None:
        ctx.digits = load_digits()
    images, labels = ctx.digits
    h, w = size

    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    # Texture (grain + stripes) drawn once, 0..128: each file takes a shifted window of one. Drawing fresh noise
    # per file cost ~20 ms of the ~35 ms a file took; JPEG encoding (~6 ms) is what is left.
    rng0 = np.random.default_rng(12345)
    pad = 64
    stripes = 40 * np.sin(np.arange(w + pad) / 5.0)[None, :, None]
    textures = [
        (64 + rng0.normal(0, 18, (h + pad, w + pad, 3)) + stripes * (t % 2)).clip(0, 128).astype(np.uint8)
        for t in range(8)
    ]

    def one(i: int) -> int:
        rng = np.random.default_rng(i)
        k = int(rng.choice(by_class[i % 10]))  # every class present, whatever n
        digit = np.asarray(Image.fromarray(images[k]).resize((w, h), Image.BILINEAR), dtype=np.uint16)
        tint = rng.integers(64, 256, 3).astype(np.uint16)
        dy, dx = rng.integers(0, pad, 2)
        texture = textures[i % len(textures)][dy : dy + h, dx : dx + w]
        pixels = ((digit[..., None] * tint) >> 9).astype(np.uint8) + texture  # <= 127 + 128
        path = root / str(labels[k]) / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        return path.stat().st_size

    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        sizes = list(pool.map(one, range(n)))
    return {"files": n, "mean_bytes": float(np.mean(sizes)), "write_s": time.perf_counter() - t0, "size": [h, w]}


# ------------------------------------------------------------------------------------------ measurements


def model_for(name: str, *, image_size: int, weights: str = "none") -> Any:
    from pipeline.stage1.backbones import load_backbone

    return load_backbone(name, weights=weights, image_size=image_size, seed=0)


@torch.inference_mode()
def bare_forward(
    ctx: Context, name: str, *, batch: int, batches: int, benchmark: bool = True, bf16: bool = True
) -> float:
    """Images/s of the backbone alone on a ready normalised batch on the device (channels_last, bf16 autocast)."""
    size = ctx.cfg.image_size
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        model = model_for(name, image_size=size).model.to(ctx.device).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=torch.channels_last)
        amp = bf16 and ctx.device.type == "cuda"
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            for _ in range(3):
                model(x)
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(batches):
                model(x).flatten(1).float()
            ctx.sync()
        return batches * batch / (time.perf_counter() - t0)
    finally:
        torch.backends.cudnn.benchmark = before


def run_extract(ctx: Context, source: Any, *, out: str, **options: Any) -> dict[str, Any]:
    """``extract`` as the CLI runs it (defaults unless ``options`` says otherwise) on an in-memory or folder source."""
    from pipeline.stage1.extract import ExtractConfig, extract, plan_extraction

    cfg = ExtractConfig(
        **{"weights": "none", "device": ctx.device.type, "force": True, "progress": False, **options},
        out=str(ctx.work / out),
    )
    plan = plan_extraction(cfg, source=source)
    res = extract(cfg, plan=plan)
    return {
        "images_per_second": res.images_per_second,
        "images": sum(res.counts.values()),
        "seconds": res.seconds,
        "compile_seconds": res.compile_seconds,
        "batch_size": plan.settings.batch_size,
        "workers": plan.settings.workers,
        "sources": sorted(set(plan.sources.values())),
        "path": str(res.path),
    }


def flops_per_image(name: str, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = model_for(name, image_size=image_size).model
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def matmul_rate(ctx: Context, n: int, reps: int = 20) -> float:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    a @ b
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    ctx.sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ sections


def section_ceiling(ctx: Context) -> dict[str, Any]:
    rate = matmul_rate(ctx, ctx.cfg.matmul_n)
    flops = {name: flops_per_image(name, ctx.cfg.image_size) for name in BACKBONES}
    return {
        "matmul_flops_per_second": rate,
        "flops_per_image": flops,
        "ceiling_images_per_second": {name: rate / f for name, f in flops.items()},
    }


def section_bare(ctx: Context) -> dict[str, Any]:
    c = ctx.cfg
    out: dict[str, Any] = {}
    for name in BACKBONES:
        out[name] = {str(b): bare_forward(ctx, name, batch=b, batches=c.bare_batches) for b in c.bare_batch_sizes}
    b = c.bare_batch_sizes[0]
    out["mobilenet_v2_no_cudnn_benchmark"] = bare_forward(
        ctx, "mobilenet_v2", batch=b, batches=c.bare_batches, benchmark=False
    )
    return out


def bare_best(ctx: Context, name: str) -> float | None:
    bare = ctx.results.get("bare", {})
    runs = bare.get(name) if bare.get("status") == "measured" else None
    return max(runs.values()) if runs else None


def section_arrays(ctx: Context) -> dict[str, Any]:
    c = ctx.cfg
    arrays, labels = augmented_digits(ctx, c.array_images, side=32, rgb=True)
    source = array_source(arrays, labels, "digits32-rgb")
    common = {"backbone": "resnet18", "image_size": c.image_size}
    out: dict[str, Any] = {"data": f"{len(arrays):,} real digits augmented to 32 px RGB (shift, tint, grain)"}
    out["defaults"] = run_extract(ctx, source, out="arrays.h5", **common)
    runs = {str(b): run_extract(ctx, source, out="arrays.h5", batch_size=b, **common) for b in c.batch_sizes}
    out["by_batch"] = runs
    best = max(runs, key=lambda b: runs[b]["images_per_second"])
    out["best_batch"], out["best"] = int(best), runs[best]
    out["sync_calls_per_batch"] = count_syncs(ctx, source, batches=c.sync_batches, **common)
    return out


def count_syncs(ctx: Context, source: Any, *, batches: int, **options: Any) -> dict[str, Any]:
    """Calls that make the CPU wait for the GPU, per batch of an extraction (torch's CUDA sync debug mode)."""
    import warnings

    if ctx.device.type != "cuda":
        return {"status": "not measured: CUDA only"}
    from pipeline.stage1.datasets import Source

    bs = options.get("batch_size") or 512
    small = {k: v.subset(np.arange(min(len(v), bs * batches))) for k, v in source.splits.items()}
    small_source = Source(source.name, source.classes, {"train": small["train"]}, {**source.identity, "sync": 1})
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = run_extract(ctx, small_source, out="sync.h5", batch_size=bs, **options)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    n_batches = max(1, -(-res["images"] // bs))
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught})
    return {"per_batch": len(caught) / n_batches, "total": len(caught), "batches": n_batches, "where": where[:8]}


def section_families(ctx: Context) -> dict[str, Any]:
    c = ctx.cfg
    weights = str(MOBILENET_WEIGHTS) if MOBILENET_WEIGHTS.is_file() else "none"
    grey, grey_labels = augmented_digits(ctx, c.mobilenet_images, side=28, rgb=False, seed=1)
    mnist_like = array_source(grey, grey_labels, "digits28-grey")
    out: dict[str, Any] = {"mobilenet_v2_weights": weights}
    common = {"image_size": c.image_size}
    out["mobilenet_v2"] = run_extract(
        ctx, mnist_like, out="mbv2.h5", backbone="mobilenet_v2", weights=weights, **common
    )
    rgb, rgb_labels = augmented_digits(ctx, c.resnet50_images, side=32, rgb=True, seed=2)
    out["resnet50"] = run_extract(
        ctx, array_source(rgb, rgb_labels, "digits32-rgb-r50"), out="r50.h5", backbone="resnet50", **common
    )
    return out


def section_jpeg(ctx: Context) -> dict[str, Any]:
    from pipeline.stage1.datasets import load_folder
    from pipeline.store import read_features

    c = ctx.cfg
    root = ctx.work / "jpegs"
    out: dict[str, Any] = {"folder": write_jpeg_folder(ctx, root, n=c.jpeg_images, size=c.jpeg_size)}
    source = load_folder(root)
    common = {"backbone": "resnet18", "image_size": c.image_size}
    out["gpu_decode"] = run_extract(ctx, source, out="jpeg_gpu.h5", preprocess="gpu-decode", **common)
    out["loader"] = run_extract(ctx, source, out="jpeg_pil.h5", preprocess="loader", **common)
    a, b = read_features(Path(out["gpu_decode"]["path"])), read_features(Path(out["loader"]["path"]))
    x, y = a.train.features, b.train.features
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
    rel = np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-30)
    out["agreement"] = {"cosine_min": float(cos.min()), "cosine_median": float(np.median(cos)),
                        "relative_l2_median": float(np.median(rel)), "rows": len(cos)}  # fmt: skip
    return out


def _child_env() -> dict[str, str]:
    root = str(REPO)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _timed(cmd: list[str], *, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return {"wall_s": wall, "stdout": proc.stdout.strip().splitlines()[-1:]}


def section_torchrun(ctx: Context) -> dict[str, Any]:
    c = ctx.cfg
    root = ctx.work / "jpegs"
    if not root.is_dir():
        write_jpeg_folder(ctx, root, n=c.jpeg_images, size=c.jpeg_size)
    args = ["extract", "--dataset", str(root), "--weights", "none", "--image-size", str(c.image_size)]
    args += ["--limit", str(c.torchrun_limit), "--device", ctx.device.type, "--no-progress", "--force"]
    plain = _timed([sys.executable, "-m", "pipeline", *args, "--out", str(ctx.work / "plain.h5")],
                   timeout=c.child_timeout_s)  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    under = _timed([*launcher, "pipeline", *args, "--out", str(ctx.work / "torchrun.h5")], timeout=c.child_timeout_s)
    return {"plain": plain, "torchrun": under, "torchrun_over_plain": under["wall_s"] / plain["wall_s"]}


_STARTUP = r"""
import json, sys, time
t = {}
t0 = time.perf_counter(); import torch; t["import torch"] = time.perf_counter() - t0
t0 = time.perf_counter(); import torchvision; t["import torchvision"] = time.perf_counter() - t0
t0 = time.perf_counter(); import pipeline.cli, pipeline.stage1.extract; t["import pipeline"] = time.perf_counter() - t0
t["scikit-learn imported by extract"] = "sklearn" in sys.modules
device = torch.device(sys.argv[1]); size = int(sys.argv[2]); batch = int(sys.argv[3])
t0 = time.perf_counter()
if device.type == "cuda":
    torch.cuda.init(); torch.zeros(1, device=device); torch.cuda.synchronize()
t["CUDA init"] = time.perf_counter() - t0
t0 = time.perf_counter()
from pipeline.stage1.backbones import load_backbone
from pipeline.stage1.extract import prepare_model
bb = load_backbone("resnet18", weights="none", image_size=size)
model = prepare_model(bb, device)
t["load and place ResNet18"] = time.perf_counter() - t0
x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
for name in ("first batch (cuDNN autotune)", "second batch"):
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model(x).float().cpu()
    t[name] = time.perf_counter() - t0
t0 = time.perf_counter(); import sklearn.linear_model
t["import scikit-learn (not needed to extract)"] = time.perf_counter() - t0
print(json.dumps(t))
"""


def section_startup(ctx: Context) -> dict[str, Any]:
    from pipeline.stage1.batches import default_batch_size

    batch = default_batch_size(ctx.device, crop_size=ctx.cfg.image_size)
    cmd = [sys.executable, "-c", _STARTUP, ctx.device.type, str(ctx.cfg.image_size), str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.cfg.child_timeout_s, env=_child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return {"phases_s": json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def break_even_images(*, compile_s: float, eager_ips: float, compiled_ips: float) -> float | None:
    """Images at which compiling pays for itself: compile_s = N (1/eager - 1/compiled); None if it never does."""
    saving = 1 / eager_ips - 1 / compiled_ips
    return compile_s / saving if saving > 0 else None


def compile_measure(ctx: Context) -> dict[str, Any]:
    """Eager and compiled extraction of the same arrays (in this process; the parent runs it in a child)."""
    from pipeline.stage1.extract import COMPILE_BREAK_EVEN_IMAGES, COMPILE_MODE

    c = ctx.cfg
    arrays, labels = augmented_digits(ctx, c.compile_images, side=32, rgb=True, seed=3)
    source = array_source(arrays, labels, "digits32-compile")
    common = {"backbone": "resnet18", "image_size": c.image_size}
    eager = run_extract(ctx, source, out="eager.h5", compile=False, **common)
    compiled = run_extract(ctx, source, out="compiled.h5", compile=True, **common)
    steady = compiled["images"] / max(compiled["seconds"] - compiled["compile_seconds"], 1e-9)
    n = break_even_images(
        compile_s=compiled["compile_seconds"], eager_ips=eager["images_per_second"], compiled_ips=steady
    )
    return {
        "mode": COMPILE_MODE,
        "eager": eager,
        "compiled": compiled,
        "compiled_steady_images_per_second": steady,
        "break_even_images": n,
        "constant_in_use": COMPILE_BREAK_EVEN_IMAGES,
    }


def section_compile(ctx: Context) -> dict[str, Any]:
    if ctx.quick and ctx.device.type == "cpu":
        return {"status": "skipped: inductor compiles for minutes on a small CPU; the arithmetic is tested"}
    out = ctx.work / "compile.json"
    cmd = [sys.executable, "-m", "pipeline.bench.gpu", "--section", "compile", "--section-out", str(out)]
    cmd += ["--quick"] if ctx.quick else []
    remaining = ctx.cfg.budget_s + 25 - (time.perf_counter() - ctx.results["_started"])
    _timed(cmd, timeout=max(30.0, min(ctx.cfg.compile_timeout_s, remaining)))
    return json.loads(out.read_text())


def section_heads(ctx: Context) -> dict[str, Any]:
    try:
        from pipeline.bench.heads import heads_bench
    except ImportError as e:
        return {"status": f"not available ({e})"}
    offered = {"device": str(ctx.device), "quick": ctx.quick, "work": ctx.work}
    params = inspect.signature(heads_bench).parameters
    result = heads_bench(**{k: v for k, v in offered.items() if k in params})
    return result if isinstance(result, dict) else {"result": result}


def section_fidelity(ctx: Context) -> dict[str, Any]:
    """Feature agreement of every path and precision on this GPU against PIL fp32 (``pipeline.bench.fidelity``)."""
    from pipeline.bench.fidelity import fidelity_bench

    return fidelity_bench(work=ctx.work / "fidelity", quick=True)


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "ceiling": section_ceiling,
    "bare": section_bare,
    "arrays": section_arrays,
    "families": section_families,
    "jpeg": section_jpeg,
    "torchrun": section_torchrun,
    "startup": section_startup,
    "compile": section_compile,
    "heads": section_heads,
    "fidelity": section_fidelity,
}


def run_sections(ctx: Context, names: list[str]) -> None:
    """Each section in turn; one that fails or would start past the time budget is recorded as such."""
    ctx.results.setdefault("_started", time.perf_counter())
    for name in names:
        elapsed = time.perf_counter() - ctx.results["_started"]
        if elapsed > ctx.cfg.budget_s:
            ctx.results[name] = {"status": f"skipped: {elapsed:.0f} s spent, budget {ctx.cfg.budget_s:.0f} s"}
            continue
        log.info("bench-gpu: %s (%.0f s so far)", name, elapsed)
        t0 = time.perf_counter()
        try:
            res = SECTIONS[name](ctx)
            ctx.results[name] = {"status": "measured", **res}
        except Exception as e:  # noqa: BLE001 - recorded; the next section runs
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            ctx.results[name] = {"status": f"failed: {type(e).__name__}: {first}",
                                 "traceback": traceback.format_exc().splitlines()[-6:]}  # fmt: skip
            log.warning("bench-gpu: %s failed: %s", name, ctx.results[name]["status"])
        ctx.results[name]["section_s"] = time.perf_counter() - t0
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the table


def _row(measure: str, value: float | None, fmt: str, *, target: str = "", ratio: str = "", note: str = "") -> dict:
    shown = "n/a" if value is None else fmt.format(value)
    return {"measure": measure, "value": value, "shown": shown, "target": target, "ratio": ratio, "note": note}


def _ratio(a: float | None, b: float | None, label: str) -> str:
    return f"{a / b:.2f} x {label}" if a and b else ""


def summary_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: its value, its target and its ratio to the bare forward or the ceiling."""
    # One flat function, section by section in the order the table prints: each block is a few rows of formatting,
    # and spreading them over nine helpers would scatter the table's layout without making any piece reusable.
    rows: list[dict[str, Any]] = []
    ok = {k: v for k, v in r.items() if isinstance(v, dict) and v.get("status") == "measured"}
    for name, v in r.items():
        if isinstance(v, dict) and "status" in v and v["status"] != "measured":
            rows.append({"measure": f"[{name}]", "value": None, "shown": "OPEN", "target": "", "ratio": "",
                         "note": v["status"]})  # fmt: skip
    ceiling = ok.get("ceiling", {}).get("ceiling_images_per_second", {})
    bare = ok.get("bare", {})
    best = {n: max(bare[n].values()) for n in BACKBONES if n in bare}
    if "ceiling" in ok:
        rate = ok["ceiling"]["matmul_flops_per_second"]
        rows.append(_row("bf16 matmul (TFLOP/s)", rate / 1e12, "{:.0f}"))
    for n in BACKBONES:
        if n in bare:
            for b, ips in bare[n].items():
                rows.append(_row(f"bare forward {n}, batch {b} (img/s)", ips, "{:,.0f}",
                                 ratio=_ratio(ips, ceiling.get(n), "FLOP ceiling")))  # fmt: skip
    if "mobilenet_v2_no_cudnn_benchmark" in bare:
        off = bare["mobilenet_v2_no_cudnn_benchmark"]
        rows.append(_row("bare forward mobilenet_v2, cuDNN autotune off (img/s)", off, "{:,.0f}",
                         ratio=_ratio(off, best.get("mobilenet_v2"), "autotuned")))  # fmt: skip
    if "arrays" in ok:
        a = ok["arrays"]
        d, bst = a["defaults"], a["best"]
        rows.append(_row(f"extract resnet18 arrays, defaults (batch {d['batch_size']}) (img/s)", d["images_per_second"],
                         "{:,.0f}", target=">= 0.9 x bare", ratio=_ratio(d["images_per_second"], best.get("resnet18"),
                         "bare"), note=f"before: {BEFORE['arrays_defaults']:,} at batch 64"))  # fmt: skip
        rows.append(_row(f"extract resnet18 arrays, best batch {a['best_batch']} (img/s)", bst["images_per_second"],
                         "{:,.0f}", target=">= 0.9 x bare",
                         ratio=_ratio(bst["images_per_second"], best.get("resnet18"), "bare")))  # fmt: skip
        s = a.get("sync_calls_per_batch", {})
        if "per_batch" in s:
            rows.append(_row("synchronising calls per batch", s["per_batch"], "{:.1f}", target="0",
                             note=", ".join(s["where"][:3])))  # fmt: skip
    if "families" in ok:
        f = ok["families"]
        for n, before in (("mobilenet_v2", f"before: {BEFORE['mobilenet_v2_arrays']:,}"), ("resnet50", "")):
            ips = f[n]["images_per_second"]
            rows.append(_row(f"extract {n} arrays, defaults (img/s)", ips, "{:,.0f}", target=">= 0.9 x bare",
                             ratio=_ratio(ips, best.get(n), "bare"), note=before))  # fmt: skip
    if "jpeg" in ok:
        j = ok["jpeg"]
        kb = j["folder"]["mean_bytes"] / 1e3
        for key, label, target in (("gpu_decode", "gpu-decode", ">= 8,000"), ("loader", "PIL loader", "")):
            ips = j[key]["images_per_second"]
            rows.append(_row(f"extract JPEG folder, {label} (img/s)", ips, "{:,.0f}", target=target,
                             ratio=_ratio(ips, best.get("resnet18"), "bare"),
                             note=f"{j['folder']['files']:,} files, {kb:.0f} KB mean; before: "
                             f"{BEFORE['jpeg_loader']:,} (PIL)"))  # fmt: skip
        ag = j["agreement"]
        note = f"min {ag['cosine_min']:.5f}, median rel. L2 {ag['relative_l2_median']:.4f}"
        rows.append(_row("gpu-decode vs PIL features, median cosine", ag["cosine_median"], "{:.5f}", note=note))
    if "torchrun" in ok:
        t = ok["torchrun"]
        rows.append(
            _row(
                "torchrun 1 process / plain command, wall",
                t["torchrun_over_plain"],
                "{:.2f}",
                target="~1",
                note=f"{t['torchrun']['wall_s']:.1f} s vs {t['plain']['wall_s']:.1f} s",
            )
        )
    if "startup" in ok:
        st = ok["startup"]
        phases = {k: v for k, v in st["phases_s"].items() if isinstance(v, float)}
        rows.append(_row("start-up to second batch, fresh process (s)", st["wall_s"], "{:.1f}",
                         note="; ".join(f"{k} {v:.2f}" for k, v in phases.items())))  # fmt: skip
    if "compile" in ok and "compiled" in ok["compile"]:
        c = ok["compile"]
        n = c["break_even_images"]
        rows.append(_row("--compile: compile time (s)", c["compiled"]["compile_seconds"], "{:.1f}",
                         note=f"mode {c['mode']}"))  # fmt: skip
        rows.append(_row("--compile: compiled / eager img/s (steady)",
                         c["compiled_steady_images_per_second"] / c["eager"]["images_per_second"], "{:.2f}",
                         note=f"{c['compiled_steady_images_per_second']:,.0f} vs "
                         f"{c['eager']['images_per_second']:,.0f}"))  # fmt: skip
        rows.append(
            _row(
                "--compile: break-even run size (images)",
                n,
                "{:,.0f}",
                note=f"constant in use: {c['constant_in_use']:,}" + ("" if n else "; never pays"),
            )
        )
    for h in ok.get("heads", {}).get("rows", []):
        target = f"<= {h['target_s']:g} s" if h.get("target_s") else ""
        met = "" if h.get("met") is None else ("met" if h["met"] else "NOT met")
        rows.append(_row(f"heads: {h['name']} (s)", h["seconds"], "{:.2f}", target=target, ratio=met, note=h["note"]))
    for images in ("digits", "digits-tinted") if "fidelity" in ok else ():
        for r in ok["fidelity"].get(images, {}).get("rows", []):
            rows.append(
                _row(
                    f"agreement with PIL fp32, {images}: {r['path']}",
                    r["median_rel"],
                    "{:.1e}",
                    note=f"min cosine {r['min_cos']:.6f}, logreg val {r['logreg_val_acc']:.3f}",
                )
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| measure | value | target | ratio | note |", "|---|---:|---|---|---|"]
    lines += [f"| {r['measure']} | {r['shown']} | {r['target']} | {r['ratio']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ entry point


def machine(device: torch.device) -> dict[str, Any]:
    import torchvision

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="toy sizes on any device: checks the code, not the speed")
    p.add_argument("--out", default=None, help="JSON path (default artifacts/bench/gpu-<UTC time>.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in this order")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this (child) process
    p.add_argument("--section-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not torch.cuda.is_available() and not args.quick:
        print("bench-gpu: no CUDA device here; nothing measured (run it on a machine with a GPU, or --quick)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = QUICK if args.quick else GpuBenchConfig()
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-gpu-") as tmp:
        ctx = Context(cfg=cfg, device=device, work=Path(tmp), quick=args.quick)
        if args.section == "compile":  # the child of section_compile
            Path(args.section_out).write_text(json.dumps(compile_measure(ctx), default=str))
            return 0
        started = time.perf_counter()
        names = [n.strip() for n in args.sections.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        run_sections(ctx, names)
    from pipeline.fileio import write_json

    results = {k: v for k, v in ctx.results.items() if not k.startswith("_")}
    result = {"machine": machine(device), "config": asdict(cfg), "quick": args.quick, **results}
    result["seconds"] = time.perf_counter() - started
    result["summary"] = summary_rows(results)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or f"artifacts/bench/gpu-{stamp}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    m = result["machine"]
    print(f"\n{m['device']}, {m['cpus']} CPUs, torch {m['torch']}, torchvision {m['torchvision']}, {m['date']}; "
          f"{result['seconds']:.0f} s; JSON: {out}")  # fmt: skip
    print(format_table(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
