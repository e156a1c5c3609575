"""The trajectories sections (``trajectories``, ``trajectories_v``, ``trajectories_stage2``).

Each gives one trajectory spec per student schedule (pipeline.trajectories.spec.trajectory_specs).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal

from pydantic import model_validator

from pipeline.config.fields import (
    Precision, NonNegativeInt, PositiveFloat, PositiveInt, ScheduleDict, Seeds, SolverName, check_schedule, num_steps_list,
    resolve_max_order,
)  # fmt: skip
from pipeline.config.validation import Section, fix, section
from pipeline.core.param_checks import ParamError, check_int
from pipeline.diffusion.schedules import Schedule, fit_to_teacher
from pipeline.diffusion.solvers import SOLVER_REGISTRY

COMPUTE_DTYPES = ("float32", "float64")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")  # bfloat16: stored as its 16 bits (uint16 in Zarr)
LABEL_POLICIES = ("none", "uniform_per_seed")
COMPRESSORS = ("blosc-zstd", "blosc-lz4", "zstd", "none")

LabelPolicy = Literal["none", "uniform_per_seed"]


TEACHER_SOURCES = ("gmm", "checkpoint")  # built-in teacher sources of a section's `teacher` (pipeline.teachers.loader)
GMM_OPTIONS = ("num_components", "sample_shape", "std", "seed", "conditional")


def check_teacher_source(teacher: dict[str, Any] | None) -> None:
    """A section's ``teacher: {source: gmm, ...}`` / ``{source: checkpoint, path: ...}`` (None: --teacher-ckpt)."""
    if teacher is None:
        return
    source = teacher.get("source")
    allowed = ", ".join(map(repr, TEACHER_SOURCES))
    if source is None:
        raise ValueError(f".teacher.source: missing; allowed values: {allowed}")
    if source not in TEACHER_SOURCES:
        raise ValueError(f".teacher.source: got {source!r}; allowed values: {allowed}")
    if source == "checkpoint" and teacher.get("path") is None:
        raise ValueError(".teacher.path: the 'checkpoint' teacher source needs the checkpoint directory path")
    unknown = sorted(set(teacher) - {"source", *GMM_OPTIONS}) if source == "gmm" else []
    if unknown:
        raise ValueError(f".teacher: unknown key(s) {', '.join(unknown)}; known: {', '.join(('source', *GMM_OPTIONS))}")


@section("trajectories", frozen=False)
class TrajectoryParams(Section):
    """A trajectories section of params.yaml (``trajectories``, ``trajectories_v``, ``trajectories_stage2``)."""

    solver: SolverName = "dpmpp"
    max_order: int | None = None  # ipndm 1-4, dpmpp 1-3 (absent: 3); other solvers: absent or 1. Always an int after loading
    lower_order_final: bool = True
    dynamic_thresholding: bool = False  # dpmpp only: sfd-main's thresholding of every x0 (quantile 0.995 of |x0|, floor 1)
    afs: bool = False
    M: NonNegativeInt = 3
    schedule: ScheduleDict = field(
        default_factory=lambda: {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
    )  # num_steps: one N, or a list of N (one store key each, SFD-v)
    seeds: Seeds = "0-1023"
    chunk_size: PositiveInt = 256
    batch_size: PositiveInt = 256
    compute_dtype: Literal["float32", "float64"] = "float32"  # the solver's arithmetic and x_T
    precision: Precision = "fp32"  # the teacher's forwards: fp32, or bf16/fp16 autocast (float32 compute_dtype only)
    storage_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # the stored states (the key says which); bfloat16 keeps float32's range
    compressor: Literal["blosc-zstd", "blosc-lz4", "zstd", "none"] = "blosc-zstd"
    label_policy: Literal["auto", "none", "uniform_per_seed"] = "auto"  # auto: uniform_per_seed for a conditional teacher
    guidance: PositiveFloat = 1.0
    teacher: dict[str, Any] | None = None  # {source: gmm, ...} when no --teacher-ckpt is given

    @model_validator(mode="after")
    def _check(self) -> "TrajectoryParams":
        fix(self, max_order=resolve_max_order(self.solver, self.max_order))
        check_teacher_source(self.teacher)
        if self.dynamic_thresholding and not SOLVER_REGISTRY[self.solver].thresholds:
            raise ValueError(f".dynamic_thresholding: only the dpmpp solver thresholds its data prediction, not {self.solver!r}")
        if self.precision != "fp32" and self.compute_dtype != "float32":
            raise ValueError(f".precision: {self.precision} autocast needs compute_dtype float32, got {self.compute_dtype}")
        try:
            for n in num_steps_list(self.schedule, allow_list=True):
                check_schedule(self.schedule, n)
        except ValueError as e:
            msg = str(e)
            raise ValueError(f".schedule{msg}" if msg.startswith(".") else f".schedule: {msg}") from None
        return self

    def chunk_overhead(self) -> tuple[int, int]:
        """(seeds requested, trajectories generated per N): the store commits whole chunks of ``chunk_size`` seeds,
        so a range not aligned to chunk_size computes the rest of its first and last chunks too."""
        from pipeline.diffusion.seeds import parse_seeds

        seeds = set(parse_seeds(self.seeds))
        return len(seeds), len({s // self.chunk_size for s in seeds}) * self.chunk_size

    def chunk_overhead_note(self, name: str) -> str | None:
        """One line saying what whole chunks cost beyond the requested seeds of section ``name`` (None: nothing)."""
        requested, generated = self.chunk_overhead()
        if generated == requested:
            return None
        return (f"{name}.seeds {self.seeds!r} with chunk_size {self.chunk_size}: {generated:,} trajectories per N "
                f"are generated for {requested:,} seeds ({generated - requested:,} more, +{(generated - requested) / requested:.0%}; "
                "the store commits whole chunks, the rest of a chunk is reused by a later range); a range aligned "
                "to chunk_size, or a chunk_size that divides it, computes none")

    def schedules(self, alphas_cumprod: Any = None, flow_shift: float | None = None) -> list[Schedule]:
        """One student schedule per N (a list of num_steps gives one key per N, for SFD-v). ``alphas_cumprod``:
        a discrete teacher's abar table (t_min / t_max default to its sigma range, the discrete kind uses it);
        ``flow_shift``: a flow-matching teacher's time shift (the flow kind, from sigma = inf;
        pipeline.diffusion.schedules.fit_to_teacher)."""
        values = self.num_steps_values()
        fitted = fit_to_teacher(dict(self.schedule), alphas_cumprod, where=f"{self.SECTION}.schedule", flow_shift=flow_shift)
        return [Schedule.from_dict({**fitted, "num_steps": v}) for v in values]

    def num_steps_values(self) -> list[int]:
        """The student's N of each key (one, or the list of SFD-v)."""
        n = self.schedule.get("num_steps", 4)
        values = n if isinstance(n, list) else [n]
        if not values:
            raise ParamError("schedule.num_steps: empty list")
        for v in values:
            check_int("schedule.num_steps", v, minimum=2)
        return values

    def resolve_label_policy(self, num_classes: int) -> str:
        if self.label_policy == "auto":
            return "uniform_per_seed" if num_classes > 0 else "none"
        return self.label_policy

