"""Field types shared by several params sections: device, seeds, schedules, network architectures, max_order."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, with_config
from typing_extensions import TypedDict

from pipeline.core.param_checks import ParamError
from pipeline.diffusion.schedules import ScheduleKind, Schedule
from pipeline.diffusion.seeds import parse_seeds
from pipeline.diffusion.solvers import MAX_ORDER, SOLVERS
from pipeline.networks.unet import network_config

NESTED = ConfigDict(extra="forbid", strict=True)

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]

Precision = Literal["fp32", "bf16", "fp16"]  # pipeline.core.distributed.PRECISIONS
SolverName = Literal[SOLVERS]  # type: ignore[valid-type]  (pipeline.diffusion.solvers.SOLVER_REGISTRY)
DEFAULT_MAX_ORDER = 3  # ipndm and dpmpp when max_order is absent


def _check_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise ValueError(f"got {value!r}; allowed values: 'auto', 'cpu', 'cuda', 'cuda:N'")


Device = Annotated[str, AfterValidator(_check_device)]


def _check_seeds(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected a seed range like '0-1023', got {value!r}")
    try:
        parse_seeds(value)
    except ParamError as e:
        raise ValueError(str(e).removeprefix("seeds: ")) from None
    return value


Seeds = Annotated[Any, AfterValidator(_check_seeds)]  # "A-B", "A,B,C" or an int (diffusion.seeds.parse_seeds)


def resolve_max_order(solver: str, max_order: int | None) -> int:
    """max_order only matters for ipndm (1-4) and dpmpp (1-3); other solvers take it absent or 1 and get 1.

    The result is what goes into a trajectory key, so an unused value never splits the store.
    """
    if solver in MAX_ORDER:
        if max_order is None:
            return DEFAULT_MAX_ORDER
        if not 1 <= max_order <= MAX_ORDER[solver]:
            raise ValueError(f".max_order: must lie in 1..{MAX_ORDER[solver]} for {solver!r}, got {max_order}")
        return max_order
    if max_order not in (None, 1):
        users = " and ".join(f"{name} (1-{top})" for name, top in MAX_ORDER.items())
        raise ValueError(f".max_order: only {users} use max_order; for {solver!r} leave it out or set 1, got {max_order}")
    return 1


# ---- schedules --------------------------------------------------------------------------------


@with_config(NESTED)
class ScheduleDict(TypedDict, total=False):
    """A student schedule (diffusion.schedules.Schedule); num_steps is an int, or a list for SFD-v."""

    kind: ScheduleKind  # discrete: a discrete (diffusers) teacher's table; flow: a flow-matching teacher's grid from sigma = inf
    num_steps: Any  # checked by num_steps_list: an int >= 2, or (trajectories only) a non-empty list of them
    t_min: PositiveFloat
    t_max: PositiveFloat
    rho: PositiveFloat
    shift: PositiveFloat  # flow only: the time shift (default: the flow teacher's own)


@with_config(NESTED)
class RangeDict(TypedDict, total=False):
    """A schedule without num_steps (the evaluation sets N per NFE)."""

    kind: ScheduleKind  # discrete: a discrete (diffusers) teacher's table; flow: a flow-matching teacher's grid from sigma = inf
    t_min: PositiveFloat
    t_max: PositiveFloat
    rho: PositiveFloat
    shift: PositiveFloat  # flow only: the time shift (default: the flow teacher's own)


def num_steps_list(schedule: dict[str, Any], *, allow_list: bool, minimum: int = 2) -> list[int]:
    """The schedule's N values (one unless a list is allowed and given); errors name ``.num_steps``."""
    n = schedule.get("num_steps", 4)
    values = n if isinstance(n, list) and allow_list else [n]
    if not values:
        raise ValueError(".num_steps: expected an integer or a non-empty list of integers, got []")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            what = "an integer or a list of integers" if allow_list else "an integer"
            raise ValueError(f".num_steps: expected {what}, got {n!r}")
        if v < minimum:
            raise ValueError(f".num_steps: must be >= {minimum}, got {v}")
    return values


def check_schedule(schedule: dict[str, Any], num_steps: int) -> Schedule:
    """The Schedule for one N; cross-key problems (t_min >= t_max) become a validation error."""
    try:
        return Schedule.from_dict({**schedule, "num_steps": num_steps}, section="")
    except ParamError as e:
        raise ValueError(str(e).removeprefix(": ")) from None


# ---- network architectures --------------------------------------------------------------------


@with_config(NESTED)
class NetworkDict(TypedDict, total=False):
    """U-Net architecture keys (networks.unet.NETWORK_KEYS) but those that come from the data."""

    out_channels: int | None
    model_channels: Annotated[int, Field(ge=4)]
    channel_mult: Annotated[list[PositiveInt], Field(min_length=1)]
    num_blocks: PositiveInt
    attn_resolutions: list[PositiveInt]
    dropout: NonNegativeFloat
    step_condition: bool


DATA_KEYS = ("img_resolution", "in_channels", "label_dim")


def _no_data_keys(value: Any) -> Any:
    if isinstance(value, dict):
        for key in DATA_KEYS:
            if key in value:
                raise ValueError(f".{key}: comes from the data; remove it from params")
    return value


def _check_network(value: dict[str, Any]) -> dict[str, Any]:
    try:
        network_config(**value)
    except ParamError as e:
        msg = str(e)
        raise ValueError(msg.removeprefix("network") if msg.startswith("network.") else msg) from None
    return value


Network = Annotated[NetworkDict, BeforeValidator(_no_data_keys), AfterValidator(_check_network)]
