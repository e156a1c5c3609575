"""DVC stage ``teacher``: train the default teacher (EDM loss, Adam, EMA), resumable."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cost import CostMeter
from pipeline.data import dataset_info, load_split
from pipeline.devices import resolve_device
from pipeline.params import load_params
from pipeline.checkpoints import CheckpointError
from pipeline.teacher_training import import_pretrained_teacher, train_teacher, write_json


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `teacher` section"),
    data: Path = typer.Option(Path("data/digits"), help="dataset directory written by the data stage"),
    out: Path = typer.Option(Path("models/teacher"), help="checkpoint directory (model.safetensors + model.json)"),
    state: Path = typer.Option(Path("checkpoints/teacher"), help="resumable training state (kept across runs)"),
    metrics: Path = typer.Option(Path("metrics/teacher.json"), help="training summary (loss, steps, wall time)"),
    cost_out: Path = typer.Option(Path("metrics/cost/teacher.json"), "--cost", help="cost record"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.teacher
    info = dataset_info(data)
    images, labels = load_split(data, "train")
    cost = CostMeter("teacher", resolve_device(p.device))
    description = {k: info[k] for k in ("name", "sample_shape", "num_classes", "sizes", "provenance")}
    if p.pretrained is not None:
        try:
            summary = import_pretrained_teacher(p.pretrained, out, description)
        except CheckpointError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        cost.extra["role"] = "pretrained teacher copied from teacher.pretrained (no training)"
        cost.write(cost_out)
        write_json(metrics, summary)
        typer.echo(f"teacher: pretrained {p.pretrained} -> {out}")
        return
    summary = train_teacher(
        p, images, labels, info["num_classes"], out, state_dir=state,
        data_description=description,
        cost=cost,
    )
    cost.extra["role"] = "teacher training (the trained network's passes are counted as student passes)"
    cost.write(cost_out)
    write_json(metrics, summary)
    typer.echo(f"teacher: {summary} -> {out}")


if __name__ == "__main__":
    typer.run(main)
