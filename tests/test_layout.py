"""The package's shape: no import cycles, and no Prefect in the library outside its one launcher.

Imports are read from the source (every ``import`` statement, the lazy ones inside functions
included), so a cycle hidden behind a function-level import is found as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = "evop.pipeline.launcher"  # the one documented place that starts the Prefect flow
SHELL = ("prefect", "flows", "tasks")  # what the library must not import


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "evop").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every module named by an import statement in ``path`` (absolute names)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: resolve it against the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]).strip(".")
            found.add(base)
            # `from evop.pipeline import search` imports the submodule evop.pipeline.search too.
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``evop`` modules it imports."""
    modules = _modules()
    return {
        name: {m for m in _imports(path, name, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_library():
    graph = import_graph()
    assert len(graph) > 30  # the walk saw the whole package
    assert cycles(graph) == []


def test_no_prefect_in_the_library_outside_the_launcher():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name == LAUNCHER:
            continue
        for imported in _imports(path, name, modules):
            if imported.split(".")[0] in SHELL:
                offenders.append(f"{name} imports {imported}")
    assert offenders == []
    launcher = _imports(modules[LAUNCHER], LAUNCHER, modules)
    assert "flows.evop_pipeline" in launcher  # the exception is real, and documented there


def test_no_module_of_the_library_is_large():
    """About 400 lines at most: a longer module holds more than one concept (the MLflow registry,
    the CLI, the config, the comparison runner and the inference-speed benchmark are one concept
    each, and allowed a little more)."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    allowed = {
        "evop.storage.registry": 520,
        "evop.cli": 480,
        "evop.eval.speed": 460,
        "evop.config.sections": 520,
        "evop.eval.compare": 440,
    }
    too_large = {n: s for n, s in sizes.items() if s > allowed.get(n, 420)}
    assert too_large == {}
