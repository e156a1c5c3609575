"""dvc.yaml's deps cannot drift from the code: each stage's deps cover the import closure of its entry point.

For every stage, the modules that ``python -m stages.NAME`` can execute (its imports, followed
transitively through ``pipeline`` and ``stages``, with every package ``__init__.py`` on the way,
imports inside functions included) must each be listed in the stage's deps, directly or through
a listed directory. Editing a solver then makes every stage that samples stale in `dvc status`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config.dvc_params import read_stages

ROOT = Path(__file__).resolve().parents[1]
DVC = read_stages(ROOT / "dvc.yaml")  # foreach groups resolved into their members, as DVC does
OWN = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in out if n.split(".")[0] in OWN}


def closure(entry: str) -> set[Path]:
    """Files of the project executed by importing ``entry`` (a dotted module name)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # the packages on the way run their __init__.py
            f = module_file(".".join(parts[:k]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(imports_of(f))
    return seen


def stage_entry(cmd: str) -> str:
    m = re.search(r"python -m (stages\.\w+)", cmd)
    assert m, f"stage command does not run a stages module: {cmd}"
    return m.group(1)


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    for dep in deps:
        d = Path(dep)
        if rel == d or d in rel.parents:
            return True
    return False


@pytest.mark.parametrize("stage", sorted(DVC))
def test_deps_cover_the_import_closure(stage):
    spec = DVC[stage]
    deps = [str(d) for d in spec.get("deps", [])]
    missing = sorted(
        str(f.relative_to(ROOT)) for f in closure(stage_entry(spec["cmd"])) if not covered(f, deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r}: deps do not cover {missing}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_code_deps_exist(stage):
    """A code dep that names a moved or deleted file would silently track nothing."""
    for dep in DVC[stage].get("deps", []):
        if str(dep).split("/")[0] in OWN:
            assert (ROOT / dep).exists(), f"dvc.yaml stage {stage!r}: dep {dep} does not exist"


def test_closure_follows_lazy_imports(tmp_path):
    """The closure is not fooled by imports inside functions (the reason deps drifted before)."""
    files = {str(f.relative_to(ROOT)) for f in closure("stages.evaluate")}
    assert "pipeline/diffusion/solvers.py" in files and "pipeline/diffusion/schedules.py" in files
    assert "pipeline/__init__.py" in files and "stages/common.py" in files


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stages_depend_on_the_manifests_of_the_files_they_read(stage):
    """A stage that reads a file named in params depends on its manifest (pipeline/config/inputs.py), so
    replacing the file re-runs the stage; a stage that reads none depends on no manifest."""
    from pipeline.config.inputs import EXTERNAL_INPUTS, inputs_read_by
    from pipeline.core.inputs import manifest_name

    deps = {str(d) for d in DVC[stage].get("deps", [])}
    wanted = {f"data/inputs/{manifest_name(inp.key)}" for inp in inputs_read_by(stage)}
    assert wanted <= deps, f"dvc.yaml stage {stage!r} misses {sorted(wanted - deps)}"
    others = {f"data/inputs/{manifest_name(inp.key)}" for inp in EXTERNAL_INPUTS} - wanted
    assert not (others & deps), f"dvc.yaml stage {stage!r} depends on {sorted(others & deps)} but does not read them"



def _out_paths(stage: dict) -> list[str]:
    outs = []
    for o in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
        outs.append(next(iter(o)) if isinstance(o, dict) else o)
    return outs


def test_no_file_under_git_lies_inside_a_dvc_output():
    """`dvc repro` on a fresh clone refuses an output that Git tracks ("already tracked by SCM"), e.g. a .gitignore
    that an older layout's run wrote inside what is now an output directory and that was committed."""
    import subprocess

    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = r.stdout.splitlines()
    inside = [(name, f) for name, stage in DVC.items() for out in _out_paths(stage)
              for f in tracked if f == out or f.startswith(out.rstrip("/") + "/")]
    assert not inside, f"Git tracks files inside DVC outputs (remove them with `git rm --cached`): {inside}"


NOT_ARTIFACTS = {"models/feature_net", "models/sfddm_control"}  # the FID classifier; the teacher with SFDDM's steps


def test_every_model_is_an_artifact_at_a_stage_output():
    """dvc.yaml's `artifacts:` (what `dvc artifacts get` and Studio's registry read): every model directory a stage
    writes, but the evaluation classifier and SFDDM's training-free control, is one artifact at that output, with
    a valid name, type model, a description, labels and meta naming its evaluation keys, metrics and cost files."""
    from gto.constants import assert_name_is_valid

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    outs = {}
    for stage, s in DVC.items():  # foreach members resolved (distill@distill_v, ...)
        for out in s.get("outs", []):
            outs[out if isinstance(out, str) else next(iter(out))] = stage
    artifacts = spec["artifacts"]
    assert sorted(a["path"] for a in artifacts.values()) == sorted(p for p in outs if p.startswith("models/")
                                                                   and p not in NOT_ARTIFACTS)
    produced = {o for s in DVC.values() for o in s.get("outs", []) if isinstance(o, str)}
    for name, a in artifacts.items():
        assert_name_is_valid(name)
        assert a["type"] == "model" and a["desc"] and a["labels"], name
        meta = a["meta"]
        assert meta["stage"] == outs[a["path"]], name
        assert meta["metrics"] in produced and meta["cost"] in produced, name
        assert re.fullmatch(r"[\w-]+/nfe\*", meta["keys"]), name
