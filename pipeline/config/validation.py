"""How a params section is declared and validated: pydantic v2 dataclasses, errors as one ParamError line.

Every section class is declared with :func:`section` (a frozen or plain pydantic dataclass with
``extra="forbid"`` and strict types: ``lr: true`` or ``kimg: "5"`` are refused, an int is accepted where
a float is expected and stored as a float). Because they stay real dataclasses, ``dataclasses.asdict``
and ``__dataclass_fields__`` keep working for the stages that hash or record their params.

:func:`validate_section` builds one from a mapping and turns pydantic's ``ValidationError`` into a
one-line :class:`ParamError` naming the full key path and what is allowed, e.g.
``trajectories.schedule.t_min: must be > 0, got -1``. Validators raise ``ValueError``: a message that
starts with ``.`` names a sub-key (``".start_steps: must be ..."`` under ``baseline_pd`` reads
``baseline_pd.start_steps: must be ...``); any other message is put after the failing key's path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import pydantic
from pydantic import ConfigDict, ValidationError
from typing_extensions import is_typeddict

from pipeline.core.param_checks import ParamError

T = TypeVar("T")
SECTION_CONFIG = ConfigDict(extra="forbid", strict=True)


class Section:
    """Base of every section class: ``from_dict`` validates a mapping (see :func:`validate_section`)."""

    SECTION: ClassVar[str] = ""  # the params.yaml key, the default prefix of its errors

    @classmethod
    def from_dict(cls: type[S], d: Mapping[str, Any] | None = None, section: str | None = None) -> S:
        """The section from a params mapping; errors name ``section`` (default: the class's own key)."""
        return validate_section(cls, d, section or cls.SECTION)


S = TypeVar("S", bound=Section)


def section(name: str, *, frozen: bool = True) -> Callable[[type[S]], type[S]]:
    """Declare a params section: a pydantic dataclass (strict, extra keys forbidden) named ``name``."""

    def wrap(cls: type[S]) -> type[S]:
        cls.SECTION = name
        return pydantic.dataclasses.dataclass(cls, frozen=frozen, config=SECTION_CONFIG)  # type: ignore[return-value]

    return wrap


def validate_section(cls: type[T], d: Mapping[str, Any] | None, name: str) -> T:
    """Build section ``cls`` from mapping ``d``; any problem is one ParamError line naming ``name.key``."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ParamError(f"{name}: expected a mapping of keys, got {d!r}")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise ParamError(f"{name}: keys must be names, got {bad[0]!r}")
    try:
        return cls(**d)
    except ValidationError as e:
        raise ParamError(format_error(e, name, cls)) from None


def fix(obj: Any, **values: Any) -> None:
    """Set normalised values on a (frozen) section from its own validator."""
    for k, v in values.items():
        object.__setattr__(obj, k, v)


# ---- error formatting -------------------------------------------------------------------------


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _path(name: str, loc: tuple[Any, ...]) -> str:
    out = name
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.removeprefix(".")  # top-level keys (name "") have no prefix


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; Optional[X] -> X."""
    while True:
        origin = get_origin(tp)
        if origin is typing.Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _hints(tp: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(tp) or is_typeddict(tp):
        return get_type_hints(tp, include_extras=True)
    return {}


def known_keys(cls: type, loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``loc`` inside section ``cls`` (a dataclass or TypedDict), for error messages."""
    tp: Any = cls
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            args = get_args(tp)
            tp = args[0] if args else Any
        else:
            hints = _hints(tp)
            if part not in hints:
                return []
            tp = hints[part]
    tp = _unwrap(tp)
    if dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp)]
    return list(_hints(tp))


def _allowed(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" -> "'a', 'b', 'c'"."""
    head, sep, last = expected.rpartition(" or ")
    return f"{head}, {last}" if sep else expected


_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "none_required": "null",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _one(err: Mapping[str, Any], name: str) -> str:
    loc = tuple(err.get("loc", ()))
    path = _path(name, loc)
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err["msg"])).replace("\n", " ")
        if msg.startswith("."):
            return (path + msg).removeprefix(".")
        return f"{path}: {msg}"
    if kind == "literal_error":
        return f"{path}: got {value!r}; allowed values: {_allowed(ctx.get('expected', ''))}"
    if kind in _TYPE_WORDS:
        return f"{path}: expected {_TYPE_WORDS[kind]}, got {value!r}"
    if kind in _BOUNDS:
        return f"{path}: must be {_BOUNDS[kind]} {_num(ctx.get(_BOUND_KEYS[kind]))}, got {_num(value)!r}"
    if kind == "too_short":
        return f"{path}: expected at least {ctx.get('min_length')} item(s), got {value!r}"
    if kind == "string_too_short":
        return f"{path}: expected a non-empty string, got {value!r}"
    if kind == "missing":
        return f"{path}: missing"
    return f"{path}: {err['msg']}, got {value!r}"


def format_error(e: ValidationError, name: str, cls: type) -> str:
    """One line: the first error; unknown keys under the same parent are listed together."""
    errors = e.errors()
    first = errors[0]
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = tuple(first["loc"][:-1])
        unknown = [
            str(er["loc"][-1]) for er in errors
            if er["type"] in ("extra_forbidden", "unexpected_keyword_argument") and tuple(er["loc"][:-1]) == parent
        ]  # fmt: skip
        known = known_keys(cls, parent)
        tail = f"; known keys: {', '.join(sorted(known))}" if known else ""
        return f"{_path(name, parent)}: unknown key(s) {', '.join(sorted(unknown))}{tail}"
    return _one(first, name)


OMITTED_AT_DEFAULT = {"batch_gpu": None, "sharding": "ddp", "activation_checkpointing": False, "lora_rank": 0,
                      "lora_alpha": None, "lora_targets": None}


def described(params: Any, *, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """``dataclasses.asdict(params)`` for hashing and provenance, less ``leave_out``, and less ``precision``
    when it is the default ``fp32`` (and each key of ``OMITTED_AT_DEFAULT`` at its default): keys, training keys
    and model.json of earlier runs stay as they were before the setting existed."""
    d = {k: v for k, v in dataclasses.asdict(params).items() if k not in leave_out}
    if d.get("precision", "fp32") == "fp32":
        d.pop("precision", None)
    for key, default in OMITTED_AT_DEFAULT.items():  # settings added later: absent while at their default
        if key in d and d[key] == default:
            d.pop(key)
    return d
