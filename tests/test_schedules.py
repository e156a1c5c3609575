import math

import pytest
import torch

from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import Schedule, fine_num_steps, fine_time_steps, student_indices, time_steps

LINEAR_VP_ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def test_polynomial_cifar_defaults_match_paper():
    t = time_steps("polynomial", 4, 0.006, 80)
    assert t.dtype == torch.float64
    assert torch.allclose(t, torch.tensor([80, 10.929, 0.6699, 0.006], dtype=torch.float64), atol=5e-4, rtol=0)
    t3 = time_steps("polynomial", 3, 0.006, 80)
    assert torch.allclose(t3, torch.tensor([80, 3.107, 0.006], dtype=torch.float64), atol=5e-4, rtol=0)


@pytest.mark.parametrize("kind", ["polynomial", "logsnr", "time_uniform"])
def test_endpoints_and_monotone(kind):
    t = time_steps(kind, 9, 0.006, 80, rho=7.0 if kind != "time_uniform" else 1.0)
    assert t[0].item() == 80 and t[-1].item() == 0.006
    assert (t[1:] < t[:-1]).all()


def test_logsnr_is_uniform_in_log_t():
    lam = -time_steps("logsnr", 7, 0.006, 80).log()
    steps = lam[1:] - lam[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-12)


def test_time_uniform_formula_endpoints_are_exact_before_clamping():
    # beta_d, beta_min are chosen so the VP time tau = 1 maps to t_max and tau = eps_s to t_min;
    # the returned endpoints are then set exactly, the interior comes from the formula.
    t = time_steps("time_uniform", 50, 0.006, 80, rho=1.0)
    assert abs(t[1].item() / t[0].item() - 1) < 0.2 and (t[1:] < t[:-1]).all()


def test_discrete_schedule_lies_on_the_table():
    sig = ((1 - LINEAR_VP_ABAR) / LINEAR_VP_ABAR).sqrt()
    t = time_steps("discrete", 10, 0.01, 80, rho=1.0, alphas_cumprod=LINEAR_VP_ABAR)
    for v in t:
        assert torch.isclose(sig, v).any()
    assert (t[1:] < t[:-1]).all()
    with pytest.raises(ParamError, match="alphas_cumprod"):
        time_steps("discrete", 10, 0.01, 80)


@pytest.mark.parametrize("kind", ["polynomial", "logsnr", "time_uniform"])
@pytest.mark.parametrize("num_steps,M", [(2, 0), (3, 2), (4, 3), (7, 1)])
def test_fine_grid_contains_student_grid_exactly(kind, num_steps, M):
    fine = fine_time_steps(kind, num_steps, M, 0.006, 80)
    assert fine.numel() == (M + 1) * (num_steps - 1) + 1 == fine_num_steps(num_steps, M)
    coarse = time_steps(kind, num_steps, 0.006, 80)
    assert torch.equal(fine[student_indices(num_steps, M)], coarse)  # bit-exact, not approximately


def test_fine_grid_default_has_13_timestamps():
    assert fine_num_steps(4, 3) == 13
    assert student_indices(4, 3) == [0, 4, 8, 12]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: time_steps("cosine", 4, 0.006, 80), "kind"),
        (lambda: time_steps("polynomial", 1, 0.006, 80), "num_steps"),
        (lambda: time_steps("polynomial", 4, 80, 0.006), "t_min must be < t_max"),
        (lambda: time_steps("polynomial", 4, 0.0, 80), "t_min"),
        (lambda: time_steps("polynomial", 4, -1.0, 80), "t_min"),
        (lambda: time_steps("polynomial", 4, 0.006, math.inf), "t_max"),
        (lambda: time_steps("polynomial", 4, 0.006, 80, rho=0), "rho"),
        (lambda: fine_time_steps("polynomial", 4, -1, 0.006, 80), "M"),
        (lambda: student_indices(4, -2), "M"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ParamError, match=match):
        call()


def test_schedule_dataclass_round_trip_and_validation():
    s = Schedule(num_steps=4)
    assert Schedule.from_dict(s.to_dict()) == s
    assert torch.equal(s.t_steps(), time_steps("polynomial", 4, 0.006, 80))
    assert torch.equal(s.fine(3)[::4], s.t_steps())
    with pytest.raises(ParamError, match="schedule: unknown key"):
        Schedule.from_dict({"kind": "polynomial", "steps": 4})
    with pytest.raises(ParamError, match="schedule.kind"):
        Schedule.from_dict({"kind": "cosine"})
