"""Sharded extraction: contiguous shards, a merge equal to the single-process file, resume after a dead rank."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.distributed as dist

from pipeline.errors import PipelineError
from pipeline.stage1.distributed import (
    extract_distributed,
    extract_shard,
    merge_shards,
    shard_bounds,
    shard_path,
    wait_for,
    wait_for_ranks,
)
from pipeline.stage1.extract import ExtractConfig, extract, plan_extraction
from pipeline.store import read_features, read_meta, tmp_path_for
from tests.conftest import TINY_ARGS, TINY_EXTRACT, write_image_folder

# Rows computed in a batch of another size differ in the last bits on CPU (oneDNN picks kernels by batch
# shape): measured up to 1.7e-6 absolute on features of magnitude up to 2.8. Shards change the batch
# composition, so the comparison allows 1e-5; ids, labels, classes and metadata must match exactly.
ATOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _cfg(folder: Path, out: Path, **kw: object) -> ExtractConfig:
    return ExtractConfig(dataset=str(folder), out=str(out), **{**TINY_EXTRACT, **kw})


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """3 classes x 7 images: 18 train / 3 val, so two shards are uneven."""
    return write_image_folder(tmp_path / "images", per_class=7)


def assert_same_features(a: Path, b: Path) -> None:
    fa, fb = read_features(a), read_features(b)
    assert fa.classes == fb.classes
    for key in ("fingerprint", "backbone", "weights", "feature_dim", "preprocessing", "dataset_identity"):
        assert getattr(fa.meta, key) == getattr(fb.meta, key), key
    for name in ("train", "val"):
        sa, sb = fa.splits[name], fb.splits[name]
        assert list(sa.ids) == list(sb.ids) and np.array_equal(sa.labels, sb.labels)
        np.testing.assert_allclose(sa.features, sb.features, rtol=0, atol=ATOL)
        with h5py.File(a) as ha, h5py.File(b) as hb:
            assert dict(ha[name].attrs) == dict(hb[name].attrs)  # n_total, n_seen, n_rows, skipped


def test_shards_cover_every_row_exactly_once() -> None:
    for n in range(0, 25):
        for world in range(1, 6):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            rows = [i for lo, hi in bounds for i in range(lo, hi)]
            assert rows == list(range(n))  # contiguous, in order, no padding, no repeats
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_torchrun_two_ranks_equal_single_process(odd_folder: Path, tmp_path: Path) -> None:
    single, merged = tmp_path / "single.h5", tmp_path / "merged.h5"
    extract(_cfg(odd_folder, single))
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pipeline",
        "extract",
        "--dataset",
        str(odd_folder),
        *TINY_ARGS,
        "--out",
        str(merged),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {merged}: train 18, val 3" in done.stdout
    assert_same_features(single, merged)
    assert read_meta(merged).merge["shards"] == 2  # provenance: merged from 2 shards (a dict, as written)
    assert not list(tmp_path.glob("merged.h5.shard-*"))  # merged, so the shards are gone


def test_dead_rank_redoes_only_its_shard(odd_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    single, out = tmp_path / "single.h5", tmp_path / "out.h5"
    extract(_cfg(odd_folder, single))
    cfg = _cfg(odd_folder, out)
    plan = plan_extraction(cfg)
    for rank in (0, 1):
        extract_shard(cfg, plan=plan, rank=rank, world=2)
    # Rank 1 "died" after its first flush: only a .tmp with 3 of its 9 train rows remains.
    s1 = shard_path(out, 1, 2)
    with h5py.File(s1, "a") as f:
        f.attrs["complete"] = False
        for key in ("features", "labels", "ids"):
            f["train"][key].resize(3, axis=0)
        f["train"].attrs.update(n_rows=3, n_seen=3)
        f["val"].attrs.update(n_rows=0, n_seen=0)
    s1.rename(tmp_path_for(s1))
    with pytest.raises(PipelineError, match=r"rank 1 did not finish"):
        merge_shards(cfg, plan=plan, world=2)
    s0_mtime = shard_path(out, 0, 2).stat().st_mtime_ns

    caplog.set_level("INFO", logger="pipeline.stage1.extract")
    assert extract_shard(cfg, plan=plan, rank=0, world=2).reused
    redone = extract_shard(cfg, plan=plan, rank=1, world=2)
    assert not redone.reused and "resuming train at sample 3 of 9" in caplog.text
    assert shard_path(out, 0, 2).stat().st_mtime_ns == s0_mtime

    merged = merge_shards(cfg, plan=plan, world=2)
    assert merged.path == out and not merged.reused
    assert_same_features(single, out)
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()
    # A rerun finds the merged file complete and reuses it on every rank, without shards.
    store = dist.HashStore()
    store.set("planned", "ok")  # rank 0 has loaded the dataset (the others wait for that)
    assert extract_distributed(cfg, rank=1, world=2, store=store, timeout_s=5).reused


def test_skip_bad_lists_are_merged_in_order(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=7)
    for bad in ("cat/001.png", "dog/005.png", "bird/006.png"):
        (folder / bad).write_bytes(b"not an image")
    single, out = tmp_path / "single.h5", tmp_path / "out.h5"
    expected = extract(_cfg(folder, single, skip_bad=True))
    assert sum(map(len, expected.skipped.values())) == 3
    # Both ranks in this process, sharing one store: rank 1 reports done, then rank 0 waits and merges.
    store, cfg = dist.HashStore(), _cfg(folder, out, skip_bad=True)
    store.set("planned", "ok")  # rank 0 has loaded the dataset (rank 1 waits for that)
    extract_distributed(cfg, rank=1, world=2, store=store, timeout_s=5)
    result = extract_distributed(cfg, rank=0, world=2, store=store, timeout_s=5)
    assert result.path == out and result.skipped == expected.skipped and result.counts == expected.counts
    assert_same_features(single, out)


def test_a_failed_or_silent_rank_is_a_one_line_error() -> None:
    store = dist.HashStore()
    store.set("done/1", "PipelineError: cannot read image x.png")
    store.set("planned", "PipelineError: no such folder")
    with pytest.raises(PipelineError, match=r"rank 1 failed \(PipelineError: cannot read image x.png\)"):
        wait_for_ranks(store, 2, timeout_s=5, poll_s=0.01)
    with pytest.raises(PipelineError, match=r"rank 0 failed \(PipelineError: no such folder\)"):
        wait_for(store, {0: "planned"}, timeout_s=5)  # ranks > 0 waiting for rank 0 to load the dataset
    store = dist.HashStore()
    store.set("done/1", "ok")
    with pytest.raises(PipelineError, match=r"rank 2 showed no sign of life for 0 s") as e:
        wait_for_ranks(store, 3, timeout_s=0.2, poll_s=0.05)
    assert "\n" not in str(e.value)


def test_merge_keeps_a_partial_file_of_other_settings(odd_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    cfg = _cfg(odd_folder, out)
    plan = plan_extraction(cfg)
    for rank in (0, 1):
        extract_shard(cfg, plan=plan, rank=rank, world=2)
    other = tmp_path_for(out)
    with h5py.File(other, "w") as f:
        f.attrs["fingerprint"] = "someone-elses-settings"
    before = other.read_bytes()
    with pytest.raises(PipelineError, match="partial extraction with other settings.*--force"):
        merge_shards(cfg, plan=plan, world=2)
    assert other.read_bytes() == before and shard_path(out, 0, 2).exists()
    merged = merge_shards(replace(cfg, force=True), plan=plan, world=2)
    assert merged.path == out and not other.exists()


def test_distributed_needs_no_h5py_and_no_private_names() -> None:
    import ast

    tree = ast.parse((REPO / "pipeline" / "stage1" / "distributed.py").read_text())
    imported = [
        (node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    ]
    imported += [(alias.name, "") for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m, _ in imported if m and m.startswith("h5py")]
    assert not [(m, n) for m, n in imported if n.startswith("_")]


def test_leftover_shards_of_a_complete_file_are_deleted(odd_folder: Path, tmp_path: Path, caplog) -> None:
    """Killed between the merge's rename and the shards' deletion: the rerun reuses the file and deletes them."""
    out = tmp_path / "out.h5"
    cfg = _cfg(odd_folder, out)
    plan = plan_extraction(cfg)
    for rank in (0, 1):
        extract_shard(cfg, plan=plan, rank=rank, world=2)
    kept = [shard_path(out, r, 2).read_bytes() for r in (0, 1)]
    merge_shards(cfg, plan=plan, world=2)
    for r in (0, 1):
        shard_path(out, r, 2).write_bytes(kept[r])
    (tmp_path / "out.h5.shard-0-of-3.h5").write_bytes(b"someone else's")  # not a shard of this file: kept
    store = dist.HashStore()
    store.set("planned", "ok")
    assert extract_distributed(cfg, rank=0, world=2, store=store, timeout_s=5).reused
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()
    assert (tmp_path / "out.h5.shard-0-of-3.h5").exists()
    assert "deleted 2 leftover shard files" in caplog.text


def test_the_merge_follows_the_one_partial_file_policy(odd_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """A .tmp of these settings (here a plain run's, stopped after 4 rows) is resumed by the merge, as by a plain
    run; one that HDF5 cannot open (killed before its first commit) is replaced by both."""
    from pipeline.store import FeatureWriter

    single, out = tmp_path / "single.h5", tmp_path / "out.h5"
    extract(_cfg(odd_folder, single))
    cfg = _cfg(odd_folder, out, batch_size=2)
    real_append, calls = FeatureWriter.append, {"n": 0}

    def append(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_append(self, *a, **kw)

    real_init = FeatureWriter.__init__
    monkeypatch.setattr(
        FeatureWriter, "__init__", lambda self, *a, **kw: real_init(self, *a, **{**kw, "flush_every": 2})
    )
    monkeypatch.setattr(FeatureWriter, "append", append)
    with pytest.raises(PipelineError, match="stopped after 4"):
        extract(cfg)
    monkeypatch.undo()
    plan = plan_extraction(cfg)
    for rank in (0, 1):
        extract_shard(cfg, plan=plan, rank=rank, world=2)
    merge_shards(cfg, plan=plan, world=2)
    assert read_meta(out).resumed_from == {"train": 4, "val": 0}
    assert_same_features(single, out)

    unreadable = single.read_bytes()[:600]  # an HDF5 signature, then nothing usable
    for merged in (True, False):
        out.unlink()
        tmp_path_for(out).write_bytes(unreadable)
        if merged:
            for rank in (0, 1):
                extract_shard(cfg, plan=plan, rank=rank, world=2)
            merge_shards(cfg, plan=plan, world=2)
        else:
            extract(cfg)
        assert_same_features(single, out)
