"""Options written once: a config dataclass field carries its command-line help (and choices) as metadata, and the
click layer builds each command's options from the fields (``cli._options_from``). Defaults live on the field,
checks in the dataclass's ``__post_init__``; nothing is repeated in the command."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its command-line help. ``meta`` may hold ``choices`` (a tuple), ``flag=True`` (an
    on/off switch without ``--no-``), ``path="file"|"dir"`` (a path argument), or ``cli=False`` (not an option:
    the command declares it itself or it is not for the command line)."""
    return field(default=default, metadata={"help": help, **meta})
