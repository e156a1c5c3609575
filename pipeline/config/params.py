"""params.yaml, loaded once and validated: shared keys (seed, device, loss, threads) and one section per stage.

Each section is a typed pydantic dataclass (pipeline/config/{data,teacher,trajectories,distill,baselines,
evaluation}.py); a bad value is refused in one line that names the full key path and the allowed values.
Sections that have their own ``seed``, ``device``, ``threads``, ``precision`` or run-setting field
(``batch_gpu``, ``activation_checkpointing``, ``sharding``, ``prefetch``) inherit the shared top-level value
unless they set one: the top-level keys are the one place for run settings, a section overrides them. Cross-section rules run here too: every distill section names an existing
trajectories section, and the evaluation seeds (and the noise floor's second seed range) are disjoint from
every trajectories section's seeds.
docs/params.md documents every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.config.baselines import PDParams, SFDDMParams, VanillaParams
from pipeline.config.data import DataParams
from pipeline.config.distill import LOSSES, DistillParams, LossName
from pipeline.config.evaluation import EvalParams, FeatureNetParams, ReportParams
from pipeline.config.fields import Device, NonNegativeInt, PositiveInt, Precision
from pipeline.config.teacher import TeacherParams
from pipeline.config.trajectories import TrajectoryParams
from pipeline.config.validation import Section, fix, section, validate_section
from pipeline.core.param_checks import ParamError
from pipeline.diffusion.seeds import parse_seeds

__all__ = ["LOSSES", "SECTIONS", "Params", "load_params", "parse_params"]

RUN_SETTINGS = ("batch_gpu", "activation_checkpointing", "sharding", "prefetch")  # per-stage memory / speed settings
SHARED_KEYS = ("seed", "device", "loss", "threads", "precision", "nproc", "compile", "channels_last", *RUN_SETTINGS)
INHERITED = ("seed", "device", "threads", "precision", *RUN_SETTINGS)  # shared keys a section inherits when it has the field
SECTIONS: dict[str, type[Section]] = {
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
}  # params.yaml key -> section class
TRAJECTORY_SECTIONS = tuple(k for k, v in SECTIONS.items() if v is TrajectoryParams)
DISTILL_SECTIONS = tuple(k for k, v in SECTIONS.items() if v is DistillParams)

S = TypeVar("S")


@section("params")
class SharedParams(Section):
    """The top-level keys every stage shares."""

    seed: NonNegativeInt = 0
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    loss: LossName = "l1"  # the SFD stages' distillation loss unless a section sets its own
    threads: NonNegativeInt = 1  # torch CPU threads per stage (0 = torch's default)
    precision: Precision = "fp32"  # fp32 | bf16 | fp16 for every section with a `precision` key (unless it sets one)
    nproc: PositiveInt = 1  # processes per stage on this machine (>1: the stage re-runs itself under torchrun)
    compile: bool = False  # torch.compile the trajectories teacher and the distill student (GPU only)
    channels_last: bool = False  # channels-last memory format for those networks (GPU only)
    # run settings the training sections inherit unless they set their own (they change results only to round-off)
    batch_gpu: PositiveInt | None = None  # rows per micro-batch on each process (gradient accumulation); None: all
    activation_checkpointing: bool = False  # recompute block activations in the backward pass
    sharding: Literal["ddp", "fsdp"] = "ddp"  # distill sections with several processes: DDP replicas | FSDP2 shards
    prefetch: PositiveInt = 2  # distill sections: trajectory chunks decoded ahead per key


class Params:
    """Validated parameters: ``p.seed``, ``p.device``, ``p.loss``, ``p.threads`` and one typed object per section
    (``p.distill``, ``p.section("distill_v")``, ...). ``p.given`` names the sections the file sets."""

    data: DataParams
    feature_net: FeatureNetParams
    teacher: TeacherParams
    trajectories: TrajectoryParams
    trajectories_v: TrajectoryParams
    distill: DistillParams
    distill_v: DistillParams
    trajectories_stage2: TrajectoryParams
    distill_stage2: DistillParams
    baseline_pd: PDParams
    baseline_sfddm: SFDDMParams
    baseline_vanilla: VanillaParams
    evaluate: EvalParams
    report: ReportParams

    def __init__(self, raw: dict[str, Any], shared: SharedParams, sections: dict[str, Any]) -> None:
        self.raw = raw
        self.seed: int = shared.seed
        self.device: str = shared.device
        self.loss: str = shared.loss
        self.threads: int = shared.threads
        self.precision: str = shared.precision
        self.nproc: int = shared.nproc
        self.compile: bool = shared.compile
        self.channels_last: bool = shared.channels_last
        self.run_settings = {k: getattr(shared, k) for k in RUN_SETTINGS}  # as the sections inherit them
        self.given = tuple(k for k in sections if k in raw)
        self._sections = sections
        for name, value in sections.items():
            setattr(self, name, value)

    def section(self, name: str, kind: type[S] | None = None) -> S | Any:
        """The section ``name``; with ``kind``, refuse a section of another type (e.g. --section distill for
        the trajectories stage)."""
        if name not in self._sections:
            raise ParamError(f"params: no section {name!r}; sections: {', '.join(sorted(self._sections))}")
        value = self._sections[name]
        if kind is not None and not isinstance(value, kind):
            allowed = [k for k, v in self._sections.items() if isinstance(v, kind)]
            raise ParamError(f"{name}: not a {kind.__name__} section; allowed values: {', '.join(map(repr, allowed))}")
        return value

    def trajectories_for(self, name: str, *, required: bool = False) -> TrajectoryParams:
        """The trajectories section that feeds distill section ``name`` (its ``trajectories`` key); ``required``:
        both must be in the file (:meth:`required`)."""
        get = self.required if required else self.section
        return get(get(name, DistillParams).trajectories, TrajectoryParams)

    @property
    def absent(self) -> tuple[str, ...]:
        """The sections the file does not set (a stage that reads one refuses to run: :meth:`required`)."""
        return tuple(k for k in self._sections if k not in self.given)

    def required(self, name: str, kind: type[S] | None = None) -> S | Any:
        """The section ``name`` for a stage that reads it: refused when the file does not set it, so that a
        deleted section never runs a stage on silent defaults (``name: {}`` asks for the defaults)."""
        value = self.section(name, kind)
        if name not in self.given:
            raise ParamError(
                f"{name}: the section is missing from the params file, and a stage never runs on silent defaults; "
                f"restore it, or write `{name}: {{}}` to run on the defaults of docs/params.md"
            )
        return value

    def apply_threads(self) -> int:
        """Set torch's CPU thread count from ``threads`` (0 leaves torch's default), and the BLAS pools numpy and
        scipy use (FID's eigendecompositions) to the same count; returns torch's count in use.

        The BLAS limit matters as much as torch's: OpenBLAS starts one thread per core, and two processes doing
        that on a busy 2-core machine made one 2048x2048 eigendecomposition take 49 s instead of 1.7 s."""
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=self.threads, user_api="blas")
        return torch.get_num_threads()


def _with_shared(section: dict[str, Any], cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(section)
    for key in INHERITED:
        if key in raw and key not in out and key in cls.__dataclass_fields__:  # type: ignore[attr-defined]
            out[key] = raw[key]
    return out


def auto_noise_floor_seeds(evaluation_seeds: Any, training_seeds: list[Any]) -> str:
    """``evaluate.noise_floor_seeds: auto``: as many seeds as the evaluation's, from the first multiple of
    1,000,000 above every evaluation and trajectory seed (so disjoint from all of them)."""
    from pipeline.diffusion.seeds import format_seeds

    count = len(parse_seeds(evaluation_seeds))
    top = max(max(parse_seeds(s)) for s in [evaluation_seeds, *training_seeds])
    start = (top // 1_000_000 + 1) * 1_000_000
    return format_seeds(range(start, start + count))


def check_student_steps(name: str, distill: DistillParams, ref: str, trajectories: TrajectoryParams) -> None:
    """A distill section against the trajectories it reads: several N need one step-conditioned model (SFD-v),
    and every N leaves the student at least one network step after the analytical first step."""
    n = trajectories.schedule.get("num_steps", 4)
    values = n if isinstance(n, list) else [n]
    if len(values) > 1 and not distill.step_condition:
        raise ParamError(f"{name}.step_condition: {ref}.schedule.num_steps lists several N {values}; one model for "
                         "several N needs step_condition: true (SFD-v)")
    for v in values:
        if isinstance(v, int) and v - 1 - int(distill.afs) < 1:
            raise ParamError(f"{ref}.schedule.num_steps: N={v} with {name}.afs={distill.afs} leaves no network step")


def check_cross_sections(sections: dict[str, Any], given: tuple[str, ...] | None = None) -> None:
    """Rules between sections: distill -> an existing trajectories section whose N the student can learn (checked
    for the distill sections the file sets: an absent one never runs); evaluation seeds never trained on."""
    for name in DISTILL_SECTIONS:
        ref = sections[name].trajectories
        if ref not in TRAJECTORY_SECTIONS:
            raise ParamError(
                f"{name}.trajectories: got {ref!r}; allowed values: {', '.join(map(repr, TRAJECTORY_SECTIONS))}"
            )
        if given is None or name in given:
            check_student_steps(name, sections[name], ref, sections[ref])
    ev = sections["evaluate"]
    if ev.noise_floor_seeds == "auto":
        fix(ev, noise_floor_seeds=auto_noise_floor_seeds(ev.seeds, [sections[n].seeds for n in TRAJECTORY_SECTIONS]))
    for key in ("seeds", "noise_floor_seeds"):
        if getattr(ev, key) is None:
            continue
        evaluation = set(parse_seeds(getattr(ev, key)))
        for name in TRAJECTORY_SECTIONS:
            common = evaluation.intersection(parse_seeds(sections[name].seeds))
            if common:
                raise ParamError(
                    f"evaluate.{key}: {getattr(ev, key)!r} overlaps {name}.seeds {sections[name].seeds!r} "
                    f"({len(common)} seed(s) in common, e.g. {min(common)}); evaluation seeds must never be trained on"
                )


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a whole params mapping (every section, every cross-section rule) into a :class:`Params`."""
    if not isinstance(raw, dict):
        raise ParamError("params: the file must hold a mapping of sections")
    unknown = sorted(map(str, set(raw) - set(SECTIONS) - set(SHARED_KEYS)))
    if unknown:
        raise ParamError(
            f"params: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted([*SHARED_KEYS, *SECTIONS]))}"
        )
    shared = validate_section(SharedParams, {k: raw[k] for k in SHARED_KEYS if k in raw}, "")
    sections = {}
    for name, cls in SECTIONS.items():
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            raise ParamError(f"{name}: expected a mapping of keys, got {given!r}")
        sections[name] = validate_section(cls, _with_shared(given, cls, raw), name)
    check_cross_sections(sections, given=tuple(k for k in sections if k in raw))
    return Params(raw, shared, sections)


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
