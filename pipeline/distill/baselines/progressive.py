"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) in EDM variables (baselines.md).

DDIM is exactly Euler on the PF-ODE, so a round with N student steps reads:
    grid sigma_0 = t_max > ... > sigma_N = t_min (polynomial, rho = 7); the teacher runs on the 2N-step
    grid of the same formula, whose even points are the student's (nested grids);
    j ~ U{0..N-1}, sigma_a = sigma_j, sigma_m = sigma_{j+1/2}, sigma_b = sigma_{j+1}, x_a = y + sigma_a eps;
    two teacher Euler steps x_a -> x_m -> x_b;
    target x~ = (sigma_a x_b - sigma_b x_a) / (sigma_a - sigma_b)   (= D_teacher(x_m, sigma_m) when sigma_b = 0),
    the denoiser output whose single Euler step from x_a lands exactly on x_b;
    loss w(sigma_a) ||D_student(x_a; sigma_a) - x~||^2 (mean over pixels and batch),
    w = max(sigma^-2, 1) ("truncated SNR") or sigma^-2 + 1.
Rounds halve N from ``start_steps`` (the original teacher's Euler steps) to ``final_steps``; each
student starts as a copy of the current teacher, trains with Adam whose learning rate decays
linearly to 0 within the round, gradient-norm clipping, no EMA, and becomes the next teacher.
Every round's student is saved with an Euler sampler on its own grid (NFE = N). With a ``state_dir``
each round keeps a resumable training state in ``<state_dir>/nfe<N>`` (pipeline.training), so an
interrupted run resumes inside its round and ends bit-identical to an uninterrupted one.
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
from pipeline.diffusion.schedules import time_steps
from pipeline.config.baselines import PDParams


def deterministic(summary: dict[str, Any]) -> dict[str, Any]:
    """The round summary without wall times: a checkpoint is a function of its seed and config, so a
    rerun writes the same bytes (and DVC does not re-evaluate an unchanged student)."""
    return {k: deterministic(v) if isinstance(v, dict) else v for k, v in summary.items() if k != "wall_seconds"}


def teacher_grid(student_steps: int, t_min: float, t_max: float, rho: float = 7.0) -> torch.Tensor:
    """The round's teacher grid: 2N + 1 polynomial timestamps; even points are the student's, odd the half-index ones."""
    return time_steps("polynomial", 2 * student_steps + 1, t_min, t_max, rho)


def pd_weight(sigma: torch.Tensor, weighting: str = "truncated_snr") -> torch.Tensor:
    """w(sigma) = max(sigma^-2, 1) (truncated SNR) or sigma^-2 + 1 (SNR + 1); in the EDM view SNR = sigma^-2."""
    snr = sigma.to(torch.float64) ** -2
    return torch.clamp(snr, min=1.0) if weighting == "truncated_snr" else snr + 1


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def two_teacher_steps(
    teacher: Denoiser,
    x_a: torch.Tensor,
    sigma_a: torch.Tensor,  # [B] float64
    sigma_m: torch.Tensor,
    sigma_b: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two teacher Euler steps x_a -> x_m -> x_b; returns (x_b, D_teacher(x_m, sigma_m))."""
    d_a = (x_a - teacher(x_a, sigma_a.to(x_a.dtype), labels)) / _col(sigma_a, x_a)
    x_m = x_a + _col(sigma_m - sigma_a, x_a) * d_a
    denoised_m = teacher(x_m, sigma_m.to(x_a.dtype), labels)
    x_b = x_m + _col(sigma_b - sigma_m, x_a) * (x_m - denoised_m) / _col(sigma_m, x_a)
    return x_b, denoised_m


def pd_target(
    x_a: torch.Tensor, x_b: torch.Tensor, sigma_a: torch.Tensor, sigma_b: torch.Tensor, denoised_m: torch.Tensor | None = None
) -> torch.Tensor:
    """x~ = (sigma_a x_b - sigma_b x_a) / (sigma_a - sigma_b); where sigma_b = 0 it is D_teacher(x_m, sigma_m)."""
    target = (_col(sigma_a, x_a) * x_b - _col(sigma_b, x_a) * x_a) / _col(sigma_a - sigma_b, x_a)
    if denoised_m is not None:
        target = torch.where((sigma_b == 0).reshape(-1, *([1] * (x_a.ndim - 1))), denoised_m, target)
    return target


def pd_loss(
    student: Denoiser,
    teacher: Denoiser,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    grid: torch.Tensor,  # teacher_grid(N): 2N + 1 timestamps
    generator: torch.Generator,
    weighting: str = "truncated_snr",
    rows: tuple[int, int] | None = None,  # this process's rows of the global batch (torchrun); None: all
) -> torch.Tensor:
    """The round's loss on one batch of clean data y (module docstring)."""
    b = y.shape[0]
    n = (len(grid) - 1) // 2
    j = torch.randint(n, (b,), generator=generator)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    if rows is not None:
        y, j, eps = y[rows[0] : rows[1]], j[rows[0] : rows[1]], eps[rows[0] : rows[1]]
        labels = None if labels is None else labels[rows[0] : rows[1]]
    sigma_a, sigma_m, sigma_b = (grid[2 * j + k].to(y.device) for k in (0, 1, 2))
    x_a = y + _col(sigma_a, y) * eps
    x_b, denoised_m = two_teacher_steps(teacher, x_a, sigma_a, sigma_m, sigma_b, labels)
    target = pd_target(x_a, x_b, sigma_a, sigma_b, denoised_m)
    denoised = student(x_a, sigma_a.to(y.dtype), labels)
    per_example = (denoised - target).flatten(1).square().mean(1)
    return (pd_weight(sigma_a, weighting).to(y.dtype) * per_example).mean()


def pd_round(
    student: EDMPrecond,
    teacher: Denoiser,
    data: TrainingData,
    student_steps: int,
    params: PDParams,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,  # resumable training state of this round; None = no resume
    live: LiveLog | None = None,
) -> dict[str, Any]:
    """One round: train ``student`` (in place) to do in N Euler steps what ``teacher`` does in 2N."""
    grid = teacher_grid(student_steps, params.t_min, params.t_max, params.rho)

    def loss_fn(net: Any, y: torch.Tensor, labels: torch.Tensor | None, rows: tuple[int, int] | None) -> tuple[torch.Tensor, int]:
        computed = len(y) if rows is None else rows[1] - rows[0]
        return pd_loss(net, teacher, y, labels, grid, generator, params.weighting, rows), 2 * computed

    summary = fit_student(
        f"pd N={student_steps}", "progressive_distillation", student, teacher, data, params, loss_fn,
        updates=params.updates_per_round, lr=lambda u: params.lr * (1 - u / params.updates_per_round),
        generator=generator, device=device, cost=cost, clip=params.grad_clip, state_dir=state_dir, live=live,
        live_prefix=f"nfe{student_steps}/", progress=progress, leave=False, student_steps=student_steps,
    )  # fmt: skip
    return {"student_steps": student_steps, "teacher_steps": 2 * student_steps, "updates": summary["updates"],
            "loss_first": summary["loss_first"], "loss_last": summary["loss_last"]}


def progressive_distillation(
    teacher: EDMPrecond,
    teacher_config: dict[str, Any],
    data: TrainingData,
    params: PDParams,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    cost: CostMeter | None = None,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    state_dir: str | Path | None = None,  # resumable states, one per round: <state_dir>/nfe<N>; None = no resume
    live_dir: str | Path | None = None,  # DVCLive directory: loss and lr per update of each round (nfe<N>/...)
) -> dict[str, Any]:
    """All rounds; writes ``out_dir/nfe<N>`` per round and returns a summary with each round's cumulative cost."""
    out_dir = Path(out_dir)
    cost = cost or CostMeter("baseline_pd", device)
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    current: EDMPrecond = frozen(teacher)
    rounds = []
    live = LiveLog(live_dir) if live_dir is not None else None
    for n in tqdm(params.round_steps(), desc="progressive distillation", unit="round", disable=not progress):
        student = trainable_copy(current)
        summary = pd_round(student, current, data, n, params, generator=generator, device=device, cost=cost,
                           progress=progress, state_dir=None if state_dir is None else Path(state_dir) / f"nfe{n}",
                           live=live)
        summary["cumulative"] = {k: v for k, v in cost.to_dict().items()
                                 if k in ("wall_seconds", "teacher_forward_images", "student_forward_images",
                                          "student_backward_images", "forward_equivalents")}
        config = student_config(
            teacher_config,
            sampler_section(params.student_schedule(n), afs=False),
            {"kind": "progressive_distillation", "round": len(rounds) + 1, "params": described(params),
             "round_summary": deterministic(summary), **(provenance or {})},
        )
        summary["checkpoint"] = str(save_student(out_dir / f"nfe{n}", student, config))
        rounds.append(summary)
        tqdm.write(f"pd: N={n}: loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}")
        current = frozen(student)
    # what PD had spent when its NFE-k student existed (rounds run from many steps to few)
    cost.extra["cumulative_by_nfe"] = {str(r["student_steps"]): r["cumulative"] for r in rounds}
    cost.extra["start_steps"] = params.start_steps
    if live is not None:
        live.log_final({f"nfe{r['student_steps']}": {k: r[k] for k in ("loss_first", "loss_last")} for r in rounds}
                       | {"forward_equivalents": cost.forward_equivalents()})
        live.end()
    return {"start_steps": params.start_steps, "rounds": rounds, "wall_seconds": round(cost.wall_seconds, 2),
            "forward_equivalents": cost.forward_equivalents(), "nfes": [r["student_steps"] for r in rounds]}
