"""The evaluation sections: ``feature_net`` (the FID classifier), ``evaluate`` and ``report``."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator, with_config
from typing_extensions import TypedDict

from pipeline.config.fields import (
    Precision, NESTED, Device, NonNegativeInt, PositiveFloat, PositiveInt, RangeDict, Seeds, check_schedule,
)  # fmt: skip
from pipeline.config.validation import Section, section
from pipeline.diffusion.sampling import SOLVER_NAMES, SamplerSpec, resolve_solver
from pipeline.diffusion.schedules import SCHEDULE_KINDS, Schedule, fit_to_teacher
from pipeline.diffusion.solvers import num_steps_for_nfe

FEATURE_SPACES = ("classifier", "inception")
ENTRY = re.compile(r"^(?P<sampler>.+)/nfe(?P<nfe>\d+)$")  # evaluation keys "<sampler>/nfe<k>"
ReferenceScheduleKind = Literal[tuple(k for k in SCHEDULE_KINDS if k != "discrete")]  # type: ignore[valid-type]
EvalSolverName = Literal[tuple(SOLVER_NAMES)]  # type: ignore[valid-type]  (euler, heun, ..., dpmpp3m)


@section("feature_net")
class FeatureNetParams(Section):
    channels: PositiveInt = 32
    feature_dim: PositiveInt = 128
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3
    shift_augment: NonNegativeInt = 1  # random translations of up to this many pixels
    min_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.95  # the stage fails below this held-out accuracy
    seed: NonNegativeInt = 0


@with_config(NESTED)
class ReferenceDict(TypedDict, total=False):
    """The teacher's reference sampler: a solver name and a schedule (EDM: Heun, 18 steps, append_zero)."""

    solver: EvalSolverName
    num_steps: Annotated[int, Field(ge=2)]
    kind: ReferenceScheduleKind
    t_min: PositiveFloat
    t_max: PositiveFloat
    rho: PositiveFloat
    shift: PositiveFloat  # flow only (default: the flow teacher's own)
    append_zero: bool


@section("evaluate")
class EvalParams(Section):
    seeds: Seeds = "1000000-1001999"  # evaluation seeds; disjoint from every trajectories section's seeds
    # the noise floor's second teacher sample set: as many seeds as `seeds`, disjoint from them and from
    # every trajectories section's seeds; "auto": that many from the first multiple of 1,000,000 above
    # every evaluation and trajectory seed (resolved by pipeline.config.params); null: no noise floor
    noise_floor_seeds: Seeds | Literal["auto"] | None = "auto"
    bootstrap: NonNegativeInt = 100  # bootstrap resamples of each entry's features for its FID's sd (0: off)
    # the paired teacher-fidelity metric: the first this-many evaluation seeds (all when fewer); evaluate_solvers keeps
    # the teacher's reference samples of them (float16 images + features: ~P x C x H x W x 2 bytes)
    paired_seeds: Annotated[int, Field(ge=2)] = 1000
    grid_seeds: NonNegativeInt = 64  # the first this-many evaluation seeds go into each grid PNG
    batch_size: PositiveInt = 1000
    solvers: list[EvalSolverName] = field(default_factory=lambda: ["euler", "ipndm", "dpmpp3m"])
    nfes: list[PositiveInt] = field(default_factory=lambda: [2, 3, 4, 5])
    schedule: RangeDict = field(default_factory=lambda: {"kind": "polynomial", "t_min": 0.006, "t_max": 80.0, "rho": 7.0})
    reference: ReferenceDict = field(
        default_factory=lambda: {"solver": "heun", "num_steps": 18, "t_min": 0.002, "t_max": 80.0, "rho": 7.0,
                                 "append_zero": True}
    )  # the teacher's reference sampler (EDM: 35 NFE)
    guidance: PositiveFloat = 1.0  # classifier-free guidance for the teacher entries
    round_nfes: Annotated[list[PositiveInt], Field(min_length=1)] | None = None  # the nfe<k>/ checkpoints of a rounds directory (PD, SFDDM's T') that are evaluated; null: all
    student_guidance: list[PositiveFloat] = field(default_factory=list)  # extra guidance scales w for every distilled student (entries "<name>-w<w>/nfe<k>")
    clip_weights: str | None = None  # text-to-image: a local CLIP folder (transformers CLIPModel, safetensors) for the CLIP score
    features: Literal["classifier", "inception"] = "classifier"  # classifier (feature_net) or inception (local weights)
    inception_weights: str | None = None  # path of torch-fidelity's pt_inception-2015-12-05-6726825d.pth
    reference_split: Literal["train", "held_out"] = "train"
    reference_stats: str | None = None  # EDM's reference .npz (mu, sigma: FID only) or a folder/zip of PNGs; overrides reference_split
    kid_subsets: PositiveInt = 100
    kid_subset_size: Annotated[int, Field(ge=2)] = 1000
    cache_dir: str = ".cache/fidelity"  # reference features, keyed by extractor weights hash
    precision: Precision = "fp32"  # fp32 | bf16 | fp16: autocast of the forwards (fp16 training: a gradient scaler)
    device: Device = "auto"

    @model_validator(mode="after")
    def _check(self) -> "EvalParams":
        if self.noise_floor_seeds not in (None, "auto"):
            from pipeline.diffusion.seeds import parse_seeds

            floor, seeds = parse_seeds(self.noise_floor_seeds), parse_seeds(self.seeds)
            if len(floor) != len(seeds):
                raise ValueError(f".noise_floor_seeds: {len(floor)} seeds, evaluate.seeds has {len(seeds)}; the noise floor "
                                 "compares two sample sets of the same size")
            common = set(floor).intersection(seeds)
            if common:
                raise ValueError(f".noise_floor_seeds: overlaps evaluate.seeds ({len(common)} seed(s) in common, e.g. "
                                 f"{min(common)}); the two teacher sample sets must be independent")
        try:
            check_schedule(dict(self.schedule), 4)
        except ValueError as e:
            raise ValueError(f".schedule: {e}") from None
        if "solver" not in self.reference:
            raise ValueError(f".reference.solver: missing; allowed values: {', '.join(map(repr, SOLVER_NAMES))}")
        ref = {k: v for k, v in self.reference.items() if k not in ("solver", "append_zero")}
        try:
            check_schedule({"kind": "polynomial", **ref}, ref.get("num_steps", 4))
        except ValueError as e:
            raise ValueError(f".reference: {e}") from None
        return self

    def reference_spec(self, alphas_cumprod: Any = None, flow_shift: float | None = None) -> SamplerSpec:
        """The teacher's reference sampler; ``alphas_cumprod``: a discrete teacher's table, ``flow_shift`` a flow
        teacher's time shift (fit_to_teacher)."""
        ref: dict[str, Any] = dict(self.reference)
        solver, order = resolve_solver(ref.pop("solver"))
        append_zero = bool(ref.pop("append_zero", False))
        ref = fit_to_teacher({"kind": "polynomial", **ref}, alphas_cumprod, where="evaluate.reference", flow_shift=flow_shift)
        sched = Schedule.from_dict(ref, section="evaluate.reference")
        return SamplerSpec(solver, order, sched, guidance=self.guidance, append_zero=append_zero)

    def solver_specs(self, alphas_cumprod: Any = None, flow_shift: float | None = None) -> dict[str, SamplerSpec]:
        """{"<solver>/nfe<k>": spec} for the training-free solvers on the student schedule (fitted to a
        discrete teacher's table ``alphas_cumprod``, or a flow teacher's time shift ``flow_shift``, when given)."""
        out = {}
        schedule = fit_to_teacher(dict(self.schedule), alphas_cumprod, where="evaluate.schedule", flow_shift=flow_shift)
        ends_at_zero = schedule.get("kind") == "flow" and not schedule.get("t_min")  # heun / dpm2: the last step is Euler
        for name in self.solvers:
            solver, order = resolve_solver(name)
            for k in self.nfes:
                n = num_steps_for_nfe(solver, k, ends_at_zero=ends_at_zero)
                sched = Schedule.from_dict({**schedule, "num_steps": n}, section="evaluate.schedule")
                out[f"{name}/nfe{k}"] = SamplerSpec(solver, order, sched, guidance=self.guidance)
        return out


def _check_panel(name: str) -> str:
    if not ENTRY.match(name):
        raise ValueError(f"{name!r} is not an evaluation key like 'sfd/nfe2'")
    return name


@section("report", frozen=False)
class ReportParams(Section):
    panels: list[Annotated[str, AfterValidator(_check_panel)]] = field(
        default_factory=lambda: ["teacher/nfe35", "dpmpp3m/nfe2", "sfd/nfe2", "sfd-stage2/nfe1"]
    )  # grids shown side by side (same seeds), in this order; missing entries are skipped with a note
    bootstrap: Annotated[int, Field(ge=100)] = 1000  # resamples of the paired bootstrap (differences from SFD)
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95  # the paired bootstrap's percentile interval
