"""DVC stage ``report``: reports/report.md with tables, PNG plots and side-by-side grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pipeline.core.param_checks import ParamError
from pipeline.core.files import write_json
from pipeline.evaluation.claims import headline_lines, paired_markdown
from pipeline.evaluation.comparison import build_comparison, headline_metrics
from pipeline.evaluation.paired import load_distances
from pipeline.evaluation.pd_sweep import PD_SWEEP_JSON, TEACHER_FILE, load_sweep, sweep_on_teacher, teacher_file_hash
from pipeline.evaluation.report import about_this_run, build_report, merge_evaluations, parse_named_paths
from stages.common import check_outputs_writable, run, stage_params


def main(
    params: Path = typer.Option(..., help="params file; reads its `report` section"),
    evaluation: list[Path] = typer.Option(..., "--eval", help="evaluation metrics JSON of an evaluate stage (repeatable)"),
    cost_dir: Path = typer.Option(..., help="per-stage cost records"),
    grids: list[Path] = typer.Option(..., help="grid PNG directory of an evaluate stage (repeatable)"),
    merged_cost: Path = typer.Option(..., help="all stages' costs in one JSON"),
    out: Path = typer.Option(..., help="directory for report.md and its PNGs"),
    loss_log: list[str] = typer.Option(
        [], help="NAME=DIR: a distill stage's DVCLive directory (its --live), plotted per step index (repeatable)"
    ),
    noise_floor: Optional[Path] = typer.Option(None, help="the evaluate_solvers stage's FID noise floor JSON"),
    comparison_json: Optional[Path] = typer.Option(None, help="write the method comparison (FID, total/marginal cost) here"),
    pd_sweep: Path = typer.Option(PD_SWEEP_JSON, help="the PD budget sweep JSON (bench/pd_sweep.py)"),
    teacher: Optional[Path] = typer.Option(None, help="the teacher checkpoint folder: its architecture; a PD sweep of another teacher is left out"),
    data_dir: Optional[Path] = typer.Option(None, "--data", help="the data stage's folder (dataset.json): what the run's data is"),
    inputs: Optional[Path] = typer.Option(None, help="the inputs stage's manifests: the teacher's and the data's files by hash"),
    headline_out: Optional[Path] = typer.Option(None, "--headline", help="write the headline metrics (`dvc exp show`) here"),
    paired: list[Path] = typer.Option(
        [], help="an evaluate stage's per-seed paired distances (its --paired; repeatable): the paired bootstrap"
    ),
) -> None:
    p = stage_params(params).required("report")
    check_outputs_writable(out, merged_cost, comparison_json, headline_out)
    evaluations = merge_evaluations(evaluation)
    logs = parse_named_paths(loss_log, "--loss-log")
    floor = None
    if noise_floor is not None:
        if not noise_floor.is_file():
            raise ParamError(f"--noise-floor {noise_floor}: does not exist (run the evaluate_solvers stage first)")
        floor = json.loads(noise_floor.read_text())
    sweep = load_sweep(pd_sweep)
    # no weights file (a built-in teacher, a wrong path): a hash no sweep carries, so any sweep is flagged
    teacher_hash = None if teacher is None else (teacher_file_hash(teacher) or f"unknown (no {TEACHER_FILE} in {teacher})")
    out.mkdir(parents=True, exist_ok=True)
    distances = load_distances(paired)
    data, comparison = build_comparison(evaluations, cost_dir, plot_path=out / "comparison.png", noise_floor=floor,
                                        pd_sweep=sweep if sweep_on_teacher(sweep, teacher_hash) else None,
                                        paired=distances, resamples=p.bootstrap, confidence=p.confidence)
    if comparison_json is not None:
        comparison_json.parent.mkdir(parents=True, exist_ok=True)
        comparison_json.write_text(json.dumps(data, indent=2) + "\n")
    if headline_out is not None:
        write_json(headline_out, headline_metrics(evaluations, floor, paired=data["paired"]))
    headline = headline_lines(data["paired"], data["headline"]["statement"]) if paired else []
    report = build_report(
        evaluation=evaluations, cost_dir=cost_dir, grids_dirs=grids, out_dir=out,
        loss_logs=logs, params=p, merged_cost_path=merged_cost, comparison=comparison, noise_floor=floor,
        pd_sweep=sweep, pd_sweep_source=pd_sweep, teacher_hash=teacher_hash,
        about=about_this_run(teacher_dir=teacher, data_dir=data_dir, inputs_dir=inputs),
        headline=headline, paired=paired_markdown(data["paired"], evaluations) if paired else None,
    )  # fmt: skip
    typer.echo("\n".join(["", "Headline of this run (what its numbers resolve):", *headline, ""]).replace("**", ""))
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    run(main)
