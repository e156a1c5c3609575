"""DVC stage ``feature_net``: the classifier whose features replace Inception for small data."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.data import dataset_info, load_split
from pipeline.feature_net import train_feature_net
from pipeline.params import load_params
from pipeline.teacher_training import write_json


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `feature_net` section"),
    data: Path = typer.Option(Path("data/digits"), help="dataset directory written by the data stage"),
    out: Path = typer.Option(Path("models/feature_net"), help="checkpoint directory"),
    metrics: Path = typer.Option(Path("metrics/feature_net.json"), help="accuracy metrics"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.feature_net
    info = dataset_info(data)
    result = train_feature_net(p, load_split(data, "train"), load_split(data, "held_out"), info["num_classes"], out)
    write_json(metrics, result)
    typer.echo(f"feature_net: held-out accuracy {result['held_out_accuracy']:.4f} -> {out}")


if __name__ == "__main__":
    typer.run(main)
