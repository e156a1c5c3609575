"""DVC stage ``data``: write the fixed train / held-out split of the configured dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.data import prepare_dataset
from pipeline.params import load_params


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `data` section"),
    out: Path = typer.Option(Path("data/digits"), help="output directory (train/held_out safetensors + dataset.json)"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.data
    info = prepare_dataset(p, out)
    typer.echo(f"data: {info.name} {info.sample_shape} classes={info.num_classes} sizes={info.sizes} -> {out}")


if __name__ == "__main__":
    typer.run(main)
