"""The params keys dvc.yaml's stages track, checked against a params file before DVC runs anything.

DVC refuses to run a stage whose tracked key (``params: [precision]``, ``[teacher.pretrained]``) is missing
from params.yaml, even where the code has a default; ``sfd params check`` runs this check so that it
accepts exactly what the stages and dvc.yaml accept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.core.param_checks import ParamError

PARAMS_FILE = "params.yaml"


def read_stages(dvc_yaml: str | Path) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages by name, a ``foreach`` group resolved into its members (``group@key``) as DVC does."""
    try:
        stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"{dvc_yaml}: cannot read it ({e})") from None
    out: dict[str, dict[str, Any]] = {}
    for name, spec in stages.items():
        if isinstance(spec, dict) and "foreach" in spec:
            items = spec["foreach"]
            if not isinstance(items, dict):
                raise ParamError(f"{dvc_yaml}: stage {name}: only a mapping `foreach` is supported here")
            for key, item in items.items():
                out[f"{name}@{key}"] = _substitute(spec["do"], key, item)
        else:
            out[name] = spec
    return out


def _substitute(value: Any, key: str, item: Any) -> Any:
    """``${key}`` and ``${item.field}`` replaced in every string (mapping keys included) of a ``do`` block."""
    if isinstance(value, dict):
        return {_substitute(k, key, item): _substitute(v, key, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, key, item) for v in value]
    if isinstance(value, str):
        value = value.replace("${key}", str(key))
        for field, v in (item.items() if isinstance(item, dict) else ()):
            value = value.replace(f"${{item.{field}}}", str(v))
        return value
    return value


def expand_targets(stages: dict[str, dict[str, Any]], targets: list[str]) -> list[str]:
    """Targets as ``dvc repro`` reads them: a ``foreach`` group's name stands for all its members."""
    out = []
    for target in targets:
        members = [name for name in stages if name.split("@", 1)[0] == target and "@" in name]
        out.extend(members if target not in stages and members else [target])
    return out


def _paths(entries: Any) -> list[str]:
    """The paths of a deps / outs / metrics / plots list (entries are paths or {path: options})."""
    out = []
    for entry in entries or []:
        out.extend([entry] if isinstance(entry, str) else list(entry) if isinstance(entry, dict) else [])
    return [p.rstrip("/") for p in out]


def upstream(stages: dict[str, dict[str, Any]], targets: list[str]) -> set[str]:
    """The targets and every stage they depend on (an output of one lies at, under or above a dep of
    another), as ``dvc repro TARGET...`` runs them."""
    targets = expand_targets(stages, targets)
    unknown = sorted(set(targets) - set(stages))
    if unknown:
        raise ParamError(f"--target: no stage {', '.join(map(repr, unknown))} in dvc.yaml; stages: {', '.join(stages)}")
    outs = {name: _paths([*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])])
            for name, spec in stages.items()}

    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    todo, seen = list(targets), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in _paths(stages[name].get("deps", [])):
            todo.extend(other for other, paths in outs.items() if any(related(dep, o) for o in paths))
    return seen


def tracked_keys(dvc_yaml: str | Path, params_file: str = PARAMS_FILE,
                 targets: list[str] | None = None) -> dict[str, list[str]]:
    """{dotted key: [stages that track it]} for the keys dvc.yaml's stages track in ``params_file``; with
    ``targets``, only the stages ``dvc repro TARGET...`` would run."""
    stages = read_stages(dvc_yaml)
    if targets:
        keep = upstream(stages, targets)
        stages = {k: v for k, v in stages.items() if k in keep}
    out: dict[str, list[str]] = {}
    for stage, spec in stages.items():
        for entry in spec.get("params", []) or []:
            if isinstance(entry, str):
                keys = [entry]
            elif isinstance(entry, dict):  # {other_file.yaml: [keys]}
                keys = [k for f, ks in entry.items() if f == params_file for k in (ks or [])]
            else:
                continue
            for key in keys:
                out.setdefault(key, []).append(stage)
    return out


def _has(raw: Any, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_tracked_keys(raw: dict[str, Any], dvc_yaml: str | Path, *, where: str = PARAMS_FILE,
                       targets: list[str] | None = None) -> int:
    """Refuse a params mapping that lacks a key dvc.yaml tracks (one line naming every such key, its stages
    and the default to write); with ``targets``, only the keys of the stages they run. Returns the number of
    tracked keys."""
    tracked = tracked_keys(dvc_yaml, targets=targets)
    missing = {k: stages for k, stages in tracked.items() if not _has(raw, k)}
    if missing:
        named = "; ".join(f"{k} (tracked by {', '.join(stages)})" for k, stages in sorted(missing.items()))
        raise ParamError(f"{where} lacks key(s) that {Path(dvc_yaml).name} tracks, so DVC would refuse those stages: "
                         f"{named}. Add them (docs/params.md gives each default), or check only the stages you run (--target)")
    return len(tracked)
