"""Training one head: fit it by the protocol on a feature file's train split, evaluate it on train and val as its
task says, and write its folder (``head.safetensors``, ``config.json``, ``metrics.json``, the task's PNGs).

One code path for every task: what differs (the rows a head learns from, the metrics, the figures, what
``config.json`` adds) is asked of the run's :class:`~pipeline.stage2.tasks.Task`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline import workers
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_directory, write_json
from pipeline.stage2 import plots
from pipeline.stage2.heads import HEADS, HeadConfig, save_head
from pipeline.stage2.heads.base import Head
from pipeline.stage2.heads.tail import require_activations, with_activations
from pipeline.stage2.protocol import fit
from pipeline.stage2.runs import (
    check_replace,
    default_head_root,
    features_label,
    read_run_features,
    run_settings,
    used_settings,
    weights_label,
    with_layer,
    writing,
)
from pipeline.stage2.tasks import Task, task_of, with_task
from pipeline.store import ALL_LAYERS, FeatureSet, read_meta

log = logging.getLogger(__name__)


def fit_and_evaluate(fs: FeatureSet, cfg: HeadConfig) -> tuple[Head, Any, list[dict[str, float]]]:
    """Fit one head on ``fs.train`` (or its few-shot sample); metrics on that train and on val, as the file's task
    (``--task``) says. Val is never used to choose anything. A head that takes activation maps (tail) gets them in
    place of features. Returns the head, its metrics record and its per-epoch history."""
    return evaluate_resolved(fs, with_task(cfg, fs.meta))


def evaluate_resolved(fs: FeatureSet, cfg: HeadConfig) -> tuple[Head, Any, list[dict[str, float]]]:
    """:func:`fit_and_evaluate` of a config whose task :func:`~pipeline.stage2.tasks.with_task` resolved."""
    task = task_of(cfg)
    if HEADS[cfg.head].inputs == "activations":
        fs = with_activations(fs)
    X, y = task.train_rows(fs, cfg)
    dims = {"num_classes": len(task.outputs(fs)), "feature_dim": fs.feature_dim}
    fitted = fit(cfg, X, y, val=(fs.val.features, task.truth(fs.val)), dims=dims, task=task)
    history = fitted.fit.history
    return fitted.head, task.evaluate(fitted, fs), history


def train_head(features: Path | str, cfg: HeadConfig, *, out: Path | str | None = None, force: bool = False) -> Any:
    """Train ``cfg.head`` on a feature file; write metrics.json, config.json, PNGs and the head to ``out``.
    A head there trained with other settings is replaced only with ``force``."""
    features = Path(features)
    meta = read_meta(features)  # a missing or foreign file, or an unknown --layer, is refused before any folder
    cfg = with_task(with_layer(cfg, meta, features=features), meta)
    out = Path(out) if out else default_head_root(features, layer=cfg.layer) / cfg.head
    if HEADS[cfg.head].inputs == "activations":
        require_activations(meta, features)
    with writing(out):
        check_replace(out / "config.json", settings=run_settings(cfg), fingerprint=meta.fingerprint, what="a head",
                      force=force)  # fmt: skip
        return train_one(read_run_features(features, cfg), cfg, out=out)


def head_config(fs: FeatureSet, head: Head, *, settings: dict[str, Any], task: Task, metrics: Any) -> dict[str, Any]:
    """``config.json`` of a head: the settings it uses (after any sweep: what export rebuilds it from), the run's
    settings as asked (what a later run into this folder is checked against), what produced its features, and
    what its task adds (what ``export`` records: a regression head's target names, a classifier's threshold)."""
    return {
        "head": head.cfg.head,
        "head_config": used_settings(head.cfg),
        "settings": settings,
        "features": str(fs.path),
        "features_fingerprint": fs.meta.fingerprint,
        "dataset": fs.meta.dataset,
        "backbone": fs.meta.backbone,
        "weights": fs.meta.weights,
        "weights_label": weights_label(fs.meta),
        "extract_config": fs.meta.config,
        "feature_dim": fs.feature_dim,
        "layer": fs.layer or ALL_LAYERS,  # what the head takes: one stored layer, or the whole row
        "layers": fs.meta.layers,  # the pooled layers in that input (extract --layers); None: the classifier's input
        "classes": fs.classes,
        "preprocessing": fs.meta.preprocessing,
        "classifier_path": fs.meta.classifier_path,
        "activations": fs.meta.activations,  # the --cache-at node a tail head starts after
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    } | task.config_record(fs, metrics)


def curves_note(cfg: HeadConfig) -> str:
    """How the curves were measured, under their title: train during each epoch (the table's train accuracy is the
    finished head's), and with dropout on where the head has dropout."""
    dropout = HEADS[cfg.head].uses("dropout") and cfg.dropout > 0
    train = "train: mean over each epoch's batches while training" + (
        f", dropout {cfg.dropout:g} on" if dropout else ""
    )
    return f"{train}; val: after each epoch{', dropout off' if dropout else ''}"


def train_one(fs: FeatureSet, cfg: HeadConfig, *, out: Path) -> Any:
    """Fit and evaluate one head (``cfg`` resolved by :func:`~pipeline.stage2.tasks.with_task`) and write its
    folder; the metrics record, with the folder it went to."""
    task = task_of(cfg)
    head, metrics, history = evaluate_resolved(fs, cfg)
    on = {"layer": fs.layer or ALL_LAYERS, "feature_dim": fs.feature_dim}  # what the head was trained on
    metrics = replace(metrics, details={**metrics.details, **on}, history=history or None)
    try:
        config = head_config(fs, head, settings=run_settings(cfg), task=task, metrics=metrics)
        # one unit: old head or new, never a mix; the head's file written beside the rest, and half the figures in
        # a forked child where this process is the only one at work (the last head of a comparison, train-head)
        with atomic_directory(out, owned_by="config.json") as unit:
            figures = task.figure_jobs(metrics, unit, fs=fs, head=head, label=features_label(fs),
                                       note=curves_note(head.cfg))  # fmt: skip
            cut = len(figures) // 2 if workers.idle_core() else len(figures)  # figures[cut:] in the child
            if cut < len(figures):
                plots.pyplot()  # imported once, before the fork: not in both processes
            with (
                workers.alongside(lambda: [job() for job in figures[cut:]]) if cut < len(figures) else nullcontext(),
                beside(lambda: save_head(head, unit, config=config)),
            ):
                write_json(unit / "metrics.json", metrics.to_json())
                for job in figures[:cut]:
                    job()
                write_answers(fs, head, out=unit, task=task, metrics=metrics)
    except OSError as e:
        raise PipelineError(f"cannot write head to {out}: {e.strerror or e}") from None
    return replace(metrics, out=str(out))


@contextmanager
def beside(work: Callable[[], object]) -> Iterator[None]:
    """``work()`` in a thread while the block runs; waited for when the block ends, however it ends, and its
    exception raised then (the block's own, if it had one, goes first). For a head's file: k-NN's holds train
    (307 MB at 60,000 x 1,280), about 0.25 s of waiting on the disk (:mod:`pipeline.tensorfile`), with the GIL
    released, while the plots take the Python thread."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            failed.append(e)

    thread = threading.Thread(target=run, name="beside")
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        raise failed[0]


def train_heads(fs: FeatureSet, configs: dict[str, HeadConfig], *, root: Path) -> tuple[list[tuple[Any, float]], int]:
    """:func:`train_one` of each head into ``root/<head>``: ``(its metrics record, the seconds it took)`` in the order
    of ``configs``, and how many trained at once. On a CPU two at a time, each in a forked worker
    (:mod:`pipeline.workers`), started in :func:`start_order`."""
    import time

    from pipeline import workers
    from pipeline.devices import resolve_device

    names = list(configs)

    def job(name: str) -> Any:
        def run() -> tuple[Any, float]:
            log.info("training %s", name)
            started = time.perf_counter()
            return train_one(fs, configs[name], out=root / name), time.perf_counter() - started

        return run

    device = resolve_device(configs[names[0]].device) if names else None
    order = start_order(names)
    data = sum(split.features.nbytes for split in fs.splits.values())
    ways = workers.worker_count(len(names), device=device, data_bytes=data)
    # matplotlib imported once, here, while the first worker trains (on the core it leaves free): each worker would
    # import it for its first plot (~0.5 s each), and this process again for compare.png after them
    return workers.run_jobs([job(name) for name in names], ways=ways, order=order, warm=plots.pyplot), ways


def start_order(names: list[str]) -> list[int]:
    """The order heads start in when two train at once: costliest first (longest first packs two workers best), and
    of two heads of one cost the one on one thread first, so that the one whose matmuls spread over the cores free
    to it (:attr:`HeadSpec.spreads`) ends later and takes both (:func:`pipeline.workers.share_of_cores`) instead of
    leaving one idle. All heads on 60,000 x 1,280 real features: mlp and logreg start together, k-NN after the first
    of them, linear and centroid beside it; k-NN ends last, on both cores once they have ended. In 14 side-by-side
    pairs against the order before (the heads on one thread first, then logreg and k-NN) 10 were faster, the medians
    of the two batches 0.6 and 0.5 s (of ~25)."""
    return sorted(range(len(names)), key=lambda i: (-HEADS[names[i]].cost, HEADS[names[i]].spreads))


def write_answers(fs: FeatureSet, head: Any, *, out: Path, task: Task, metrics: Any) -> None:
    """``predictions.csv`` (every val image, in the task's columns) and ``errors.png`` (the worst-predicted ones,
    read back from the source images; not for regression) from the val outputs the evaluation already computed: no
    backbone run, no second prediction."""
    from pipeline.stage2 import answers

    outputs = getattr(head, "val_outputs", None)
    if outputs is None:
        return
    rows = task.answer_rows(fs, outputs, metrics)
    answers.write_predictions(out / "predictions.csv", rows)
    if task.errors:
        identity = dict(fs.meta.dataset_identity or {})
        note = answers.write_errors_png(out / "errors.png", rows, identity=identity, captions=task.errors)
        if note:
            log.warning("%s", note)
