"""DVC stage ``distill_stage2``: one-NFE student (N = 3 + AFS) distilled from a stage-1 model (section 8).

The stage-1 model (SFD-v or SFD with N = 7) is both the teacher — its Euler, M = 2, AFS
trajectories come from the ``trajectories_stage2`` key, which includes its checkpoint hash —
and the student's initialisation. Loss: L1, plus LPIPS on the last step when the section gives
``lpips_weights`` (recorded in the metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.distill import run


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    section: str = typer.Option("distill_stage2", help="params section"),
    store: str = typer.Option("data/trajectories.zarr", help="trajectory store written by trajectories_stage2"),
    teacher_ckpt: Path = typer.Option(Path("models/sfd_v"), help="the stage-1 checkpoint (teacher and initialisation)"),
    out: Path = typer.Option(Path("models/sfd_stage2"), help="distilled checkpoint directory"),
    state: Optional[Path] = typer.Option(Path("checkpoints/distill_stage2"), help="resumable state and last good checkpoint"),
    metrics: Path = typer.Option(Path("metrics/distill_stage2.json"), help="summary: final loss, epochs, loss used"),
    loss_log: Path = typer.Option(Path("metrics/distill_stage2_loss.csv"), help="training-loss log"),
    cost: Optional[Path] = typer.Option(None, help="cost record; default metrics/cost/<section>.json"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    run(params, section, store, teacher_ckpt, out, state, metrics, loss_log, cost, progress)


if __name__ == "__main__":
    typer.run(main)
