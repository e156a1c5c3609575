"""Sampling: any denoiser with any solver / schedule / NFE, per-seed noise, PNGs and image grids.

Sample i starts from x_0 = t_max · z_i (z_i itself when t_max = inf: a flow schedule) with z_i drawn from seed i's own generator
(pipeline.diffusion.seeds), so it is the same whatever the batch size. A distilled checkpoint carries
its sampler (``"sampler"`` section: solver, max_order, schedule, afs, step_condition,
guidance); a teacher checkpoint has none and gets DPM-Solver++(3M) on the student schedule
unless the caller picks something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from pipeline.diffusion.denoisers import Denoiser, bind_num_steps, guided
from pipeline.core.param_checks import ParamError, check_choice, check_int
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.seeds import seed_labels, seed_noise
from pipeline.diffusion.solvers import SOLVER_REGISTRY, SOLVERS, initial_state, solve, solver_nfe

# evaluation / CLI names -> (solver, max_order): each registered solver at its default order, then its aliases
SOLVER_NAMES: dict[str, tuple[str, int]] = {
    **{name: (name, s.default_order) for name, s in SOLVER_REGISTRY.items()},
    **{alias: (name, order) for name, s in SOLVER_REGISTRY.items() for alias, order in s.aliases},
}
DEFAULT_TEACHER_SAMPLER = {"solver": "dpmpp", "max_order": 3, "num_steps": 6}  # NFE 5 on the student schedule


def resolve_solver(name: str, max_order: int | None = None) -> tuple[str, int]:
    """('dpmpp3m' | 'ipndm' | ...) -> (solver for pipeline.diffusion.solvers.solve, max_order)."""
    check_choice("solver", name, list(SOLVER_NAMES))
    solver, order = SOLVER_NAMES[name]
    return solver, order if max_order is None else max_order


@dataclass(frozen=True)
class SamplerSpec:
    """Everything a sampler needs besides the denoiser and the seeds."""

    solver: str  # a pipeline.diffusion.solvers name
    max_order: int
    schedule: Schedule
    afs: bool = False
    guidance: float = 1.0
    step_condition: tuple[int, ...] | None = None  # SFD-v: the N values the network supports
    append_zero: bool = False  # EDM's reference sampler: a final step to t = 0 after the schedule

    @property
    def nfe(self) -> int:
        n = self.schedule.num_steps + int(self.append_zero)
        ends_at_zero = self.append_zero or self.schedule.t_min == 0  # a flow schedule may end at the data
        return solver_nfe(self.solver, n, afs=self.afs, ends_at_zero=ends_at_zero)

    @property
    def bound_num_steps(self) -> int | None:
        """The N a step-conditioned (SFD-v) network is called with: the schedule's; None without a step condition."""
        return None if self.step_condition is None else self.schedule.num_steps

    @property
    def network_calls(self) -> int:
        """Network evaluations per sample: the NFE, doubled by classifier-free guidance (w != 1: two branches)."""
        return self.nfe * (1 if self.guidance == 1.0 else 2)

    def t_steps(self) -> torch.Tensor:
        """The float64 timestamps t_0 = t_max > ... (> 0 when append_zero)."""
        t = self.schedule.t_steps()
        return torch.cat([t, t.new_zeros(1)]) if self.append_zero else t

    def to_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "max_order": self.max_order,
            "schedule": self.schedule.to_dict(),
            "afs": self.afs,
            "step_condition": None if self.step_condition is None else list(self.step_condition),
            "guidance": self.guidance,
            "append_zero": self.append_zero,
            "nfe": self.nfe,
            "network_calls": self.network_calls,
        }


def resolve_sampler(
    section: dict[str, Any] | None,  # a checkpoint's "sampler" section; None for a teacher
    *,
    solver: str | None = None,
    max_order: int | None = None,
    num_steps: int | None = None,
    schedule: str | None = None,  # schedule kind override
    afs: bool | None = None,
    guidance: float | None = None,
) -> SamplerSpec:
    """The checkpoint's sampler (or the teacher default), with the given options overriding it."""
    if section is None:
        name = solver or DEFAULT_TEACHER_SAMPLER["solver"]
        s, order = resolve_solver(name, max_order)
        if solver is None and max_order is None:
            order = DEFAULT_TEACHER_SAMPLER["max_order"]
        sched = Schedule(num_steps=num_steps or DEFAULT_TEACHER_SAMPLER["num_steps"])
        steps_cond = None
        spec_afs, spec_guidance = bool(afs), 1.0 if guidance is None else float(guidance)
        append_zero = False
    else:
        for key in ("solver", "schedule"):
            if key not in section:
                raise ParamError(f"checkpoint sampler section: missing key {key!r}")
        s, order = resolve_solver(section["solver"], section.get("max_order"))
        if solver is not None:
            s, order = resolve_solver(solver, max_order)
        elif max_order is not None:
            order = max_order
        sched = Schedule.from_dict(section["schedule"], section="sampler.schedule")
        steps_cond = tuple(int(n) for n in section["step_condition"]) if section.get("step_condition") else None
        if num_steps is not None:
            if steps_cond is not None and num_steps not in steps_cond:
                raise ParamError(
                    f"num_steps: this step-conditioned checkpoint supports N in {list(steps_cond)}, got {num_steps}"
                )
            sched = sched.with_num_steps(num_steps)
        spec_afs = bool(section.get("afs", False)) if afs is None else afs
        spec_guidance = float(section.get("guidance", 1.0)) if guidance is None else float(guidance)
        append_zero = bool(section.get("append_zero", False))
    if schedule is not None:
        sched = replace(sched, kind=schedule)
    check_choice("solver", s, SOLVERS)
    return SamplerSpec(s, order, sched, spec_afs, spec_guidance, steps_cond, append_zero)


def make_denoiser(model: Denoiser, spec: SamplerSpec) -> Denoiser:
    """The model as D(x, sigma, labels) with the step condition bound (at the schedule's N) and guidance applied."""
    return guided(bind_num_steps(model, spec.bound_num_steps), spec.guidance)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    seeds: Sequence[int],
    sample_shape: Sequence[int],
    spec: SamplerSpec,
    *,
    labels: torch.Tensor | None = None,  # [len(seeds)] int64, or None for unconditional
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Samples x_{N-1} for each seed (float32 [len(seeds), *sample_shape] on the CPU), batch by batch."""
    check_int("batch_size", batch_size, minimum=1)
    t_steps = spec.t_steps()
    outs = []
    starts = range(0, len(seeds), batch_size)
    for i in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        chunk = list(seeds[i : i + batch_size])
        x = initial_state(seed_noise(chunk, sample_shape, device=device), float(t_steps[0]))
        lab = None if labels is None else labels[i : i + batch_size].to(device)
        x = solve(denoiser, x, t_steps, spec.solver, max_order=spec.max_order, afs=spec.afs, labels=lab)
        outs.append(x.float().cpu())
    return torch.cat(outs) if outs else torch.empty((0, *sample_shape))


def resolve_labels(spec: str | int | Sequence[int] | None, seeds: Sequence[int], num_classes: int) -> torch.Tensor | None:
    """Labels for the seeds: None/'seed' = per-seed labels, 'none' = unconditional, 'k' = all class k,
    'a,b,...' = one per seed."""
    if num_classes <= 0:
        if spec not in (None, "seed", "none"):
            raise ParamError("labels: this model is unconditional; leave --labels out")
        return None
    if spec is None or spec == "seed":
        return seed_labels(seeds, num_classes)
    if spec == "none":
        return None
    values = [int(v) for v in str(spec).split(",")] if isinstance(spec, (str, int)) else [int(v) for v in spec]
    if len(values) == 1:
        values = values * len(seeds)
    if len(values) != len(seeds):
        raise ParamError(f"labels: got {len(values)} labels for {len(seeds)} seeds (give one label, or one per seed)")
    for v in values:
        if not 0 <= v < num_classes:
            raise ParamError(f"labels: {v} is outside 0..{num_classes - 1}")
    return torch.tensor(values, dtype=torch.int64)
