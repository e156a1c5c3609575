"""SFDDM, single fold (Hong et al. 2024, arXiv 2405.14961), in EDM variables (baselines.md).

The teacher lives on a fine grid of T steps, sigma_0 = t_max > ... > sigma_T = t_min (polynomial).
A student of T' steps uses the index map phi(t') = c t', c = T / T', and the student schedule
sigma'_{t'} := sigma_{phi(t')} (in the discrete VP view abar'_{t'} := abar_{phi(t')}); so the same
noisy input x = y + sigma'_{t'} eps is at once the student's state at t' and the teacher's at
phi(t') ("reparameterised intermediate inputs").

What the student learns. The student's one step t' -> t'+1 of its T'-step sampler stands for the
teacher's c fine steps phi(t') -> phi(t'+1) (the student's forward process q'(x'_{t'+1} | x'_{t'})
is the teacher's q(x_{phi(t'+1)} | x_{phi(t')}) by the index map). So its target is what the
teacher's own sampler does over those c steps from the reparameterised input: with
x_a = y + sigma'_{t'} eps, sigma_a = sigma'_{t'} = sigma_{phi(t')}, sigma_b = sigma'_{t'+1} =
sigma_{phi(t'+1)}, and x_b = Euler^c_T(x_a; sigma_{phi(t')}, ..., sigma_{phi(t'+1)}) the teacher's c
Euler (DDIM) steps, the target is the denoiser output whose single student Euler step from x_a
lands on x_b (the same algebra as progressive distillation, baselines.md):

    o~ = (sigma_a x_b - sigma_b x_a) / (sigma_a - sigma_b),
    L  = mean|o_S(x_a, sigma'_{t'}) - o~| + w_h mean|h_S(x_a, sigma'_{t'}) - h_T(x_a, sigma_{phi(t')})|,
    t' ~ U{0..T'-1},

o the denoiser output D (the EDM counterpart of the network output) and h the feature map right
before the network's output layer (the paper's hidden-variable term; h_T comes from the teacher's
first fine step, so it costs no extra pass). With c = 1 (T = T') o~ is the teacher's own output.
The earlier form of this module matched o_S(x, sigma'_{t'}) to o_T(x, sigma_{phi(t')}) at the same
sigma: in EDM variables both models get the same noise level, so that target is the teacher's
one-step output, a student initialised from the teacher starts at L = 0 and learns nothing, and a
random student can at best become the training-free control. (The public code's discrete students
see their own time index t' while the teacher sees c t', which hides this; in sigma-conditioned
EDM networks it is exact.) The multi-step target is non-zero at a teacher initialisation and is
what makes the student's T'-step sampler better than the teacher's T'-step sampler.

Initialisation. ``init: teacher`` (the default here) starts the student as a copy of the teacher,
as SFD and progressive distillation do; ``init: random`` gives the teacher's architecture with fresh
seeded weights, as the public SFDDM code does (Adam 2e-4, batch 50, ~10 epochs of CIFAR-10, i.e.
~10,000 updates: far beyond a few-minute CPU budget).

Budget. ``budget: sfd_stage1`` gives each student the forward-pass equivalents of SFD's stage 1 on
the same params (pipeline.core.cost: a backward counts 2 forwards): the trajectories it consumes
(seeds x teacher NFE per trajectory) plus its distillation passes (kimg x network steps per
trajectory x (1 forward + 1 backward)); see :func:`sfd_stage1_budget`. One SFDDM update costs
B (c + 3) forward equivalents (c teacher passes per example, one student forward and backward),
so updates = floor(budget / (B (c + 3))). ``budget: updates`` uses the ``updates`` param instead.

Its realistic ceiling without training is the teacher itself sampled with the same T' Euler steps:
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
from pipeline.core.cost import BACKWARD_FORWARD_RATIO, CostMeter
from pipeline.diffusion.schedules import fine_num_steps
from pipeline.diffusion.seeds import parse_seeds
from pipeline.diffusion.solvers import solver_nfe
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


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def teacher_fine_steps(
    teacher: Any,
    x_a: torch.Tensor,
    labels: torch.Tensor | None,
    fine: torch.Tensor,  # [B, c + 1] per-sample fine sigmas sigma_{phi(t')} .. sigma_{phi(t'+1)} (float64)
    *,
    features: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's c Euler (DDIM) steps from x_a over each sample's fine grid: (x_b, o_T(x_a), h_T(x_a) or None).

    The first step's denoiser output and features are returned too (the feature target costs no extra pass)."""
    x = x_a
    o_first = h_first = None
    for k in range(fine.shape[1] - 1):
        s, s_next = fine[:, k], fine[:, k + 1]
        sigma = s.to(device=x.device, dtype=x.dtype)
        if k == 0 and features:
            d, h_first = teacher(x, sigma, labels, return_features=True)
        else:
            d = teacher(x, sigma, labels)
        if k == 0:
            o_first = d
        x = x + _col((s_next - s) / s, x).to(x.device) * (x - d)
    return x, o_first, h_first


def sfddm_target(x_a: torch.Tensor, x_b: torch.Tensor, sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """o~ = (sigma_a x_b - sigma_b x_a) / (sigma_a - sigma_b): the output whose one Euler step from x_a lands on x_b."""
    sa, sb = _col(sigma_a, x_a).to(x_a.device), _col(sigma_b, x_a).to(x_a.device)
    return (sa * x_b - sb * x_a) / (sa - sb)


def sfddm_loss(
    student: EDMPrecond,
    teacher: Any,  # a denoiser D(x, sigma, labels); with feature_weight > 0 it must take return_features=True
    y: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_sigmas: torch.Tensor,  # the teacher's T + 1 fine timestamps sigma_0 = t_max .. sigma_T = t_min
    student_steps: int,  # T'
    generator: torch.Generator,
    feature_weight: float = 1.0,
    rows: tuple[int, int] | None = None,  # this process's rows of the global batch (torchrun); None: all
) -> torch.Tensor:
    """mean|o_S(x_a) - o~| + w_h mean|h_S - h_T| with o~ from the teacher's c fine steps (module docstring)."""
    phi = torch.tensor(index_map(student_steps, len(teacher_sigmas) - 1))
    c = int(phi[1] - phi[0])
    b = y.shape[0]
    t_prime = torch.randint(student_steps, (b,), generator=generator)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    if rows is not None:
        y, t_prime, eps = y[rows[0] : rows[1]], t_prime[rows[0] : rows[1]], eps[rows[0] : rows[1]]
        labels = None if labels is None else labels[rows[0] : rows[1]]
    start = phi[t_prime]
    fine = teacher_sigmas[start[:, None] + torch.arange(c + 1)[None, :]]  # [B, c + 1], float64
    sigma_a, sigma_b = fine[:, 0], fine[:, -1]
    x_a = reparameterised_input(y, eps, sigma_a.to(y.device))
    with torch.no_grad():
        x_b, _, h_t = teacher_fine_steps(teacher, x_a, labels, fine, features=feature_weight > 0)
        target = sfddm_target(x_a, x_b, sigma_a, sigma_b)
    sigma = sigma_a.to(device=y.device, dtype=y.dtype)
    if feature_weight > 0:
        o_s, h_s = student(x_a, sigma, labels, return_features=True)
        return (o_s - target).abs().mean() + feature_weight * (h_s - h_t).abs().mean()
    return (student(x_a, sigma, labels) - target).abs().mean()


def sfd_stage1_budget(distill: Any, trajectories: Any) -> dict[str, float]:
    """Forward-pass equivalents of SFD's stage 1 on these params (``distill`` and the trajectories section it names).

    teacher: seeds x teacher NFE of one trajectory (the solver over the (M+1)(N-1)+1 fine timestamps, per N);
    student: every trajectory the distill loop reads (ceil(kimg 1000 / B) batches of B) x network steps
    (N - 1 - afs) x (1 forward + 1 backward = 3 forward equivalents, pipeline.core.cost)."""
    seeds = len(parse_seeds(trajectories.seeds))
    steps = trajectories.num_steps_values()  # the N of each key (no teacher needed to count)
    teacher_nfe = sum(solver_nfe(trajectories.solver, fine_num_steps(n, trajectories.M), afs=trajectories.afs) for n in steps)
    net_steps = max(n - 1 - int(distill.afs) for n in steps)
    seen = distill.total_batches() * distill.batch_size
    teacher_images = seeds * teacher_nfe
    student_images = seen * net_steps
    return {
        "teacher_forward_images": teacher_images,
        "student_forward_images": student_images,
        "student_backward_images": student_images,
        "forward_equivalents": teacher_images + student_images * (1 + BACKWARD_FORWARD_RATIO),
    }


def updates_for_budget(budget: float, params: SFDDMParams, student_steps: int) -> int:
    """floor(budget / (B (c + 3))): one update costs c teacher passes + one student forward and backward per example."""
    c = params.teacher_steps // student_steps
    per_update = params.batch_size * (c + 1 + BACKWARD_FORWARD_RATIO)
    updates = int(budget // per_update)
    if updates < 1:
        raise ParamError(
            f"baseline_sfddm.budget: {budget:g} forward equivalents buy no update of batch {params.batch_size} at "
            f"c = {c} teacher steps per example ({per_update:g} each); lower teacher_steps or batch_size"
        )
    return updates


def train_sfddm_student(
    student: EDMPrecond,
    teacher: Any,
    data: TrainingData,
    student_steps: int,
    params: SFDDMParams,
    *,
    generator: torch.Generator,
    updates: int | None = None,  # None: params.updates
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,  # resumable training state of this student; None = no resume
    live: LiveLog | None = None,
) -> dict[str, Any]:
    """Train one T'-step student in place; returns its loss summary."""
    sigmas = params.teacher_sigmas()
    c = params.teacher_steps // student_steps
    updates = params.updates if updates is None else updates

    def loss_fn(net: Any, y: torch.Tensor, labels: torch.Tensor | None, rows: tuple[int, int] | None) -> tuple[torch.Tensor, int]:
        computed = len(y) if rows is None else rows[1] - rows[0]
        loss = sfddm_loss(net, teacher, y, labels, sigmas, student_steps, generator, params.feature_weight, rows)
        return loss, c * computed

    summary = fit_student(
        f"sfddm T'={student_steps}", "sfddm", student, teacher, data, params, loss_fn,
        updates=updates, lr=lambda u: params.lr, generator=generator, device=device, cost=cost,
        state_dir=state_dir, live=live, live_prefix=f"nfe{student_steps}/", progress=progress,
        student_steps=student_steps, sfddm_updates=updates, sfddm_target="teacher_fine_steps",
    )  # fmt: skip
    return {"student_steps": student_steps, "updates": summary["updates"], "teacher_steps_per_update": c,
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
    budget: dict[str, float] | None = None,  # with budget: sfd_stage1, sfd_stage1_budget(...) of the same params file
) -> dict[str, Any]:
    """One student per T' into ``out_dir/nfe<T'>``, and the control row (teacher, same T' Euler steps) into ``control_dir/nfe<T'>``.

    With ``params.budget == "sfd_stage1"`` each student gets ``budget["forward_equivalents"]`` (module docstring)."""
    if params.budget == "sfd_stage1" and budget is None:
        raise ParamError("baseline_sfddm.budget: sfd_stage1 needs SFD's stage-1 budget (sfd_stage1_budget of the "
                         "`distill` section and its trajectories section); or set budget: updates")
    cost = cost or CostMeter("baseline_sfddm", device)
    teacher = frozen(teacher)
    generator = torch.Generator().manual_seed(params.seed)
    students = []
    live = LiveLog(live_dir) if live_dir is not None else None
    for k, t_prime in enumerate(params.student_steps):
        student = init_student(teacher, teacher_config, params.init, params.seed + k)
        updates = (updates_for_budget(budget["forward_equivalents"], params, t_prime)
                   if params.budget == "sfd_stage1" and budget is not None else params.updates)
        before = cost.forward_equivalents()
        summary = train_sfddm_student(student, teacher, data, t_prime, params, generator=generator, device=device,
                                      updates=updates, cost=cost, progress=progress, live=live,
                                      state_dir=None if state_dir is None else Path(state_dir) / f"nfe{t_prime}")
        sampler = sampler_section(params.student_schedule(t_prime), afs=False)
        prov = {"params": described(params), "index_map": index_map(t_prime, params.teacher_steps), **(provenance or {})}
        save_student(Path(out_dir) / f"nfe{t_prime}", student,
                     student_config(teacher_config, sampler, {"kind": "sfddm", "summary": summary, **prov}))
        save_student(Path(control_dir) / f"nfe{t_prime}", teacher,
                     student_config(teacher_config, sampler, {"kind": "sfddm_control (the teacher, training-free)", **prov}))
        summary["forward_equivalents"] = cost.forward_equivalents() - before
        summary["cumulative_forward_equivalents"] = cost.forward_equivalents()
        students.append(summary)
        tqdm.write(f"sfddm: T'={t_prime}: loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}")
    cost.extra["init"] = params.init
    cost.extra["teacher_steps"] = params.teacher_steps
    cost.extra["budget"] = params.budget
    if params.budget == "sfd_stage1" and budget is not None:
        cost.extra["sfd_stage1_budget"] = budget
    if live is not None:
        live.log_final({f"nfe{r['student_steps']}": {k: r[k] for k in ("loss_first", "loss_last")} for r in students}
                       | {"forward_equivalents": cost.forward_equivalents()})
        live.end()
    return {"teacher_steps": params.teacher_steps, "init": params.init, "budget": params.budget,
            "sfd_stage1_budget": budget if params.budget == "sfd_stage1" else None, "students": students,
            "wall_seconds": round(cost.wall_seconds, 2), "forward_equivalents": cost.forward_equivalents()}
