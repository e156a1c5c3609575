"""DVC stage ``baseline_vanilla``: vanilla trajectory distillation (SFD paper, Algorithm 1), N = 4 + AFS."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.core.files import write_json
from pipeline.distill.baselines.common import load_baseline_inputs
from pipeline.distill.baselines.vanilla import vanilla_distillation
from stages.common import run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `baseline_vanilla` section"),
    teacher: Path = typer.Option(..., help="teacher checkpoint directory"),
    data: Path = typer.Option(..., help="dataset directory written by the data stage"),
    out: Path = typer.Option(..., help="student checkpoint directory"),
    metrics: Path = typer.Option(..., help="loss summary"),
    cost_out: Path = typer.Option(..., "--cost", help="cost record"),
) -> None:
    p = stage_params(params).baseline_vanilla
    device = resolve_device(p.device)
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter("baseline_vanilla", device)
    summary = vanilla_distillation(model, config, train, p, out, device=device, cost=cost, provenance=provenance)
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"baseline_vanilla: -> {out} ({summary['wall_seconds']} s)")


if __name__ == "__main__":
    run(main)
