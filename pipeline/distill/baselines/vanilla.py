"""Vanilla trajectory distillation (SFD paper, Algorithm 1): local targets from noised data, no rollout.

In this project's index convention (t_0 = t_max > ... > t_{N-1} = t_min, sfd-method.md section 2):
    y ~ data, n ~ U{n_0..N-2}, x_n = y + t_n eps  (x_n ~ N(y, t_n^2 I));
    target = the teacher solver from x_n at t_n to t_{n+1} over its K = M + 1 fine sub-steps
             (fine indices n(M+1) .. (n+1)(M+1) of schedule.fine(M));
    student = one Euler step x_hat = x_n + (t_{n+1} - t_n) (x_n - D_theta(x_n, t_n)) / t_n;
    loss d(x_hat, target) (L1: sum over pixels, mean over the batch).
The paper writes n ~ U{0..N-1}, x_{n+1} ~ N(x_0, t_{n+1}^2 I) with time running the other way;
it is the same set of N - 1 intervals. With AFS the first interval has no network call, hence
nothing to learn, and n_0 = 1. The student never sees its own states (the difference to SFD's
on-the-fly rollout). The student starts as a copy of the teacher; Adam, lr x 0.1 at half the
budget, as SFD's stage 1. Resumable from a ``state_dir`` (pipeline.training).
"""

from __future__ import annotations


from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.distill.baselines.common import TrainingData, fit_student
from pipeline.distill.student import sampler_section, save_student, student_config
from pipeline.training.live import LiveLog
from pipeline.training.optim import frozen, trainable_copy
from pipeline.config.validation import described
from pipeline.core.cost import CostMeter
from pipeline.diffusion.denoisers import Denoiser, EDMPrecond
from pipeline.distill.losses import l1_loss, l2_loss
from pipeline.config.baselines import VanillaParams
from pipeline.diffusion.solvers import CountingDenoiser, solve

VANILLA_LOSSES = {"l1": l1_loss, "l2": l2_loss}


@torch.no_grad()
def local_targets(
    teacher: Denoiser,
    x_n: torch.Tensor,
    n: torch.Tensor,  # [B] interval index of each example
    fine: torch.Tensor,  # schedule.fine(M)
    M: int,
    *,
    solver: str = "dpmpp",
    max_order: int = 3,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The teacher's state at t_{n+1} from x_n at t_n, over the K = M + 1 fine sub-steps (grouped by n)."""
    target = torch.empty_like(x_n)
    for k in n.unique().tolist():
        rows = (n == k).nonzero().flatten()
        sub = fine[k * (M + 1) : (k + 1) * (M + 1) + 1]
        lab = None if labels is None else labels[rows]
        target[rows] = solve(teacher, x_n[rows], sub, solver, max_order=max_order, labels=lab)
    return target


def student_euler_step(student: Denoiser, x_n: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat = x_n + (t_{n+1} - t_n) (x_n - D(x_n, t_n)) / t_n, per-example times."""
    col = lambda v: v.to(x_n.dtype).reshape(-1, *([1] * (x_n.ndim - 1)))  # noqa: E731
    return x_n + col(t_next - t_cur) * (x_n - student(x_n, t_cur.to(x_n.dtype), labels)) / col(t_cur)


def vanilla_loss(
    student: Denoiser,
    teacher: Denoiser,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    params: VanillaParams,
    generator: torch.Generator,
    fine: torch.Tensor | None = None,
    rows: tuple[int, int] | None = None,  # this process's rows of the global batch (torchrun); None: all
) -> torch.Tensor:
    """d(one student Euler step from x_n, the teacher's K sub-steps from x_n) on noised data (module docstring)."""
    sched = params.student_schedule()
    t = sched.t_steps()
    fine = sched.fine(params.M) if fine is None else fine
    first = 1 if params.afs else 0
    b = y.shape[0]
    n = torch.randint(first, sched.num_steps - 1, (b,), generator=generator)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    if rows is not None:
        y, n, eps = y[rows[0] : rows[1]], n[rows[0] : rows[1]], eps[rows[0] : rows[1]]
        labels = None if labels is None else labels[rows[0] : rows[1]]
    t_cur, t_next = t[n].to(y.device), t[n + 1].to(y.device)
    x_n = y + t_cur.to(y.dtype).reshape(-1, *([1] * (y.ndim - 1))) * eps
    target = local_targets(teacher, x_n, n.to(y.device), fine, params.M, solver=params.solver,
                           max_order=params.max_order, labels=labels)
    x_hat = student_euler_step(student, x_n, t_cur, t_next, labels)
    return VANILLA_LOSSES[params.loss](x_hat, target)


def train_vanilla(
    student: EDMPrecond,
    teacher: Denoiser,
    data: TrainingData,
    params: VanillaParams,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,  # resumable training state; None = no resume
    live: LiveLog | None = None,
) -> dict[str, Any]:
    """Train ``student`` in place; returns its loss summary."""
    counter = CountingDenoiser(teacher)
    fine = params.student_schedule().fine(params.M)

    def loss_fn(net: Any, y: torch.Tensor, labels: torch.Tensor | None, rows: tuple[int, int] | None) -> tuple[torch.Tensor, int]:
        before = counter.images
        loss = vanilla_loss(net, counter, y, labels, params, generator, fine, rows)
        return loss, counter.images - before

    return fit_student(
        "vanilla", "vanilla", student, teacher, data, params, loss_fn,
        updates=params.updates, lr=lambda u: params.lr * (0.1 if u >= params.updates / 2 else 1.0),
        generator=generator, device=device, cost=cost, state_dir=state_dir, live=live, progress=progress,
    )  # fmt: skip


def vanilla_distillation(
    teacher: EDMPrecond,
    teacher_config: dict[str, Any],
    data: TrainingData,
    params: VanillaParams,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    state_dir: str | Path | None = None,  # resumable training state; None = no resume
    live_dir: str | Path | None = None,  # DVCLive directory: loss and lr per update
) -> dict[str, Any]:
    """Train the student (a copy of the teacher) and save it with its Euler (+ AFS) sampler in ``out_dir``."""
    cost = cost or CostMeter("baseline_vanilla", device)
    teacher = frozen(teacher)
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    student = trainable_copy(teacher)
    live = LiveLog(live_dir) if live_dir is not None else None
    summary = train_vanilla(student, teacher, data, params, generator=generator, device=device, cost=cost,
                            progress=progress, state_dir=state_dir, live=live)
    if live is not None:
        live.log_final({k: summary[k] for k in ("loss_first", "loss_last")} | {"forward_equivalents": cost.forward_equivalents()})
        live.end()
    sampler = sampler_section(params.student_schedule(), afs=params.afs)
    save_student(out_dir, student, student_config(
        teacher_config, sampler,
        {"kind": "vanilla_trajectory_distillation", "params": described(params), "summary": summary, **(provenance or {})},
    ))
    tqdm.write(f"vanilla: loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}")
    return {**summary, "wall_seconds": round(cost.wall_seconds, 2), "forward_equivalents": cost.forward_equivalents()}
