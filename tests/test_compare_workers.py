"""compare's heads, two at a time in forked workers (:mod:`pipeline.workers`): the same answers as one after another,
failures raised in the parent, and no worker left behind by an error, Ctrl-C or a ``kill -9`` of the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import workers
from pipeline.bench.heads import ONE_AFTER_ANOTHER
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
FORKS = pytest.mark.skipif(sys.platform != "linux", reason="workers fork on Linux only")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@FORKS
def test_jobs_run_in_other_processes_and_answer_in_their_own_order() -> None:
    jobs = [lambda i=i: (i, os.getpid()) for i in range(5)]
    got = workers.run_jobs(jobs, ways=2, order=[4, 2, 0, 1, 3])
    assert [i for i, _ in got] == [0, 1, 2, 3, 4]
    assert all(pid != os.getpid() for _, pid in got) and len({pid for _, pid in got}) == 5
    assert workers.run_jobs(jobs, ways=1) == [(i, os.getpid()) for i in range(5)]  # one way: here, in order


_WARMED: list[tuple[int, bool]] = []  # who ran ``warm``, and whether the objects were frozen (gc.freeze) then


@FORKS
def test_warm_runs_once_beside_the_first_job_and_the_later_children_inherit_it() -> None:
    """``warm`` (compare's matplotlib import) runs in the parent once the first child has started: that child
    forked without what it loads, every child forked after it has it; and the parent's objects are out of the
    collector's reach only while the children run (``gc.freeze``)."""
    import gc

    def warm() -> None:
        _WARMED.append((os.getpid(), gc.get_freeze_count() > 0))

    def job() -> tuple[int, bool]:
        time.sleep(0.3)  # the first child is still running when the parent warms
        return os.getpid(), bool(_WARMED)

    _WARMED.clear()
    got = workers.run_jobs([job, job, job], ways=2, warm=warm)
    assert [(os.getpid(), True)] == _WARMED  # once, here, while the children's objects were frozen
    assert [seen for _, seen in got] == [False, True, True]
    assert gc.get_freeze_count() == 0  # unfrozen after: later collections see every object again
    _WARMED.clear()
    assert workers.run_jobs([job, job], ways=1, warm=warm) == [(os.getpid(), True)] * 2  # one way: warm first
    assert [(os.getpid(), False)] == _WARMED


@FORKS
def test_a_worker_takes_every_core_once_the_other_has_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """While two jobs run, each may use half the cores (``fitting.in_pieces`` splits its matmuls that many ways);
    once one has ended, the other may use them all; outside ``run_jobs`` a process has them all."""
    from pipeline.stage2.heads import fitting

    monkeypatch.setattr(workers, "cores", lambda: 2)

    def short() -> int:
        time.sleep(1.0)  # still running while the other job reads its share
        return workers.share_of_cores()

    def long() -> tuple[int, int]:
        beside = fitting._ways()
        deadline = time.monotonic() + 20
        while workers.share_of_cores() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        return beside, fitting._ways()

    assert workers.run_jobs([short, long], ways=2) == [1, (1, 2)]
    assert workers.share_of_cores() == 2 and workers._RUNNING is None  # the shared count is gone with the jobs


def test_the_costliest_heads_start_first_and_of_equal_costs_the_one_that_spreads_last() -> None:
    from pipeline.stage2.training import start_order

    names = ["linear", "logreg", "mlp", "knn", "centroid"]
    assert [names[i] for i in start_order(names)] == ["mlp", "logreg", "knn", "linear", "centroid"]
    assert [["tail", "ridge"][i] for i in start_order(["tail", "ridge"])] == ["tail", "ridge"]


@FORKS
def test_heads_train_one_after_another_where_a_forked_child_could_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two at a time on a CPU; one on a GPU, and one after this process ran autograd in a way that leaves forked
    children unable to (PyTorch's "Unable to handle autograd's threading in combination with fork-based
    multiprocessing": the test process itself, after some tests) or initialised CUDA."""
    import torch

    monkeypatch.setattr(workers, "cores", lambda: 2)
    monkeypatch.setattr(workers, "fork_can_train", lambda: True)
    assert workers.worker_count(5, device=torch.device("cpu")) == 2
    assert workers.worker_count(1, device=torch.device("cpu")) == 1
    assert workers.worker_count(5, device=torch.device("cuda")) == 1
    monkeypatch.setattr(workers, "available_memory", lambda: 6 * 10**9)  # needs 7 copies of the features
    assert workers.worker_count(5, device=torch.device("cpu"), data_bytes=10**9) == 1  # two heads would not fit
    assert workers.worker_count(5, device=torch.device("cpu"), data_bytes=10**8) == 2
    monkeypatch.setattr(workers, "fork_can_train", lambda: False)
    assert workers.worker_count(5, device=torch.device("cpu")) == 1


_POISON = "import torch\n{}\nfrom pipeline import workers\nprint(workers.fork_can_train())\n"


def test_fork_can_train_says_whether_a_forked_child_can_run_a_backward() -> None:
    """A fresh process can; after CUDA was initialised (faked) it cannot."""
    fresh = subprocess.run([sys.executable, "-c", _POISON.format("")], cwd=ROOT, capture_output=True, text=True)
    assert fresh.stdout.strip() == "True", fresh.stderr[-2000:]
    fake = "torch.cuda.is_initialized = lambda: True"
    cuda = subprocess.run([sys.executable, "-c", _POISON.format(fake)], cwd=ROOT, capture_output=True, text=True)
    assert cuda.stdout.strip() == "False", cuda.stderr[-2000:]


def _sleeper(pids: Path) -> int:
    pids.write_text(str(os.getpid()))
    time.sleep(60)
    return 0


@FORKS
@pytest.mark.parametrize("error", [PipelineError("bad input: one line"), ValueError("a bug")])
def test_a_failing_job_is_raised_in_the_parent_and_stops_the_other(error: Exception, tmp_path: Path) -> None:
    def fail() -> int:
        while not (tmp_path / "pid").is_file():  # the other job is running
            time.sleep(0.01)
        raise error

    started = time.monotonic()
    with pytest.raises(PipelineError) as caught:
        workers.run_jobs([lambda: _sleeper(tmp_path / "pid"), fail], ways=2)
    assert time.monotonic() - started < 20  # not the sleeper's 60 s
    if isinstance(error, PipelineError):
        assert str(caught.value) == "bad input: one line"
    else:  # a bug: its type, message and the child's traceback, which would be lost with the child
        assert "ValueError: a bug" in str(caught.value) and "Traceback" in str(caught.value)
    assert not _alive(int((tmp_path / "pid").read_text()))  # stopped and reaped: no orphan keeps running


@FORKS
def test_a_job_alongside_runs_in_another_process_while_the_block_runs_here(tmp_path: Path) -> None:
    """compare.png drawn by a forked child while the parent tests the ties: both at once, the child waited for."""

    def job() -> None:
        (tmp_path / "child").write_text(str(os.getpid()))
        while not (tmp_path / "parent").is_file():  # the block is running at the same time
            time.sleep(0.01)

    with workers.alongside(job):
        deadline = time.monotonic() + 20
        while not (tmp_path / "child").is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp_path / "parent").write_text("here")
    assert int((tmp_path / "child").read_text()) != os.getpid()
    assert not _alive(int((tmp_path / "child").read_text()))  # waited for and reaped


@FORKS
def test_a_job_alongside_that_fails_is_raised_after_the_block(tmp_path: Path) -> None:
    ran = []
    with (
        pytest.raises(PipelineError, match="bad input: one line"),
        workers.alongside(lambda: _fail_with("bad input: one line")),
    ):
        ran.append("block")
    assert ran == ["block"]


@FORKS
def test_a_block_that_fails_stops_the_job_alongside(tmp_path: Path) -> None:
    with pytest.raises(KeyError), workers.alongside(lambda: _sleeper(tmp_path / "pid")):
        deadline = time.monotonic() + 20
        while not (tmp_path / "pid").is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise KeyError("the block's own error")
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_a_job_alongside_runs_here_after_the_block_on_one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "cores", lambda: 1)
    order = []
    with workers.alongside(lambda: order.append(("job", os.getpid()))):
        order.append(("block", os.getpid()))
    assert order == [("block", os.getpid()), ("job", os.getpid())]


def _fail_with(message: str) -> None:
    raise PipelineError(message)


_PARENT = """
import sys, time
from pathlib import Path
from pipeline import workers
folder = Path(sys.argv[1])
def job(i):
    def run():
        (folder / f"{i}.pid").write_text(str(__import__("os").getpid()))
        time.sleep(60)
    return run
workers.run_jobs([job(0), job(1)], ways=2)
"""


@FORKS
def test_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """``kill -9`` of the parent: its workers die with it (PR_SET_PDEATHSIG), none keeps writing."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.kill()
        parent.wait(10)
        assert _wait_gone(pids, timeout=10)
    finally:
        parent.kill()


@pytest.fixture
def features(make_feature_file) -> Path:
    return make_feature_file(n_train=3000, n_val=600, dim=64, classes=5, spread=2.0)


@FORKS
def test_compare_in_workers_gives_what_one_after_another_gives(features: Path, tmp_path: Path) -> None:
    """Each run in a fresh process (a test process may have run autograd, after which compare trains one head after
    another): the rows, the best head and every head's per-image answers are the same either way."""
    args = ["compare", "--features", str(features), "--device", "cpu", "--epochs", "3", "--out"]
    runs = {"together": [sys.executable, "-m", "pipeline"], "alone": [sys.executable, "-c", ONE_AFTER_ANOTHER]}
    results = {}
    for name, start in runs.items():
        proc = subprocess.run([*start, *args, str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = json.loads((tmp_path / name / "compare.json").read_text())
    together, alone = results["together"], results["alone"]
    assert (together["heads_at_once"], alone["heads_at_once"]) == (2, 1)
    keys = ("head", "val_accuracy", "val_loss", "train_accuracy", "balanced_accuracy")
    assert [{k: r[k] for k in keys} for r in together["rows"]] == [{k: r[k] for k in keys} for r in alone["rows"]]
    assert together["best"] == alone["best"] and len(together["rows"]) == 5
    for head in ("linear", "logreg", "mlp", "knn", "centroid"):  # every head's folder whole, the same answers
        a, b = (tmp_path / run / head / "predictions.csv" for run in runs)
        assert a.read_text() == b.read_text()


@FORKS
@pytest.mark.parametrize("head", ["linear", "centroid"])
def test_figures_drawn_half_in_a_forked_child_are_the_files_drawn_here(
    head: str, features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a core is idle (the last head of a comparison, train-head) half of a head's figures are drawn in a
    forked child: the same files, byte for byte, as all of them drawn here."""
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.training import train_head

    forked, real = [], workers.alongside

    def spy(job):  # type: ignore[no-untyped-def]
        forked.append(job)
        return real(job)

    monkeypatch.setattr(workers, "alongside", spy)
    cfg = HeadConfig(head=head, epochs=2, device="cpu")
    monkeypatch.setattr(workers, "idle_core", lambda: True)
    train_head(features, cfg, out=tmp_path / "split")
    assert len(forked) == 1
    monkeypatch.setattr(workers, "idle_core", lambda: False)
    train_head(features, cfg, out=tmp_path / "here")
    assert len(forked) == 1  # not forked this time
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "split").iterdir())
    pngs = [n for n in names if n.endswith(".png")]
    assert {"confusion.png", "pr_roc.png"} <= set(pngs)
    for name in [*pngs, "predictions.csv", "head.safetensors"]:
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@FORKS
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_compare_stopped_while_heads_train_leaves_no_worker_and_no_partial_head(
    sig: signal.Signals, make_feature_file, tmp_path: Path
) -> None:
    """Ctrl-C or SIGTERM while two heads train: exit 130 with one line, the workers stopped and gone, no temporary
    or partial head folder left; a rerun then writes every head."""
    features = make_feature_file(n_train=20_000, n_val=2_000, dim=256, classes=10, spread=0.3)
    out = tmp_path / "cmp"
    args = ["compare", "--features", str(features), "--out", str(out), "--device", "cpu", "--epochs", "40"]
    # Ctrl-C as in a terminal: a suite run as a background job (`make test &`) hands its children SIGINT ignored,
    # which the CLI keeps (a background job's Ctrl-C is not its own)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = _children(proc.pid)
        assert len(kids) == 2, "two heads never trained at once"
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-2000:]
    assert _wait_gone(kids, timeout=5)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no .<head>.tmp left
    for folder in (p for p in out.iterdir() if p.is_dir()):  # a head written before the stop is whole
        assert json.loads((folder / "config.json").read_text())["head"] == folder.name
        assert (folder / "metrics.json").is_file() and (folder / "predictions.csv").is_file()
    rerun = subprocess.run([sys.executable, "-m", "pipeline", *args[:-2], "--epochs", "2", "--force"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {r["head"] for r in json.loads((out / "compare.json").read_text())["rows"]} >= {"linear", "knn"}
