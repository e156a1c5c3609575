"""What a cached teacher trajectory depends on, and the content-hash key derived from it.

The teacher states at the student timestamps t_1..t_{N-1} (sfd-method.md section 4) are a
function of (teacher weights, solver and its options, M, student schedule, compute dtype, compute
precision, seed, label) and never of the student. The compute precision (``precision``: the teacher's
forwards in fp32, or under bf16/fp16 autocast) enters the description only when it is not fp32, and
DPM-Solver++'s dynamic thresholding only when it is on, so every key written before those settings
existed is unchanged. A :class:`TrajectorySpec` holds everything but the seed; its
``key`` (xxh3-128 of the canonical description) names the store group holding those states.
:func:`trajectory_specs` gives a trajectories params section's specs, one per student schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config.trajectories import (
    COMPUTE_DTYPES, LABEL_POLICIES, STORAGE_DTYPES, LabelPolicy, TrajectoryParams,
)  # fmt: skip
from pipeline.core.distributed import PRECISIONS
from pipeline.core.hashing import hash_description
from pipeline.core.param_checks import ParamError, check_choice, check_int, check_positive
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.solvers import DYNAMIC_THRESHOLD_QUANTILE, MAX_ORDER, SOLVERS

SPEC_VERSION = 2  # bump when the meaning of a stored trajectory or of its key changes
SPEC_CHANGES = {  # what an older version's keys lacked, for the error that refuses them
    1: "its teacher hash covered the network weights only, not the preconditioner, scheduler or VAE "
       "(pipeline.teachers.content); regenerate the trajectories (the stage writes the new key) and drop the "
       "old key with `sfd store gc`",
}


@dataclass(frozen=True)
class TrajectorySpec:
    """Everything (but the seed) that the stored states x_T, y_1..y_{N-1} and labels depend on."""

    teacher_hash: str  # content hash of the teacher (weights + any bound condition)
    schedule: Schedule  # the student schedule; the teacher runs on schedule.fine(M)
    solver: str = "dpmpp"
    max_order: int = 3
    lower_order_final: bool = True
    afs: bool = False
    dynamic_thresholding: bool = False  # dpmpp: every x0 thresholded as sfd-main does (pipeline.diffusion.solvers)
    M: int = 3  # teacher steps inserted between two student timestamps
    compute_dtype: str = "float32"
    storage_dtype: str = "float32"
    precision: str = "fp32"  # the teacher's forwards: fp32, or bf16/fp16 autocast (pipeline.core.distributed)
    label_policy: LabelPolicy = "none"
    num_classes: int = 0
    sample_shape: tuple[int, ...] = (3, 32, 32)
    guidance: float = 1.0
    prompt_set: str | None = None  # text-to-image teachers: the prompt set's hash (labels are prompt indices)

    def __post_init__(self) -> None:
        if not isinstance(self.teacher_hash, str) or not self.teacher_hash:
            raise ParamError(f"teacher_hash: expected a non-empty string, got {self.teacher_hash!r}")
        if not isinstance(self.schedule, Schedule):
            raise ParamError(f"schedule: expected a pipeline.diffusion.schedules.Schedule, got {type(self.schedule).__name__}")
        check_choice("solver", self.solver, SOLVERS)
        check_int("max_order", self.max_order, minimum=1, maximum=MAX_ORDER.get(self.solver, 4))
        check_int("M", self.M, minimum=0)
        if not isinstance(self.dynamic_thresholding, bool):
            raise ParamError(f"dynamic_thresholding: expected true or false, got {self.dynamic_thresholding!r}")
        if self.dynamic_thresholding and self.solver != "dpmpp":
            raise ParamError(f"dynamic_thresholding: only the dpmpp solver thresholds its data prediction, not {self.solver!r}")
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.precision != "fp32" and self.compute_dtype != "float32":
            raise ParamError(f"precision: {self.precision} autocast needs compute_dtype float32, got {self.compute_dtype}")
        check_choice("label_policy", self.label_policy, LABEL_POLICIES)
        check_int("num_classes", self.num_classes, minimum=0)
        if self.label_policy == "uniform_per_seed" and self.num_classes < 1:
            raise ParamError("label_policy: 'uniform_per_seed' needs num_classes >= 1 (the teacher is unconditional)")
        check_positive("guidance", self.guidance)
        if self.prompt_set is not None and (not isinstance(self.prompt_set, str) or not self.prompt_set):
            raise ParamError(f"prompt_set: expected a prompt-set hash (a non-empty string) or None, got {self.prompt_set!r}")
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
        d = {
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
        if self.dynamic_thresholding:  # only when on: keys without it stay those written before the setting existed
            d["solver"]["dynamic_thresholding"] = {"quantile": DYNAMIC_THRESHOLD_QUANTILE, "floor": 1.0}
        if self.precision != "fp32":  # fp32 keys stay those written before the setting existed
            d["precision"] = self.precision
        if self.prompt_set is not None:  # only with a prompt set, so the keys of other teachers do not change
            d["prompt_set"] = self.prompt_set
        return d

    @property
    def key(self) -> str:
        return hash_description(self.description())

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> "TrajectorySpec":
        """Inverse of :meth:`description` (used to rebuild a spec from a store's attributes)."""
        if d.get("spec_version") != SPEC_VERSION:
            raise ParamError(f"spec_version: this code reads version {SPEC_VERSION}, the store has {d.get('spec_version')!r}"
                             + older_version_hint(d.get("spec_version")))
        return cls(
            teacher_hash=d["teacher_hash"],
            schedule=Schedule.from_dict(d["schedule"]),
            solver=d["solver"]["name"],
            max_order=d["solver"]["max_order"],
            lower_order_final=d["solver"]["lower_order_final"],
            afs=d["solver"]["afs"],
            dynamic_thresholding=_thresholding_from(d["solver"].get("dynamic_thresholding")),
            M=d["M"],
            compute_dtype=d["compute_dtype"],
            storage_dtype=d["storage_dtype"],
            precision=d.get("precision", "fp32"),
            label_policy=d["labels"]["policy"],
            num_classes=d["labels"]["num_classes"],
            sample_shape=tuple(d["sample_shape"]),
            guidance=d["guidance"],
            prompt_set=d.get("prompt_set"),
        )


def trajectory_specs(
    params: TrajectoryParams, *, teacher_hash: str, num_classes: int, sample_shape: tuple[int, ...],
    alphas_cumprod: Any = None, prompt_set: str | None = None, flow_shift: float | None = None,
) -> list[TrajectorySpec]:
    """The trajectory specs (one per schedule) of a trajectories section for a teacher; readers build the same
    to find their key. A discrete teacher passes its abar table ``alphas_cumprod`` (its sigma range bounds the
    schedule), a flow-matching teacher its time shift ``flow_shift`` (the flow kind from sigma = inf), a
    text-to-image teacher its ``prompt_set`` hash (labels are then prompt indices)."""
    policy = params.resolve_label_policy(num_classes)
    return [
        TrajectorySpec(
            teacher_hash=teacher_hash,
            schedule=s,
            solver=params.solver,
            max_order=params.max_order,  # type: ignore[arg-type]  (an int once validated)
            lower_order_final=params.lower_order_final,
            afs=params.afs,
            dynamic_thresholding=params.dynamic_thresholding,
            M=params.M,
            compute_dtype=params.compute_dtype,
            storage_dtype=params.storage_dtype,
            precision=params.precision,
            label_policy=policy,  # type: ignore[arg-type]
            num_classes=num_classes if policy != "none" else 0,
            sample_shape=tuple(sample_shape),
            guidance=params.guidance,
            prompt_set=prompt_set,
        )
        for s in params.schedules(alphas_cumprod, flow_shift)
    ]


def older_version_hint(version: Any) -> str:
    """'' or '; written by an earlier version of the pipeline: <what changed>' for a stored spec_version."""
    reason = SPEC_CHANGES.get(version) if isinstance(version, int) and version < SPEC_VERSION else None
    return f"; written by an earlier version of the pipeline (spec_version {version}): {reason}" if reason else ""


def _thresholding_from(value: Any) -> bool:
    """A stored description's ``solver.dynamic_thresholding`` (absent: off); constants this code does not use are refused."""
    if value is None:
        return False
    if value != {"quantile": DYNAMIC_THRESHOLD_QUANTILE, "floor": 1.0}:
        raise ParamError(f"solver.dynamic_thresholding: this code thresholds at quantile {DYNAMIC_THRESHOLD_QUANTILE}, "
                         f"floor 1; the store has {value!r}")
    return True


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k in sorted(d):
            out.update(_flatten(d[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two descriptions, e.g. 'schedule.num_steps: expected 4, found 5'."""
    e, f = _flatten(expected), _flatten(found)
    out = []
    for name in sorted(set(e) | set(f)):
        if name not in f:
            out.append(f"{name}: expected {e[name]!r}, missing in the store")
        elif name not in e:
            out.append(f"{name}: not expected, found {f[name]!r}")
        elif e[name] != f[name]:
            out.append(f"{name}: expected {e[name]!r}, found {f[name]!r}")
    return out
