"""Training-free ODE solvers for the probability-flow ODE dx/dt = (x - D(x, t)) / t.

Every solver is a pure function of (denoiser, x, t_steps, options): ``x`` is the state at
t_steps[0] (already scaled, x_0 = t_max * z) and the result is the state at t_steps[-1] (the
sample; no extra "denoise to 0" call unless t_steps ends with 0). Notation of sfd-method.md
section 3: d_i = (x_i - D_i) / t_i, Delta_i = t_{i+1} - t_i, lambda = -ln t, h = lambda_{i+1} - lambda_i.

Start at t_0 = inf (a flow-matching teacher's schedule, docs/teachers.md). The VE state x = t z + ... is
unbounded there, so the state at t_0 = inf is its direction z = lim x / t: the noise itself, which is the
flow state x_t at flow time 1 (:func:`initial_state`); the denoiser is called there with x = z and sigma = inf.
The first step is the limit of the finite formulas as t_0 -> inf, which is the step written in the
(alpha, sigma) = (1 - tau, tau) form of flow time tau = t / (1 + t):

- euler, dpmpp (order 1 at the first step; DDIM), ipndm (its first step is Euler):
  x_1 = t_1 z + D(z, inf); with AFS D(z, inf) is replaced by 0 (eps = z, the data mean), so x_1 = t_1 z;
- heun, dpm2 (the VE-sigma formulas have no limit): the first step is their rule in flow time tau from
  tau = 1 with the flow velocity v = (x_tau - D) / tau - Heun's trapezoid (as diffusers'
  FlowMatchHeunDiscreteScheduler) and the midpoint rule at tau_mid = (1 + tau_1) / 2;
- later DPM-Solver++ steps whose history reaches t_0 = inf take the limit lambda_0 = -inf: the terms with
  r = inf vanish (step 1's second-order correction is 0; step 2's third-order update keeps phi2 D1_0 only);
  iPNDM keeps d_0 = z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.core.param_checks import ParamError, check_choice, check_int
from pipeline.diffusion.denoisers import Denoiser

# iPNDM: Adams-Bashforth weights for d_i, d_{i-1}, ... (order k uses the first k)
IPNDM_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class CountingDenoiser:
    """Wraps a denoiser and counts real calls (``calls``) and images passed through (``images``)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor, sigma, labels=None, **kwargs) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return self.denoiser(x, sigma, labels, **kwargs)


def afs_epsilon(x: torch.Tensor, t: float) -> torch.Tensor:
    """Analytical first step (section 5): eps_hat(x, t_0) ~= x / sqrt(1 + t_0^2), no network call.

    At t_0 = inf the state is the noise z itself (module docstring) and eps_hat = z."""
    return x if math.isinf(t) else x / math.sqrt(1.0 + t * t)


def initial_state(z: torch.Tensor, t_0: float) -> torch.Tensor:
    """The state at the first timestamp from unit noise z: x_0 = t_0 z, or z itself when t_0 = inf."""
    return z if math.isinf(t_0) else float(t_0) * z


def euler_step(x: torch.Tensor, t_cur: float, t_next: float, denoised: torch.Tensor) -> torch.Tensor:
    """x + (t_next - t_cur) (x - D) / t_cur; from t_cur = inf (x = z) its limit t_next z + D."""
    if math.isinf(t_cur):
        return t_next * x + denoised
    return x + (t_next - t_cur) * ((x - denoised) / t_cur)  # eps first: SFD's arithmetic, bit for bit


def afs_step(x: torch.Tensor, t_cur: float, t_next: float) -> torch.Tensor:
    """The analytical first step x + (t_next - t_cur) x / sqrt(1 + t_cur^2); from t_cur = inf: t_next z."""
    if math.isinf(t_cur):
        return t_next * x
    return x + (t_next - t_cur) * afs_epsilon(x, t_cur)


DYNAMIC_THRESHOLD_QUANTILE = 0.995  # sfd-main's dynamic_thresholding_fn (Imagen's dynamic thresholding)
QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger inputs; rows are processed in slices below it


def dynamic_threshold(x0: torch.Tensor, quantile: float = DYNAMIC_THRESHOLD_QUANTILE) -> torch.Tensor:
    """Imagen's dynamic thresholding of a data prediction, as sfd-main's DPM-Solver++ applies it to every x0.

    Per sample b: s_b = max(q_b, 1) with q_b the ``quantile`` of |x0_b| over all its elements (torch's
    linear interpolation); x0_b <- clamp(x0_b, -s_b, s_b) / s_b. A sample with every |x0| <= 1 is
    unchanged; otherwise it is clamped (its values beyond s_b) and shrunk by s_b, into [-1, 1].
    """
    flat = x0.abs().reshape(x0.shape[0], -1)
    rows = max(1, QUANTILE_MAX_NUMEL // max(1, flat.shape[1]))
    q = torch.cat([torch.quantile(flat[i : i + rows], quantile, dim=1) for i in range(0, flat.shape[0], rows)])
    s = torch.maximum(q, torch.ones_like(q)).reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.clamp(x0, -s, s) / s


def dpmpp_order(step: int, num_steps: int, max_order: int, lower_order_final: bool) -> int:
    """Order used by DPM-Solver++ at step i of S: warm-up 1, 2, 3...; lower_order_final ends ..., 2, 1."""
    order = min(max_order, step + 1)
    if lower_order_final:
        order = min(order, num_steps - step)
    return order


def solver_nfe(solver: str, num_steps: int, *, afs: bool = False, ends_at_zero: bool = False) -> int:
    """Denoiser calls of a solver over ``num_steps`` timestamps (num_steps - 1 steps).

    Euler, iPNDM and DPM-Solver++ call once per step; Heun and DPM-Solver-2 twice, except that a
    final step to t = 0 is a plain Euler step. AFS replaces the first call by the analytic estimate.
    """
    check_choice("solver", solver, SOLVERS)
    check_int("num_steps", num_steps, minimum=2)
    steps = num_steps - 1
    nfe = steps if SOLVER_REGISTRY[solver].calls_per_step == 1 else 2 * steps - int(ends_at_zero)
    return nfe - int(afs)


def num_steps_for_nfe(solver: str, nfe: int, *, afs: bool = False, ends_at_zero: bool = False) -> int:
    """Smallest number of timestamps whose NFE equals ``nfe``; error if no grid gives exactly that."""
    check_int("nfe", nfe, minimum=0)
    for n in range(2, 2 * nfe + 4):
        if solver_nfe(solver, n, afs=afs, ends_at_zero=ends_at_zero) == nfe:
            return n
    raise ParamError(f"nfe: {solver} cannot spend exactly {nfe} denoiser calls (afs={afs})")


def _check_t_steps(t_steps: torch.Tensor) -> list[float]:
    if not torch.is_tensor(t_steps) or t_steps.ndim != 1 or t_steps.numel() < 2:
        raise ParamError("t_steps: expected a 1-D tensor with at least 2 timestamps")
    t = t_steps.to(torch.float64).tolist()
    if any(not math.isfinite(v) for v in t[1:]) or math.isnan(t[0]) or t[0] == -math.inf or any(v <= 0 for v in t[:-1]) or t[-1] < 0:
        raise ParamError(f"t_steps: times must be positive and finite (only the first may be inf, only the last 0), got {t}")
    if any(b >= a for a, b in zip(t[:-1], t[1:])):
        raise ParamError("t_steps: times must be strictly decreasing (t_max first)")
    return t


def solve(
    denoiser: Denoiser,
    x: torch.Tensor,
    t_steps: torch.Tensor,
    solver: str,
    *,
    max_order: int = 3,  # iPNDM: 1-4, DPM-Solver++: 1-3; ignored by euler, heun, dpm2
    lower_order_final: bool = True,  # DPM-Solver++ only: the last two steps use orders 2, 1
    afs: bool = False,  # analytical first step: no denoiser call at t_0
    labels: torch.Tensor | None = None,
    record: Sequence[int] | None = None,  # indices into t_steps whose states are returned
    dynamic_thresholding: bool = False,  # DPM-Solver++ only: every x0 through dynamic_threshold (sfd-main)
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate the PF-ODE from t_steps[0] to t_steps[-1] with the named solver.

    Updates (section 3):
    - euler: x_{i+1} = x_i + Delta_i d_i
    - heun: Euler predictor, then x_{i+1} = x_i + Delta_i (d_i + d(x', t_{i+1})) / 2
    - dpm2: t_mid = sqrt(t_i t_{i+1}), x_{i+1} = x_i + Delta_i d(x_i + (t_mid - t_i) d_i, t_mid)
    - ipndm: x_{i+1} = x_i + Delta_i sum_j c_j d_{i-j} (Adams-Bashforth, warm-up from order 1)
    - dpmpp: DPM-Solver++ multistep in data prediction, VE form, phi1 = t_{i+1}/t_i - 1:
      x_{i+1} = (t_{i+1}/t_i) x_i - phi1 m_i [- phi1 D1 / 2 (order 2) | + phi2 D1 - phi3 D2 (order 3)]
      With ``dynamic_thresholding`` every m_i is :func:`dynamic_threshold` (D_i) before it enters the
      update and the history, as in sfd-main's dpm_pp_sampler.
    The update runs in x's dtype; the schedule is read in float64.
    """
    check_choice("solver", solver, list(SOLVER_REGISTRY))
    entry = SOLVER_REGISTRY[solver]
    if dynamic_thresholding and not entry.thresholds:
        raise ParamError(f"dynamic_thresholding: only the dpmpp solver thresholds its data prediction, not {solver!r}")
    if entry.max_order is not None:
        check_int("max_order", max_order, minimum=1, maximum=entry.max_order)
    t = _check_t_steps(t_steps)
    wanted = _check_record(record, len(t))
    run = SolverRun(denoiser, t, labels, afs, max_order, lower_order_final, dynamic_thresholding)
    recorded: dict[int, torch.Tensor] = {0: x} if 0 in wanted else {}
    start = 0
    if math.isinf(t[0]):  # the first step from sigma = inf: its limit (module docstring)
        x, start = _first_step_from_infinity(run, entry, x), 1
        if 1 in wanted:
            recorded[1] = x
    for i in range(start, len(t) - 1):
        x = entry.step(run, x, i)
        if i + 1 in wanted:
            recorded[i + 1] = x
    if record is None:
        return x
    return x, [recorded[idx] for idx in record]


def _check_record(record: Sequence[int] | None, num_steps: int) -> list[int]:
    wanted = sorted(set(record)) if record is not None else []
    for idx in wanted:
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_steps:
            raise ParamError(f"record: index {idx!r} is outside 0..{num_steps - 1}")
    return wanted


@dataclass
class SolverRun:
    """One integration: the denoiser, the float64 schedule as floats, the options, and the solver's history."""

    denoiser: Denoiser
    t: list[float]
    labels: torch.Tensor | None
    afs: bool
    max_order: int
    lower_order_final: bool
    dynamic_thresholding: bool
    history: list[torch.Tensor] = field(default_factory=list)  # iPNDM: past d's; DPM-Solver++: past m's (newest last)

    def denoise(self, x_cur: torch.Tensor, t_cur: float) -> torch.Tensor:
        sigma = torch.full((x_cur.shape[0],), t_cur, dtype=x_cur.dtype, device=x_cur.device)
        return self.denoiser(x_cur, sigma, self.labels)

    def derivative(self, x_cur: torch.Tensor, i: int) -> torch.Tensor:
        """d_i = (x_i - D(x_i, t_i)) / t_i, or the AFS estimate at i = 0."""
        if self.afs and i == 0:
            return afs_epsilon(x_cur, self.t[0])
        return (x_cur - self.denoise(x_cur, self.t[i])) / self.t[i]


def _first_step_from_infinity(run: SolverRun, entry: "Solver", z: torch.Tensor) -> torch.Tensor:
    """The first step from t_0 = inf, where the state is the noise z (module docstring)."""
    t = run.t
    m0 = torch.zeros_like(z) if run.afs else run.denoise(z, t[0])  # D(z, inf); AFS: 0
    if run.dynamic_thresholding:
        m0 = dynamic_threshold(m0)
    if entry.flow_time_first_step and t[1] > 0:
        x = _flow_time_first_step(run.denoise, z, m0, t[1], entry.name)
    else:
        x = euler_step(z, t[0], t[1], m0)
    run.history = {"denoised": [m0], "noise": [z]}.get(entry.history_from_infinity, [])  # d_0 = lim (x_0 - D_0) / t_0 = z
    return x


def euler_update(run: SolverRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Euler: x_{i+1} = x_i + Delta_i d_i."""
    return x + (run.t[i + 1] - run.t[i]) * run.derivative(x, i)


def heun_update(run: SolverRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """Heun: Euler predictor x', then x_{i+1} = x_i + Delta_i (d_i + d(x', t_{i+1})) / 2; Euler into t = 0."""
    t_cur, t_next = run.t[i], run.t[i + 1]
    if t_next == 0:
        return euler_update(run, x, i)
    delta = t_next - t_cur
    d_cur = run.derivative(x, i)
    x_pred = x + delta * d_cur
    d_pred = (x_pred - run.denoise(x_pred, t_next)) / t_next
    return x + delta * (d_cur + d_pred) / 2


def dpm2_update(run: SolverRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver-2: t_mid = sqrt(t_i t_{i+1}), x_{i+1} = x_i + Delta_i d(x_i + (t_mid - t_i) d_i, t_mid); Euler into 0."""
    t_cur, t_next = run.t[i], run.t[i + 1]
    if t_next == 0:
        return euler_update(run, x, i)
    t_mid = math.sqrt(t_cur * t_next)
    x_mid = x + (t_mid - t_cur) * run.derivative(x, i)
    return x + (t_next - t_cur) * (x_mid - run.denoise(x_mid, t_mid)) / t_mid


def ipndm_update(run: SolverRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """iPNDM: x_{i+1} = x_i + Delta_i sum_j c_j d_{i-j} (Adams-Bashforth, warm-up from order 1)."""
    run.history.append(run.derivative(x, i))
    order = min(run.max_order, len(run.history))
    coeffs = IPNDM_COEFFS[order]
    x = x + (run.t[i + 1] - run.t[i]) * sum(c * d for c, d in zip(coeffs, reversed(run.history[-order:])))
    run.history = run.history[-3:]
    return x


def dpmpp_update(run: SolverRun, x: torch.Tensor, i: int) -> torch.Tensor:
    """DPM-Solver++ multistep in data prediction, VE form, phi1 = t_{i+1}/t_i - 1:
    x_{i+1} = (t_{i+1}/t_i) x_i - phi1 m_i [- phi1 D1 / 2 (order 2) | + phi2 D1 - phi3 D2 (order 3)]."""
    t_cur, t_next = run.t[i], run.t[i + 1]
    m_cur = x - t_cur * afs_epsilon(x, t_cur) if (run.afs and i == 0) else run.denoise(x, t_cur)
    if run.dynamic_thresholding:
        m_cur = dynamic_threshold(m_cur)
    run.history.append(m_cur)
    if t_next == 0:
        x = m_cur
    else:
        order = min(dpmpp_order(i, len(run.t) - 1, run.max_order, run.lower_order_final), len(run.history))
        x = _dpmpp_update(x, run.history, run.t, i, order)
    run.history = run.history[-3:]
    return x


def _flow_time_first_step(denoise, z: torch.Tensor, m0: torch.Tensor, t_next: float, solver: str) -> torch.Tensor:
    """Heun's or DPM-Solver-2's first step from sigma = inf, taken in flow time tau = t / (1 + t) from tau = 1
    (x_tau = z there; velocity v = (x_tau - D) / tau; the VE state is x = x_tau / (1 - tau))."""
    tau_next = t_next / (1 + t_next)
    v0 = z - m0
    if solver == "heun":  # trapezoid: x_tau' = z + (tau_1 - 1) v0, then the average of v0 and v(x_tau', tau_1)
        xt_pred = z + (tau_next - 1) * v0
        v1 = (xt_pred - denoise(xt_pred * (1 + t_next), t_next)) / tau_next
        return (z + (tau_next - 1) * (v0 + v1) / 2) * (1 + t_next)
    tau_mid = (1 + tau_next) / 2  # dpm2: the midpoint rule in tau
    t_mid = tau_mid / (1 - tau_mid)
    xt_mid = z + (tau_mid - 1) * v0
    v_mid = (xt_mid - denoise(xt_mid * (1 + t_mid), t_mid)) / tau_mid
    return (z + (tau_next - 1) * v_mid) * (1 + t_next)


def _dpmpp_update(x: torch.Tensor, m: list[torch.Tensor], t: list[float], i: int, order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep update of the given order (section 3, VE form). A history point at
    t = inf (lambda = -inf) gives r = inf, and its terms their limit 0 (module docstring)."""
    lam = lambda k: -math.log(t[k])  # noqa: E731  (-inf at t = inf)
    h = lam(i + 1) - lam(i)
    phi1 = t[i + 1] / t[i] - 1  # = exp(-h) - 1
    x_next = (t[i + 1] / t[i]) * x - phi1 * m[-1]
    if order == 1:
        return x_next
    r0 = (lam(i) - lam(i - 1)) / h
    d1_0 = torch.zeros_like(x) if math.isinf(r0) else (m[-1] - m[-2]) / r0
    if order == 2:
        return x_next - 0.5 * phi1 * d1_0
    r1 = (lam(i - 1) - lam(i - 2)) / h
    if math.isinf(r1):  # r1 -> inf: D1_1 -> 0, D1 -> D1_0, D2 -> 0
        d1, d2 = d1_0, torch.zeros_like(x)
    else:
        d1_1 = (m[-2] - m[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return x_next + phi2 * d1 - phi3 * d2


@dataclass(frozen=True)
class Solver:
    """One training-free solver: its step function and what the rest of the pipeline needs to know about it."""

    name: str
    step: Callable[[SolverRun, torch.Tensor, int], torch.Tensor]  # x_i -> x_{i+1}
    description: str
    calls_per_step: int = 1  # denoiser calls per step (a final step into t = 0 of a 2-call solver is Euler: 1)
    max_order: int | None = None  # the solver's order is a choice 1..max_order (else fixed)
    default_order: int = 1  # the order the evaluation / CLI name alone means
    aliases: tuple[tuple[str, int], ...] = ()  # extra evaluation / CLI names: (name, max_order)
    thresholds: bool = False  # may apply dynamic thresholding to its data prediction
    flow_time_first_step: bool = False  # from t_0 = inf: its rule in flow time (no VE-sigma limit)
    history_from_infinity: str | None = None  # what the step from t_0 = inf leaves in the history: denoised | noise


SOLVER_REGISTRY: dict[str, Solver] = {s.name: s for s in (
    Solver("euler", euler_update, "Euler (= DDIM), 1 call per step"),
    Solver("heun", heun_update, "Heun's 2nd order (EDM's sampler), 2 calls per step", calls_per_step=2,
           default_order=2, flow_time_first_step=True),
    Solver("dpm2", dpm2_update, "DPM-Solver-2 (midpoint in log t), 2 calls per step", calls_per_step=2,
           default_order=2, flow_time_first_step=True),
    Solver("ipndm", ipndm_update, "improved PNDM (Adams-Bashforth on d, order 1-4), 1 call per step", max_order=4,
           default_order=4, history_from_infinity="noise"),
    Solver("dpmpp", dpmpp_update, "DPM-Solver++ multistep (order 1-3), 1 call per step", max_order=3,
           default_order=3, aliases=(("dpmpp2m", 2), ("dpmpp3m", 3)), thresholds=True,
           history_from_infinity="denoised"),
)}
SOLVERS = tuple(SOLVER_REGISTRY)
SolverName = Literal[SOLVERS]  # type: ignore[valid-type]
MAX_ORDER = {name: s.max_order for name, s in SOLVER_REGISTRY.items() if s.max_order is not None}
