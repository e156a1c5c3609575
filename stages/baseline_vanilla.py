"""DVC stage ``baseline_vanilla``: vanilla trajectory distillation (SFD paper, Algorithm 1), N = 4 + AFS."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.baselines import load_baseline_inputs, write_json
from pipeline.baselines.vanilla import vanilla_distillation
from pipeline.cost import CostMeter
from pipeline.devices import resolve_device
from pipeline.params import load_params


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `baseline_vanilla` section"),
    teacher: Path = typer.Option(Path("models/teacher"), help="teacher checkpoint directory"),
    data: Path = typer.Option(Path("data/digits"), help="dataset directory written by the data stage"),
    out: Path = typer.Option(Path("models/vanilla"), help="student checkpoint directory"),
    metrics: Path = typer.Option(Path("metrics/baseline_vanilla.json"), help="loss summary"),
    cost_out: Path = typer.Option(Path("metrics/cost/baseline_vanilla.json"), "--cost", help="cost record"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.baseline_vanilla
    device = resolve_device(p.device)
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter("baseline_vanilla", device)
    summary = vanilla_distillation(model, config, train, p, out, device=device, cost=cost, provenance=provenance)
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"baseline_vanilla: -> {out} ({summary['wall_seconds']} s)")


if __name__ == "__main__":
    typer.run(main)
