"""Solvers against the exact Gaussian-mixture denoiser: convergence orders, NFE, AFS, record."""

import math

import numpy as np
import pytest
import torch

from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import fine_time_steps, student_indices, time_steps
from pipeline.diffusion.solvers import SOLVERS, CountingDenoiser, _dpmpp_update, afs_epsilon, solve, solver_nfe
from pipeline.teachers.loader import gmm_teacher

T_MIN, T_MAX = 0.006, 80.0


@pytest.fixture(scope="module")
def problem():
    # std 0.5 keeps the ODE well conditioned; with very sharp mixtures a few trajectories near a
    # decision boundary flip modes and hide the asymptotic rates.
    teacher = gmm_teacher(num_components=4, sample_shape=(1, 4, 4), std=0.5, seed=0)
    z = torch.randn(128, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = T_MAX * z
    ref = solve(teacher.denoiser, x0, time_steps("logsnr", 3001, T_MIN, T_MAX), "dpmpp", max_order=3)
    return teacher.denoiser, x0, ref


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


def fitted_order(errors, num_steps):
    """Slope of log(error) against log(step size) (step size ~ 1/(N-1))."""
    h = [1 / (n - 1) for n in num_steps]
    return float(np.polyfit(np.log(h), np.log(errors), 1)[0])


@pytest.mark.parametrize(
    "solver,max_order,expected,tol",
    [("euler", 1, 1.0, 0.2), ("heun", 1, 2.0, 0.25), ("dpm2", 1, 2.0, 0.25), ("dpmpp", 2, 2.0, 0.3)],
)
def test_global_convergence_order(problem, solver, max_order, expected, tol):
    denoiser, x0, ref = problem
    grid = [17, 33, 65]
    errors = [
        rms(solve(denoiser, x0, time_steps("logsnr", n, T_MIN, T_MAX), solver, max_order=max_order, lower_order_final=False), ref)
        for n in grid
    ]
    assert abs(fitted_order(errors, grid) - expected) < tol, errors


@pytest.fixture(scope="module")
def local_errors(problem):
    """Local error of one DPM-Solver++ step of order 1, 2, 3 from exact history, h in lambda."""
    from scipy.integrate import solve_ivp

    denoiser, _, _ = problem
    g = torch.Generator().manual_seed(1)
    gmm = denoiser
    xa = gmm.sample(32, generator=g) + torch.randn(32, 1, 4, 4, dtype=torch.float64, generator=g)

    def rhs(lam, y):  # dx/dlambda = D(x, e^-lambda) - x
        x = torch.from_numpy(y).reshape(xa.shape)
        return (gmm(x, torch.full((32,), math.exp(-lam), dtype=torch.float64)) - x).flatten().numpy()

    hs = [0.08, 0.04, 0.02, 0.01]
    errors = {1: [], 2: [], 3: []}
    for h in hs:
        lams = [k * h for k in range(4)]
        pts = [math.exp(-lam) for lam in lams]
        sol = solve_ivp(rhs, (0, lams[-1]), xa.flatten().numpy(), method="DOP853", t_eval=lams, rtol=1e-13, atol=1e-13)
        exact = [torch.from_numpy(sol.y[:, k]).reshape(xa.shape) for k in range(4)]
        m = [gmm(exact[k], torch.full((32,), pts[k], dtype=torch.float64)) for k in range(3)]
        for order in errors:
            errors[order].append(rms(_dpmpp_update(exact[2], m, pts, 2, order), exact[3]))
    return hs, errors


@pytest.mark.parametrize("order,expected", [(1, 2.0), (2, 3.0), (3, 3.0)])
def test_dpmpp_local_truncation_order(local_errors, order, expected):
    """Local error O(h^(k+1)) for orders 1 and 2. The published third-order multistep update
    (DPM-Solver/diffusers/k-diffusion, and sfd-method.md) weights D2 by phi3 = phi2/h - 1/2, half
    the Taylor coefficient, so its local error is O(h^3) too, with a smaller constant than 2M."""
    hs, errors = local_errors
    slope = float(np.polyfit(np.log(hs), np.log(errors[order]), 1)[0])
    assert abs(slope - expected) < 0.3, (errors[order], slope)
    if order == 3:
        assert all(e3 < e2 for e3, e2 in zip(errors[3], errors[2]))


@pytest.mark.parametrize("num_steps", [17, 20])
def test_dpmpp_3m_beats_2m_beats_euler_at_same_nfe(problem, num_steps):
    denoiser, x0, ref = problem
    t = time_steps("polynomial", num_steps, T_MIN, T_MAX)
    e_euler = rms(solve(denoiser, x0, t, "euler"), ref)
    e_2m = rms(solve(denoiser, x0, t, "dpmpp", max_order=2), ref)
    e_3m = rms(solve(denoiser, x0, t, "dpmpp", max_order=3), ref)
    assert e_3m <= e_2m <= e_euler, (e_3m, e_2m, e_euler)


@pytest.mark.parametrize("num_steps", [5, 7, 9, 13, 17, 21])
def test_dpmpp_2m_beats_euler_on_realistic_grids(problem, num_steps):
    denoiser, x0, ref = problem
    t = time_steps("polynomial", num_steps, T_MIN, T_MAX)
    assert rms(solve(denoiser, x0, t, "dpmpp", max_order=2), ref) <= rms(solve(denoiser, x0, t, "euler"), ref)


def test_dpmpp_order1_is_euler(problem):
    denoiser, x0, _ = problem
    t = time_steps("polynomial", 8, T_MIN, T_MAX)
    a = solve(denoiser, x0, t, "dpmpp", max_order=1)
    b = solve(denoiser, x0, t, "euler")
    assert torch.allclose(a, b, rtol=0, atol=1e-12 * x0.abs().max().item())


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("num_steps", [2, 3, 5, 8])
def test_nfe_formula_matches_real_calls(problem, solver, afs, num_steps):
    denoiser, x0, _ = problem
    counter = CountingDenoiser(denoiser)
    solve(counter, x0[:4], time_steps("polynomial", num_steps, T_MIN, T_MAX), solver, max_order=3, afs=afs)
    assert counter.calls == solver_nfe(solver, num_steps, afs=afs)
    assert counter.images == 4 * counter.calls


@pytest.mark.parametrize("solver", ["heun", "dpm2", "euler", "dpmpp"])
def test_nfe_when_grid_ends_at_zero(problem, solver):
    denoiser, x0, _ = problem
    t = torch.cat([time_steps("polynomial", 18, 0.002, T_MAX), torch.zeros(1, dtype=torch.float64)])
    counter = CountingDenoiser(denoiser)
    out = solve(counter, x0[:2], t, solver)
    assert counter.calls == solver_nfe(solver, 19, ends_at_zero=True)
    assert torch.isfinite(out).all()
    if solver == "heun":
        assert counter.calls == 35  # EDM's reference sampler


def test_afs_first_step_is_analytic_and_free(problem):
    denoiser, x0, _ = problem
    t = time_steps("polynomial", 4, T_MIN, T_MAX)
    t0, t1 = t[0].item(), t[1].item()
    for solver in SOLVERS:
        counter = CountingDenoiser(denoiser)
        _, (x1,) = solve(counter, x0, t, solver, afs=True, record=[1])
        if solver in ("euler", "ipndm", "dpmpp"):
            expected = x0 + (t1 - t0) * x0 / math.sqrt(1 + t0**2)
            assert torch.allclose(x1, expected, rtol=1e-12, atol=1e-12), solver
        assert counter.calls == solver_nfe(solver, 4) - 1
    assert torch.allclose(afs_epsilon(x0, t0), x0 / math.sqrt(1 + t0 * t0))


def test_record_returns_states_at_student_timestamps(problem):
    denoiser, x0, _ = problem
    fine = fine_time_steps("polynomial", 4, 3, T_MIN, T_MAX)
    idx = student_indices(4, 3)
    final, states = solve(denoiser, x0, fine, "dpmpp", record=idx)
    assert len(states) == 4
    assert torch.equal(states[0], x0) and torch.equal(states[-1], final)
    # the state at index 8 equals a run over the first 9 fine timestamps with the same history
    partial = solve(denoiser, x0, fine[:9], "dpmpp", lower_order_final=False)
    full_no_lof, (s8,) = solve(denoiser, x0, fine, "dpmpp", lower_order_final=False, record=[8])
    assert torch.allclose(s8, partial, rtol=0, atol=1e-12 * 80)


def test_float32_input_stays_float32(problem):
    denoiser, x0, _ = problem
    out = solve(denoiser, x0.float(), time_steps("polynomial", 5, T_MIN, T_MAX), "dpmpp")
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"solver": "rk4"}, "solver"),
        ({"solver": "dpmpp", "max_order": 4}, "max_order"),
        ({"solver": "dpmpp", "max_order": 0}, "max_order"),
        ({"solver": "ipndm", "max_order": 5}, "max_order"),
        ({"solver": "euler", "record": [9]}, "record"),
        ({"solver": "euler", "t_steps": torch.tensor([1.0, 2.0], dtype=torch.float64)}, "decreasing"),
        ({"solver": "euler", "t_steps": torch.tensor([1.0, -1.0], dtype=torch.float64)}, "positive"),
        ({"solver": "euler", "t_steps": torch.tensor([1.0], dtype=torch.float64)}, "t_steps"),
    ],
)
def test_bad_input_names_the_argument(problem, kwargs, match):
    denoiser, x0, _ = problem
    kwargs = {"t_steps": time_steps("polynomial", 4, T_MIN, T_MAX), **kwargs}
    with pytest.raises(ParamError, match=match):
        solve(denoiser, x0[:1], **kwargs)
    with pytest.raises(ParamError, match="solver"):
        solver_nfe("rk4", 4)
    with pytest.raises(ParamError, match="num_steps"):
        solver_nfe("euler", 1)


# ---- the start at sigma = inf (a flow-matching teacher's t = 1) ---------------------------------------------------

BIG = 1e9  # the exact mixture denoiser at sigma = inf: its limit, D(z, inf) = lim D(sigma z, sigma)


def _with_infinity(denoiser):
    """The mixture denoiser with the solvers' convention at sigma = inf: x is the direction z = lim x / sigma."""

    def d(x, sigma, labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        inf = torch.isinf(s)
        scale = torch.where(inf, torch.full_like(s, BIG), torch.ones_like(s)).reshape(-1, 1, 1, 1).to(x.dtype)
        return denoiser(x * scale, torch.where(inf, torch.full_like(s, BIG), s), labels)

    return d


@pytest.mark.parametrize("solver,max_order", [("euler", 1), ("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3), ("ipndm", 3), ("ipndm", 4)])
@pytest.mark.parametrize("afs", [False, True])
def test_a_start_at_infinity_is_the_limit_of_finite_starts(problem, solver, max_order, afs):
    """solve from t_0 = inf (state z) is the limit of solve from t_0 = s (state s z) as s -> inf (float64, a flow grid
    to t = 0.006 with shift 3). One-step rules converge like 1/s; DPM-Solver++'s 2M / 3M corrections from a history
    point at lambda_0 = -ln s are weighted by 1/r ~ 1/ln s, so they converge like 1/ln s (error x ln s constant)."""
    from pipeline.diffusion.schedules import Schedule

    denoiser, _, _ = problem
    d = _with_infinity(denoiser)
    z = torch.randn(16, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grid = Schedule.flow(7, 0.006, 3.0).t_steps()
    limit = solve(d, z, grid, solver, max_order=max_order, afs=afs)

    def error(s0: float) -> float:
        finite = grid.clone()
        finite[0] = s0
        return rms(solve(d, s0 * z, finite, solver, max_order=max_order, afs=afs), limit)

    if solver == "dpmpp" and max_order > 1:
        e12, e24 = error(1e12), error(1e24)
        assert e12 * math.log(1e12) == pytest.approx(e24 * math.log(1e24), rel=0.1) and e24 < 2e-4
    else:
        e6, e7 = error(1e6), error(1e7)
        assert e7 < 3e-6 and e7 < e6 / 5


def test_first_step_from_infinity_in_closed_form(problem):
    """x_1 = t_1 z + D(z, inf) (DDIM / Euler / DPM-Solver++ order 1), t_1 z with AFS; Heun and DPM-Solver-2 take
    their rule in flow time tau = t / (1 + t) from tau = 1 (trapezoid; midpoint tau_mid = (1 + tau_1) / 2)."""
    denoiser, _, _ = problem
    d = _with_infinity(denoiser)
    z = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t1 = 2.5
    grid = torch.tensor([math.inf, t1], dtype=torch.float64)
    d0 = d(z, math.inf)
    for solver in ("euler", "dpmpp", "ipndm"):
        torch.testing.assert_close(solve(d, z, grid, solver), t1 * z + d0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(solve(d, z, grid, solver, afs=True), t1 * z, rtol=0, atol=0)
    tau1 = t1 / (1 + t1)
    v0 = z - d0
    x_pred = z + (tau1 - 1) * v0
    v1 = (x_pred - d(x_pred * (1 + t1), t1)) / tau1
    torch.testing.assert_close(solve(d, z, grid, "heun"), (z + (tau1 - 1) * (v0 + v1) / 2) * (1 + t1))
    tau_mid = (1 + tau1) / 2
    t_mid = tau_mid / (1 - tau_mid)
    x_mid = z + (tau_mid - 1) * v0
    v_mid = (x_mid - d(x_mid * (1 + t_mid), t_mid)) / tau_mid
    torch.testing.assert_close(solve(d, z, grid, "dpm2"), (z + (tau1 - 1) * v_mid) * (1 + t1))
    with pytest.raises(ParamError, match="only the first may be inf"):
        solve(d, z, torch.tensor([80.0, math.inf, 1.0], dtype=torch.float64), "euler")
