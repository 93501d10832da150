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
