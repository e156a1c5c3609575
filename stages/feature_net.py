"""DVC stage ``feature_net``: the classifier whose features replace Inception for small data."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.files import write_json
from pipeline.data.datasets import dataset_info, load_split
from pipeline.evaluation.feature_net import skip_feature_net, train_feature_net
from stages.common import check_outputs_writable, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `feature_net` section"),
    data: Path = typer.Option(..., help="dataset directory written by the data stage"),
    out: Path = typer.Option(..., help="checkpoint directory"),
    metrics: Path = typer.Option(..., help="accuracy metrics (JSON)"),
) -> None:
    loaded = stage_params(params)
    check_outputs_writable(out, metrics)
    info = dataset_info(data)
    if info["num_classes"] == 0 and loaded.evaluate.features == "inception":
        write_json(metrics, skip_feature_net(out, "unlabelled dataset: FID uses Inception, label accuracy is not measured"))
        typer.echo(f"feature_net: skipped (unlabelled data, evaluate.features: inception) -> {out}")
        return
    result = train_feature_net(loaded.required("feature_net"), load_split(data, "train"), load_split(data, "held_out"),
                               info["num_classes"], out)
    write_json(metrics, result)
    typer.echo(f"feature_net: held-out accuracy {result['held_out_accuracy']:.4f} -> {out}")


if __name__ == "__main__":
    run(main)
