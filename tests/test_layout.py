"""The library's shape, read from its source: imports point one way (no cycle, hidden or not), imports sit at the top
of their module, no function is longer than 80 lines, and Ray Train's TorchTrainer is built in one place."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LIBRARY = REPO / "acr"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in LIBRARY.rglob("*.py"):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(p.read_text(), str(p)) for name, p in _modules().items()}


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the library modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {m: set() for m in trees}
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in trees and t != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [u, v] if v in path else [u, v]
            if v not in state and (found := visit(v, path + [u])):
                return found
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_library():
    graph = import_graph(_trees())
    assert len(graph) > 40 and graph["acr.train.driver"] >= {"acr.runtime.trainer", "acr.train.worker"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_are_at_the_top_of_their_module():
    local = [f"{name}:{sub.lineno} in {node.name}(): {ast.unparse(sub)}"
             for name, tree in _trees().items() for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
    assert not local, "function-local imports:\n" + "\n".join(local)


def test_no_function_is_over_80_lines():
    long = [f"{name}:{node.lineno} {node.name}() is {node.end_lineno - node.lineno + 1} lines"
            for name, tree in _trees().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_one_torchtrainer_construction():
    calls = [f"{name}:{node.lineno}" for name, tree in _trees().items() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TorchTrainer"]
    assert calls == [calls[0]] and calls[0].startswith("acr.runtime.trainer:"), calls


def test_the_library_logs_instead_of_printing():
    prints = [f"{name}:{node.lineno}" for name, tree in _trees().items() for node in ast.walk(tree)
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"]
    assert prints == [p for p in prints if p.startswith("acr.runtime.errors:")], prints  # the error boundary only
