"""DVC stage ``baseline_pd``: progressive distillation, one checkpoint per round (``<out>/nfe<N>``)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.core.files import write_json
from pipeline.distill.baselines.common import load_baseline_inputs
from pipeline.distill.baselines.progressive import progressive_distillation
from stages.common import run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `baseline_pd` section"),
    teacher: Path = typer.Option(..., help="teacher checkpoint directory"),
    data: Path = typer.Option(..., help="dataset directory written by the data stage"),
    out: Path = typer.Option(..., help="one student checkpoint per round: <out>/nfe<N>"),
    metrics: Path = typer.Option(..., help="per-round losses and cumulative cost"),
    cost_out: Path = typer.Option(..., "--cost", help="cost record"),
) -> None:
    p = stage_params(params).baseline_pd
    device = resolve_device(p.device)
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter("baseline_pd", device)
    summary = progressive_distillation(model, config, train, p, out, device=device, cost=cost, provenance=provenance)
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"baseline_pd: students at NFE {summary['nfes']} -> {out} ({summary['wall_seconds']} s)")


if __name__ == "__main__":
    run(main)
