"""DVC stages ``baseline_pd``, ``baseline_sfddm``, ``baseline_vanilla``: the baselines on SFD's teacher.

``--method`` picks the params section ``baseline_<method>`` and its trainer: progressive
distillation (one checkpoint per round, ``<out>/nfe<N>``), SFDDM (one student per T',
``<out>/nfe<T'>``, and the training-free control rows in ``--control-out``) or vanilla trajectory
distillation (``<out>``). Resumable from ``--state``. SFDDM's default budget (``budget: sfd_stage1``)
is computed from the ``distill`` section and its trajectories section of the same params file.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.core.files import write_json
from pipeline.distill.baselines.common import load_baseline_inputs
from pipeline.distill.baselines.progressive import progressive_distillation
from pipeline.distill.baselines.sfddm import sfd_stage1_budget, sfddm_distillation
from pipeline.distill.baselines.vanilla import vanilla_distillation
from pipeline.core.distributed import is_main, rank_device
from stages.common import check_outputs_writable, fail, loaded_device, run, stage_params


class Method(str, Enum):
    pd = "pd"
    sfddm = "sfddm"
    vanilla = "vanilla"


def main(
    method: Method = typer.Option(..., help="pd | sfddm | vanilla: reads the params section baseline_<method>"),
    params: Path = typer.Option(..., help="params file"),
    teacher: Path = typer.Option(..., help="teacher checkpoint directory"),
    data: Path = typer.Option(..., help="dataset directory written by the data stage"),
    out: Path = typer.Option(..., help="student checkpoint(s): <out> (vanilla) or <out>/nfe<N> (pd, sfddm)"),
    metrics: Path = typer.Option(..., help="losses and cumulative cost (JSON)"),
    cost_out: Path = typer.Option(..., "--cost", help="cost record"),
    state: Path = typer.Option(..., help="resumable training state(s), kept across runs"),
    live: Path = typer.Option(..., help="DVCLive directory: loss and lr per update, final metrics"),
    control_out: Optional[Path] = typer.Option(None, help="sfddm only: the teacher with the same T' Euler steps, <dir>/nfe<T'>"),
) -> None:
    name = f"baseline_{method.value}"
    if (method is Method.sfddm) != (control_out is not None):
        fail("--control-out is required with --method sfddm and only allowed with it")
    all_params = stage_params(params, distributed=True, device=loaded_device(params, name))
    p = all_params.required(name)
    check_outputs_writable(out, metrics, cost_out, state, live, control_out)
    device = rank_device(resolve_device(p.device))
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter(name, device)
    common = dict(device=device, cost=cost, provenance=provenance, state_dir=state, live_dir=live)
    if method is Method.pd:
        summary = progressive_distillation(model, config, train, p, out, **common)
    elif method is Method.sfddm:
        budget = None
        if p.budget == "sfd_stage1":  # the same forward-pass equivalents as SFD's stage 1 on this params file
            budget = sfd_stage1_budget(all_params.required("distill"), all_params.trajectories_for("distill", required=True))
        summary = sfddm_distillation(model, config, train, p, out, control_out, budget=budget, **common)
    else:
        summary = vanilla_distillation(model, config, train, p, out, **common)
    cost.write(cost_out)
    write_json(metrics, summary)
    if not is_main():
        return
    typer.echo(f"{name}: -> {out} ({summary['wall_seconds']} s)")


if __name__ == "__main__":
    run(main)
