"""SFDDM, single fold (Hong et al. 2024, arXiv 2405.14961), in EDM variables (baselines.md).

The teacher lives on a fine grid of T steps, sigma_0 = t_max > ... > sigma_T = t_min (polynomial).
A student of T' steps uses the index map phi(t') = c t', c = T / T', and the student schedule
sigma'_{t'} := sigma_{phi(t')} (in the discrete VP view abar'_{t'} := abar_{phi(t')}); so the same
noisy input x = y + sigma'_{t'} eps is at once the student's state at t' and the teacher's at
phi(t') ("reparameterised intermediate inputs"). With t' ~ U{0..T'-1} (the points where the
student's Euler/DDIM sampler calls it) the loss is

    L = mean|o_S(x, sigma'_{t'}) - o_T(x, sigma_{phi(t')})| + w_h mean|h_S - h_T|,

o the denoiser output D (the EDM counterpart of the network output) and h the feature map right
before the network's output layer; the student has the teacher's architecture and, as in the
public code, starts from random weights (``init: teacher`` copies the teacher instead; then L = 0
at the start). Its realistic ceiling is the teacher itself sampled with the same T' Euler steps:
that training-free control row is saved next to every student. With a ``state_dir`` each student
keeps a resumable training state in ``<state_dir>/nfe<T'>`` (pipeline.training).
"""

from __future__ import annotations

from collections.abc import Sequence

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.distill.baselines.common import TrainingData, fit_student
from pipeline.distill.student import model_from_architecture, sampler_section, save_student, student_config
from pipeline.training.live import LiveLog
from pipeline.training.optim import frozen, trainable_copy
from pipeline.config.validation import described
from pipeline.core.cost import CostMeter
from pipeline.diffusion.denoisers import EDMPrecond
from pipeline.core.param_checks import ParamError, check_int
from pipeline.config.baselines import SFDDMParams


def index_map(student_steps: int, teacher_steps: int) -> list[int]:
    """phi(t') = c t' with c = T / T', for t' = 0..T'."""
    check_int("student_steps", student_steps, minimum=1)
    if teacher_steps % student_steps:
        raise ParamError(f"student_steps: T'={student_steps} must divide T={teacher_steps}")
    c = teacher_steps // student_steps
    return [c * t for t in range(student_steps + 1)]


def student_sigmas(teacher_sigmas: torch.Tensor, student_steps: int) -> torch.Tensor:
    """sigma'_{t'} = sigma_{phi(t')}: the student schedule read off the teacher's (T + 1 values)."""
    return teacher_sigmas[index_map(student_steps, len(teacher_sigmas) - 1)]


def student_alphas_cumprod(alphas_cumprod: Sequence[float] | torch.Tensor, student_steps: int) -> torch.Tensor:
    """Discrete VP view: abar'_{t'} = abar_{phi(t')} from the teacher's table abar_0..abar_T."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return abar[index_map(student_steps, len(abar) - 1)]


def reparameterised_input(y: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x = y + sigma eps: the student's input at t' and the teacher's at phi(t') (VP: sqrt(abar) x)."""
    return y + sigma.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1))) * eps


def sfddm_loss(
    student: EDMPrecond,
    teacher: EDMPrecond,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    sigmas: torch.Tensor,  # the student's T' + 1 timestamps sigma'_{t'}
    generator: torch.Generator,
    feature_weight: float = 1.0,
    rows: tuple[int, int] | None = None,  # this process's rows of the global batch (torchrun); None: all
) -> torch.Tensor:
    """mean|o_S - o_T| + w_h mean|h_S - h_T| on x = y + sigma'_{t'} eps, t' ~ U{0..T'-1} (module docstring)."""
    b = y.shape[0]
    t_prime = torch.randint(len(sigmas) - 1, (b,), generator=generator)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    if rows is not None:
        y, t_prime, eps = y[rows[0] : rows[1]], t_prime[rows[0] : rows[1]], eps[rows[0] : rows[1]]
        labels = None if labels is None else labels[rows[0] : rows[1]]
    sigma = sigmas[t_prime].to(y.device)
    x = reparameterised_input(y, eps, sigma)
    with torch.no_grad():
        o_t, h_t = teacher(x, sigma.to(y.dtype), labels, return_features=True)
    o_s, h_s = student(x, sigma.to(y.dtype), labels, return_features=True)
    return (o_s - o_t).abs().mean() + feature_weight * (h_s - h_t).abs().mean()


def train_sfddm_student(
    student: EDMPrecond,
    teacher: EDMPrecond,
    data: TrainingData,
    student_steps: int,
    params: SFDDMParams,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,  # resumable training state of this student; None = no resume
    live: LiveLog | None = None,
) -> dict[str, Any]:
    """Train one T'-step student in place; returns its loss summary."""
    sigmas = student_sigmas(params.teacher_sigmas(), student_steps)

    def loss_fn(y: torch.Tensor, labels: torch.Tensor | None, rows: tuple[int, int] | None) -> tuple[torch.Tensor, int]:
        computed = len(y) if rows is None else rows[1] - rows[0]
        return sfddm_loss(student, teacher, y, labels, sigmas, generator, params.feature_weight, rows), computed

    summary = fit_student(
        f"sfddm T'={student_steps}", "sfddm", student, teacher, data, params, loss_fn,
        updates=params.updates, lr=lambda u: params.lr, generator=generator, device=device, cost=cost,
        state_dir=state_dir, live=live, live_prefix=f"nfe{student_steps}/", progress=progress,
        student_steps=student_steps,
    )  # fmt: skip
    return {"student_steps": student_steps, "updates": summary["updates"],
            "loss_first": summary["loss_first"], "loss_last": summary["loss_last"]}


def init_student(teacher: EDMPrecond, teacher_config: dict[str, Any], init: str, seed: int) -> EDMPrecond:
    """The teacher's architecture (our U-Net or an EDM network) with fresh random weights (seeded), or a copy of the teacher."""
    if init == "teacher":
        return trainable_copy(teacher)
    return model_from_architecture(teacher_config, seed=seed, device=next(teacher.parameters()).device).train()


def sfddm_distillation(
    teacher: EDMPrecond,
    teacher_config: dict[str, Any],
    data: TrainingData,
    params: SFDDMParams,
    out_dir: str | Path,
    control_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    state_dir: str | Path | None = None,  # resumable states, one per student: <state_dir>/nfe<T'>; None = no resume
    live_dir: str | Path | None = None,  # DVCLive directory: loss and lr per update of each student (nfe<T'>/...)
) -> dict[str, Any]:
    """One student per T' into ``out_dir/nfe<T'>``, and the control row (teacher, same T' Euler steps) into ``control_dir/nfe<T'>``."""
    cost = cost or CostMeter("baseline_sfddm", device)
    teacher = frozen(teacher)
    generator = torch.Generator().manual_seed(params.seed)
    students = []
    live = LiveLog(live_dir) if live_dir is not None else None
    for k, t_prime in enumerate(params.student_steps):
        student = init_student(teacher, teacher_config, params.init, params.seed + k)
        summary = train_sfddm_student(student, teacher, data, t_prime, params, generator=generator, device=device,
                                      cost=cost, progress=progress, live=live,
                                      state_dir=None if state_dir is None else Path(state_dir) / f"nfe{t_prime}")
        sampler = sampler_section(params.student_schedule(t_prime), afs=False)
        prov = {"params": described(params), "index_map": index_map(t_prime, params.teacher_steps), **(provenance or {})}
        save_student(Path(out_dir) / f"nfe{t_prime}", student,
                     student_config(teacher_config, sampler, {"kind": "sfddm", "summary": summary, **prov}))
        save_student(Path(control_dir) / f"nfe{t_prime}", teacher,
                     student_config(teacher_config, sampler, {"kind": "sfddm_control (the teacher, training-free)", **prov}))
        summary["cumulative_forward_equivalents"] = cost.forward_equivalents()
        students.append(summary)
        tqdm.write(f"sfddm: T'={t_prime}: loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}")
    cost.extra["init"] = params.init
    cost.extra["teacher_steps"] = params.teacher_steps
    if live is not None:
        live.log_final({f"nfe{r['student_steps']}": {k: r[k] for k in ("loss_first", "loss_last")} for r in students}
                       | {"forward_equivalents": cost.forward_equivalents()})
        live.flush()
    return {"teacher_steps": params.teacher_steps, "init": params.init, "students": students,
            "wall_seconds": round(cost.wall_seconds, 2), "forward_equivalents": cost.forward_equivalents()}
