"""The baseline sections: progressive distillation, SFDDM and vanilla trajectory distillation."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from pipeline.config.fields import (
    Precision, Device, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ScheduleDict, SolverName, check_schedule,
    num_steps_list, resolve_max_order,
)  # fmt: skip
from pipeline.config.validation import Section, fix, section
from pipeline.diffusion.schedules import Schedule, time_steps

Weighting = Literal["truncated_snr", "snr_plus_one"]
Init = Literal["random", "teacher"]
Budget = Literal["sfd_stage1", "updates"]
VanillaLoss = Literal["l1", "l2"]


def _check_range(t_min: float, t_max: float, rho: float) -> None:
    check_schedule({"kind": "polynomial", "t_min": t_min, "t_max": t_max, "rho": rho}, 2)


@section("baseline_pd")
class PDParams(Section):
    start_steps: int = 64  # Euler steps of the original teacher's sampler; round 1's student gets start/2
    final_steps: PositiveInt = 1  # the last round's student steps (NFE)
    updates_per_round: PositiveInt = 60
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-4  # at the start of each round, decaying linearly to 0 (official: 5e-5, 50k updates)
    weighting: Weighting = "truncated_snr"
    grad_clip: PositiveFloat = 1.0  # max gradient norm
    t_min: PositiveFloat = 0.006
    t_max: PositiveFloat = 80.0
    rho: PositiveFloat = 7.0
    seed: NonNegativeInt = 0
    precision: Precision = "fp32"  # fp32 | bf16 | fp16: autocast of the forwards (fp16: a gradient scaler)
    device: Device = "auto"
    batch_gpu: PositiveInt | None = None  # rows per micro-batch on each process (gradient accumulation); None: all its rows
    activation_checkpointing: bool = False  # recompute the student's block activations in the backward pass

    @model_validator(mode="after")
    def _check(self) -> "PDParams":
        if self.start_steps < 2 * self.final_steps:
            raise ValueError(f".start_steps: must be >= {2 * self.final_steps}, got {self.start_steps}")
        ratio = self.start_steps // self.final_steps
        if self.start_steps % self.final_steps or ratio & (ratio - 1):
            raise ValueError(
                ".start_steps: must be final_steps times a power of two (rounds halve N), "
                f"got start_steps={self.start_steps}, final_steps={self.final_steps}"
            )
        _check_range(self.t_min, self.t_max, self.rho)
        return self

    def round_steps(self) -> list[int]:
        """Student steps N of each round: start/2, start/4, ..., final."""
        out, n = [], self.start_steps
        while n > self.final_steps:
            n //= 2
            out.append(n)
        return out

    def student_schedule(self, num_steps: int) -> Schedule:
        """The N-step student grid: N + 1 polynomial timestamps."""
        return Schedule("polynomial", num_steps + 1, self.t_min, self.t_max, self.rho)


@section("baseline_sfddm")
class SFDDMParams(Section):
    teacher_steps: PositiveInt = 1024  # T: the teacher's fine grid
    student_steps: Annotated[list[PositiveInt], Field(min_length=1)] = field(
        default_factory=lambda: [2]
    )  # T' values, one student each (NFE = T')
    init: Init = "teacher"  # a copy of the teacher, or `random` (the public code's random initialisation)
    feature_weight: NonNegativeFloat = 1.0  # w_h on mean|h_S - h_T|
    budget: Budget = "sfd_stage1"  # per student: SFD stage 1's forward equivalents on the same params, or `updates`
    updates: PositiveInt = 150  # per student, with budget: updates
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-4  # public code: Adam 2e-4, batch 50, ~10 epochs of CIFAR-10
    t_min: PositiveFloat = 0.006
    t_max: PositiveFloat = 80.0
    rho: PositiveFloat = 7.0
    seed: NonNegativeInt = 0
    precision: Precision = "fp32"  # fp32 | bf16 | fp16: autocast of the forwards (fp16: a gradient scaler)
    device: Device = "auto"
    batch_gpu: PositiveInt | None = None  # rows per micro-batch on each process (gradient accumulation); None: all its rows
    activation_checkpointing: bool = False  # recompute the student's block activations in the backward pass

    @model_validator(mode="after")
    def _check(self) -> "SFDDMParams":
        for i, t in enumerate(self.student_steps):
            if t > self.teacher_steps:
                raise ValueError(f".student_steps[{i}]: must be <= teacher_steps ({self.teacher_steps}), got {t}")
            if self.teacher_steps % t:
                raise ValueError(
                    f".student_steps: T'={t} must divide teacher_steps T={self.teacher_steps} (phi(t') = (T/T') t')"
                )
        if len(set(self.student_steps)) != len(self.student_steps):
            raise ValueError(f".student_steps: {self.student_steps} lists a value twice")
        _check_range(self.t_min, self.t_max, self.rho)
        return self

    def teacher_sigmas(self) -> torch.Tensor:
        return time_steps("polynomial", self.teacher_steps + 1, self.t_min, self.t_max, self.rho)

    def student_schedule(self, student_steps: int) -> Schedule:
        """The student's grid as a Schedule (T' + 1 timestamps); equals teacher_sigmas()[phi] (nested polynomial grids)."""
        return Schedule("polynomial", student_steps + 1, self.t_min, self.t_max, self.rho)


@section("baseline_vanilla")
class VanillaParams(Section):
    schedule: ScheduleDict = field(
        default_factory=lambda: {"kind": "polynomial", "num_steps": 4, "t_min": 0.006, "t_max": 80.0, "rho": 7.0}
    )  # the student's N timestamps (N = 4 + AFS: NFE 2, as SFD's default)
    afs: bool = True
    solver: SolverName = "dpmpp"  # the teacher solver over the K = M + 1 sub-steps (SFD's default teacher)
    max_order: int | None = None  # as in the trajectories sections: ipndm 1-4, dpmpp 1-3 (absent: 3), else absent or 1
    M: NonNegativeInt = 3
    loss: VanillaLoss = "l1"
    updates: PositiveInt = 150
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 5e-5  # x 0.1 once half the updates are done
    seed: NonNegativeInt = 0
    precision: Precision = "fp32"  # fp32 | bf16 | fp16: autocast of the forwards (fp16: a gradient scaler)
    device: Device = "auto"
    batch_gpu: PositiveInt | None = None  # rows per micro-batch on each process (gradient accumulation); None: all its rows
    activation_checkpointing: bool = False  # recompute the student's block activations in the backward pass

    @model_validator(mode="after")
    def _check(self) -> "VanillaParams":
        try:
            (n,) = num_steps_list(self.schedule, allow_list=False)
            check_schedule(self.schedule, n)
            if n < (3 if self.afs else 2):
                raise ValueError(f".num_steps: with afs the student needs N >= 3, got {n}")
        except ValueError as e:
            msg = str(e)
            raise ValueError(f".schedule{msg}" if msg.startswith(".") else f".schedule: {msg}") from None
        fix(self, max_order=resolve_max_order(self.solver, self.max_order))
        return self

    def student_schedule(self) -> Schedule:
        return Schedule.from_dict(self.schedule)
