"""The package's import graph: no cycle (module-level or inside functions), no private name imported across modules.

Walks every module of ``pipeline`` with ``ast`` (every Import/ImportFrom node, function bodies included), so an
import deferred into a function to dodge a cycle still counts as one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def _imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, str]]:
    """(imported pipeline module, name) for every import in ``tree``; name is "" for ``import pipeline.x``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("pipeline")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for a in node.names:  # `from pipeline.stage1 import backbones` imports the submodule
                sub = f"{node.module}.{a.name}"
                found.append((sub, "") if sub in modules else (node.module, a.name))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    names = set(mods)
    return {m: {t for t, _ in _imports(tree, names) if t in names and t != m} for m, tree in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative DFS with colours)."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not colour.get(nxt):
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_cycle_finder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_name_imported_across_modules():
    mods = _modules()
    names = set(mods)
    bad = [f"{m} imports {n} from {t}" for m, tree in mods.items() for t, n in _imports(tree, names)
           if n.startswith("_") and not n.startswith("__") and t != m]  # fmt: skip
    assert not bad, "; ".join(bad)
