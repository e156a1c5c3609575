"""DVC stages ``distill`` (SFD), ``distill_v`` (SFD-v) and ``distill_stage2`` (one NFE): learning from cached trajectories.

The student starts as a copy of ``--teacher-ckpt`` and streams the store keys that match that
teacher and the section's trajectory params (sfd-method.md sections 6-8). Resumable from
``--state``; a NaN/inf loss stops the run with exit code 3 and the last verified state intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.config.distill import DistillParams
from pipeline.distill.sfd import run_distill_stage
from pipeline.core.distributed import is_main
from stages.common import check_outputs_writable, loaded_device, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file"),
    section: str = typer.Option(..., help="params section: distill (SFD), distill_v (SFD-v) or distill_stage2"),
    store: str = typer.Option(..., help="trajectory store written by the section's trajectories stage"),
    teacher_ckpt: Optional[Path] = typer.Option(
        None, help="the trajectories' teacher checkpoint, copied into the student; without it, the trajectories "
        "section's built-in teacher (gmm) and the section's student_network"
    ),
    out: Path = typer.Option(..., help="distilled checkpoint directory (model.safetensors + model.json)"),
    state: Path = typer.Option(..., help="resumable state (verified by its checksum) and the last usable checkpoint"),
    metrics: Path = typer.Option(..., help="summary: final loss per step index, epochs over the cache"),
    live: Path = typer.Option(..., help="DVCLive directory: loss per step index (x axis kimg), lr, final metrics"),
    cost: Path = typer.Option(..., help="cost record"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    loaded = stage_params(params, distributed=True, device=loaded_device(params, section))
    check_outputs_writable(out, state, metrics, live, cost)  # before the teacher is loaded
    result = run_distill_stage(
        loaded.required(section, DistillParams), trajectories=loaded.trajectories_for(section, required=True), loss=loaded.loss,
        name=section,
        store=store, teacher_ckpt=teacher_ckpt, out=out, state_dir=state,
        metrics=metrics, live_dir=live, cost_path=cost, progress=progress,
        compile=loaded.compile, channels_last=loaded.channels_last,
    )  # fmt: skip
    if not is_main():
        return
    final = ", ".join(f"{k}={v:.4g}" for k, v in result["final_loss"].items() if v is not None)
    typer.echo(
        f"{section}: {result['kimg']:g} kimg, {result['optimizer_steps']} optimizer steps, "
        f"{result['epochs_over_cache_max']:.2f} epochs over the cache, loss {result['loss_used']} ({final}), "
        f"{result['wall_seconds']:.1f} s -> {out}"
    )


if __name__ == "__main__":
    run(main)
