"""``edgecl serve``: the on-device daemon.

It owns the REST API (``app.py`` builds it from one router per resource in ``routers/``, with auth and the
:class:`ServeContext` as FastAPI dependencies), the upload path (``multipart.py`` spools bodies to disk,
``uploads.py`` validates them into the store), the training worker (``worker.py``: queued jobs run through
:mod:`edgecl.runner`, the same assembly as ``edgecl train``), Prometheus metrics (``metrics.py``), the
systemd notify/watchdog protocol (``notify.py``) and the process around it all (``daemon.py``). Durable
state lives in :mod:`edgecl.store`. Nothing outside ``edgecl.commands.serve`` imports this package, and it
imports no CLI module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgecl.serve.app import create_app
    from edgecl.serve.config import ServeSettings, resolve_settings
    from edgecl.serve.context import ServeContext
    from edgecl.serve.predictor import ModelHolder, OnnxRuntimePredictor, Predictor, TorchPredictor

__all__ = [
    "ModelHolder",
    "OnnxRuntimePredictor",
    "Predictor",
    "ServeContext",
    "ServeSettings",
    "TorchPredictor",
    "create_app",
    "resolve_settings",
]

_WHERE = {
    "create_app": "edgecl.serve.app",
    "ServeSettings": "edgecl.serve.config",
    "resolve_settings": "edgecl.serve.config",
    "ServeContext": "edgecl.serve.context",
    "ModelHolder": "edgecl.serve.predictor",
    "OnnxRuntimePredictor": "edgecl.serve.predictor",
    "Predictor": "edgecl.serve.predictor",
    "TorchPredictor": "edgecl.serve.predictor",
}


def __getattr__(name: str) -> Any:
    """Import the public names lazily (``edgecl doctor`` reads the settings without loading FastAPI)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'edgecl.serve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
