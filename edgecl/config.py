"""The one typed configuration mechanism: pydantic v2 models for method configs, profiles and settings.

Every settings object a user can write (a method's ``Config``, a device profile, the daemon's environment)
is a :class:`ConfigModel`: unknown keys are errors, types are checked strictly for typed input (YAML, JSON,
Python), constraints live on the fields (``Field(gt=0)``, ``Literal[...]``), cross-field rules in
model validators, and assignments are validated too. Strings from the command line (``--set
key=value``, environment variables) are coerced by the model's own field types (:func:`coerce_strings`).
:func:`describe_validation_error` turns pydantic's :class:`~pydantic.ValidationError` into one line that
names each key, the rule and the value given (``method 'cps_prompt': pool_size: must be >= 1 (got -1)``).

This module imports neither torch nor any other edgecl module.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WrapValidator,
)
from pydantic.fields import FieldInfo

__all__ = [
    "BlockIndices",
    "ConfigModel",
    "EvenLength",
    "FieldProblem",
    "coerce_strings",
    "describe_validation_error",
    "parse_assignments",
]

C = TypeVar("C", bound="ConfigModel")

_NULL_STRINGS = frozenset({"none", "null", "~", ""})


class FieldProblem(ValueError):
    """A cross-field rule broken: raised inside a ``model_validator`` so the message names ``key``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _to_tuple(value: Any) -> Any:
    """Sequences arrive as JSON/YAML lists or command-line strings (``0,1,2``, ``[0, 1]``, ``()``)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        return tuple(part.strip() for part in text.split(",") if part.strip()) if text else ()
    return value


def _even(value: int) -> int:
    if value % 2:
        raise ValueError("must be an even number (first half keys, second half values)")
    return value


BlockIndices = Annotated[tuple[Annotated[int, Field(ge=0)], ...], BeforeValidator(_to_tuple)]
"""Transformer block indices (0-based); a list, tuple or ``0,1,2`` string."""
EvenLength = Annotated[int, Field(ge=2), AfterValidator(_even)]
"""A prefix length split into keys and values: an even number >= 2."""


class ConfigModel(BaseModel):
    """Base of every edgecl config: strict types, no unknown keys, validated assignment.

    Field docstrings become the fields' descriptions (``use_attribute_docstrings``), so the text next to a
    default is what ``--help``-like listings and the daemon's OpenAPI schema show.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
        strict=True,
        allow_inf_nan=False,
    )

    @classmethod
    def from_options(cls: type[C], options: Mapping[str, Any] | None = None, **describe: Any) -> C:
        """Validate ``options`` (typed values) into the model; a ``ValueError`` says what is wrong where
        (``describe`` goes to :func:`describe_validation_error`: ``where``, ``noun``, ``key_format``)."""
        try:
            return cls.model_validate(dict(options or {}))
        except ValidationError as err:
            raise ValueError(describe_validation_error(err, cls, **describe)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        """Validated assignment whose error reads like every other config error."""
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ValueError(describe_validation_error(err, type(self))) from None

    def validate(self) -> None:  # type: ignore[override]
        """Re-check the whole config (assignments are checked already; this catches in-place edits of
        mutable values). Raises ``ValueError`` naming the key."""
        type(self).from_options(self.model_dump())


# ---- command-line strings -------------------------------------------------------------------------
def parse_assignments(items: Iterable[str], flag: str = "--set") -> dict[str, str]:
    """``KEY=VALUE`` strings into ``{key: raw string}`` (dashes in keys become underscores)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _nullable(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return _nullable(get_args(annotation)[0])
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _conversion_type(info: FieldInfo) -> Any:
    """The field's type with its parsing hooks but without its constraints: the model checks those, so a
    string converts to the value the model then judges (``pool_size=-1`` is -1, then ``must be >= 1``)."""
    hooks = [m for m in info.metadata if isinstance(m, (BeforeValidator, PlainValidator, WrapValidator))]
    return Annotated[(info.annotation, *hooks)] if hooks else info.annotation


def coerce_strings(
    model: type[BaseModel], values: Mapping[str, Any], *, where: str = "", noun: str = "option"
) -> dict[str, Any]:
    """Values given as strings (``--set``, the environment) converted by ``model``'s field types.

    Only the conversion happens here (``"0.5"`` -> 0.5, ``"false"`` -> False, ``"0,1"`` -> (0, 1)); the
    constraints are checked when the model is built. Non-strings pass through, as do unknown keys (building
    the model names them); ``none``/``null`` is None for a field that allows None. A string the field's type
    cannot take is a ``ValueError`` naming the key.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        info = model.model_fields.get(key)
        if info is None or not isinstance(value, str):
            out[key] = value
            continue
        if value.strip().lower() in _NULL_STRINGS and _nullable(info.annotation):
            out[key] = None
            continue
        adapter: TypeAdapter[Any] = TypeAdapter(_conversion_type(info))
        try:
            out[key] = adapter.validate_python(value.strip(), strict=False)
        except ValidationError as err:
            text = "; ".join(f"{key}: {_problem(e, None)[1]}" for e in err.errors(include_url=False))
            raise ValueError(f"{where}: {text}" if where else text) from None
    return out


# ---- error text ---------------------------------------------------------------------------------
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "tuple": "a list",
    "list": "a list",
    "dict": "a mapping",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _key(loc: tuple[int | str, ...]) -> tuple[str, str]:
    """(top-level key, ``"item 1 "`` for a list element); union-branch names pydantic adds are dropped."""
    if not loc:
        return "", ""
    items = [str(part) for part in loc[1:] if isinstance(part, int)]
    return str(loc[0]), "".join(f"item {i} " for i in items)


def _problem(error: Mapping[str, Any], model: type[BaseModel] | None) -> tuple[str, str]:
    """(key, "must be ... (got ...)") for one pydantic error dict; an element of a list is "item N ..."."""
    key, problem = _rule(error, model)
    item = _key(tuple(error.get("loc", ())))[1]
    return key, item + problem


def _rule(error: Mapping[str, Any], model: type[BaseModel] | None) -> tuple[str, str]:
    kind = str(error["type"])
    key = _key(tuple(error.get("loc", ())))[0]
    ctx = error.get("ctx") or {}
    got = f" (got {error['input']!r})" if "input" in error else ""
    info = model.model_fields.get(key) if model is not None and key else None
    or_null = " or null" if info is not None and _nullable(info.annotation) else ""
    if kind == "value_error":
        original = ctx.get("error")
        if isinstance(original, FieldProblem):
            return original.key, original.message
        message = str(original) if original is not None else str(error["msg"])
        return key, message + (got if key and "got" not in message else "")
    if kind == "literal_error":
        return key, f"must be one of {ctx.get('expected')}{or_null}{got}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values())) if ctx else "?"
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return key, f"must be {_BOUNDS[kind]} {bound}{or_null}{got}"
    if kind == "int_from_float" or kind.startswith("int_"):
        return key, f"must be an integer{or_null}{got}"
    if kind == "finite_number":
        return key, f"must be a finite number{got}"
    prefix = kind.split("_", 1)[0]
    if kind.endswith(("_type", "_parsing")) and prefix in _TYPE_WORDS:
        return key, f"must be {_TYPE_WORDS[prefix]}{or_null}{got}"
    return key, f"{error['msg']}{got}"


def describe_validation_error(
    err: ValidationError,
    model: type[BaseModel] | None = None,
    *,
    where: str = "",
    noun: str = "option",
    key_format: str = "{key}",
    unknown_prefix: str = "",
) -> str:
    """One line for ``err``: unknown keys with the valid ones listed, then each bad key with its rule.

    ``where`` starts the line (``method 'l2p'``); ``key_format`` writes each key (a profile's
    ``profile key 'method_options.{key}'``) and ``unknown_prefix`` starts the unknown-keys part.
    """
    errors = err.errors(include_url=False)
    unknown = sorted(_key(tuple(e["loc"]))[0] for e in errors if e["type"] == "extra_forbidden")
    parts: list[str] = []
    if unknown:
        names = sorted(model.model_fields) if model is not None else []
        close = [m for k in unknown for m in difflib.get_close_matches(k, names, n=1)]
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        valid = f"; valid {noun}s: {', '.join(names)}" if names else ""
        parts.append(f"{unknown_prefix}unknown {noun}(s) {unknown}{hint}{valid}")
    for e in errors:
        if e["type"] == "extra_forbidden":
            continue
        key, problem = _problem(e, model)
        parts.append(f"{key_format.format(key=key)}: {problem}" if key else problem)
    text = "; ".join(dict.fromkeys(parts))
    return f"{where}: {text}" if where else text
