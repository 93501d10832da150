"""Start-up: help and version print without importing torch, torchvision or scikit-learn (issue 23)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "sklearn")
# Runs the CLI's main on argv, then prints which heavy modules it left imported.
PROBE = (
    "import sys, pipeline.cli as c\n"
    "try:\n    c.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
)


def _heavy(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("HEAVY="))
    return [m for m in line[len("HEAVY=") :].split(",") if m]


@pytest.mark.parametrize(
    "argv", [(), ("--help",), ("--version",), ("extract", "--help"), ("baseline", "--help")], ids=" ".join
)
def test_light_commands_import_no_torch(argv: tuple[str, ...]) -> None:
    assert _heavy(*argv) == []


@pytest.mark.parametrize("argv", [("train-head", "--help"), ("compare", "--help"), ("list", "heads")], ids=" ".join)
def test_head_commands_import_no_torch(argv: tuple[str, ...]) -> None:
    assert _heavy(*argv) == []


# ---- the end of a command: the console script skips the interpreter's teardown, but never what a normal exit keeps


def _console(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` run in a fresh interpreter, then :func:`pipeline.cli._exit_now` (as the console script ends)."""
    script = f"import sys\nfrom pipeline.cli import _exit_now\n{code}\n_exit_now(0)\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=_env())


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


# An object the teardown would finalise (it prints when it is), a buffered write, an atexit handler.
TORN_DOWN = (
    "import atexit\n"
    "class Noisy:\n    def __del__(self):\n        print('torn down', flush=True)\n"
    "keep = Noisy()\n"
    "atexit.register(lambda: print('atexit ran'))\n"
    "sys.stdout.write('buffered, not flushed')\n"
)


def test_console_exit_skips_the_teardown_but_runs_atexit_and_flushes(tmp_path: Path) -> None:
    out = _console(TORN_DOWN, tmp_path)
    assert out.returncode == 0
    assert "atexit ran" in out.stdout and "buffered, not flushed" in out.stdout
    assert "torn down" not in out.stdout  # no teardown: the point of the fast exit


def test_console_exit_takes_the_normal_exit_while_a_thread_runs(tmp_path: Path) -> None:
    code = TORN_DOWN + (
        "import threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished', flush=True))).start()\n"
    )
    out = _console(code, tmp_path)
    assert out.returncode == 0
    assert "thread finished" in out.stdout and "torn down" in out.stdout  # joined, then the usual teardown


def test_console_exit_takes_the_normal_exit_while_an_hdf5_file_is_open(tmp_path: Path) -> None:
    """HDF5 writes a file's metadata when the library closes it: an os._exit with a file open for writing would
    leave it unreadable."""
    code = TORN_DOWN + (
        "import h5py, numpy as np\nf = h5py.File('open.h5', 'w')\nf.create_dataset('x', data=np.arange(10))\n"
    )
    out = _console(code, tmp_path)
    import h5py

    with h5py.File(tmp_path / "open.h5", "r") as f:  # after os._exit: "bad object header version number"
        assert list(f["x"][()]) == list(range(10))
    assert out.returncode == 0 and "torn down" in out.stdout


def test_console_exit_codes_are_those_of_main(tmp_path: Path) -> None:
    """The console script's codes: 0 after output, 1 for an error's one line, 2 for a usage error."""
    run = [sys.executable, "-m", "pipeline"]
    ok = subprocess.run([*run, "list", "heads"], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert ok.returncode == 0 and "logreg" in ok.stdout
    bad = subprocess.run([*run, "compare", "--features", "missing.h5"], capture_output=True, text=True, cwd=tmp_path,
                         env=_env())  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "error: feature file not found: missing.h5 (run `python -m pipeline extract` first)"
    )
    usage = subprocess.run([*run, "compare", "--no-such-option"], capture_output=True, text=True, cwd=tmp_path,
                           env=_env())  # fmt: skip
    assert usage.returncode == 2 and usage.stderr.startswith("error: ")
