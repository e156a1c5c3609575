"""Time schedules t_0 = t_max > t_1 > ... > t_{N-1} = t_min (sfd-method.md section 2), in float64.

In the EDM view sigma(t) = t, so a schedule is a decreasing list of noise levels. The teacher's
fine grid uses the same formula with (M+1)(N-1)+1 timestamps, so every (M+1)-th fine timestamp
equals a student timestamp exactly (section 4).

The ``flow`` kind is the grid of a flow-matching (rectified-flow) teacher (docs/teachers.md): it starts
where the teacher's own sampler starts, at flow time 1, which is t_0 = sigma = inf in this view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from pipeline.core.param_checks import ParamError, check_choice, check_int, check_keys

FLOW = "flow"
TIME_UNIFORM_EPS = 1e-3  # epsilon_s of the VP time of the time_uniform schedule


def _check_range(num_steps: int, t_min: float, t_max: float, rho: float, *, flow: bool = False) -> None:
    check_int("num_steps", num_steps, minimum=2)
    if flow:  # starts at sigma = inf, may end at the data (t_min = 0)
        if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not math.isfinite(t_min) or t_min < 0:
            raise ParamError(f"t_min: expected a finite number >= 0 (the flow schedule's last sigma), got {t_min!r}")
        if t_max != math.inf:
            raise ParamError(f"t_max: the flow schedule starts at flow time 1 (sigma = inf), where the teacher's own "
                             f"sampler starts; leave t_max out (got {t_max!r})")
        return
    for name, value in (("t_min", t_min), ("t_max", t_max), ("rho", rho)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamError(f"{name}: expected a finite number, got {value!r}")
        if value <= 0:
            raise ParamError(f"{name}: must be > 0, got {value!r}")
    if t_min >= t_max:
        raise ParamError(f"t_min must be < t_max, got t_min={t_min!r}, t_max={t_max!r}")


def discrete_sigmas(alphas_cumprod: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """sigma(tau) = sqrt((1 - abar_tau) / abar_tau) for tau = 1..T (index 0 is tau = 1)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if abar.numel() < 2 or not ((abar > 0) & (abar < 1)).all():
        raise ParamError("alphas_cumprod: expected >= 2 values strictly between 0 and 1")
    if not (abar[1:] < abar[:-1]).all():
        raise ParamError("alphas_cumprod: must be strictly decreasing in tau (abar_1 > abar_2 > ...)")
    return ((1 - abar) / abar).sqrt()


def flow_shift_time(u: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """diffusers' FlowMatchEulerDiscreteScheduler shift of the flow time: u -> s u / (1 + (s - 1) u).

    Its resolution-dependent (dynamic) shift e^mu / (e^mu + 1/u - 1) is the same map with s = e^mu (and its
    ``linear`` time_shift_type mu / (mu + 1/u - 1) the same with s = mu)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_unshift_time(t: float, shift: float) -> float:
    """Inverse of :func:`flow_shift_time`: u = t / (s - (s - 1) t)."""
    return t / (shift - (shift - 1) * t)


def flow_time_steps(num_steps: int, t_min: float, shift: float) -> torch.Tensor:
    """The ``flow`` kind: sigma_0 = inf > sigma_1 > ... > sigma_{N-1} = t_min (float64).

    Flow time u runs uniformly from 1 to u_end (diffusers' FlowMatchEuler grid), is shifted by the teacher's
    ``shift`` s, t_i = s u_i / (1 + (s - 1) u_i), and becomes the VE noise level sigma_i = t_i / (1 - t_i).
    u_end = t_end / (s - (s - 1) t_end) with t_end = t_min / (1 + t_min), so the last sigma is t_min exactly
    (t_min = 0: the schedule ends at the data, as the teacher's sampler does with its appended sigma = 0)."""
    _check_range(num_steps, t_min, math.inf, 1.0, flow=True)
    check_positive_shift(shift)
    u_end = flow_unshift_time(t_min / (1 + t_min), shift)
    frac = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = flow_shift_time(1 - frac * (1 - u_end), shift)
    sigma = t / (1 - t)
    sigma[0], sigma[-1] = math.inf, t_min
    if not (sigma[1:] < sigma[:-1]).all():
        raise ParamError(f"num_steps: {num_steps} flow timestamps with shift {shift} and t_min {t_min} are not strictly "
                         "decreasing (float64 rounding); use fewer steps or a larger t_min")
    return sigma


def check_positive_shift(shift: Any) -> float:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ParamError(f"shift: expected a finite number > 0 (the flow teacher's time shift), got {shift!r}")
    return float(shift)


def time_steps(
    kind: str,
    num_steps: int,
    t_min: float,
    t_max: float,
    rho: float = 7.0,
    *,
    alphas_cumprod: Sequence[float] | torch.Tensor | None = None,  # discrete only: abar_tau, tau = 1..T
    shift: float | None = None,  # flow only: the teacher's time shift s
) -> torch.Tensor:
    """Timestamps t_0 = t_max ... t_{N-1} = t_min (float64) for the given schedule kind.

    - polynomial: t_i = (t_max^(1/rho) + i/(N-1) (t_min^(1/rho) - t_max^(1/rho)))^rho
    - logsnr: lambda_i linear from -ln t_max to -ln t_min, t_i = exp(-lambda_i)
    - time_uniform: VP time tau_i = (1 + i/(N-1) (eps_s^(1/rho) - 1))^rho (rho = 1 is uniform),
      t_i = sqrt(exp(beta_d tau_i^2 / 2 + beta_min tau_i) - 1) with beta_d, beta_min chosen so
      tau = 1 gives t_max and tau = eps_s gives t_min
    - discrete: for a teacher trained on T discrete VP steps with table abar_tau; tau runs on the
      polynomial formula between the discrete steps whose sigma(tau) = sqrt((1 - abar)/abar)
      lies nearest t_max and t_min, rounded to integers, and t_i = sigma(tau_i). The endpoints are
      therefore sigma values of the table, not exactly t_max and t_min.
    - flow: a flow-matching teacher's grid from sigma = inf (:func:`flow_time_steps`; t_max must be inf).
    """
    check_choice("kind", kind, SCHEDULE_KINDS)
    if kind == FLOW:
        if t_max != math.inf:
            _check_range(num_steps, t_min, t_max, rho, flow=True)
        if shift is None:
            raise ParamError("shift: the 'flow' schedule needs the flow teacher's time shift (a flow-matching teacher "
                             "fills it in)")
        return flow_time_steps(num_steps, t_min, shift)
    _check_range(num_steps, t_min, t_max, rho)
    frac = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = SCHEDULE_REGISTRY[kind].steps(frac, t_min, t_max, rho, alphas_cumprod)
    if kind != "discrete":
        t[0], t[-1] = t_max, t_min  # exact endpoints despite rounding in the formulas
    return t


def polynomial_steps(frac: torch.Tensor, t_min: float, t_max: float, rho: float, _abar: Any = None) -> torch.Tensor:
    """EDM's grid: t_i = (t_max^(1/rho) + i/(N-1) (t_min^(1/rho) - t_max^(1/rho)))^rho."""
    return (t_max ** (1 / rho) + frac * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho


def logsnr_steps(frac: torch.Tensor, t_min: float, t_max: float, rho: float, _abar: Any = None) -> torch.Tensor:
    """lambda_i linear from -ln t_max to -ln t_min, t_i = exp(-lambda_i)."""
    lam = -math.log(t_max) + frac * (math.log(t_max) - math.log(t_min))
    return torch.exp(-lam)


def time_uniform_steps(frac: torch.Tensor, t_min: float, t_max: float, rho: float, _abar: Any = None) -> torch.Tensor:
    """VP time tau_i = (1 + i/(N-1) (eps_s^(1/rho) - 1))^rho, t_i = sqrt(exp(beta_d tau_i^2 / 2 + beta_min tau_i) - 1)."""
    eps_s = TIME_UNIFORM_EPS
    beta_d = 2 * (math.log(t_min**2 + 1) / eps_s - math.log(t_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(t_max**2 + 1) - beta_d / 2
    tau = (1 + frac * (eps_s ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.exp(beta_d * tau**2 / 2 + beta_min * tau) - 1)


def discrete_steps(frac: torch.Tensor, t_min: float, t_max: float, rho: float,
                   alphas_cumprod: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """The polynomial formula in the teacher's discrete step tau, rounded to integers: t_i = sigma(tau_i)."""
    num_steps = frac.numel()
    if alphas_cumprod is None:
        raise ParamError("alphas_cumprod: the 'discrete' schedule needs the teacher's abar table")
    sig = discrete_sigmas(alphas_cumprod)  # increasing in tau
    tau_hi = int(torch.argmin((sig - t_max).abs())) + 1
    tau_lo = int(torch.argmin((sig - t_min).abs())) + 1
    if tau_hi - tau_lo + 1 < num_steps:
        raise ParamError(
            f"num_steps: {num_steps} timestamps do not fit the {tau_hi - tau_lo + 1} discrete steps "
            f"between t_min={t_min} and t_max={t_max}"
        )
    tau = (tau_hi ** (1 / rho) + frac * (tau_lo ** (1 / rho) - tau_hi ** (1 / rho))) ** rho
    tau = torch.round(tau).long()
    if not (tau[1:] < tau[:-1]).all():
        raise ParamError(
            f"num_steps: rounding to the discrete grid merged timestamps (rho={rho}); use fewer steps or rho=1"
        )
    return sig[tau - 1]


@dataclass(frozen=True)
class ScheduleKindEntry:
    """One schedule kind: its formula (``None`` for ``flow``, which has its own signature) and a description."""

    name: str
    steps: Any  # (frac, t_min, t_max, rho, alphas_cumprod) -> t, float64
    description: str


SCHEDULE_REGISTRY: dict[str, ScheduleKindEntry] = {e.name: e for e in (
    ScheduleKindEntry("polynomial", polynomial_steps, "EDM's rho-polynomial grid (rho = 7)"),
    ScheduleKindEntry("logsnr", logsnr_steps, "uniform in log t (log-SNR)"),
    ScheduleKindEntry("time_uniform", time_uniform_steps, "uniform in VP time (rho = 1), or its rho-power"),
    ScheduleKindEntry("discrete", discrete_steps, "on a discrete (diffusers) teacher's own sigma grid"),
    ScheduleKindEntry(FLOW, None, "a flow-matching teacher's shifted flow-time grid from sigma = inf"),
)}
SCHEDULE_KINDS = tuple(SCHEDULE_REGISTRY)
ScheduleKind = Literal[SCHEDULE_KINDS]  # type: ignore[valid-type]


def fine_num_steps(num_steps: int, M: int) -> int:
    """Number of teacher timestamps N_tea = (M+1)(N-1)+1 (K = M+1 teacher steps per student step)."""
    check_int("num_steps", num_steps, minimum=2)
    check_int("M", M, minimum=0)
    return (M + 1) * (num_steps - 1) + 1


def fine_time_steps(
    kind: str,
    num_steps: int,
    M: int,
    t_min: float,
    t_max: float,
    rho: float = 7.0,
    *,
    alphas_cumprod: Sequence[float] | torch.Tensor | None = None,
    shift: float | None = None,
) -> torch.Tensor:
    """The teacher's fine grid: the same schedule formula with (M+1)(N-1)+1 timestamps."""
    return time_steps(kind, fine_num_steps(num_steps, M), t_min, t_max, rho, alphas_cumprod=alphas_cumprod,
                      shift=shift)


def student_indices(num_steps: int, M: int) -> list[int]:
    """Positions of the student timestamps t_0..t_{N-1} inside the fine grid: 0, M+1, 2(M+1), ..."""
    fine_num_steps(num_steps, M)  # validates
    return [n * (M + 1) for n in range(num_steps)]


@dataclass(frozen=True)
class Schedule:
    """A student schedule: kind, number of timestamps N, t_min, t_max, rho; for the ``discrete`` kind
    also the teacher's abar table, for the ``flow`` kind the teacher's time shift (both filled in from
    the teacher by :func:`fit_to_teacher`). A flow schedule has t_max = inf and no rho."""

    kind: ScheduleKind = "polynomial"
    num_steps: int = 4
    t_min: float = 0.006
    t_max: float = 80.0
    rho: float = 7.0
    alphas_cumprod: tuple[float, ...] | None = None  # discrete only: abar_tau of the teacher's T steps
    shift: float | None = None  # flow only: the teacher's time shift s (diffusers' shift, or e^mu)

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, SCHEDULE_KINDS)
        _check_range(self.num_steps, self.t_min, self.t_max, self.rho, flow=self.kind == FLOW)
        if self.shift is not None:
            if self.kind != FLOW:
                raise ParamError(f"shift: only the 'flow' kind takes a time shift, got kind {self.kind!r}")
            object.__setattr__(self, "shift", check_positive_shift(self.shift))
        if self.alphas_cumprod is not None:
            if self.kind != "discrete":
                raise ParamError(f"schedule.alphas_cumprod: only the 'discrete' kind takes an abar table, got kind {self.kind!r}")
            object.__setattr__(self, "alphas_cumprod", tuple(float(a) for a in self.alphas_cumprod))
            discrete_sigmas(self.alphas_cumprod)  # validates

    @classmethod
    def flow(cls, num_steps: int, t_min: float = 0.0, shift: float | None = None) -> "Schedule":
        """A flow-matching teacher's schedule: sigma_0 = inf ... sigma_{N-1} = t_min (:func:`flow_time_steps`)."""
        return cls(FLOW, num_steps, float(t_min), math.inf, 1.0, None, shift)

    @property
    def starts_at_infinity(self) -> bool:
        """Whether t_0 = sigma = inf (a flow schedule): the state there is the noise itself (pipeline.diffusion.solvers)."""
        return self.t_max == math.inf

    def _table(self) -> tuple[float, ...] | None:
        if self.kind == "discrete" and self.alphas_cumprod is None:
            raise ParamError(
                "schedule.kind: 'discrete' needs the teacher's abar table: use a discrete (diffusers) teacher, "
                "whose table the pipeline fills in"
            )
        return self.alphas_cumprod

    def t_steps(self) -> torch.Tensor:
        return time_steps(self.kind, self.num_steps, self.t_min, self.t_max, self.rho, alphas_cumprod=self._table(),
                          shift=self.shift)

    def fine(self, M: int) -> torch.Tensor:
        return fine_time_steps(self.kind, self.num_steps, M, self.t_min, self.t_max, self.rho,
                               alphas_cumprod=self._table(), shift=self.shift)

    def with_num_steps(self, num_steps: int) -> "Schedule":
        return Schedule(self.kind, num_steps, self.t_min, self.t_max, self.rho, self.alphas_cumprod, self.shift)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == FLOW:  # no t_max (inf, not JSON) and no rho: keys of other kinds stay as they were
            return {"kind": FLOW, "num_steps": self.num_steps, "t_min": self.t_min, "shift": self.shift}
        d = asdict(self)
        del d["shift"]
        if self.alphas_cumprod is None:
            del d["alphas_cumprod"]  # absent unless discrete with a table: existing keys stay as they were
        else:
            d["alphas_cumprod"] = list(self.alphas_cumprod)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, section: str = "schedule") -> "Schedule":
        check_keys(section, d, ("kind", "num_steps", "t_min", "t_max", "rho", "alphas_cumprod", "shift"))
        d = dict(d)
        for key in ("t_min", "t_max", "rho", "shift"):
            if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
                d[key] = float(d[key])
        try:
            if d.get("kind") == FLOW:
                for key, why in (("t_max", "it starts at flow time 1, sigma = inf, where the teacher's own sampler starts"),
                                 ("rho", "its grid is uniform in the (shifted) flow time"), ("alphas_cumprod", "")):
                    if d.get(key) is not None:
                        raise ParamError(f"{key}: the 'flow' schedule has none ({why or 'a flow teacher has no abar table'}); "
                                         "leave it out")
                return cls.flow(d.get("num_steps", 4), d.get("t_min", 0.0), d.get("shift"))
            return cls(**d)
        except ParamError as e:
            raise ParamError(f"{section}: {e}") from None


SIGMA_RANGE_RTOL = 1e-3  # slack (0.1%) for endpoints such as t_min 0.01 vs DDPM's sigma_0 = 0.0100005 (the denoiser clamps to the table)


def fit_to_teacher(
    schedule: dict[str, Any],
    alphas_cumprod: Sequence[float] | torch.Tensor | None,
    *,
    where: str = "schedule",
    given: Sequence[str] | None = None,
    flow_shift: float | None = None,
) -> dict[str, Any]:
    """A schedule dict fitted to its teacher: a discrete one with the table ``alphas_cumprod``, a flow-matching one
    with the time shift ``flow_shift`` (neither: unchanged, but the ``flow`` kind is refused).

    - t_min / t_max default to the teacher's sigma range [sigma_0, sigma_{T-1}] when absent (or not in
      ``given``, the keys the user wrote);
    - a t_min below sigma_0 or a t_max above sigma_{T-1} is an error naming the key and the range;
    - the ``discrete`` kind gets the table (``alphas_cumprod``).
    - a flow teacher: the kind must be ``flow`` (its sampler starts at sigma = inf; any other kind would start at
      a finite t_max and silently change its trajectories), and gets the teacher's shift unless one is given.
    """
    kind = schedule.get("kind", "polynomial")
    if flow_shift is not None:
        if kind != FLOW:
            raise ParamError(
                f"{where}.kind: {kind!r} starts at a finite t_max, but this flow-matching teacher's sampler starts at "
                "flow time 1 (sigma = inf): use kind 'flow' (t_max and rho left out; t_min is the last sigma, default 0, "
                "the data; the teacher's shift is filled in)"
            )
        d = dict(schedule)
        d.setdefault("shift", float(flow_shift))
        return d
    if kind == FLOW:
        raise ParamError(f"{where}.kind: 'flow' starts at sigma = inf, which only a flow-matching teacher can take "
                         "(its denoiser is bounded there); this teacher is not one: use polynomial, logsnr, "
                         "time_uniform or discrete")
    if alphas_cumprod is None:
        return dict(schedule)
    sig = discrete_sigmas(alphas_cumprod)
    lo, hi = float(sig[0]), float(sig[-1])
    d = dict(schedule)
    written = set(d) if given is None else set(given)
    if "t_min" not in written:
        d["t_min"] = lo
    if "t_max" not in written:
        d["t_max"] = hi
    if d["t_min"] < lo * (1 - SIGMA_RANGE_RTOL):
        raise ParamError(
            f"{where}.t_min: {d['t_min']} is below the discrete teacher's smallest sigma {lo:.6g} (its range is "
            f"{lo:.6g} ... {hi:.6g}); set t_min >= {lo:.6g}, or leave t_min out to use the teacher's range"
        )
    if d["t_max"] > hi * (1 + SIGMA_RANGE_RTOL):
        raise ParamError(
            f"{where}.t_max: {d['t_max']} is above the discrete teacher's largest sigma {hi:.6g} (its range is "
            f"{lo:.6g} ... {hi:.6g}); set t_max <= {hi:.6g}, or leave t_max out to use the teacher's range"
        )
    if d.get("kind") == "discrete":
        d["alphas_cumprod"] = [float(a) for a in torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()]
    return d
