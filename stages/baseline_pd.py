"""DVC stage ``baseline_pd``: progressive distillation, one checkpoint per round (``<out>/nfe<N>``)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.baselines import load_baseline_inputs, write_json
from pipeline.baselines.progressive import progressive_distillation
from pipeline.cost import CostMeter
from pipeline.devices import resolve_device
from pipeline.params import load_params


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `baseline_pd` section"),
    teacher: Path = typer.Option(Path("models/teacher"), help="teacher checkpoint directory"),
    data: Path = typer.Option(Path("data/digits"), help="dataset directory written by the data stage"),
    out: Path = typer.Option(Path("models/pd"), help="one student checkpoint per round: <out>/nfe<N>"),
    metrics: Path = typer.Option(Path("metrics/baseline_pd.json"), help="per-round losses and cumulative cost"),
    cost_out: Path = typer.Option(Path("metrics/cost/baseline_pd.json"), "--cost", help="cost record"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.baseline_pd
    device = resolve_device(p.device)
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter("baseline_pd", device)
    summary = progressive_distillation(model, config, train, p, out, device=device, cost=cost, provenance=provenance)
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"baseline_pd: students at NFE {summary['nfes']} -> {out} ({summary['wall_seconds']} s)")


if __name__ == "__main__":
    typer.run(main)
