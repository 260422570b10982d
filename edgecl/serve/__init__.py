"""``edgecl serve``: the on-device daemon (REST API, SQLite store, training worker, token auth)."""

from edgecl.serve.app import ServeContext, create_app
from edgecl.serve.config import ServeSettings, resolve_settings
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
