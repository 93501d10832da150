"""``python -m pipeline.bench.heads``: the heads timed on features of real images from real backbones.

The feature files: augmented views (random crops, flips, small rotations; seeded) of the committed ``data/digits``
at 32 px (the issue's size) through the ImageNet MobileNetV2 (60,000 train + 10,000 val views, 1,280-d; the val
views come from digit images no train view comes from); its first 50,000 train rows reduced to 512-d by PCA fitted
on them; and a randomly initialised (seeded) ResNet18 on 50,000 + 10,000 views, 512-d, whose feature vectors all
point nearly the same way: the case where k-NN's bfloat16 pass cannot tell neighbours apart. ``compare`` of all
heads runs on each, as a whole process (target 30 s; k-NN 5 s), and prints each head's fit and evaluation seconds.
A synthetic file of separable blobs is a last row only, to show how much synthetic features flatter.
The files are cached under ``artifacts/bench/`` keyed by their settings and reused.

Each row is a figure beside its target; ``met`` says whether it is within it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.fileio import write_json

log = logging.getLogger(__name__)

WEIGHTS = Path("artifacts/weights/mobilenet_v2_imagenet.pt")
DIGITS = Path("data/digits")


@dataclass(frozen=True)
class RealFeatures:
    """How the real feature file is made; every field is in its cache key."""

    n_train: int = 60_000
    n_val: int = 10_000
    image_size: int = 32  # the size (28-32 px photos); MobileNetV2 at 32 px: a one-off build of minutes
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"  # the real ImageNet MobileNetV2 (WEIGHTS), or "none": random init, seeded
    val_images: float = 0.2  # share of the digit images whose views form val
    seed: int = 0
    batch_size: int = 256


QUICK_FEATURES = RealFeatures(n_train=2_000, n_val=500, image_size=32)
# The worst case for k-NN: a randomly initialised ResNet18 at 32 px, whose 512-d features of any two
# images point nearly the same way (cosine ~0.99+): the bfloat16 pass cannot tell the neighbours apart.
RANDOM_FEATURES = RealFeatures(n_train=50_000, n_val=10_000, backbone="resnet18", weights="none")
QUICK_RANDOM = replace(RANDOM_FEATURES, n_train=2_000, n_val=500)


# ------------------------------------------------------------------------------------------ the feature files


def _digits(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.png")):
            images.append(np.asarray(Image.open(f).convert("L"), np.float32) / 255.0)
            labels.append(c)
    return np.stack(images), np.asarray(labels, np.int64), classes


def augmented_views(
    images: torch.Tensor, n: int, *, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` views of (M, H, W) images in [0, 1]: random source, crop (zoom 1-1.3x, shift up to 15%), horizontal
    flip, rotation of at most 15 degrees, resampled bilinearly to ``size`` x ``size``. (views, source index)."""
    src = torch.randint(len(images), (n,), generator=gen)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15)
    zoom = 1 / (1 + 0.3 * torch.rand(n, generator=gen))  # < 1: the view covers part of the image (a crop)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 0.15
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = torch.nn.functional.affine_grid(theta, [n, 1, size, size], align_corners=False)
    views = torch.nn.functional.grid_sample(
        images[src, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return views, src


def _key(spec: RealFeatures, weights: Path) -> str:
    from pipeline.stage1.backbones import file_sha256

    settings = {**asdict(spec), "digits": _digits_identity(DIGITS)}
    if spec.weights == "imagenet":
        settings["weights"] = file_sha256(weights)
    settings.pop("batch_size")  # does not change the features
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _digits_identity(root: Path) -> str:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


@torch.inference_mode()
def _embed(model: torch.nn.Module, views: torch.Tensor, *, batch_size: int, device: torch.device) -> np.ndarray:
    from pipeline.stage1.backbones import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for batch in views.split(batch_size):
        x = ((batch.to(device).expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


def real_feature_file(
    work: Path, *, spec: RealFeatures = RealFeatures(), weights: Path = WEIGHTS, device: str = "auto"
) -> Path:
    """The 1,280-d MobileNetV2 features of augmented digit views, built once per settings and reused."""
    from pipeline.devices import resolve_device
    from pipeline.stage1.backbones import load_backbone
    from pipeline.stage2.train import stratified_holdout

    name = f"digits_aug_{spec.backbone}_{spec.weights}_{spec.image_size}px_{spec.n_train}_{_key(spec, weights)}.h5"
    path = Path(work) / name
    if path.is_file():
        log.info("reusing %s", path)
        return path
    dev = resolve_device(device)
    images, labels, classes = _digits(DIGITS)
    fit, held = stratified_holdout(labels, fraction=spec.val_images, seed=spec.seed)
    chosen = str(weights) if spec.weights == "imagenet" else "none"
    model = load_backbone(spec.backbone, weights=chosen, seed=spec.seed).model
    model = model.to(dev).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(spec.seed)
    splits = {}
    t0 = time.perf_counter()
    for name, rows, n in (("train", fit, spec.n_train), ("val", held, spec.n_val)):
        views, src = augmented_views(torch.as_tensor(images[rows]), n, size=spec.image_size, gen=gen)
        splits[name] = (_embed(model, views, batch_size=spec.batch_size, device=dev), labels[rows][src.numpy()])
    seconds = time.perf_counter() - t0
    log.info(
        "embedded %d views in %.0f s (%.0f images/s)",
        spec.n_train + spec.n_val,
        seconds,
        (spec.n_train + spec.n_val) / seconds,
    )
    meta = {
        "backbone": spec.backbone,
        "weights": f"file:{weights.name}" if spec.weights == "imagenet" else "none",
        "dataset": "digits (augmented views)",
        "bench": asdict(spec),
    }
    _write(path, splits, classes=classes, meta=meta)
    return path


def _write(
    path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, classes: list[str], meta: dict[str, Any]
) -> None:
    """A feature file in the schema extract writes (through the store's writer)."""
    from pipeline.store import FeatureWriter

    dim = splits["train"][0].shape[1]
    meta = {
        "fingerprint": f"bench-{path.stem}",
        "feature_dim": dim,
        "num_classes": len(classes),
        "preprocessing": {},
        "dataset_identity": {},
        **meta,
    }
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    w = FeatureWriter(path, meta=meta, classes=classes, sizes=sizes, feature_dim=dim)
    for name, (X, y) in splits.items():
        w.append(name, X, y, [str(i) for i in range(len(y))], seen=len(y))
    w.finish()


def pca_file(path: Path, *, dim: int = 512, n_train: int | None = None) -> Path:
    """``path`` projected on the top ``dim`` principal components of its train split (fitted on train only);
    with ``n_train``, its first ``n_train`` train rows only."""
    from pipeline.store import read_features

    out = path.with_name(f"{path.stem}_pca{dim}" + (f"_{n_train}" if n_train else "") + ".h5")
    if out.is_file():
        return out
    fs = read_features(path)
    if n_train:
        t = fs.train
        fs = replace(
            fs,
            splits={
                **fs.splits,
                "train": replace(t, features=t.features[:n_train], labels=t.labels[:n_train], ids=t.ids[:n_train]),
            },
        )
    X = fs.train.features.astype(np.float64)
    mean = X.mean(0)
    _, vectors = np.linalg.eigh(np.cov(X - mean, rowvar=False))
    basis = vectors[:, ::-1][:, :dim]  # eigh sorts ascending
    splits = {
        s: (((fs.splits[s].features - mean) @ basis).astype(np.float32), fs.splits[s].labels) for s in ("train", "val")
    }
    meta = {"backbone": fs.meta.backbone, "weights": fs.meta.weights, "dataset": fs.meta.dataset}
    _write(out, splits, classes=fs.classes, meta={**meta, "reduced": f"PCA to {dim} (fitted on train)"})
    return out


# ------------------------------------------------------------------------------------------ the timings


def _row(name: str, seconds: float, target: float | None, note: str) -> dict[str, Any]:
    return {"name": name, "seconds": seconds, "target_s": target, "met": None if target is None else seconds <= target,
            "note": note}  # fmt: skip


def _timed_head(fs: Any, cfg: Any) -> tuple[float, dict[str, Any]]:
    from pipeline.stage2.train import fit_and_evaluate

    t0 = time.perf_counter()
    _, metrics, _ = fit_and_evaluate(fs, cfg)
    return time.perf_counter() - t0, metrics


def _fit_note(m: dict[str, Any]) -> str:
    parts = [f"val acc {m['val_accuracy']:.4f}"]
    if "n_iter" in m:
        parts.append(f"{m['n_iter']} iterations, {'converged' if m['converged'] else 'NOT converged'}")
    return "; ".join(parts)


def logreg_rows(
    fs: Any, *, label: str, device: str, gpu: bool, sklearn: bool = True, targeted: bool = True
) -> list[dict[str, Any]]:
    """logreg in torch (target 5 s on CPU at 50,000 x 512, 2 s on a GPU; ``targeted`` False: no target, for the
    CPU's 1,280-d file, which is not the size the target was set at), scikit-learn for reference, and the
    45-value sweep + refit (target 3x the torch fit)."""
    from pipeline.stage2.heads import HeadConfig

    cfg = HeadConfig(head="logreg", device=device)
    seconds, m = _timed_head(fs, cfg)
    rows = [_row(f"logreg torch, {label}", seconds, (2.0 if gpu else 5.0) if targeted else None, _fit_note(m))]
    if sklearn:
        s, ms = _timed_head(fs, replace(cfg, solver="sklearn"))
        rows.append(_row(f"logreg sklearn (reference), {label}", s, None, _fit_note(ms)))
    s, mw = _timed_head(fs, replace(cfg, sweep=True))
    sw = mw["sweep"]
    note = (f"45 C on {sw['n_fit']} rows, {sw['iterations']} path iterations; chose C={sw['chosen']['C']:.3g}; "
            f"{_fit_note(mw)}")  # fmt: skip
    rows.append(_row(f"logreg --sweep + refit, {label}", s, 3 * seconds, note + " (target: 3x the fit above)"))
    return rows


def other_head_rows(fs: Any, *, label: str, device: str, logreg_acc: float) -> list[dict[str, Any]]:
    from pipeline.stage2.heads import HeadConfig

    rows = []
    for name in ("linear", "mlp", "knn", "centroid"):
        seconds, m = _timed_head(fs, HeadConfig(head=name, device=device))
        note = _fit_note(m)
        if name == "linear":
            gap = 100 * (m["val_accuracy"] - logreg_acc)
            note += f"; {gap:+.1f} points against logreg (target: no lower than -1)"
        rows.append(_row(f"{name}, {label}", seconds, None, note))
    return rows


COMPARE_TARGET_S, KNN_TARGET_S = 30.0, 5.0  # the targets on this 2-core CPU: whole compare, k-NN
COMPARE_RUNS = 3  # compare runs per file on a CPU: the row is the median (this VM's speed drifts by +-10%)


# compare as it ran before its heads trained two at a time: the same process with pipeline.workers held to one way
ONE_AFTER_ANOTHER = (
    "import sys\nfrom pipeline import workers\nworkers.worker_count = lambda jobs, **kw: 1\n"
    "from pipeline.cli import console\nconsole()\n"
)


def _compare_process(path: Path, out: Path, *, device: str, one_by_one: bool = False) -> tuple[float, float, Any]:
    """``python -m pipeline compare`` of every head on ``path`` into ``out``: (wall s, CPU s of the process and its
    workers, the finished process)."""
    import resource

    start = [sys.executable, "-c", ONE_AFTER_ANOTHER] if one_by_one else [sys.executable, "-m", "pipeline"]
    cmd = [*start, "compare", "--features", str(path), "--out", str(out), "--device", device, "--force"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, proc


def host_speed(X: np.ndarray) -> tuple[float, float]:
    """How fast this shared CPU runs just now, on one core, in the two kinds of work that are most of compare's
    time: mlp's mini-batch matmul (128 x D by D x 128; GFLOP/s) and logreg's pass over the whole train matrix
    (10 x D by D x N; GB/s of features read). Each is the median of five short timings (~0.5 s in all).
    Measured beside each compare run, so that a run in one of the host's slow spells shows as one: every head
    slowed by 21-30% between two bench runs of the same code in session 18, and these fall with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Z = torch.from_numpy(np.ascontiguousarray(X, np.float32))
        gen = torch.Generator().manual_seed(0)
        x, w = Z[:128], torch.randn(128, Z.shape[1], generator=gen)
        thin = torch.randn(10, Z.shape[1], generator=gen)

        def median_time(work: Any, repeat: int) -> float:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(repeat):
                    work()
                times.append((time.perf_counter() - t0) / repeat)
            return sorted(times)[2]

        gemm = median_time(lambda: torch.mm(x, w.t()), 40)
        passes = median_time(lambda: torch.mm(thin, Z.t()), 1)
    finally:
        torch.set_num_threads(threads)
    return 2 * 128 * Z.shape[1] * 128 / gemm / 1e9, Z.numel() * 4 / passes / 1e9


def compare_rows(
    path: Path,
    work: Path,
    *,
    label: str,
    device: str,
    gpu: bool,
    baseline: bool = False,
    runs: int = 1,
    probe: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """``python -m pipeline compare`` of every head, the whole process (start-up and reading the file included),
    ``runs`` times: the row is the median run (every run's seconds in its note), then one row per head of that
    run: its whole time (fit + evaluation + writing its folder) as compare recorded it, with the three parts in
    the note. With ``baseline``, first the same compare with its heads one after another (as before they trained
    two at a time), for the ratio side by side. With ``probe`` (features), the host's speed (:func:`host_speed`)
    is measured before each run and said beside its time."""
    rows = []
    if baseline:
        seconds, cpu, proc = _compare_process(path, work / f"compare1_{path.stem}", device=device, one_by_one=True)
        said = f"CPU {cpu:.1f} s" if not proc.returncode else "FAILED: " + proc.stderr.strip()[-300:]
        rows.append(_row(f"compare, heads one after another, {label}", seconds, None, said))
    out = work / f"compare_{path.stem}"
    name = f"compare all heads (process), {label}"
    tries = []
    for _ in range(runs):
        speed = None if probe is None or gpu else "host {:.0f} GFLOP/s, {:.1f} GB/s".format(*host_speed(probe))
        seconds, cpu, proc = _compare_process(path, out, device=device)
        if proc.returncode:
            return [*rows, _row(name, seconds, None, "FAILED: " + proc.stderr.strip()[-300:])]
        tries.append((seconds, cpu, json.loads((out / "compare.json").read_text()), speed))  # the next run replaces it
    seconds, cpu, result, _ = sorted(tries, key=lambda t: t[0])[len(tries) // 2]
    note = f"best {result.get('best')}; CPU {cpu:.1f} s"
    if tries[0][3]:  # a shared machine's speed drifts by seconds: each run's time beside the host's speed then
        listed = ", ".join(f"{t[0]:.2f} s ({t[3]})" for t in tries)
        note = (f"median of {runs} runs: {listed}; " if runs > 1 else f"{listed}; ") + note
    elif runs > 1:  # the median run, and every run's time
        note = f"median of {runs} runs ({', '.join(f'{t[0]:.2f}' for t in tries)} s); " + note
    if rows:
        note += f"; {rows[0]['seconds'] / seconds:.2f}x the one-after-another run above"
    rows.append(_row(name, seconds, 10.0 if gpu else COMPARE_TARGET_S, note))
    for r in result["rows"]:
        fit, evaluation, whole = r.get("fit_seconds"), r.get("eval_seconds"), r.get("head_seconds")
        # what the user waits for the head: fit + evaluation + writing its folder (plots, predictions.csv)
        total = whole if whole is not None else (fit or 0.0) + (evaluation or 0.0)
        note = f"fit {fit:.2f} s" if fit is not None else "fit ? s"
        note += f", evaluation {evaluation:.2f} s" if evaluation is not None else ", evaluation not recorded"
        if whole is not None:
            note += f", writing {max(0.0, whole - (fit or 0.0) - (evaluation or 0.0)):.2f} s"
        score = r.get("val_accuracy", r.get("val_r2"))
        note += f"; val {score:.4f}" if score is not None else ""
        # Two heads at once share the CPU, so a head's time in compare is not its own: k-NN's target is then
        # checked on its own rows ("knn alone") and this one is for information.
        target = KNN_TARGET_S if r["head"] == "knn" and not gpu and result.get("heads_at_once", 1) == 1 else None
        rows.append(_row(f"  {r['head']}, {label}", total, target, note))
    return rows


def synthetic_file(work: Path, *, n_train: int, n_val: int, dim: int) -> Path:
    from pipeline.bench.endtoend import write_feature_file

    path = Path(work) / f"synthetic_{n_train}x{dim}.h5"
    if not path.is_file():
        write_feature_file(path, n_train=n_train, n_val=n_val, dim=dim)
    return path


def heads_bench(*, work: Path, device: str = "auto", quick: bool = False) -> dict[str, Any]:
    """Every row: real 1,280-d and 512-d (PCA) features, then the synthetic file; ``rows`` of
    ``{name, seconds, target_s, met, note}``. Feature files are cached in ``work``."""
    from pipeline.devices import resolve_device
    from pipeline.stage2.heads import HeadConfig
    from pipeline.store import read_features

    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    spec, random_spec = (QUICK_FEATURES, QUICK_RANDOM) if quick else (RealFeatures(), RANDOM_FEATURES)
    t0 = time.perf_counter()
    full = real_feature_file(work, spec=spec, device=device)
    reduced = pca_file(full, dim=64 if quick else 512, n_train=random_spec.n_train)
    parallel = real_feature_file(work, spec=random_spec, device=device)
    build_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    fs512, fs1280, fs_random = read_features(reduced), read_features(full), read_features(parallel)
    labels = {
        reduced: f"{len(fs512.train):,} x {fs512.feature_dim} real (MobileNetV2 ImageNet, PCA)",
        full: f"{len(fs1280.train):,} x {fs1280.feature_dim:,} real (MobileNetV2 ImageNet)",
        parallel: f"{len(fs_random.train):,} x {fs_random.feature_dim} real (ResNet18 random init: nearly parallel)",
    }
    for path, label in labels.items():
        one = gpu or quick
        rows += compare_rows(path, work, label=label, device=device, gpu=gpu, baseline=path == full and not one,
                             runs=1 if one else COMPARE_RUNS, probe=fs1280.train.features)  # fmt: skip
    rows.append(_row("  (cosine of random-init features)", 0.0, None, _parallel_note(fs_random)))
    for fs, label in ((fs512, labels[reduced]), (fs_random, labels[parallel])):  # k-NN's own bound, no other head
        seconds, m = _timed_head(fs, HeadConfig(head="knn", device=device))
        target = None if gpu else KNN_TARGET_S
        rows.append(_row(f"knn alone: fit + evaluation, {label}", seconds, target, _fit_note(m)))
    n = f"{len(fs1280.train):,} train"
    rows += logreg_rows(fs512, label=labels[reduced], device=device, gpu=gpu)
    lr_rows = logreg_rows(fs1280, label=f"{n} x 1,280 real", device=device, gpu=gpu, sklearn=not gpu, targeted=gpu)
    rows += lr_rows
    acc = float(lr_rows[0]["note"].split("val acc ")[1].split(";")[0])
    rows += other_head_rows(fs1280, label=f"{n} x 1,280 real", device=device, logreg_acc=acc)
    if gpu:
        rows += logreg_rows(_lifted(fs1280, dim=2048), label=f"{n} x 2,048 (real, lifted)", device=device, gpu=True,
                            sklearn=False)  # fmt: skip
    size = (2_000, 500, 64) if quick else (50_000, 10_000, 512)
    syn = read_features(synthetic_file(work, n_train=size[0], n_val=size[1], dim=size[2]))
    seconds, m = _timed_head(syn, HeadConfig(head="logreg", device=device))
    rows.append(_row(f"logreg torch, {size[0]:,} x {size[2]} synthetic (flatters)", seconds, None, _fit_note(m)))
    return {"device": str(dev), "quick": quick, "feature_file": str(full), "build_or_reuse_s": build_s, "rows": rows}


def _parallel_note(fs: Any) -> str:
    """How nearly parallel a file's features are: the median cosine between 2,000 seeded pairs of train rows."""
    X = fs.train.features
    rng = np.random.default_rng(0)
    a, b = X[rng.integers(0, len(X), 2000)], X[rng.integers(0, len(X), 2000)]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return f"median cosine between two train rows {np.median(cos):.4f} (1.0: all the same direction)"


def _lifted(fs: Any, *, dim: int) -> Any:
    """The GPU target's shape (60,000 x 2,048) from the real features: a fixed seeded random projection to ``dim``
    followed by ReLU, as a wider backbone's features are non-negative (the information is the 1,280-d one)."""
    from dataclasses import replace as swap

    proj = np.random.default_rng(0).normal(0, fs.feature_dim**-0.5, (fs.feature_dim, dim)).astype(np.float32)
    splits = {k: swap(v, features=np.maximum(v.features @ proj, 0)) for k, v in fs.splits.items()}
    return swap(fs, splits=splits, meta={**fs.meta, "feature_dim": dim})


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'row':<62} {'seconds':>8} {'target':>8}  met   note"]
    for r in rows:
        target = "-" if r["target_s"] is None else f"{r['target_s']:.1f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['name']:<62} {r['seconds']:>8.2f} {target:>8}  {met:<4}  {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.heads", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small files: checks that the bench runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default="artifacts/bench", help="where the feature files are cached")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    result = heads_bench(work=Path(args.work), device=args.device, quick=args.quick)
    out = Path(args.work) / ("heads-quick.json" if args.quick else "heads-latest.json")
    write_json(out, result)
    print(f"\nheads on {result['device']} (features: {result['feature_file']})")
    print(format_rows(result["rows"]))
    print(f"\nfull numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
