"""Solvers, losses and schedule kinds each have one registry; validation, dispatch, CLI help and docs read it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import typer

from pipeline.config.distill import LOSS_DESCRIPTIONS, LOSSES
from pipeline.config.params import parse_params
from pipeline.core.param_checks import ParamError
from pipeline.diffusion import solvers
from pipeline.diffusion.sampling import SOLVER_NAMES
from pipeline.diffusion.schedules import SCHEDULE_KINDS, SCHEDULE_REGISTRY, time_steps
from pipeline.distill.losses import LOSS_REGISTRY, make_loss

ROOT = Path(__file__).resolve().parents[1]
PARAMS_DOC = (ROOT / "docs" / "params.md").read_text()


def doc_row(key: str, containing: str) -> str:
    rows = [line for line in PARAMS_DOC.splitlines() if line.startswith(f"| `{key}` |") and containing in line]
    assert rows, f"docs/params.md has no `{key}` row mentioning {containing!r}"
    return rows[0]


def test_every_registered_name_is_documented():
    solver_row = doc_row("solver", "`dpmpp`")
    assert set(re.findall(r"`(\w+)`", solver_row.split("|")[3])) == set(solvers.SOLVERS)
    loss_row = doc_row("loss", "`pseudo_huber`")
    assert set(re.findall(r"`(\w+)`", loss_row.split("|")[3])) == set(LOSSES)
    schedule_row = doc_row("schedule", "`kind`")
    assert all(kind in schedule_row for kind in SCHEDULE_KINDS)


def test_cli_help_lists_every_solver_and_schedule_kind():
    from pipeline.cli import app

    sample = typer.main.get_command(app).commands["sample"]
    helps = {p.name: p.help for p in sample.params}
    assert helps["solver"].startswith("|".join(SOLVER_NAMES))
    assert all(kind in helps["schedule"] for kind in SCHEDULE_KINDS)


def test_registries_agree_with_the_params_types():
    p = parse_params({"trajectories": {"solver": "heun", "seeds": "0-3"}})
    assert p.trajectories.solver == "heun"
    with pytest.raises(ParamError, match="allowed values: 'euler', 'heun', 'dpm2', 'ipndm', 'dpmpp'"):
        parse_params({"trajectories": {"solver": "rk4", "seeds": "0-3"}})
    assert tuple(LOSS_REGISTRY) == LOSSES == tuple(LOSS_DESCRIPTIONS)
    assert make_loss("l2")(torch.ones(2, 3), torch.zeros(2, 3)).item() == 3.0
    assert set(SOLVER_NAMES) >= set(solvers.SOLVERS) and {"dpmpp2m", "dpmpp3m"} <= set(SOLVER_NAMES)
    assert solvers.MAX_ORDER == {"ipndm": 4, "dpmpp": 3}


def test_a_registered_solver_is_dispatched(monkeypatch):
    """solve() runs whatever step function the registry holds: a new solver is one function and one entry."""
    def half_step(run, x, i):  # x_{i+1} = x_i + Delta_i d_i / 2 (a deliberately wrong solver: only dispatch counts)
        return x + (run.t[i + 1] - run.t[i]) * run.derivative(x, i) / 2

    monkeypatch.setitem(solvers.SOLVER_REGISTRY, "half", solvers.Solver("half", half_step, "test only"))
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([2.0, 1.0], dtype=torch.float64)
    out = solvers.solve(lambda x, sigma, labels=None: torch.zeros_like(x), x, t, "half")
    torch.testing.assert_close(out, x * 0.75, rtol=0, atol=0)  # d = x / 2, Delta = -1: x - x / 4


def test_schedule_kinds_dispatch_through_the_registry():
    for kind in ("polynomial", "logsnr", "time_uniform"):
        t = time_steps(kind, 5, 0.002, 80.0, 7.0)
        assert t[0].item() == 80.0 and t[-1].item() == 0.002 and (t[1:] < t[:-1]).all()
        assert SCHEDULE_REGISTRY[kind].description
