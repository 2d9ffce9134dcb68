"""The layout the docs promise (docs/design.md §14): no module of oryx imports one that imports it back, module by
module and package by package (every import statement counts: top-level, inside functions, under TYPE_CHECKING)."""

import ast
import sys
from pathlib import Path

import pytest

import oryx

ROOT = Path(oryx.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    """module -> the oryx modules it imports."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("depth", [None, 2], ids=["modules", "packages"])
def test_no_import_cycles(depth):
    graph = _import_graph()
    if depth is not None:  # oryx.training.trainer -> oryx.training
        group = {name: ".".join(name.split(".")[:depth]) for name in graph}
        graph = {
            group[a]: {group[b] for m, targets in graph.items() if group[m] == group[a] for b in targets} - {group[a]}
            for a in graph
        }
    assert _cycles(graph) == []


def test_the_graph_sees_a_cycle():
    """The checker itself: a cycle through a function-level import is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_gpu_mixer_benchmark_covers_every_oryx_variant(monkeypatch):
    """benchmarks/gpu.py's mixer table names its own rows (fla's anchor kernel differs per recurrence); a recurrence
    added to the variant table without one would be missing from the benchmark silently."""
    import importlib.util

    from oryx.variants import oryx_variants

    path = ROOT.parent.parent / "benchmarks" / "gpu.py"
    if not path.exists():
        pytest.skip("benchmarks/ is not beside this installed package")
    spec = importlib.util.spec_from_file_location("gpu_benchmark", path)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)  # its dataclasses look their module up
    spec.loader.exec_module(gpu)
    assert list(gpu.MIXER_OPS) == oryx_variants()
