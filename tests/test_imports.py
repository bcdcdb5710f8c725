"""The package's import graph: no cycles, lazy imports included, and the layers import only downward.

Read from the source with `ast` (nothing is imported), so a cycle hidden in a function body
(`def f(): from tunelab.x import y`) counts as much as one at the top of a module. A package's
own `__init__` importing its children is not an edge back: Python runs a parent's `__init__`
before any child, so that relation is not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

SRC = REPO / "src"
# Each layer may import the ones to its left, never one to its right (the run's order: data, then the
# model, then training and evaluation, then what puts a finished run to use, then the faces).
LAYERS = [
    {"tunelab.errors", "tunelab.io", "tunelab.config", "tunelab.progress"},
    {"tunelab.data"},
    {"tunelab.model"},
    {"tunelab.rundir"},
    {"tunelab.evaluation"},
    {"tunelab.training"},
    {"tunelab.registry", "tunelab.pipeline", "tunelab.planning"},
    # One server: the fine-tuning service mounts its routes on the serving app and serves its models through the
    # serving catalog, and speaks the serving protocol's errors; each imports the other, with no module cycle.
    {"tunelab.serve", "tunelab.service", "tunelab.export"},
    {"tunelab", "tunelab.cli", "tunelab.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """module -> the tunelab modules it imports anywhere in its text."""
    modules = {module_name(p): p for p in (SRC / "tunelab").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tunelab"):
                for alias in node.names:  # `from tunelab.data import records` imports the module tunelab.data.records
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("tunelab")}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges[name] = {t for t in targets if t != name and not (path.name == "__init__.py" and t.startswith(package + "."))}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    """The layer of the longest entry of LAYERS that is the module or a package holding it."""
    matches = [(len(prefix), n) for n, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    edges["tunelab.data.records"] = edges["tunelab.data.records"] | {"tunelab.data.read"}  # read imports records
    assert any({"tunelab.data.read", "tunelab.data.records"} <= set(c) for c in cycles(edges))


def test_layers_import_only_downward():
    upward = [(a, b) for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert upward == []


def test_the_layer_check_sees_a_planted_upward_import():
    assert layer_of("tunelab.data.read") == 1 and layer_of("tunelab.cli.run") == 8 and layer_of("tunelab") == 8
    edges = graph()
    edges["tunelab.data.read"] = edges["tunelab.data.read"] | {"tunelab.training.recipe"}
    assert [(a, b) for a, targets in edges.items() for b in targets if layer_of(b) > layer_of(a)] == [
        ("tunelab.data.read", "tunelab.training.recipe")]
