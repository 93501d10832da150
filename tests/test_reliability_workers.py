"""Loader workers that fail: shared memory exhausted, a worker killed, a worker blocked in a system call (issue 24
items 2 and 3). Each runs a real ``python -m pipeline extract`` under ``timeout``, so a regression to the old hang
fails the test instead of hanging it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.stage1.batches as batches
from pipeline.stage1.extract import ExtractConfig, extract
from pipeline.store import read_features, tmp_path_for
from tests.conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
# One image a batch (a commit every 8) with 2 loader workers: a failure lands after some rows are committed.
SLOW = {"backbone": "resnet18", "weights": "none", "image_size": 32, "batch_size": 1, "workers": 2,
        "progress": False, "device": "cpu"}  # fmt: skip
SLOW_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "1",
             "--workers", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("workers") / "img", per_class=20)


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract(ExtractConfig(dataset=str(folder), out=str(out), **{**SLOW, "workers": 0}))
    return read_features(out)


def _same(path: Path, ref) -> None:
    got = read_features(path)
    for name in ("train", "val"):
        assert np.array_equal(got.splits[name].features, ref.splits[name].features), name  # bit-identical
        assert np.array_equal(got.splits[name].ids, ref.splits[name].ids)


def _committed(tmp: Path) -> int:
    import h5py

    with h5py.File(tmp, "r", locking=False) as f:
        return sum(int(f[s].attrs["n_seen"]) for s in ("train", "val"))


def _extract_with(patch: str, args: list[str], *, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` with ``patch`` run first (in the main process; forked workers inherit it)."""
    code = f"import sys\n{patch}\nfrom pipeline.cli import main\nmain(sys.argv[1:])\n"
    cmd = [*(prefix or []), "timeout", "-s", "KILL", "90", sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def _one_line(stderr: str, *fragments: str) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]


# Workers fail to share their 7th batch onwards: what /dev/shm filling up mid-run does (the feeder thread of the
# worker's queue raises "unable to allocate shared memory ... No space left on device").
_SHM_FULL_LATER = """
import os, torch
main_pid, real, n = os.getpid(), torch.UntypedStorage._share_fd_cpu_, [0]
def share(self, *a, **kw):
    if os.getpid() != main_pid:
        n[0] += 1
        if n[0] > 6:
            raise RuntimeError("unable to allocate shared memory(shm): No space left on device (28)")
    return real(self, *a, **kw)
torch.UntypedStorage._share_fd_cpu_ = share
"""


def test_shared_memory_exhausted_ends_the_run_in_one_line_keeping_rows(folder: Path, reference, tmp_path) -> None:
    """Issue 24 item 2: "A worker that fails must end the run within seconds with one line that names shared memory
    and the remedies, keeping committed rows"; the rerun with room is bit-identical. It used to wait for good."""
    out = tmp_path / "f.h5"
    t0 = time.monotonic()
    proc = _extract_with(_SHM_FULL_LATER, ["extract", "--dataset", str(folder), "--out", str(out), *SLOW_ARGS])
    assert time.monotonic() - t0 < 60, "took too long"
    assert proc.returncode == 1, proc.stderr[-3000:]
    _one_line(proc.stderr, "shared memory", "--workers 0", "--batch-size", "--shm-size")
    assert _committed(tmp_path_for(out)) >= 8 and not out.exists()  # a commit made before the failure is kept
    again = extract(ExtractConfig(dataset=str(folder), out=str(out), **SLOW))
    assert sum(again.resumed_from.values()) >= 8
    _same(out, reference)


_KILL_A_WORKER = """
import os, signal, pipeline.stage1.datasets as d
main_pid, real = os.getpid(), d.read_image_file
def load(path):
    if os.getpid() != main_pid and path.name == "015.png" and path.parent.name == "dog":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path)
d.read_image_file = load
"""


def test_a_killed_worker_ends_the_run_in_one_line(folder: Path, reference, tmp_path: Path) -> None:
    """Issue 24 item 2: a loader worker killed (the OOM killer, say) ends the run in one line, not a hang or a
    traceback raised wherever the main process was; the rerun resumes to the same features."""
    out = tmp_path / "f.h5"
    t0 = time.monotonic()
    proc = _extract_with(_KILL_A_WORKER, ["extract", "--dataset", str(folder), "--out", str(out), *SLOW_ARGS])
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1, proc.stderr[-3000:]
    _one_line(proc.stderr, "killed by signal 9", "shared memory", "--workers 0")
    extract(ExtractConfig(dataset=str(folder), out=str(out), **SLOW))
    _same(out, reference)


def test_too_little_shared_memory_up_front_sizes_down_in_one_line(monkeypatch, caplog) -> None:
    """Checked up front: the room in /dev/shm against batch bytes x prefetch x workers; sized down, said once."""
    monkeypatch.setattr(batches, "_said", set())
    mb = 1_000_000
    monkeypatch.setattr(batches, "shared_memory_free", lambda: 100 * mb)
    assert batches.fit_shared_memory(workers=4, prefetch=2, batch_bytes=10 * mb) == (4, 2)  # 100 MB is room enough
    monkeypatch.setattr(batches, "shared_memory_free", lambda: 50 * mb)
    assert batches.fit_shared_memory(workers=2, prefetch=4, batch_bytes=10 * mb) == (2, 1)
    monkeypatch.setattr(batches, "shared_memory_free", lambda: 20 * mb)
    assert batches.fit_shared_memory(workers=2, prefetch=2, batch_bytes=10 * mb) == (0, 2)
    assert batches.fit_shared_memory(workers=2, prefetch=2, batch_bytes=10 * mb) == (0, 2)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("/dev/shm" in s for s in said), said  # each said once, not per split
    assert "--workers 0" in said[1] and "--shm-size" in said[1]


def _root_with_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs over /dev/shm (unshare -m)"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    ok = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return None if ok.returncode == 0 else f"cannot mount a tmpfs in a mount namespace: {ok.stderr.decode()[:200]}"


SMALL_SHM = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "$@"', "sh"]
BIG_BATCH = ["--backbone", "resnet18", "--weights", "none", "--image-size", "224", "--batch-size", "8",
             "--workers", "2", "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.mark.skipif(_root_with_unshare() is not None, reason=str(_root_with_unshare()))
def test_a_1_mib_dev_shm_is_said_and_sized_down_or_ends_in_one_line(folder: Path, tmp_path: Path) -> None:
    """Issue 24 done-when: "extract with a 1 MiB /dev/shm ends within 30 s, one line, committed rows kept, and the
    rerun with room is bit-identical to an uninterrupted run". Batches of 8 x 224 px (1.2 MB) do not fit: the check
    up front decodes in the main process and says so; with the check bypassed, the real failure is one line."""
    small = write_image_folder(tmp_path / "img", per_class=4)
    args = ["extract", "--dataset", str(small), *BIG_BATCH]
    ref = tmp_path / "ref.h5"
    extract(ExtractConfig(dataset=str(small), out=str(ref), **{**SLOW, "image_size": 224, "batch_size": 8}))

    sized = tmp_path / "sized.h5"
    t0 = time.monotonic()
    proc = _extract_with("", [*args, "--out", str(sized)], prefix=SMALL_SHM)
    assert proc.returncode == 0 and time.monotonic() - t0 < 60, proc.stderr[-3000:]
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warned) == 1 and "/dev/shm has 1.0 MB free" in warned[0] and "--workers 0" in warned[0], proc.stderr
    _same(sized, read_features(ref))

    failed = tmp_path / "failed.h5"
    t0 = time.monotonic()
    bypass = "import pipeline.stage1.batches as b\nb.shared_memory_free = lambda: None"
    proc = _extract_with(bypass, [*args, "--out", str(failed)], prefix=SMALL_SHM)
    assert time.monotonic() - t0 < 30 + 15, "the run must end within 30 s (plus start-up)"
    assert proc.returncode == 1, proc.stderr[-3000:]
    _one_line(proc.stderr, "ran out of shared memory", "--workers 0", "--shm-size")
    assert not failed.exists()
    extract(ExtractConfig(dataset=str(small), out=str(failed), **{**SLOW, "image_size": 224, "batch_size": 8}))
    _same(failed, read_features(ref))


def test_sigterm_with_a_worker_blocked_on_a_fifo_exits_within_5_s(tmp_path: Path) -> None:
    """Issue 24 item 3: "Ctrl-C / SIGTERM exit within 5 s with workers". A worker blocked in a system call (here
    open() on a FIFO with no writer: what a path that became a FIFO after the scan does) ignores the polite stop and
    SIGTERM; the main process commits, says how to resume, and kills it instead of waiting for it at exit."""
    folder = write_image_folder(tmp_path / "img", per_class=20)
    out, fifo = tmp_path / "f.h5", tmp_path / "fifo"
    os.mkfifo(fifo)
    patch = (
        "import os, pipeline.stage1.datasets as d\n"
        "main_pid, real = os.getpid(), d.read_image_file\n"
        "def load(path):\n"
        "    if os.getpid() != main_pid and path.name == '015.png' and path.parent.name == 'dog':\n"
        f"        open({str(fifo)!r}, 'rb')  # blocks: nobody writes\n"
        "    return real(path)\n"
        "d.read_image_file = load\n"
    )
    code = f"import sys\n{patch}\nfrom pipeline.cli import main\nmain(sys.argv[1:])\n"
    args = ["extract", "--dataset", str(folder), "--out", str(out), *SLOW_ARGS, "--skip-bad"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not tmp_path_for(out).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # a worker is now blocked in open() on the FIFO
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIGTERM did not end the run") from None
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == 130, err[-3000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert took < 5, f"SIGTERM took {took:.1f} s"
