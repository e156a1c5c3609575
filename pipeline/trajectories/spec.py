"""What a cached teacher trajectory depends on, and the content-hash key derived from it.

:class:`TrajectorySpec` (everything but the seed that the stored states depend on; its ``key`` names
the store group) and the params section that yields one spec per student schedule,
:class:`TrajectoryParams`, live in :mod:`pipeline.config.trajectories` (the config layer builds the
specs from params); they are re-exported here with the helpers that compare descriptions.
"""

from __future__ import annotations

from typing import Any

from pipeline.config.trajectories import (  # noqa: F401  (re-exported: this module is the trajectories' view)
    COMPRESSORS, COMPUTE_DTYPES, LABEL_POLICIES, SPEC_VERSION, STORAGE_DTYPES, LabelPolicy, TrajectoryParams,
    TrajectorySpec,
)  # fmt: skip


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k in sorted(d):
            out.update(_flatten(d[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def diff(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two descriptions, e.g. 'schedule.num_steps: expected 4, found 5'."""
    e, f = _flatten(expected), _flatten(found)
    out = []
    for name in sorted(set(e) | set(f)):
        if name not in f:
            out.append(f"{name}: expected {e[name]!r}, missing in the store")
        elif name not in e:
            out.append(f"{name}: not expected, found {f[name]!r}")
        elif e[name] != f[name]:
            out.append(f"{name}: expected {e[name]!r}, found {f[name]!r}")
    return out
