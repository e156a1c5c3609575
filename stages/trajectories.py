"""DVC stage ``trajectories``: teacher states at the student timestamps, cached in a Zarr store.

Only chunks that are not yet committed are generated, so a larger seed range, another schedule
or a resumed run reuses everything already stored (docs/trajectory-store.md). The same script
serves ``trajectories_stage2`` (a distilled checkpoint as the teacher).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.cost import CostMeter
from pipeline.devices import resolve_device
from pipeline.param_checks import ParamError
from pipeline.params import load_params
from pipeline.trajectory_generation import parse_shard, run_trajectories_stage
from pipeline.trajectory_store import StoreError


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    section: str = typer.Option("trajectories", help="params section to read (trajectories, trajectories_stage2)"),
    out: str = typer.Option("data/trajectories.zarr", help="trajectory store: a path or an fsspec URL"),
    teacher_ckpt: Optional[Path] = typer.Option(None, help="teacher checkpoint directory; default: the section's `teacher`"),
    seeds: Optional[str] = typer.Option(None, help="seed range 'A-B' overriding the section's seeds"),
    shard: Optional[str] = typer.Option(None, help="'i/n': generate only chunks c with c % n == i (default: torchrun rank)"),
    summary: Path = typer.Option(Path("metrics/trajectories.json"), help="summary JSON (keys, chunks generated/reused, traj/s)"),
    cost: Optional[Path] = typer.Option(None, help="cost record; default metrics/cost/<section>.json"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    try:
        loaded = load_params(params)
        loaded.apply_threads()
        all_params = loaded.resolved
        meter = CostMeter(section, resolve_device(str(all_params.get("device", "auto"))))
        result, teacher_images = run_trajectories_stage(
            all_params, section, out, teacher_ckpt=teacher_ckpt, seeds=seeds, shard=parse_shard(shard), progress=progress
        )
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except (ParamError, StoreError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    meter.add_teacher_forward(teacher_images)
    meter.extra["trajectories_generated"] = result["trajectories_generated"]
    meter.write(cost or Path("metrics/cost") / f"{section}.json")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=2) + "\n")
    for k in result["keys"]:
        typer.echo(
            f"trajectories: key {k['key']} N={k['description']['schedule']['num_steps']}: "
            f"{k['chunks_generated']} chunks generated, {k['chunks_reused']} reused, {k['traj_per_s']} traj/s -> {out}"
        )


if __name__ == "__main__":
    typer.run(main)
