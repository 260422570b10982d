"""Continual-learning methods; importing this package registers the built-in ones."""

from edgecl.methods import coda_prompt, cps_prompt, patchdropout  # noqa: F401
from edgecl.methods.base import Method, MethodConfig, Phase, TaskInfo
from edgecl.methods.registry import build_config, create_method, get_method_class, list_methods, register_method

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
