"""Crash safety, resume, interrupts, --force, the lock against a second writer, and a fingerprint that covers
everything the features depend on. The kill and Ctrl-C tests run a real ``python -m pipeline extract``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.extract import ExtractConfig, extract, plan_extraction
from pipeline.store import FeatureWriter, read_features, tmp_path_for
from tests.conftest import TINY_EXTRACT, run, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
# Slow enough to stop partway yet cheap: 180 tiny images one per batch (a commit every 8) take about a second,
# mostly per-batch overhead rather than CPU. The subprocess decodes in 2 workers, as a default CPU run does.
SLOW = {**TINY_EXTRACT, "batch_size": 1}
SLOW_ARGS = ["--weights", "none", "--image-size", "32", "--batch-size", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here and in the subprocesses: identical arithmetic on both sides of a resume, and
    no spin-waiting thread team on a shared 2-core machine (tiny batches ran 15x slower with two threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("reliability") / "img", per_class=60)


@pytest.fixture(scope="module")
def reference(big_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted extraction with the same settings, in its own --out (the fingerprint ignores --out)."""
    out = tmp_path_factory.mktemp("reference") / "ref.h5"
    extract(ExtractConfig(dataset=str(big_folder), out=str(out), **SLOW))
    return read_features(out)


def _assert_same_features(path: Path, ref) -> None:
    got = read_features(path)
    assert got.classes == ref.classes and got.meta["fingerprint"] == ref.meta["fingerprint"]
    for name in ("train", "val"):
        assert np.array_equal(got.splits[name].features, ref.splits[name].features), name  # bit-identical
        assert np.array_equal(got.splits[name].labels, ref.splits[name].labels)
        assert np.array_equal(got.splits[name].ids, ref.splits[name].ids)


def _committed(tmp: Path) -> dict[str, int]:
    """The committed progress of a .tmp another process is writing (read without taking its lock)."""
    try:
        with h5py.File(tmp, "r", locking=False) as f:
            return {s: int(f[s].attrs["n_seen"]) for s in ("train", "val")}
    except (OSError, KeyError):
        return {}


def _start(folder: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline", "extract", "--dataset", str(folder), "--out", str(out), *SLOW_ARGS]
    # Own session: a signal to its group reaches the loader workers too, as Ctrl-C in a terminal does.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _wait_for_progress(proc: subprocess.Popen, tmp: Path, timeout: float = 180) -> dict[str, int]:
    """Poll until the first commit (rows on disk) while most of the work is still ahead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _committed(tmp)
        if seen.get("train", 0) > 0:
            return seen
        assert proc.poll() is None, f"extract ended before it could be stopped: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError("no progress committed in time")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_9_then_rerun_resumes_to_identical_features(big_folder: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    tmp = tmp_path_for(out)
    proc = _start(big_folder, out)
    try:
        seen = _wait_for_progress(proc, tmp)
        # Let it write past that commit: rows, id strings and HDF5 structures that no flush saved. (Resuming in
        # place then failed 9 times in 10 with "bad heap index"; the writer now copies the committed rows.)
        time.sleep(0.25)
        os.killpg(proc.pid, signal.SIGSTOP)  # freeze it mid-extraction: holding its lock and its open .tmp
        assert seen["train"] < len(reference.train) and not out.exists()

        # A reader never sees the file being written; a second writer is refused.
        with pytest.raises(PipelineError, match="feature file not found"):
            read_features(out)
        with pytest.raises(PipelineError, match="being written by another process"):
            read_features(tmp)
        with pytest.raises(PipelineError, match="another extract is already writing"):
            extract(ExtractConfig(dataset=str(big_folder), out=str(out), **SLOW))

        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its loader workers live on, orphaned
        proc.wait(timeout=30)
        os.killpg(proc.pid, signal.SIGCONT)
        assert not out.exists() and tmp.exists()

        # Rerun at once, while the orphans may still be alive: neither the lock nor the .tmp is held by them.
        again = extract(ExtractConfig(dataset=str(big_folder), out=str(out), **SLOW))
    finally:
        _kill_group(proc)
    assert again.resumed_from["train"] >= seen["train"] > 0  # resumed, did not start over
    assert not tmp.exists()
    _assert_same_features(out, reference)


def test_ctrl_c_says_how_far_and_resumes(big_folder: Path, reference, tmp_path: Path, capsys) -> None:
    out = tmp_path / "interrupted.h5"
    tmp = tmp_path_for(out)
    proc = _start(big_folder, out)
    try:
        _wait_for_progress(proc, tmp)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group, workers included
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    committed = _committed(tmp)
    total = len(reference.train) + len(reference.val)
    assert lines[0] == (
        f"interrupted: stopped after {sum(committed.values())} of {total} images; "
        f"rerun the same command to resume ({tmp} keeps them)"
    )
    code, text, _ = run(
        ["extract", "--dataset", str(big_folder), "--out", str(out), "--workers", "0", *SLOW_ARGS], capsys
    )
    assert code == 0 and f"resumed a partial extraction at train {committed['train']}" in text
    _assert_same_features(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_extraction_exits_130_and_resumes(
    sig: signal.Signals, image_folder: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The signal arrives for real (sent to this process) in the middle of the loop; main() handles it."""
    out = tmp_path / "f.h5"
    args = ["extract", "--dataset", str(image_folder), "--out", str(out), "--batch-size", "2", "--no-progress"]
    args += ["--weights", "none", "--image-size", "32", "--workers", "0", "--device", "cpu"]
    calls = {"n": 0}
    real_append = FeatureWriter.append

    def append(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # 4 batches of 2 images written, committed every 2 batches
            os.kill(os.getpid(), sig)
        return real_append(self, *a, **kw)

    monkeypatch.setattr(FeatureWriter, "append", append)
    monkeypatch.setattr(FeatureWriter, "__init__", _small_commits(FeatureWriter.__init__))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code, _, err = run(args, capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130
    # The writer thread finishes the append it is in and the batches already queued (at most the ring's 4), so the
    # stop lands between 8 and 18 images: what the message says is what the .tmp committed.
    kept = _committed(Path(f"{out}.tmp"))["train"]
    assert 8 <= kept < 18
    assert (
        err.strip()
        == f"interrupted: stopped after {kept} of 18 images; rerun the same command to resume ({out}.tmp keeps them)"
    )
    assert not out.exists()
    monkeypatch.setattr(FeatureWriter, "append", real_append)
    code, text, _ = run(args, capsys)
    assert code == 0 and f"resumed a partial extraction at train {kept}" in text
    fresh = extract(
        ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "g.h5"), **{**TINY_EXTRACT, "batch_size": 2})
    )
    _assert_same_features(out, read_features(fresh.path))


def _small_commits(init):
    def wrapped(self, *a, **kw):
        init(self, *a, **{**kw, "flush_every": 2})

    return wrapped


def test_force_discards_a_partial_file_and_nothing_else_does(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "f.h5"
    tmp = tmp_path_for(out)
    calls = {"n": 0}
    real_append = FeatureWriter.append

    def append(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_append(self, *a, **kw)

    monkeypatch.setattr(FeatureWriter, "append", append)
    monkeypatch.setattr(FeatureWriter, "__init__", _small_commits(FeatureWriter.__init__))
    cfg = {"dataset": str(image_folder), "out": str(out), **TINY_EXTRACT, "batch_size": 2}
    with pytest.raises(PipelineError, match="stopped after 4 of 18"):
        extract(ExtractConfig(**cfg))
    monkeypatch.setattr(FeatureWriter, "append", real_append)
    partial = tmp.read_bytes()

    with pytest.raises(PipelineError, match="partial extraction with other settings.*--force"):
        extract(ExtractConfig(**{**cfg, "image_size": 48}))
    assert tmp.read_bytes() == partial and not out.exists()  # nothing lost

    forced = extract(ExtractConfig(**{**cfg, "image_size": 48, "force": True}))
    assert forced.resumed_from == {"train": 0, "val": 0} and read_features(out).meta["preprocessing"]["crop_size"] == 48
    with pytest.raises(PipelineError, match="other settings.*--force"):
        extract(ExtractConfig(**cfg))  # a complete file with other settings: refused, kept
    assert read_features(out).meta["preprocessing"]["crop_size"] == 48
    redone = extract(ExtractConfig(**{**cfg, "force": True}))
    assert not redone.reused and read_features(out).meta["preprocessing"]["crop_size"] == 32


# ------------------------------------------------------------------------------------------ the fingerprint


def _fp(folder: Path, **kw: object) -> str:
    return plan_extraction(ExtractConfig(dataset=str(folder), **{**TINY_EXTRACT, **kw})).fp


def test_fingerprint_ignores_what_does_not_change_features(image_folder: Path, tmp_path: Path) -> None:
    base = _fp(image_folder)
    for same in (
        {"out": str(tmp_path / "elsewhere.h5")},
        {"batch_size": 3},
        {"workers": 2},
        {"progress": True},
        {"skip_bad": True},
        {"force": True},
    ):
        assert _fp(image_folder, **same) == base, same


def test_fingerprint_covers_the_images(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "img", per_class=4)
    seen = {_fp(folder)}
    target = folder / "cat" / "001.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: modification time
    seen.add(_fp(folder))
    target.write_bytes(target.read_bytes() + b"\0")  # same name, other size
    seen.add(_fp(folder))
    target.rename(folder / "cat" / "renamed.png")  # same bytes, other name
    seen.add(_fp(folder))
    (folder / "dog" / "000.png").rename(folder / "cat" / "moved.png")  # another class
    seen.add(_fp(folder))
    assert len(seen) == 5


def test_fingerprint_covers_split_seed_and_limit_of_a_split_folder(split_image_folder: Path) -> None:
    fps = {
        _fp(split_image_folder),
        _fp(split_image_folder, limit=4),
        _fp(split_image_folder, limit=5),
        _fp(split_image_folder, limit=4, split_seed=1),  # another seeded sample of the same size
    }
    assert len(fps) == 4


def test_fingerprint_covers_the_weights_file(image_folder: Path, tmp_path: Path) -> None:
    """Two files of the same name with other contents: the file's hash, not its name, is the identity."""
    import torchvision

    def weights(seed: int) -> Path:
        torch.manual_seed(seed)
        path = tmp_path / "w.pt"
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
        return path

    a = _fp(image_folder, weights=str(weights(0)))
    b = _fp(image_folder, weights=str(weights(1)))
    assert a != b and a != _fp(image_folder)


def test_fingerprint_of_a_torchvision_dataset(tmp_path: Path, monkeypatch) -> None:
    """Name, split, length and root (a fake dataset class stands in for a download)."""
    from pipeline import datasets

    class Fake:
        def __init__(self, n: int):
            self.data = np.random.default_rng(n).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
            self.targets = [i % 2 for i in range(n)]
            self.classes = ["a", "b"]

    sizes = {"train": 12, "val": 6}
    monkeypatch.setitem(datasets.TORCHVISION_DATASETS, "fakeset", lambda root, split, download: Fake(sizes[split]))
    source = datasets.load_source("fakeset", data_root=tmp_path / "a")
    assert {k: source.identity[k] for k in ("kind", "name", "lengths")} == {
        "kind": "torchvision",
        "name": "fakeset",
        "lengths": {"train": 12, "val": 6},
    }
    fps = {_fp(Path("fakeset"), data_root=str(tmp_path / "a"))}
    fps.add(_fp(Path("fakeset"), data_root=str(tmp_path / "b")))
    fps.add(_fp(Path("fakeset"), data_root=str(tmp_path / "a"), limit=5))
    sizes["val"] = 7
    fps.add(_fp(Path("fakeset"), data_root=str(tmp_path / "a")))
    assert len(fps) == 4


def test_random_weights_are_seeded_in_the_fingerprint(image_folder: Path, tmp_path: Path) -> None:
    """resnet18(weights=None) draws from the global RNG: the seed fixes it and is part of the fingerprint."""
    torch.manual_seed(123)  # the caller's RNG state must not matter
    a = extract(ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "a.h5"), **TINY_EXTRACT))
    torch.manual_seed(456)
    b = extract(ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "b.h5"), **TINY_EXTRACT))
    c = extract(ExtractConfig(dataset=str(image_folder), out=str(tmp_path / "c.h5"), seed=1, **TINY_EXTRACT))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    fa, fb, fc = (read_features(r.path).train.features for r in (a, b, c))
    assert np.array_equal(fa, fb) and not np.array_equal(fa, fc)
    assert read_features(a.path).meta["weights"] == "none(seed=0)"
