"""Validation helpers shared by every params section: errors name the key and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class PipelineError(Exception):
    """Base of the project's own errors: a stage reports one as a single line and exits with code 2."""


class ParamError(PipelineError, ValueError):
    """A parameter (from params.yaml, the command line or a function argument) is invalid."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ParamError(f"{name}: got {value!r}; allowed values: {', '.join(map(repr, allowed))}")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(f"{name}: expected a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ParamError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(f"{name}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParamError(f"{name}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ParamError(f"{name}: must be <= {maximum}, got {value}")
    return value


def check_keys(section: str, given: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse unknown keys so that a typo in params.yaml is not silently ignored."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ParamError(
            f"{section}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
