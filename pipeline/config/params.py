"""params.yaml, loaded once and validated: shared keys (seed, device, loss) and one section per stage.

Each section is parsed by its own dataclass's ``from_dict``, which names the offending key and
the allowed values. Sections that have their own ``seed`` or ``device`` field inherit the
shared top-level value unless they set one (``threads`` likewise). docs/params.md documents every key.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.param_checks import ParamError, check_choice, check_int

LOSSES = ("l1", "l2", "pseudo_huber", "lpips")
SHARED_KEYS = ("seed", "device", "loss", "threads")
INHERITED = ("seed", "device", "threads")  # shared keys a section inherits when it has the field


def _section_classes() -> dict[str, type]:
    """Section name -> dataclass with ``from_dict(d)`` or ``from_dict(d, section=name)``."""
    from pipeline.distill.baselines.progressive import PDParams
    from pipeline.distill.baselines.sfddm import SFDDMParams
    from pipeline.distill.baselines.vanilla import VanillaParams
    from pipeline.data.datasets import DataParams
    from pipeline.evaluation.evaluate import EvalParams
    from pipeline.evaluation.feature_net import FeatureNetParams
    from pipeline.evaluation.report import ReportParams
    from pipeline.distill.sfd import DistillParams
    from pipeline.teachers.training import TeacherParams
    from pipeline.trajectories.spec import TrajectoryParams

    return {
        "data": DataParams,
        "feature_net": FeatureNetParams,
        "teacher": TeacherParams,
        "trajectories": TrajectoryParams,
        "trajectories_v": TrajectoryParams,
        "distill": DistillParams,
        "distill_v": DistillParams,
        "trajectories_stage2": TrajectoryParams,
        "distill_stage2": DistillParams,
        "baseline_pd": PDParams,
        "baseline_sfddm": SFDDMParams,
        "baseline_vanilla": VanillaParams,
        "evaluate": EvalParams,
        "report": ReportParams,
    }


def _parse_section(cls: type, name: str, d: dict[str, Any]) -> Any:
    if "section" in inspect.signature(cls.from_dict).parameters:
        return cls.from_dict(d, section=name)
    return cls.from_dict(d)


class Params:
    """Validated parameters: ``p.seed``, ``p.device``, ``p.loss``, ``p.threads`` and ``p.<section>`` objects.

    ``p.resolved`` is the raw mapping with the shared keys filled into every section that has
    such a field, for the stages that take the whole file (trajectories, distill).
    """

    def __init__(self, raw: dict[str, Any], sections: dict[str, Any], resolved: dict[str, Any]) -> None:
        self.raw = raw
        self.resolved = resolved
        self.seed: int = raw.get("seed", 0)
        self.device: str = raw.get("device", "auto")
        self.loss: str = raw.get("loss", "l1")
        self.threads: int = raw.get("threads", 1)
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

    def apply_threads(self) -> int:
        """Set torch's CPU thread count from ``threads`` (0 leaves torch's default); returns the count in use."""
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
        return torch.get_num_threads()


def _with_shared(section: dict[str, Any], fields: Any, raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(section)
    for key in INHERITED:
        if key in raw and key not in out and key in fields:
            out[key] = raw[key]
    return out


def parse_params(raw: dict[str, Any]) -> Params:
    if not isinstance(raw, dict):
        raise ParamError("params: the file must hold a mapping of sections")
    classes = _section_classes()
    unknown = sorted(set(raw) - set(classes) - set(SHARED_KEYS))
    if unknown:
        raise ParamError(
            f"params: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted([*SHARED_KEYS, *classes]))}"
        )
    check_int("seed", raw.get("seed", 0), minimum=0)
    check_int("threads", raw.get("threads", 1), minimum=0)
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device)):
        raise ParamError(f"device: got {device!r}; allowed values: 'auto', 'cpu', 'cuda', 'cuda:N'")
    check_choice("loss", raw.get("loss", "l1"), LOSSES)
    sections, resolved = {}, {k: raw[k] for k in SHARED_KEYS if k in raw}
    for name, cls in classes.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ParamError(f"{name}: expected a mapping of keys, got {section!r}")
        resolved[name] = _with_shared(section, cls.__dataclass_fields__, raw)
        sections[name] = _parse_section(cls, name, resolved[name])
    return Params(raw, sections, resolved)


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
