"""DVC stage ``report``: reports/report.md with tables, PNG plots and side-by-side grids."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.comparison import comparison_markdown
from pipeline.param_checks import ParamError
from pipeline.params import load_params
from pipeline.report import build_report, merge_evaluations


def parse_named(values: list[str], option: str) -> dict[str, Path]:
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{option}: expected NAME=PATH, got {value!r}")
        named[name] = Path(path)
    return named


def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file; reads its `report` section"),
    evaluation: list[Path] = typer.Option([], "--eval", help="evaluation metrics JSON of an evaluate stage (repeatable)"),
    cost_dir: Path = typer.Option(Path("metrics/cost"), help="per-stage cost records"),
    grids: list[Path] = typer.Option([], help="grid PNG directory of an evaluate stage (repeatable)"),
    loss_log: list[str] = typer.Option([], help="NAME=CSV distillation loss log of a distill stage; repeatable"),
    merged_cost: Path = typer.Option(Path("metrics/cost.json"), help="all stages' costs in one JSON"),
    out: Path = typer.Option(Path("reports"), help="directory for report.md and its PNGs"),
) -> None:
    try:
        p = load_params(params)
        evaluations = merge_evaluations(evaluation or [Path("metrics/eval.json")])
    except ParamError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    logs = parse_named(loss_log, "--loss-log")
    for name, path in logs.items():
        if not path.is_file():
            raise typer.BadParameter(f"--loss-log {name}: file {path} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    comparison = comparison_markdown(evaluations, cost_dir, plot_path=out / "comparison.png")
    report = build_report(
        evaluation=evaluations, cost_dir=cost_dir, grids_dirs=grids or [Path("reports/grids")], out_dir=out,
        loss_logs=logs, params=p.report, merged_cost_path=merged_cost, comparison=comparison,
    )
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    typer.run(main)
