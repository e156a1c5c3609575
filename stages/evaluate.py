"""DVC stages ``evaluate_solvers``, ``evaluate_baselines``, ``evaluate``: FID, KID, precision, recall, label accuracy."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cost import CostMeter
from pipeline.devices import resolve_device
from pipeline.evaluation import parse_student_args, run_evaluation, write_results
from pipeline.params import load_params


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `evaluate` section"),
    teacher: Path = typer.Option(Path("models/teacher"), help="teacher checkpoint directory"),
    feature_net: Path = typer.Option(Path("models/feature_net"), help="feature_net checkpoint (features, label accuracy)"),
    data: Path = typer.Option(Path("data/digits"), help="dataset directory (reference images)"),
    out: Path = typer.Option(Path("metrics/eval.json"), help="flat JSON map '<sampler>/nfe<k>' -> metrics"),
    grids: Path = typer.Option(Path("reports/grids"), help="one PNG grid per sampler"),
    student: list[str] = typer.Option([], help="distilled checkpoint NAME=CKPT_DIR (repeatable)"),
    solvers: bool = typer.Option(True, help="also evaluate the teacher's reference sampler and the training-free solvers"),
    cost_out: Path = typer.Option(Path("metrics/cost/evaluate.json"), "--cost", help="cost record"),
) -> None:
    all_params = load_params(params)
    all_params.apply_threads()
    p = all_params.evaluate
    cost = CostMeter(cost_out.stem, resolve_device(p.device))
    results = run_evaluation(
        p, teacher_dir=teacher, data_dir=data, feature_net_dir=feature_net,
        students=parse_student_args(student), grids_dir=grids, cost=cost,
        reference_and_solvers=solvers,
    )
    write_results(out, results)
    cost.write(cost_out)
    typer.echo(f"evaluate: {len(results)} samplers -> {out}")


if __name__ == "__main__":
    typer.run(main)
