"""DVC stages ``evaluate_solvers``, ``evaluate_baselines``, ``evaluate``: FID, KID, precision, recall, label accuracy,
and the paired distance to the teacher's reference samples from the same x_T."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.core.cost import CostMeter
from pipeline.core.devices import resolve_device
from pipeline.evaluation.evaluate import parse_student_args, run_evaluation, write_results
from pipeline.core.distributed import is_main
from stages.common import check_outputs_writable, loaded_device, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `evaluate` section"),
    teacher: Path = typer.Option(..., help="teacher checkpoint directory"),
    feature_net: Path = typer.Option(..., help="feature_net checkpoint (features, label accuracy)"),
    data: Path = typer.Option(..., help="dataset directory (reference images)"),
    out: Path = typer.Option(..., help="flat JSON map '<sampler>/nfe<k>' -> metrics"),
    grids: Path = typer.Option(..., help="one PNG grid per sampler"),
    cost_out: Path = typer.Option(..., "--cost", help="cost record"),
    student: list[str] = typer.Option([], help="distilled checkpoint NAME=CKPT_DIR (repeatable)"),
    solvers: bool = typer.Option(True, help="also evaluate the teacher's reference sampler and the training-free solvers"),
    noise_floor: Optional[Path] = typer.Option(
        None, help="write the protocol's FID noise floor here (teacher vs teacher on evaluate.noise_floor_seeds, held-out FID)"
    ),
    paired_reference_out: Optional[Path] = typer.Option(
        None, help="write the teacher reference entry's first evaluate.paired_seeds samples and features here (safetensors)"
    ),
    paired_reference: Optional[Path] = typer.Option(None, help="the teacher's reference samples (evaluate_solvers wrote them)"),
    paired: Optional[Path] = typer.Option(None, help="every entry's per-seed paired distances to the reference (safetensors)"),
) -> None:
    p = stage_params(params, distributed=True, device=loaded_device(params, "evaluate")).required("evaluate")
    check_outputs_writable(out, grids, cost_out, noise_floor, paired_reference_out, paired)
    cost = CostMeter(cost_out.stem, resolve_device(p.device))
    results = run_evaluation(
        p, teacher_dir=teacher, data_dir=data, feature_net_dir=feature_net,
        students=parse_student_args(student), grids_dir=grids, cost=cost,
        reference_and_solvers=solvers, noise_floor_out=noise_floor, paired_reference=paired_reference,
        paired_reference_out=paired_reference_out, paired_out=paired,
    )  # fmt: skip
    if not is_main():  # rank 0 gathered the samples and writes every output
        return
    write_results(out, results)
    cost.write(cost_out)
    typer.echo(f"evaluate: {len(results)} samplers -> {out}")


if __name__ == "__main__":
    run(main)
