"""params.yaml, loaded once and validated: shared keys (seed, device, loss) and one section per stage.

Each section is parsed by its own dataclass's ``from_dict``, which names the offending key and
the allowed values. Sections that have their own ``seed`` or ``device`` field inherit the
shared top-level value unless they set one. docs/params.md documents every key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.param_checks import ParamError, check_choice, check_int

LOSSES = ("l1", "l2", "pseudo_huber", "lpips")
SHARED_KEYS = ("seed", "device", "loss")


def _section_parsers() -> dict[str, Callable[[dict[str, Any]], Any]]:
    from pipeline.data import DataParams
    from pipeline.evaluation import EvalParams
    from pipeline.feature_net import FeatureNetParams
    from pipeline.report import ReportParams
    from pipeline.teacher_training import TeacherParams
    from pipeline.trajectory_spec import TrajectoryParams

    parsers: dict[str, Callable[[dict[str, Any]], Any]] = {
        "data": DataParams.from_dict,
        "feature_net": FeatureNetParams.from_dict,
        "teacher": TeacherParams.from_dict,
        "trajectories": lambda d: TrajectoryParams.from_dict(d, section="trajectories"),
        "trajectories_stage2": lambda d: TrajectoryParams.from_dict(d, section="trajectories_stage2"),
        "evaluate": EvalParams.from_dict,
        "report": ReportParams.from_dict,
    }
    return parsers


class Params:
    """Validated parameters: ``p.seed``, ``p.device``, ``p.loss`` and ``p.<section>`` objects."""

    def __init__(self, raw: dict[str, Any], sections: dict[str, Any]) -> None:
        self.raw = raw
        self.seed: int = raw.get("seed", 0)
        self.device: str = raw.get("device", "auto")
        self.loss: str = raw.get("loss", "l1")
        self._sections = sections

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"params has no section {name!r}")

    def section(self, name: str) -> Any:
        if name not in self._sections:
            raise ParamError(f"params: no section {name!r}; sections: {', '.join(sorted(self._sections))}")
        return self._sections[name]


def _with_shared(section: dict[str, Any], fields: Any, raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(section)
    for key in ("seed", "device"):
        if key in raw and key not in out and key in fields:
            out[key] = raw[key]
    return out


def parse_params(raw: dict[str, Any]) -> Params:
    if not isinstance(raw, dict):
        raise ParamError("params: the file must hold a mapping of sections")
    parsers = _section_parsers()
    unknown = sorted(set(raw) - set(parsers) - set(SHARED_KEYS))
    if unknown:
        raise ParamError(
            f"params: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted([*SHARED_KEYS, *parsers]))}"
        )
    check_int("seed", raw.get("seed", 0), minimum=0)
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ParamError(f"device: got {device!r}; allowed values: 'auto', 'cpu', 'cuda', 'cuda:N'")
    check_choice("loss", raw.get("loss", "l1"), LOSSES)
    sections = {}
    for name, parse in parsers.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ParamError(f"{name}: expected a mapping of keys, got {section!r}")
        fields = _dataclass_fields(parse)
        sections[name] = parse(_with_shared(section, fields, raw))
    return Params(raw, sections)


def _dataclass_fields(parse: Callable[..., Any]) -> set[str]:
    owner = getattr(parse, "__self__", None)
    if owner is not None and hasattr(owner, "__dataclass_fields__"):
        return set(owner.__dataclass_fields__)
    return set()  # lambdas (trajectory sections) take no shared keys


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; a missing file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamError(f"params file {path} is not valid YAML: {e}") from None
    return parse_params(raw)
