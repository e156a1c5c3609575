"""The trajectories sections (``trajectories``, ``trajectories_v``, ``trajectories_stage2``) and the spec
they give per student schedule: everything (but the seed) a cached teacher trajectory depends on.

The teacher states at the student timestamps t_1..t_{N-1} (sfd-method.md section 4) are a
function of (teacher weights, solver and its options, M, student schedule, compute dtype, seed,
label) and never of the student. A :class:`TrajectorySpec` holds everything but the seed; its
``key`` (xxh3-128 of the canonical description) names the store group holding those states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import model_validator

from pipeline.config.fields import (
    NonNegativeInt, PositiveFloat, PositiveInt, ScheduleDict, Seeds, SolverName, check_schedule, num_steps_list,
    resolve_max_order,
)  # fmt: skip
from pipeline.config.validation import Section, fix, section
from pipeline.core.hashing import hash_description
from pipeline.core.param_checks import ParamError, check_choice, check_int, check_positive
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.solvers import MAX_ORDER, SOLVERS

SPEC_VERSION = 1  # bump when the meaning of a stored trajectory changes
COMPUTE_DTYPES = ("float32", "float64")
STORAGE_DTYPES = ("float32", "float16")
LABEL_POLICIES = ("none", "uniform_per_seed")
COMPRESSORS = ("blosc-zstd", "blosc-lz4", "zstd", "none")

LabelPolicy = Literal["none", "uniform_per_seed"]


@dataclass(frozen=True)
class TrajectorySpec:
    """Everything (but the seed) that the stored states x_T, y_1..y_{N-1} and labels depend on."""

    teacher_hash: str  # content hash of the teacher (weights + any bound condition)
    schedule: Schedule  # the student schedule; the teacher runs on schedule.fine(M)
    solver: str = "dpmpp"
    max_order: int = 3
    lower_order_final: bool = True
    afs: bool = False
    M: int = 3  # teacher steps inserted between two student timestamps
    compute_dtype: str = "float32"
    storage_dtype: str = "float32"
    label_policy: LabelPolicy = "none"
    num_classes: int = 0
    sample_shape: tuple[int, ...] = (3, 32, 32)
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.teacher_hash, str) or not self.teacher_hash:
            raise ParamError(f"teacher_hash: expected a non-empty string, got {self.teacher_hash!r}")
        if not isinstance(self.schedule, Schedule):
            raise ParamError(f"schedule: expected a pipeline.diffusion.schedules.Schedule, got {type(self.schedule).__name__}")
        check_choice("solver", self.solver, SOLVERS)
        check_int("max_order", self.max_order, minimum=1, maximum=MAX_ORDER.get(self.solver, 4))
        check_int("M", self.M, minimum=0)
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        check_choice("label_policy", self.label_policy, LABEL_POLICIES)
        check_int("num_classes", self.num_classes, minimum=0)
        if self.label_policy == "uniform_per_seed" and self.num_classes < 1:
            raise ParamError("label_policy: 'uniform_per_seed' needs num_classes >= 1 (the teacher is unconditional)")
        check_positive("guidance", self.guidance)
        if self.schedule.num_steps < 2:
            raise ParamError(f"schedule.num_steps: must be >= 2, got {self.schedule.num_steps}")
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise ParamError(f"sample_shape: expected positive sizes, got {self.sample_shape}")

    @property
    def num_targets(self) -> int:
        """Number of stored teacher states per seed: t_1..t_{N-1}."""
        return self.schedule.num_steps - 1

    @property
    def labelled(self) -> bool:
        return self.label_policy != "none"

    def description(self) -> dict[str, Any]:
        """Readable, JSON-serialisable description; equal descriptions mean interchangeable states."""
        return {
            "spec_version": SPEC_VERSION,
            "teacher_hash": self.teacher_hash,
            "solver": {
                "name": self.solver,
                "max_order": self.max_order,
                "lower_order_final": self.lower_order_final,
                "afs": self.afs,
            },
            "M": self.M,
            "schedule": self.schedule.to_dict(),
            "compute_dtype": self.compute_dtype,
            "storage_dtype": self.storage_dtype,
            "labels": {"policy": self.label_policy, "num_classes": self.num_classes},
            "sample_shape": list(self.sample_shape),
            "guidance": float(self.guidance),
        }

    @property
    def key(self) -> str:
        return hash_description(self.description())

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> "TrajectorySpec":
        """Inverse of :meth:`description` (used to rebuild a spec from a store's attributes)."""
        if d.get("spec_version") != SPEC_VERSION:
            raise ParamError(f"spec_version: this code reads version {SPEC_VERSION}, the store has {d.get('spec_version')!r}")
        return cls(
            teacher_hash=d["teacher_hash"],
            schedule=Schedule.from_dict(d["schedule"]),
            solver=d["solver"]["name"],
            max_order=d["solver"]["max_order"],
            lower_order_final=d["solver"]["lower_order_final"],
            afs=d["solver"]["afs"],
            M=d["M"],
            compute_dtype=d["compute_dtype"],
            storage_dtype=d["storage_dtype"],
            label_policy=d["labels"]["policy"],
            num_classes=d["labels"]["num_classes"],
            sample_shape=tuple(d["sample_shape"]),
            guidance=d["guidance"],
        )


@section("trajectories", frozen=False)
class TrajectoryParams(Section):
    """A trajectories section of params.yaml (``trajectories``, ``trajectories_v``, ``trajectories_stage2``)."""

    solver: SolverName = "dpmpp"
    max_order: int | None = None  # ipndm 1-4, dpmpp 1-3 (absent: 3); other solvers: absent or 1. Always an int after loading
    lower_order_final: bool = True
    afs: bool = False
    M: NonNegativeInt = 3
    schedule: ScheduleDict = field(
        default_factory=lambda: {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
    )  # num_steps: one N, or a list of N (one store key each, SFD-v)
    seeds: Seeds = "0-1023"
    chunk_size: PositiveInt = 256
    batch_size: PositiveInt = 256
    compute_dtype: Literal["float32", "float64"] = "float32"
    storage_dtype: Literal["float32", "float16"] = "float32"
    compressor: Literal["blosc-zstd", "blosc-lz4", "zstd", "none"] = "blosc-zstd"
    label_policy: Literal["auto", "none", "uniform_per_seed"] = "auto"  # auto: uniform_per_seed for a conditional teacher
    guidance: PositiveFloat = 1.0
    teacher: dict[str, Any] | None = None  # {source: gmm, ...} when no --teacher-ckpt is given

    @model_validator(mode="after")
    def _check(self) -> "TrajectoryParams":
        fix(self, max_order=resolve_max_order(self.solver, self.max_order))
        try:
            for n in num_steps_list(self.schedule, allow_list=True):
                check_schedule(self.schedule, n)
        except ValueError as e:
            msg = str(e)
            raise ValueError(f".schedule{msg}" if msg.startswith(".") else f".schedule: {msg}") from None
        return self

    def schedules(self) -> list[Schedule]:
        """One student schedule per N (a list of num_steps gives one key per N, for SFD-v)."""
        n = self.schedule.get("num_steps", 4)
        values = n if isinstance(n, list) else [n]
        if not values:
            raise ParamError("schedule.num_steps: empty list")
        for v in values:
            check_int("schedule.num_steps", v, minimum=2)
        return [Schedule.from_dict({**self.schedule, "num_steps": v}) for v in values]

    def resolve_label_policy(self, num_classes: int) -> str:
        if self.label_policy == "auto":
            return "uniform_per_seed" if num_classes > 0 else "none"
        return self.label_policy

    def specs(self, *, teacher_hash: str, num_classes: int, sample_shape: tuple[int, ...]) -> list[TrajectorySpec]:
        """The trajectory specs (one per schedule) for a teacher; readers build the same to find their key."""
        policy = self.resolve_label_policy(num_classes)
        return [
            TrajectorySpec(
                teacher_hash=teacher_hash,
                schedule=s,
                solver=self.solver,
                max_order=self.max_order,  # type: ignore[arg-type]  (an int once validated)
                lower_order_final=self.lower_order_final,
                afs=self.afs,
                M=self.M,
                compute_dtype=self.compute_dtype,
                storage_dtype=self.storage_dtype,
                label_policy=policy,  # type: ignore[arg-type]
                num_classes=num_classes if policy != "none" else 0,
                sample_shape=tuple(sample_shape),
                guidance=self.guidance,
            )
            for s in self.schedules()
        ]
