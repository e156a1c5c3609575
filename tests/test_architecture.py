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


# ---- function length and model-family tests (issue 23) -----------------------------------------------------------
MAX_FUNCTION_LINES = 60  # pipeline/ outside networks/: a function reads in one screen
LONG_FUNCTIONS = {  # the functions still over the limit, with their length: this list may only shrink
}
FAMILY_MODULES = ("pipeline/teachers/families/", "pipeline/networks/", "pipeline/teachers/diffusers_folder.py",
                  "pipeline/teachers/edm_pickle.py")  # the family modules and the readers they own
FAMILY_CLASSES = {"DiffusersVP", "DiffusersFlow", "DiffusersNetwork", "PixelFlow", "EDMPrecond", "KarrasPrecond",
                  "VPPrecond", "VEPrecond", "iDDPMPrecond", "UNet", "SongUNet", "DhariwalUNet"}
MAX_MODULES_TESTING_FAMILIES = 1  # outside the family modules


def function_lengths() -> dict[str, int]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "networks" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_functions_outside_networks_fit_one_screen():
    lengths = function_lengths()
    too_long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    new = sorted(f"{name} ({n} lines)" for name, n in too_long.items() if name not in LONG_FUNCTIONS)
    grown = sorted(f"{name} ({n} > {LONG_FUNCTIONS[name]})" for name, n in too_long.items()
                   if name in LONG_FUNCTIONS and n > LONG_FUNCTIONS[name])
    assert not new and not grown, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(new + grown)
    fixed = sorted(name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES)
    assert not fixed, f"now within {MAX_FUNCTION_LINES} lines, remove from LONG_FUNCTIONS: {fixed}"


def family_tests(path: Path) -> list[str]:
    """Where a module asks which model family it holds: is_*_config / is_*_folder / is_*_pickle_path calls,
    isinstance against a network class, comparisons involving model.json's "architecture" or "precond"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name.startswith("is_") and name.endswith(("_config", "_folder", "_pickle_path")):
                found.append(f"{name}() line {node.lineno}")
            if name == "isinstance" and len(node.args) == 2:
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                if any(getattr(c, "id", getattr(c, "attr", None)) in FAMILY_CLASSES for c in classes):
                    found.append(f"isinstance line {node.lineno}")
        if isinstance(node, ast.Compare) and any(  # config.get("architecture") == ..., "precond" in config, ...
                isinstance(c, ast.Constant) and c.value in ("architecture", "precond") for c in ast.walk(node)):
            found.append(f"model.json family key compared, line {node.lineno}")
    return found


def test_family_tests_stay_in_the_family_modules():
    outside = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(FAMILY_MODULES):
            continue
        found = family_tests(path)
        if found:
            outside[rel] = found
    assert len(outside) <= MAX_MODULES_TESTING_FAMILIES, f"modules outside the family modules that test the family: {outside}"
