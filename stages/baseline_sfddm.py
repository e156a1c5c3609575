"""DVC stage ``baseline_sfddm``: SFDDM students (``<out>/nfe<T'>``) and their training-free control rows."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.baselines import load_baseline_inputs, write_json
from pipeline.baselines.sfddm import sfddm_distillation
from pipeline.cost import CostMeter
from pipeline.devices import resolve_device
from pipeline.params import load_params


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `baseline_sfddm` section"),
    teacher: Path = typer.Option(Path("models/teacher"), help="teacher checkpoint directory"),
    data: Path = typer.Option(Path("data/digits"), help="dataset directory written by the data stage"),
    out: Path = typer.Option(Path("models/sfddm"), help="one student per T': <out>/nfe<T'>"),
    control_out: Path = typer.Option(Path("models/sfddm_control"), help="the teacher with the same T' Euler steps: <dir>/nfe<T'>"),
    metrics: Path = typer.Option(Path("metrics/baseline_sfddm.json"), help="losses per student"),
    cost_out: Path = typer.Option(Path("metrics/cost/baseline_sfddm.json"), "--cost", help="cost record"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.baseline_sfddm
    device = resolve_device(p.device)
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter("baseline_sfddm", device)
    summary = sfddm_distillation(model, config, train, p, out, control_out, device=device, cost=cost, provenance=provenance)
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"baseline_sfddm: students T'={p.student_steps} -> {out}, controls -> {control_out}")


if __name__ == "__main__":
    typer.run(main)
