"""DVC stage ``teacher``: train the default teacher (EDM loss, Adam, EMA, resumable) or import ``teacher.pretrained``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.core.files import write_json
from pipeline.core.inputs import read_manifest
from pipeline.data.datasets import dataset_info, load_split
from pipeline.teachers.training import data_description, import_pretrained_teacher, train_teacher
from pipeline.core.distributed import is_main
from stages.common import check_outputs_writable, loaded_device, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `teacher` section"),
    data: Path = typer.Option(..., help="dataset directory written by the data stage"),
    out: Path = typer.Option(..., help="checkpoint directory (model.safetensors + model.json)"),
    state: Path = typer.Option(..., help="resumable training state (kept across runs)"),
    metrics: Path = typer.Option(..., help="training summary (loss, steps, wall time)"),
    live: Path = typer.Option(..., help="DVCLive directory: loss and lr per step, final metrics"),
    cost_out: Path = typer.Option(..., "--cost", help="cost record"),
    inputs: Optional[Path] = typer.Option(None, help="the inputs stage's manifests (the pretrained file's content hash)"),
) -> None:
    p = stage_params(params, distributed=True, device=loaded_device(params, "teacher")).required("teacher")
    check_outputs_writable(out, state, metrics, live, cost_out)
    info = dataset_info(data)
    cost = CostMeter("teacher", resolve_device(p.device))
    description = data_description(info)
    if p.pretrained is not None:
        if not is_main():  # a copy, not training: rank 0 alone writes it
            return
        summary = import_pretrained_teacher(p.pretrained, out, description, prompts=p.prompts)
        source = read_manifest(inputs, "teacher.pretrained")
        if source is not None:
            summary["source_file_hash"] = source["hash"]
        write_json(live / "metrics.json", {"imported": 1, "steps": 0})  # no training: no loss curve
        cost.extra["role"] = "pretrained teacher from teacher.pretrained: copied, or converted from an EDM pickle or a diffusers folder (no training)"
    else:
        images, labels = load_split(data, "train")
        summary = train_teacher(p, images, labels, info["num_classes"], out, state_dir=state,
                                data_description=description, cost=cost, live_dir=live)
        cost.extra["role"] = "teacher training (the trained network's passes are counted as student passes)"
    cost.write(cost_out)
    write_json(metrics, summary)
    if not is_main():
        return
    typer.echo(f"teacher: {summary} -> {out}")


if __name__ == "__main__":
    run(main)
