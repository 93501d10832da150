"""Stage one over many processes: ``torchrun --nproc-per-node N -m pipeline extract ...``.

Each rank extracts a contiguous, non-overlapping slice of every split, rows ``[n*r//W, n*(r+1)//W)``, into
its own shard file ``<out>.shard-<r>-of-<W>.h5`` through the ordinary single-process path (so each shard is
crash-safe and resumable exactly like a normal feature file). Rank 0 then copies the shards, in rank order,
into ``<out>``: the same rows in the same order, the same fingerprint and metadata as a single-process run.

No sampler padding (``DistributedSampler`` repeats samples to even out ranks) and no tensor ever crosses
ranks: the ranks only need to tell rank 0 "done" or "failed" and show they are alive, which the launcher's
key-value store does. So there is no NCCL or gloo collective at all, and CPU-only machines run it unchanged.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.stage1.datasets import rank_rows
from pipeline.stage1.extract import (
    ExtractConfig,
    ExtractPlan,
    ExtractResult,
    extract,
    meta_from_plan,
    output_columns,
    plan_extraction,
    refresh_targets,
    reuse_existing,
)
from pipeline.store import FeatureReadError, FeatureWriter, FileLock, StoredFile, read_meta

log = logging.getLogger(__name__)

TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT"  # seconds a rank may show no sign of life before rank 0 gives up
DEFAULT_TIMEOUT_S = 300.0
_BEAT_S = 5.0


# ------------------------------------------------------------------------------------------ shards


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-sample split that ``rank`` of ``world`` extracts (sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}.h5")


def shard_plan(plan: ExtractPlan, *, rank: int, world: int) -> ExtractPlan:
    """The same plan (model, fingerprint) narrowed to ``rank``'s rows of every split and its shard file."""
    splits = {
        name: split.subset(np.arange(*rank_rows(split, rank, world)))  # WebDataset shards stay whole
        for name, split in plan.source.splits.items()
    }
    return replace(plan, source=replace(plan.source, splits=splits), out=shard_path(plan.out, rank, world))


def extract_shard(cfg: ExtractConfig, *, plan: ExtractPlan, rank: int, world: int) -> ExtractResult:
    """Extract (or resume, or reuse) one rank's shard file."""
    return extract(cfg, plan=shard_plan(plan, rank=rank, world=world))


# ------------------------------------------------------------------------------------------ merging


def _open_shard(path: Path, fp: str, rank: int) -> StoredFile:
    if not path.exists():
        raise PipelineError(
            f"shard {path} is missing (rank {rank} did not finish, or --out is not on a filesystem all nodes "
            "share); rerun the same command to redo only the missing work"
        )
    return StoredFile(path, fingerprint=fp)


def remove_leftover_shards(out: Path, *, fp: str) -> list[Path]:
    """Delete the shards of a complete ``out`` (left when a merge was killed between its rename and their
    deletion): complete files of the same fingerprint named ``<out>.shard-*``. Returns what was deleted."""
    removed = []
    for p in sorted(out.parent.glob(f"{glob.escape(out.name)}.shard-*-of-*.h5")):
        try:
            same = read_meta(p).fingerprint == fp
        except PipelineError:
            same = False
        if same:
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.warning("deleted %d leftover shard files of the complete %s", len(removed), out)
    return removed


def merge_shards(cfg: ExtractConfig, *, plan: ExtractPlan, world: int) -> ExtractResult:
    """Copy the ``world`` complete shards, in rank order, into ``plan.out`` (``.tmp`` + rename), then delete them.

    The merge writes through the same :class:`FeatureWriter` as a plain run, so a partial ``.tmp`` follows the one
    policy of :mod:`pipeline.store`: one of these settings (a merge cut short, or a plain run's) is resumed, one of
    other settings is refused unless --force. Its metadata is built from the plan, as a plain run's is.
    """
    t0, out = time.perf_counter(), plan.out
    paths = [shard_path(out, r, world) for r in range(world)]
    sizes = {s: len(v) for s, v in plan.source.splits.items()}
    with FileLock(out):
        reused = reuse_existing(plan, force=cfg.force)
        if reused:
            return reused
        shards: list[StoredFile] = []
        try:
            shards = [_open_shard(p, plan.fp, r) for r, p in enumerate(paths)]
            shard_seconds = [s.meta.extract_seconds or 0.0 for s in shards]
            writer = FeatureWriter(
                out,
                meta=meta_from_plan(plan, config=asdict(cfg)),
                classes=plan.source.classes,
                sizes=sizes,
                feature_dim=plan.backbone.feature_dim,
                dtype=cfg.dtype,
                files=plan.source.files,
                restart=cfg.force,
                columns=output_columns(plan.backbone),  # --cache-at's activation maps, merged like the features
            )
            try:
                for name in sizes:
                    writer.extend_from(shards, name)
            except FeatureReadError as e:
                writer.close()
                raise PipelineError(f"{e}; delete that shard and rerun the same command to redo its rows") from None
            except BaseException:
                writer.close()  # committed rows stay in the .tmp: a rerun resumes the merge
                raise
            skipped = {s: writer.skipped(s) for s in sizes}
            writer.finish(
                {
                    "extract_seconds": round(max(shard_seconds), 3),
                    "merge": {"shards": world, "seconds": round(time.perf_counter() - t0, 3)},
                    "resumed_from": writer.start,  # rows a partial .tmp of these settings already held
                },
                targets=plan.targets,
            )
        finally:
            for f in shards:
                f.close()
    # The merged file is complete under its final name, so the shards are redundant: keeping them would double
    # the disk used, and a rerun reuses the merged file without looking at them. Had this process died before
    # the rename, they would still be here for the rerun to merge again.
    for p in paths:
        p.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    counts = {s: n - len(skipped[s]) for s, n in sizes.items()}
    log.info("merged %d shards into %s in %.2f s", world, out, seconds)
    return ExtractResult(path=out, reused=False, counts=counts, skipped=skipped, seconds=seconds, fingerprint=plan.fp)


# ------------------------------------------------------------------------------------------ coordination


class _Heartbeat:
    """Bumps ``beat/<rank>`` in the store every few seconds from a thread, so rank 0 can tell slow from dead."""

    def __init__(self, store: object, rank: int):
        self.store, self.key, self._stop = store, f"beat/{rank}", threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 - store gone: rank 0 has stopped caring; keep extracting
                return
            self._stop.wait(_BEAT_S)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def wait_for(store: object, keys: dict[int, str], *, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until every rank in ``keys`` has set its key to "ok". A rank that reports a failure, or whose
    heartbeat stops for ``timeout_s``, is a one-line error (slow ranks are waited for as long as they live)."""
    pending = dict(keys)
    last = {r: (-1, time.monotonic()) for r in pending}
    try:
        while pending:
            for r, key in sorted(pending.items()):
                if store.check([key]):
                    status = store.get(key).decode()
                    if status != "ok":
                        raise PipelineError(f"rank {r} failed ({status}); finished shards are kept: rerun the command")
                    del pending[r]
                    continue
                beat, now = store.add(f"beat/{r}", 0), time.monotonic()
                if beat != last[r][0]:
                    last[r] = (beat, now)
                elif now - last[r][1] > timeout_s:
                    raise PipelineError(
                        f"rank {r} showed no sign of life for {timeout_s:.0f} s ({TIMEOUT_ENV} sets the limit); "
                        f"finished shards are kept: rerun the same command to redo only the missing work"
                    )
            if pending:
                time.sleep(poll_s)
    except (RuntimeError, OSError) as e:  # torch's DistStoreError is a RuntimeError
        raise PipelineError(f"lost contact with the torchrun store while waiting for the other ranks: {e}") from None


def wait_for_ranks(store: object, world: int, *, timeout_s: float, poll_s: float = 1.0) -> None:
    """Rank 0: block until ranks ``1..world-1`` have finished their shards."""
    wait_for(store, {r: f"done/{r}" for r in range(1, world)}, timeout_s=timeout_s, poll_s=poll_s)


def _plan(cfg: ExtractConfig, *, rank: int, store: object, timeout_s: float) -> ExtractPlan:
    # Rank 0 loads the dataset first: N processes downloading one torchvision dataset into one folder at
    # once would corrupt it. The others then find it in place (planning is seconds; extraction is hours).
    if rank != 0:
        wait_for(store, {0: "planned"}, timeout_s=timeout_s)
        return plan_extraction(cfg)
    try:
        plan = plan_extraction(cfg)
    except BaseException as e:
        _set(store, "planned", _status(e))
        raise
    _set(store, "planned", "ok")
    return plan


def extract_distributed(cfg: ExtractConfig, *, rank: int, world: int, store: object, timeout_s: float) -> ExtractResult:
    """One rank's part: its shard, then (rank 0) wait for the others and merge. Returns the shard's result on
    ranks > 0 and the merged file's on rank 0."""
    t0 = time.perf_counter()
    with _Heartbeat(store, rank):
        try:
            plan = _plan(cfg, rank=rank, store=store, timeout_s=timeout_s)
            if world == 1:  # nothing to split or merge: write --out directly, as the plain command does
                result = extract(cfg, plan=plan)
            elif reused := reuse_existing(plan, force=cfg.force):  # every rank sees the same file: all reuse
                if rank == 0:
                    remove_leftover_shards(plan.out, fp=plan.fp)
                    if reused.targets_stale:  # a changed --targets CSV: attached without running the backbone
                        with FileLock(plan.out):
                            reused = refresh_targets(plan, reused, cfg=cfg)
                result = reused
            else:
                result = extract_shard(cfg, plan=plan, rank=rank, world=world)
        except BaseException as e:
            _set(store, f"done/{rank}", _status(e))
            raise
        _set(store, f"done/{rank}", "ok")
    if rank != 0 or world == 1 or result.path == plan.out:
        return result
    wait_for_ranks(store, world, timeout_s=timeout_s)
    merged = merge_shards(cfg, plan=plan, world=world)
    merged.seconds = time.perf_counter() - t0
    merged.images_per_second = sum(merged.counts.values()) / merged.seconds if merged.seconds > 0 else 0.0
    return merged


def _status(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""  # rank 0 repeats it in a one-line error
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _set(store: object, key: str, status: str) -> None:
    try:
        store.set(key, status)
    except Exception:  # noqa: BLE001 - the store is gone (rank 0 died); our own shard file is what matters
        log.warning("could not report %s=%r to the other ranks", key, status)


# ------------------------------------------------------------------------------------------ torchrun


def launched_by_torchrun() -> bool:
    """True when the env:// variables of torchrun (or another launcher that sets them) are present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise PipelineError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise PipelineError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {raw!r}")
    return value


def _bind_device(cfg: ExtractConfig, local_rank: int) -> None:
    """One GPU per process: make plain ``cuda`` mean ``cuda:LOCAL_RANK`` (the metadata then reads as usual)."""
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise PipelineError(f"LOCAL_RANK {local_rank} but this machine has {n} GPUs; use --nproc-per-node {n}")
        torch.cuda.set_device(local_rank)


def extract_torchrun(cfg: ExtractConfig) -> ExtractResult:
    """:func:`extract_distributed` with rank, world size and store taken from torchrun's environment."""
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise PipelineError(f"RANK {rank} is outside WORLD_SIZE {world}")
    timeout_s = _timeout_s()
    _bind_device(cfg, local_rank)
    import torch.distributed as dist

    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    except (RuntimeError, ValueError, OSError) as e:
        raise PipelineError(f"cannot reach the torchrun rendezvous store: {str(e).splitlines()[0]}") from None
    # Keys of an earlier attempt (torchrun --max-restarts) or another run must not be read as this one's.
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = dist.PrefixStore(f"pipeline-extract/{run}/", store)
    return extract_distributed(cfg, rank=rank, world=world, store=store, timeout_s=timeout_s)
