"""What every stage entry point shares: loading params.yaml once, and one way to fail.

A stage's ``main`` is a typer command whose paths are all required options (dvc.yaml passes
them; nothing defaults to a path that could disagree with it). :func:`run` executes it and turns
the project's errors (:class:`pipeline.core.param_checks.PipelineError`) and missing files into
one line on stderr and exit code 2; a non-finite training loss exits with 3. An OS error (no space,
file too large, read-only, permission) is one line naming the path and the cause, exit code 2
(pipeline.core.commands); :func:`check_outputs_writable` refuses an unwritable output before any work.

Several processes: a stage that can run on several (``distributed=True``: teacher, trajectories,
distill, baselines, evaluate) joins torchrun's process group when launched by torchrun; when it is
launched plainly and params.yaml sets ``nproc`` > 1 it re-executes itself as
``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m stages.X <same arguments>``
(dvc.yaml's commands stay as they are; ``nproc`` is a run setting, not a dependency).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from pipeline.config.params import Params, load_params
from pipeline.core.commands import EXIT_ERROR, error_line
from pipeline.core.files import check_writable
from pipeline.core.param_checks import PipelineError

EXIT_NON_FINITE = 3


def stage_params(path: Path, *, distributed: bool = False, device: str | None = None) -> Params:
    """Validate the whole params file (every section, every cross-section rule) and apply ``threads``.

    ``distributed``: the stage runs on several processes (module docstring); ``device`` is the device
    param that picks the backend (nccl for CUDA, gloo for the CPU; default: the top-level ``device``).
    """
    params = load_params(path)
    params.apply_threads()
    if distributed:
        from pipeline.core.devices import resolve_device
        from pipeline.core.distributed import init_from_env, under_torchrun

        if not under_torchrun() and params.nproc > 1:
            relaunch_under_torchrun(params.nproc)  # does not return
        init_from_env(resolve_device(device or params.device))
    return params


def loaded_device(path: Path, section: str) -> str:
    """The ``device`` param a section resolves to (its own, else the top-level one), for :func:`stage_params`."""
    params = load_params(path)
    value = params.section(section)
    return getattr(value, "device", params.device)


def relaunch_under_torchrun(nproc: int) -> None:
    """Replace this process by torchrun running the same stage module with the same arguments on ``nproc`` processes."""
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    if not module:
        raise PipelineError(f"nproc: {nproc} processes need the stage started as a module (python -m stages.NAME ...)")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def check_outputs_writable(*paths: Path | str | None) -> None:
    """Refuse an output this process cannot write (read-only, permission) before loading or computing anything.

    Under torchrun only rank 0 writes the outputs, so only rank 0 checks."""
    from pipeline.core.distributed import is_main

    if is_main():
        for path in paths:
            if path is not None:
                check_writable(path)


def fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run(main: Callable[..., Any]) -> None:
    """``typer.run(main)`` with the project's errors reported as one line (see module docstring)."""
    stage_app(main)()


def stage_app(main: Callable[..., Any]) -> typer.Typer:
    """The typer app :func:`run` executes (tests drive a stage in-process through it with typer's CliRunner)."""

    @functools.wraps(main)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except FloatingPointError as e:  # a non-finite loss (NonFiniteLossError and the baselines' checks)
            fail(str(e), EXIT_NON_FINITE)
        except (PipelineError, OSError) as e:
            fail(str(error_line(e)))

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(guarded)
    return app
