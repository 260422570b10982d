"""Continual-learning methods. Every module in this package that defines a method registers it with
``@register_method``; importing the package imports them all (one file per method, no central list).

A method owns its trainable modules, loss, phase schedule and config model, and uses the backbone only
through its three entry points. Must not import ``train``, ``budget``, ``runner``, ``serve`` or ``export``.
"""

import importlib
import pkgutil

from edgecl.methods.base import Method, MethodConfig, Phase, TaskInfo
from edgecl.methods.registry import (
    build_config,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)

_INFRA = {"base", "registry", "layers", "prompting"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _INFRA and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "Method",
    "MethodConfig",
    "Phase",
    "TaskInfo",
    "build_config",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
]
