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
from typing import Literal

import torch

from pipeline.core.param_checks import ParamError, check_choice, check_int
from pipeline.diffusion.denoisers import Denoiser

SolverName = Literal["euler", "heun", "dpm2", "ipndm", "dpmpp"]
SOLVERS = ("euler", "heun", "dpm2", "ipndm", "dpmpp")
MAX_ORDER = {"ipndm": 4, "dpmpp": 3}

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
    nfe = steps if solver in ("euler", "ipndm", "dpmpp") else 2 * steps - int(ends_at_zero)
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
    check_choice("solver", solver, SOLVERS)
    if dynamic_thresholding and solver != "dpmpp":
        raise ParamError(f"dynamic_thresholding: only the dpmpp solver thresholds its data prediction, not {solver!r}")
    if solver in MAX_ORDER:
        check_int("max_order", max_order, minimum=1, maximum=MAX_ORDER[solver])
    t = _check_t_steps(t_steps)
    num_steps = len(t)
    wanted = sorted(set(record)) if record is not None else []
    for idx in wanted:
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_steps:
            raise ParamError(f"record: index {idx!r} is outside 0..{num_steps - 1}")
    recorded: dict[int, torch.Tensor] = {0: x} if 0 in wanted else {}

    def denoise(x_cur: torch.Tensor, t_cur: float) -> torch.Tensor:
        sigma = torch.full((x_cur.shape[0],), t_cur, dtype=x_cur.dtype, device=x_cur.device)
        return denoiser(x_cur, sigma, labels)

    def derivative(x_cur: torch.Tensor, i: int) -> torch.Tensor:
        """d_i = (x_i - D(x_i, t_i)) / t_i, or the AFS estimate at i = 0."""
        if afs and i == 0:
            return afs_epsilon(x_cur, t[0])
        return (x_cur - denoise(x_cur, t[i])) / t[i]

    history: list[torch.Tensor] = []  # iPNDM: past d's; DPM-Solver++: past m's (newest last)
    start = 0
    if math.isinf(t[0]):  # the first step from sigma = inf: its limit (module docstring)
        z = x
        m0 = torch.zeros_like(x) if afs else denoise(x, t[0])  # D(z, inf); AFS: 0
        if dynamic_thresholding:
            m0 = dynamic_threshold(m0)
        if solver in ("heun", "dpm2") and t[1] > 0:
            x = _flow_time_first_step(denoise, z, m0, t[1], solver)
        else:
            x = euler_step(z, t[0], t[1], m0)
        history = {"dpmpp": [m0], "ipndm": [z]}.get(solver, [])  # d_0 = lim (x_0 - D_0) / t_0 = z
        start = 1
        if 1 in wanted:
            recorded[1] = x
    for i in range(start, num_steps - 1):
        t_cur, t_next = t[i], t[i + 1]
        delta = t_next - t_cur
        if solver == "euler" or (t_next == 0 and solver in ("heun", "dpm2")):
            x = x + delta * derivative(x, i)
        elif solver == "heun":
            d_cur = derivative(x, i)
            x_pred = x + delta * d_cur
            d_pred = (x_pred - denoise(x_pred, t_next)) / t_next
            x = x + delta * (d_cur + d_pred) / 2
        elif solver == "dpm2":
            t_mid = math.sqrt(t_cur * t_next)
            x_mid = x + (t_mid - t_cur) * derivative(x, i)
            x = x + delta * (x_mid - denoise(x_mid, t_mid)) / t_mid
        elif solver == "ipndm":
            history.append(derivative(x, i))
            order = min(max_order, len(history))
            coeffs = IPNDM_COEFFS[order]
            x = x + delta * sum(c * d for c, d in zip(coeffs, reversed(history[-order:])))
            history = history[-3:]
        else:  # dpmpp
            m_cur = x - t_cur * afs_epsilon(x, t_cur) if (afs and i == 0) else denoise(x, t_cur)
            if dynamic_thresholding:
                m_cur = dynamic_threshold(m_cur)
            history.append(m_cur)
            if t_next == 0:
                x = m_cur
            else:
                order = min(dpmpp_order(i, num_steps - 1, max_order, lower_order_final), len(history))
                x = _dpmpp_update(x, history, t, i, order)
            history = history[-3:]
        if i + 1 in wanted:
            recorded[i + 1] = x
    if record is None:
        return x
    return x, [recorded[idx] for idx in record]


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
