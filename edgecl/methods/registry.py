"""Method registry: ``@register_method`` entry points and one factory, as timm's ``create_model``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from edgecl.backbone import FrozenViT
from edgecl.methods.base import Method, MethodConfig

__all__ = [
    "build_config",
    "coerce_options",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
    "saved_options",
]

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator that registers a :class:`Method` subclass under ``name``."""

    def wrap(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method '{name}' is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _ensure_builtin() -> None:
    import edgecl.methods  # noqa: F401  (importing the package registers the built-in methods)


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The class registered as ``name``; a ``ValueError`` lists the valid names otherwise."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}") from None


def build_config(name: str, overrides: Mapping[str, Any] | None = None) -> MethodConfig:
    """The method's config model with ``overrides`` (typed values: YAML, JSON, Python) applied.

    A ``ValueError`` names the method, every unknown key (listing the valid ones) and every bad value with
    its rule; command-line strings go through :func:`coerce_options` first.
    """
    return get_method_class(name).Config.from_options(overrides, where=f"method '{name}'")


def saved_options(name: str, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved method config, upgraded by the method to this version (keys added since it was
    saved get the value that reproduces the saved model's behaviour)."""
    return get_method_class(name).Config.upgrade_saved(dict(saved))


def coerce_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with string values (``--set key=value``, CLI flags) converted by the method's field types;
    unknown keys are kept for :func:`build_config` to name."""
    from edgecl.config import coerce_strings

    return coerce_strings(get_method_class(name).Config, options, where=f"method '{name}'")


def create_method(name: str, backbone: FrozenViT, overrides: Mapping[str, Any] | None = None) -> Method:
    """Build method ``name`` over ``backbone`` with its config defaults plus ``overrides``."""
    return get_method_class(name)(backbone, build_config(name, overrides))
