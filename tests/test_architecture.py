"""The package's layering: lower layers never import higher ones, and nothing imports in a cycle.

Layers, lowest first (the data flow data -> teacher -> trajectories -> distill -> evaluation):
core, diffusion, networks, config, data, training, teachers, trajectories, distill, evaluation;
``pipeline/__init__.py`` (the public API) and ``pipeline/cli.py`` sit on top. Every import counts,
also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
LAYERS = ["core", "diffusion", "networks", "config", "data", "training", "teachers", "trajectories", "distill", "evaluation"]
TOP = {"pipeline", "pipeline.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pipeline_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The pipeline modules a file imports (``from pipeline.x import y`` counts y when y is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("pipeline"):
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = pipeline_modules()
    names = set(modules)
    return {m: imported_modules(p, names) - {m} for m, p in modules.items()}


def layer_of(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module}: every module belongs to a layer subpackage ({', '.join(LAYERS)}) or the top")
    return LAYERS.index(part)


def test_every_module_is_in_a_layer():
    for module in pipeline_modules():
        layer_of(module)


def test_no_upward_imports():
    bad = []
    for module, deps in import_graph().items():
        for dep in deps:
            if dep == "pipeline" and module not in TOP:
                bad.append(f"{module} imports the package top (the public API is for users, not for the library)")
            elif layer_of(dep) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)] if layer_of(module) < len(LAYERS) else 'top'}) imports {dep}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "pipeline" or d.count(".") == 1 and (PACKAGE / d.split(".")[1] / "__init__.py").exists() and d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_import_only_the_library(path):
    """Stages are thin: they import pipeline (and typer), never each other's internals beyond stages.common."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            assert node.module == "stages.common", f"{path.name} imports {node.module}"
