"""The README and docs/ (issue 23): every link resolves, and every `python -m pipeline ...` and `make ...` command
shown parses against the real CLI and the Makefile."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links() -> list[tuple[Path, str]]:
    return [(p, m) for p in PAGES for m in LINK.findall(p.read_text()) if not m.startswith(("http", "#", "mailto"))]


@pytest.mark.parametrize(("page", "target"), _links(), ids=lambda x: str(x))
def test_link_resolves(page: Path, target: str) -> None:
    path = target.split("#")[0]
    assert (page.parent / path).exists(), f"{page.name}: {target}"


def _commands() -> list[tuple[str, str]]:
    """Commands in fenced bash blocks, continuation lines joined, comments cut."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith(("python -m pipeline ", "make ")):
                    found.append((page.name, line))
    return found


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m for line in re.findall(r"^([\w./$()-]+(?: [\w./$()-]+)*):", text, re.M) for m in line.split()}


@pytest.mark.parametrize(("page", "line"), _commands())
def test_command_parses(page: str, line: str) -> None:
    words = shlex.split(line)
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w]
        known = _make_targets()
        for t in targets:
            assert t in known or t.startswith("artifacts/"), f"{page}: make {t} is not a Makefile target"
        return
    args = words[3:]
    command = cli.commands.get(args[0])
    assert command is not None, f"{page}: unknown command {args[0]}"
    ctx = command.make_context(args[0], args[1:], resilient_parsing=False) if "--help" not in args else None
    assert ctx is None or isinstance(ctx, click.Context)


def test_docs_show_commands() -> None:
    assert len(_commands()) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_fences_balanced(page: Path) -> None:
    """Every fence opened is closed, and a closing fence names no language: an unclosed ```bash swallows the prose
    after it (and hides the next block's commands from test_command_parses)."""
    inside = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if not line.lstrip().startswith("```"):
            continue
        if inside:
            assert line.strip() == "```", f"{page.name} line {number}: {line.strip()!r} closes a block it should not"
        inside = not inside
    assert not inside, f"{page.name}: the last code block is not closed"
