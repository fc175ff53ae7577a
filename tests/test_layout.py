"""The code's shape, read from its source: the library's imports follow its layers (pure computation below the
runtime, the runtime below the jobs) with no cycle, no two modules whose names cross and none named like a package;
imports sit at the top of their module and no function is longer than 80 lines, in the library, the tests, the
benchmarks and the experiments; Ray Train's TorchTrainer is built in one place."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.conftest import REPO

LIBRARY = REPO / "acr"
ALL_CODE = ("acr", "tests", "benchmarks", "experiments", "ray_jobs")
MAX_FUNCTION_LINES = 80
# The library's layers, lowest first: a module imports from its own layer or below, never above.
LAYERS = (("acr.errors", "acr.registry"), ("acr.config", "acr.storage"),
          ("acr.data", "acr.models", "acr.refine", "acr.method", "acr.metrics", "acr.cam", "acr.viz", "acr.checkpoint"),
          ("acr.runtime",), ("acr.train", "acr.tune", "acr.pseudo", "acr.segment"), ("acr.pipeline",), ("acr.cli",))
PURE = LAYERS[2]  # pure computation: no Ray, except the Ray Data streams of acr.data.ingest
# Function-local imports with a reason: the checkout under test is put on sys.path first (step_timer); the measuring
# child processes import only what the walk needs (random_walk_memory).
LOCAL_IMPORTS_ALLOWED = {"benchmarks.step_timer", "benchmarks.random_walk_memory"}


def _modules(folders: tuple[str, ...] = ("acr",)) -> dict[str, Path]:
    out = {}
    for folder in folders:
        for p in (REPO / folder).rglob("*.py"):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _trees(folders: tuple[str, ...] = ("acr",)) -> dict[str, ast.Module]:
    return {name: ast.parse(p.read_text(), str(p)) for name, p in _modules(folders).items()}


def layer(module: str) -> int | None:
    return next((i for i, prefixes in enumerate(LAYERS)
                 if any(module == p or module.startswith(p + ".") for p in prefixes)), None)


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
    assert len(graph) > 40 and graph["acr.train.job"] >= {"acr.runtime.trainer", "acr.train.worker"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_library_imports_follow_its_layers():
    graph = import_graph(_trees())
    assert [m for m in graph if m != "acr" and layer(m) is None] == []  # every module has its layer
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets if m != "acr" and layer(t) > layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    ray_in_pure = [m for m, tree in _trees().items() if layer(m) == LAYERS.index(PURE) and m != "acr.data.ingest"
                   for node in ast.walk(tree) for name in _imported(node) if name.split(".")[0] == "ray"]
    assert not ray_in_pure, ray_in_pure


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module] if isinstance(node, ast.ImportFrom) and node.module else []


def test_no_module_names_cross_or_shadow_a_package():
    names = {tuple(m.split(".")[1:]) for m in _modules()}
    packages = {m.split(".")[1] for m in _modules() if m.count(".") >= 2}
    crossing = [f"acr.{a}.{b} and acr.{b}.{a}" for a, b in (n for n in names if len(n) == 2) if (b, a) in names]
    shadowing = [".".join(("acr", *n)) for n in names if len(n) == 2 and n[1] in packages | sys.stdlib_module_names]
    assert not crossing and not shadowing, (crossing, shadowing)


def test_imports_are_at_the_top_of_their_module():
    local = [f"{name}:{sub.lineno} in {node.name}(): {ast.unparse(sub)}"
             for name, tree in _trees(ALL_CODE).items() if name not in LOCAL_IMPORTS_ALLOWED for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
    assert not local, "function-local imports:\n" + "\n".join(local)


def test_no_function_is_over_80_lines():
    long = [f"{name}:{node.lineno} {node.name}() is {node.end_lineno - node.lineno + 1} lines"
            for name, tree in _trees(ALL_CODE).items() for node in ast.walk(tree)
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
    assert prints == [p for p in prints if p.startswith("acr.runtime.boundary:")], prints  # the error boundary only


def test_tests_import_nothing_from_the_benchmarks_or_experiments():
    """Tests run a benchmark's script as its users do; they share no code with benchmarks/ or experiments/."""
    found = [f"{m}: {name}" for m, tree in _trees(("tests",)).items() for node in ast.walk(tree)
             for name in _imported(node) if name.split(".")[0] in ("benchmarks", "experiments")]
    assert not found, found
