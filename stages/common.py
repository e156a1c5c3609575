"""What every stage entry point shares: loading params.yaml once, and one way to fail.

A stage's ``main`` is a typer command whose paths are all required options (dvc.yaml passes
them; nothing defaults to a path that could disagree with it). :func:`run` executes it and turns
the project's errors (:class:`pipeline.core.param_checks.PipelineError`) and missing files into
one line on stderr and exit code 2; a non-finite training loss exits with 3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from pipeline.config.params import Params, load_params
from pipeline.core.param_checks import PipelineError

EXIT_ERROR = 2
EXIT_NON_FINITE = 3


def stage_params(path: Path) -> Params:
    """Validate the whole params file (every section, every cross-section rule) and apply ``threads``."""
    params = load_params(path)
    params.apply_threads()
    return params


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(main: Callable[..., Any]) -> None:
    """``typer.run(main)`` with the project's errors reported as one line (see module docstring)."""

    @functools.wraps(main)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except FloatingPointError as e:  # a non-finite loss (NonFiniteLossError and the baselines' checks)
            fail(str(e), EXIT_NON_FINITE)
        except (PipelineError, FileNotFoundError) as e:
            fail(str(e))

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(guarded)
    app()
