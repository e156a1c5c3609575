"""DVC stage ``report``: reports/report.md with tables, PNG plots and side-by-side grids."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.evaluation.comparison import comparison_markdown
from pipeline.evaluation.report import build_report, merge_evaluations, parse_named_paths
from stages.common import run, stage_params


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
) -> None:
    p = stage_params(params).report
    evaluations = merge_evaluations(evaluation)
    logs = parse_named_paths(loss_log, "--loss-log")
    out.mkdir(parents=True, exist_ok=True)
    comparison = comparison_markdown(evaluations, cost_dir, plot_path=out / "comparison.png")
    report = build_report(
        evaluation=evaluations, cost_dir=cost_dir, grids_dirs=grids, out_dir=out,
        loss_logs=logs, params=p, merged_cost_path=merged_cost, comparison=comparison,
    )  # fmt: skip
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    run(main)
