"""Presets as overlays: a preset holds only what differs from params.yaml, and ``sfd preset apply NAME`` writes
the merged file (docs/params.md, "Presets").

Merge rule (:func:`merge_overlay`): a section merges key by key; every value inside a section (a number, a list,
a schedule or network mapping, null) and every top-level scalar replaces the default whole; a section set to
``null`` is removed (that preset does not run the stage: a stage that reads it refuses to run on silent defaults). The merged file is validated as a whole
(pipeline.config.params.parse_params) before it is written, so ``sfd params check`` and ``dvc exp run -S
key=value`` see one ordinary params.yaml; DVC's Hydra composition is not used (one mechanism: this command).

The written file starts with a ``# preset: NAME`` line. Applying a preset on a file that already has one is
refused unless ``--force``: overlays are differences from the shipped defaults (``git checkout params.yaml``
restores them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.param_checks import ParamError

PRESET_MARK = "# preset: "
PRESETS_DIR = Path("presets")


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` applied (module docstring); neither argument is modified."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None and isinstance(base.get(key), dict):
            out.pop(key, None)  # a section this preset does not have
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump_params(params: dict[str, Any]) -> str:
    """YAML of a params mapping: one block per section, short lists and mappings inside a section on one line."""
    def item(key: Any, value: Any, indent: str) -> str:
        flow = None if isinstance(value, (dict, list)) else False  # a collection of scalars on one line
        return "".join(f"{indent}{line}\n" for line in
                       yaml.safe_dump({key: value}, sort_keys=False, width=120, default_flow_style=flow).splitlines())

    out = []
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.append(f"{key}:\n" + "".join(item(k, v, "  ") for k, v in value.items()))
        else:
            out.append(item(key, value, ""))
    return "".join(out)


def preset_path(name: str | Path, presets_dir: Path = PRESETS_DIR) -> Path:
    """A preset by name (``cifar10`` -> presets/cifar10.yaml) or by path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in presets_dir.glob("*.yaml"))) if presets_dir.is_dir() else "none"
        raise ParamError(f"preset {name}: {path} does not exist (presets: {known})")
    return path


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(value, dict):
        raise ParamError(f"{what} {path}: expected a mapping of sections")
    return value


def applied_preset(text: str) -> str | None:
    """The preset named on a params file's first line, if any."""
    first = text.split("\n", 1)[0]
    return first[len(PRESET_MARK):].split()[0] if first.startswith(PRESET_MARK) and first[len(PRESET_MARK):].split() else None


def merged_preset(name: str | Path, base: Path = Path("params.yaml"), presets_dir: Path = PRESETS_DIR) -> dict[str, Any]:
    """The params mapping a preset gives on top of ``base`` (validated)."""
    from pipeline.config.params import parse_params

    merged = merge_overlay(read_yaml(base, "params file"), read_yaml(preset_path(name, presets_dir), "preset"))
    parse_params(merged)
    return merged


def apply_preset(name: str | Path, base: Path = Path("params.yaml"), out: Path | None = None, *,
                 presets_dir: Path = PRESETS_DIR, force: bool = False) -> Path:
    """Write ``base`` merged with the preset to ``out`` (default: ``base``); returns ``out``."""
    out = base if out is None else out
    earlier = applied_preset(base.read_text()) if base.is_file() else None
    if earlier is not None and not force:
        raise ParamError(f"{base} already has the preset {earlier!r} applied; presets are differences from the shipped "
                         f"defaults: restore them first (`git checkout {base}`), or pass --force to merge on top")
    path = preset_path(name, presets_dir)
    merged = merged_preset(name, base, presets_dir)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    header = header[: next((i for i, line in enumerate(header) if not line.strip("# ")), len(header))]
    text = f"{PRESET_MARK}{path.stem} (from {path}; `sfd preset apply`)\n" + "".join(f"{h}\n" for h in header)
    out.write_text(text + "\n" + dump_params(merged))
    return out
