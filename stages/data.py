"""DVC stage ``data``: write the fixed train / held-out split of the configured dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.core.inputs import read_manifest
from pipeline.data.datasets import prepare_dataset
from stages.common import check_outputs_writable, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `data` section"),
    out: Path = typer.Option(..., help="output directory (train/held_out safetensors + dataset.json)"),
    inputs: Optional[Path] = typer.Option(None, help="the inputs stage's manifests (the dataset file's content hash)"),
) -> None:
    p = stage_params(params).required("data")
    check_outputs_writable(out)
    source = read_manifest(inputs, "data.path")
    info = prepare_dataset(p, out, source_hash=None if source is None else source.get("hash"))
    typer.echo(f"data: {info.name} {info.sample_shape} classes={info.num_classes} sizes={info.sizes} -> {out}")


if __name__ == "__main__":
    run(main)
