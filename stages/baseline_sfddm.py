"""DVC stage ``baseline_sfddm``: SFDDM students (``<out>/nfe<T'>``) and their training-free control rows."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.core.files import write_json
from pipeline.distill.baselines.common import load_baseline_inputs
from pipeline.distill.baselines.sfddm import sfddm_distillation
from stages.common import run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `baseline_sfddm` section"),
    teacher: Path = typer.Option(..., help="teacher checkpoint directory"),
    data: Path = typer.Option(..., help="dataset directory written by the data stage"),
    out: Path = typer.Option(..., help="one student per T': <out>/nfe<T'>"),
    control_out: Path = typer.Option(..., help="the teacher with the same T' Euler steps: <dir>/nfe<T'>"),
    metrics: Path = typer.Option(..., help="losses per student"),
    cost_out: Path = typer.Option(..., "--cost", help="cost record"),
) -> None:
    p = stage_params(params).baseline_sfddm
    device = resolve_device(p.device)
    model, config, train, provenance = load_baseline_inputs(teacher, data, device)
    cost = CostMeter("baseline_sfddm", device)
    summary = sfddm_distillation(model, config, train, p, out, control_out, device=device, cost=cost, provenance=provenance)
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"baseline_sfddm: students T'={p.student_steps} -> {out}, controls -> {control_out}")


if __name__ == "__main__":
    run(main)
