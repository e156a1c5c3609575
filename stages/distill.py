"""DVC stages ``distill`` (SFD, stage 1) and ``distill_v`` (SFD-v): the student learns from cached trajectories.

The student starts as a copy of ``--teacher-ckpt`` and streams the store keys that match that
teacher and the section's trajectory params (sfd-method.md sections 6-7). Resumable from
``--state``; a NaN/inf loss stops the run with exit code 3 and the last good checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.checkpoints import CheckpointError
from pipeline.losses import LPIPSWeightsError
from pipeline.param_checks import ParamError
from pipeline.params import load_params
from pipeline.sfd_distillation import NonFiniteLossError, run_distill_stage
from pipeline.trajectory_store import StoreError


def run(
    params: Path,
    section: str,
    store: str,
    teacher_ckpt: Optional[Path],
    out: Path,
    state: Optional[Path],
    metrics: Path,
    loss_log: Path,
    cost: Optional[Path],
    progress: bool,
) -> None:
    try:
        loaded = load_params(params)
        loaded.apply_threads()
        all_params = loaded.resolved
        result = run_distill_stage(
            all_params, section, store=store, teacher_ckpt=teacher_ckpt, out=out, state_dir=state,
            metrics=metrics, loss_log=loss_log, cost_path=cost or Path("metrics/cost") / f"{section}.json",
            progress=progress,
        )  # fmt: skip
    except NonFiniteLossError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    except (ParamError, StoreError, CheckpointError, LPIPSWeightsError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    final = ", ".join(f"{k}={v:.4g}" for k, v in result["final_loss"].items() if v is not None)
    typer.echo(
        f"{section}: {result['kimg']:g} kimg, {result['optimizer_steps']} optimizer steps, "
        f"{result['epochs_over_cache_max']:.2f} epochs over the cache, loss {result['loss_used']} ({final}), "
        f"{result['wall_seconds']:.1f} s -> {out}"
    )


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    section: str = typer.Option("distill", help="params section: distill (SFD) or distill_v (SFD-v)"),
    store: str = typer.Option("data/trajectories.zarr", help="trajectory store written by the trajectories stage"),
    teacher_ckpt: Optional[Path] = typer.Option(None, help="teacher checkpoint (copied into the student); default: the trajectories section's teacher"),
    out: Path = typer.Option(Path("models/sfd"), help="distilled checkpoint directory (model.safetensors + model.json)"),
    state: Optional[Path] = typer.Option(Path("checkpoints/distill"), help="resumable state and last good checkpoint"),
    metrics: Path = typer.Option(Path("metrics/distill.json"), help="summary: final loss per step index, epochs over the cache"),
    loss_log: Path = typer.Option(Path("metrics/distill_loss.csv"), help="training-loss log per step index"),
    cost: Optional[Path] = typer.Option(None, help="cost record; default metrics/cost/<section>.json"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    run(params, section, store, teacher_ckpt, out, state, metrics, loss_log, cost, progress)


if __name__ == "__main__":
    typer.run(main)
