"""How a command-line entry point (``sfd ...``, ``python -m stages.X``) fails: one line on stderr, exit code 2.

The project's own errors (:class:`pipeline.core.param_checks.PipelineError`: bad params, missing or
damaged files, stores, checkpoints) print their message; an OS error that escaped the write paths
(no space, file too large, read-only, permission) prints the path and the cause
(:func:`pipeline.core.files.os_error_message`). Neither prints a traceback.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pipeline.core.files import os_error_message
from pipeline.core.param_checks import PipelineError

EXIT_ERROR = 2
F = TypeVar("F", bound=Callable[..., Any])
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def error_line(e: BaseException) -> str | None:
    """The one-line message for a project error or an OS error; None for anything else (a bug: traceback)."""
    if isinstance(e, PipelineError):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e, action="write" if e.errno in _WRITE_ERRORS else "access")
    return None


def one_line_errors(command: F) -> F:
    """Decorate a typer command: project and OS errors become ``error: <line>`` on stderr and exit code 2."""
    import typer

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (PipelineError, OSError) as e:
            typer.echo(f"error: {error_line(e)}", err=True)
            raise typer.Exit(EXIT_ERROR) from None

    return guarded  # type: ignore[return-value]
