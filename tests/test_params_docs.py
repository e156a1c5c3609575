"""docs/params.md and the code agree on every default they both state.

Each ``| `key` | default | ...`` row of a section's table, and each ``\\`key\\` (default`` in a section's
prose, is compared with the section class's field default when the cell is a plain value (a number,
a bool, null, a name, a list or mapping); a ``(params.yaml: X)`` note is compared with params.yaml.
Cells that describe rather than state a value ("(shared)", "3 (`dpmpp`), 1 (others)") are skipped,
and the test fails if fewer than 60 defaults were compared (the parser must keep working).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config.params import SECTIONS, SharedParams

ROOT = Path(__file__).resolve().parents[1]
NOT_A_VALUE = object()


def literal(cell: str):
    """The value a docs cell states, or NOT_A_VALUE."""
    c = cell.strip()
    m = re.fullmatch(r"`([^`]*)`", c)
    if m:
        c = m.group(1)
    if "`" in c or "(" in c or c == "shared" or (re.search(r"\s", c) and c[:1] not in "[{"):
        return NOT_A_VALUE  # a description, not a value
    for number in (int, float):
        try:
            return number(c)
        except ValueError:
            pass
    try:
        return yaml.safe_load(c)
    except yaml.YAMLError:
        return NOT_A_VALUE


def code_default(cls, name: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert name in fields, f"docs/params.md documents {cls.SECTION}.{name}, which the code does not have"
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{cls.SECTION}.{name} has no default"
    return f.default_factory()


def documented_defaults():
    """(section name, class, key, docs value, params.yaml note or NOT_A_VALUE) for every stated default."""
    out = []
    section = cls = None
    for line in (ROOT / "docs" / "params.md").read_text().splitlines():
        if line.startswith("## "):
            names = re.findall(r"`([a-z_0-9]+)`", line)
            section, cls = ("", SharedParams) if "Shared keys" in line else (names[0], SECTIONS.get(names[0])) if names else (None, None)
            continue
        if cls is None:
            continue
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            keys = re.findall(r"`([^`]+)`", cells[0])
            if len(keys) != 1 or len(cells) < 2:
                continue
            note = re.search(r"\(params\.yaml: `?([^`)]*)`?\)", cells[1])
            value = literal(re.sub(r"\s*\(params\.yaml:[^)]*\)", "", cells[1]))
            if value is not NOT_A_VALUE:
                out.append((section, cls, keys[0], value, literal(note.group(1)) if note else NOT_A_VALUE))
        else:
            for key, value in re.findall(r"`([A-Za-z_]+)` \(([^(),;:]+)[),;:]", line):
                value = literal(value)
                if value is not NOT_A_VALUE:
                    out.append((section, cls, key, value, NOT_A_VALUE))
    return out


def test_docs_defaults_match_the_code_and_params_yaml():
    rows = documented_defaults()
    assert len(rows) >= 60, f"only {len(rows)} defaults parsed from docs/params.md: the parser needs updating"
    params_yaml = yaml.safe_load((ROOT / "params.yaml").read_text())
    wrong = []
    for section, cls, key, value, note in rows:
        code = code_default(cls, key)
        if code != value:
            wrong.append(f"{section or 'params'}.{key}: docs say {value!r}, the code's default is {code!r}")
        if note is not NOT_A_VALUE:
            shipped = (params_yaml.get(section) or {}).get(key) if section else params_yaml.get(key)
            if shipped != note:
                wrong.append(f"{section}.{key}: docs say params.yaml sets {note!r}, it sets {shipped!r}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("section", ["trajectories", "distill"])
def test_a_deleted_section_is_refused_by_its_stage_and_named_by_params_check(tmp_path, section):
    """Deleting `distill:` or `trajectories:` never runs a stage on defaults: the stage's section lookup refuses it,
    `sfd params check` names it, and `NAME: {}` asks for the defaults explicitly."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config.params import load_params
    from pipeline.core.param_checks import ParamError

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw[section]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    loaded = load_params(path)
    with pytest.raises(ParamError, match=rf"^{section}: the section is missing .* write `{section}: {{}}`"):
        loaded.required(section)
    with pytest.raises(ParamError, match=r"the section is missing"):
        loaded.trajectories_for("distill", required=True)
    check = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml"), "--target", "data"])
    assert check.exit_code == 0 and f"note: no section {section}:" in check.output
    refused = CliRunner().invoke(app, ["params", "check", str(path), "--dvc-yaml", str(ROOT / "dvc.yaml")])
    assert refused.exit_code == 2 and f"{section} (tracked by {section}" in refused.output  # DVC would refuse it too
    raw[section] = {}
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).required(section) == load_params(path).section(section)
