"""DVC stages ``trajectories``, ``trajectories_v``, ``trajectories_stage2``: teacher states cached in a Zarr store.

Only chunks that are not yet committed are generated, so a larger seed range, another schedule
or a resumed run reuses everything already stored (docs/trajectory-store.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.core.distributed import is_main
from pipeline.core.files import write_json
from pipeline.config.trajectories import TrajectoryParams
from pipeline.trajectories.generation import parse_shard, run_trajectories_stage
from stages.common import check_outputs_writable, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file"),
    section: str = typer.Option(..., help="params section to read (trajectories, trajectories_v, trajectories_stage2)"),
    out: str = typer.Option(..., help="trajectory store: a path or an fsspec URL"),
    teacher_ckpt: Optional[Path] = typer.Option(
        None, help="teacher checkpoint directory (a distilled SFD-v model for stage 2); without it, the section's "
        "built-in `teacher: {source: gmm, ...}`"
    ),
    summary: Path = typer.Option(..., help="summary JSON (keys, chunks generated/reused, traj/s)"),
    cost: Path = typer.Option(..., help="cost record"),
    seeds: Optional[str] = typer.Option(None, help="seed range 'A-B' overriding the section's seeds"),
    shard: Optional[str] = typer.Option(None, help="'i/n': generate only chunks c with c % n == i (default: torchrun rank)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    loaded = stage_params(params, distributed=True)
    check_outputs_writable(summary, cost)  # the store itself is checked by the stage (a complete one may be read-only)
    meter = CostMeter(section, resolve_device(loaded.device))
    p = loaded.required(section, TrajectoryParams)
    note = None if seeds is not None else p.chunk_overhead_note(section)
    if note and is_main():
        typer.echo(f"trajectories: warning: {note}", err=True)
    result, teacher_images = run_trajectories_stage(
        p, out, name=section, device=loaded.device, teacher_ckpt=teacher_ckpt,
        seeds=seeds, shard=parse_shard(shard), progress=progress and is_main(),
        compile=loaded.compile, channels_last=loaded.channels_last,
    )  # fmt: skip
    meter.add_teacher_forward(teacher_images)  # what this run spent (0 when every chunk was committed)
    meter.extra["trajectories_generated"] = result["trajectories_generated"]
    meter.extra["stored"] = result["stored_cost"]  # what the stored trajectories cost, from the commit records
    meter.write(cost)
    write_json(summary, result)
    if not is_main():  # rank 0 has written the merged summary and cost
        return
    for k in result["keys"]:
        redone = f" ({k['chunks_regenerated']} failed verification)" if k.get("chunks_regenerated") else ""
        typer.echo(
            f"trajectories: key {k['key']} N={k['description']['schedule']['num_steps']}: "
            f"{k['chunks_generated']} chunks generated{redone}, {k['chunks_reused']} reused (verified), "
            f"{k['traj_per_s']} traj/s -> {out}"
        )


if __name__ == "__main__":
    run(main)
