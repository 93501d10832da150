"""Run folders of stage two: where ``train-head`` and ``compare`` write by default, what a run records about
itself (its settings, the features it read), the check before a folder is replaced, and the lock held while a run
writes. Also the names a table or figure gives the features (dataset, backbone, weights)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.locks import FileLock
from pipeline.stage2.heads import HEADS, HeadConfig
from pipeline.store import FeatureMeta, FeatureSet, WeightsIdentity, read_features, resolve_layer


def default_head_root(features: Path, *, layer: str | None = None) -> Path:
    """Where ``train-head`` puts ``<head>/`` by default; heads on one stored layer (``--layer``) in ``<layer>/``."""
    root = Path("artifacts") / "heads" / Path(features).stem
    return root / layer if layer else root


def default_compare_root(features: Path, *, layer: str | None = None, sweep: bool = False) -> Path:
    """Where ``compare`` puts its run by default: its own folder, so that it never replaces a head that
    ``train-head`` trained (with other settings, say ``--class-weight balanced``) beside it; ``compare --sweep`` in
    ``compare-sweep/`` beside it, so trying the sweep after a plain compare keeps both and needs no ``--force``."""
    return default_head_root(features, layer=layer) / ("compare-sweep" if sweep else "compare")


def with_layer(cfg: HeadConfig, meta: FeatureMeta, *, features: Path) -> HeadConfig:
    """``cfg`` with ``--layer`` in its canonical form for this file (None: the whole stored row; see
    :func:`pipeline.store.resolve_layer`), so equal choices record equal settings; an unknown layer is one line."""
    return replace(cfg, layer=resolve_layer(meta, cfg.layer, path=features))


def read_run_features(features: Path, cfg: HeadConfig) -> FeatureSet:
    """The rows a run trains and scores on: the file's (``--layer``'s columns), less the images ``--exclude``
    names (see :mod:`pipeline.exclude`)."""
    from pipeline.exclude import drop_excluded, read_exclusion

    fs = read_features(features, layer=cfg.layer)
    return drop_excluded(fs, read_exclusion(cfg.exclude)) if cfg.exclude else fs


# ------------------------------------------------------------------------------------------ who wrote a folder


def used_settings(cfg: HeadConfig) -> dict[str, Any]:
    """The HeadConfig fields ``cfg.head`` reads (its registry entry lists them), with the head's name (and the task
    when it is not classification: absent for classification, as in heads saved before regression existed)."""
    settings = {"head": cfg.head, **{name: getattr(cfg, name) for name in HEADS[cfg.head].settings}}
    return settings | ({"task": cfg.task} if cfg.task not in ("auto", "classify") else {})


def run_settings(cfg: HeadConfig) -> dict[str, Any]:
    """What a run asked for, as far as it changes the head: the settings it uses (not where it ran), ``--sweep``,
    ``--shots`` and the seed they draw with. Two runs with equal run settings on one feature file train the same
    head, so one may replace the other's folder; any other run must be asked to (``--force``)."""
    settings = used_settings(cfg)
    settings.pop("device", None)
    if cfg.sweep or cfg.shots or cfg.threshold_target:
        settings["seed"] = cfg.seed
    if cfg.positive:  # recorded only when asked, so heads saved before these options still compare equal
        settings |= {"positive": cfg.positive, **(cfg.threshold_target or {})}
    if cfg.layer:  # one stored layer (canonical, see with_layer); the whole row is recorded as before
        settings["layer"] = cfg.layer
    if cfg.exclude:  # the images left out, by count and digest: a run without them has other settings
        from pipeline.exclude import read_exclusion

        settings["exclude"] = read_exclusion(cfg.exclude).record()
    return {**settings, "sweep": cfg.sweep, "shots": cfg.shots}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in {**old, **new} if old.get(k) != new.get(k)]


def check_replace(record: Path, *, settings: dict[str, Any], fingerprint: str, what: str, force: bool) -> None:
    """Refuse to replace ``record`` (a head's config.json, a shots.json) written by a run with other settings or on
    other features, unless ``force``. A record from a run with the same settings is replaced: nothing is lost."""
    if force or not record.is_file():
        return
    try:
        old = json.loads(record.read_text())
        # A head saved before "settings" was recorded: its head_config holds the same keys.
        old_settings = old.get("settings") or {k: old.get("head_config", {}).get(k) for k in settings}
    except (OSError, ValueError, AttributeError):
        old, old_settings = {}, {"unreadable": record.name}
    changes = _changes(old_settings, settings)
    if old.get("features_fingerprint", fingerprint) != fingerprint:
        changes.insert(0, "features re-extracted since")
    if changes:
        shown = ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise PipelineError(
            f"{record.parent} holds {what} made with other settings ({shown}); pass --force to replace it or "
            "choose another --out"
        )


def check_heads(root: Path, *, heads: list[str], base: HeadConfig, fingerprint: str, force: bool) -> None:
    """:func:`check_replace` for each head folder a comparison writes under ``root``: all checked before any head
    is trained, so a refusal costs nothing."""
    for name in heads:
        check_replace(root / name / "config.json", settings=run_settings(replace(base, head=name)),
                      fingerprint=fingerprint, what=f"a {name} head", force=force)  # fmt: skip


class FolderLock(FileLock):
    BUSY = "another train-head or compare is writing {target}; wait for it or choose another --out"


@contextlib.contextmanager
def writing(*folders: Path) -> Iterator[None]:
    """Hold ``<folder>.lock`` for each folder while a run writes them: a second writer is refused, one line."""
    with contextlib.ExitStack() as stack:
        for folder in folders:
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise PipelineError(f"cannot write to {folder.parent}: {e.strerror or e}") from None
            stack.enter_context(FolderLock(folder))
        yield


# ------------------------------------------------------------------------------------------ names of the features


def weights_label(meta: FeatureMeta) -> str:
    """The weights by name: a torchvision name, 'random init (seed=S)', or a file's name and a short hash."""
    try:
        identity = WeightsIdentity.parse(meta.weights)
    except PipelineError:
        return meta.weights or "?"  # not from `extract` (a hand-made file): shown as it is
    return identity.label(meta.config.get("weights"))


def features_label(fs: FeatureSet) -> str:
    """What a figure or table is about, by name: dataset, backbone, weights."""
    return f"{fs.meta.dataset or fs.path.stem}, {fs.meta.backbone}, {weights_label(fs.meta)}"


def describe(fs: FeatureSet) -> dict[str, Any]:
    """What a comparison's JSON says about the features it read."""
    return {
        "features": str(fs.path),
        "features_fingerprint": fs.meta.fingerprint,
        "dataset": fs.meta.dataset,
        "backbone": fs.meta.backbone,
        "weights": fs.meta.weights,
        "label": features_label(fs),
        "n_train": len(fs.train),
        "n_val": len(fs.val),
    }


def header(fs: FeatureSet) -> str:
    """The first line of a comparison's markdown."""
    layer = f"; layer {fs.layer} ({fs.feature_dim}-d)" if fs.layer else ""
    return f"Features: `{fs.path}`: {features_label(fs)}{layer}; {len(fs.train)} train / {len(fs.val)} val\n\n"
