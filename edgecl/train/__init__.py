"""The trainer, its callbacks, metrics and checkpoints.

Owns the only training loop (``Trainer``: data, optimisers, schedules, micro-batching, checkpoints and
callback hooks) and knows no method names. Must not import ``budget``, ``runner``, ``serve``, ``bench`` or
``commands``: they plug in as callbacks.

Names are imported lazily so ``edgecl.train.callbacks`` (used by telemetry) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Callback": "edgecl.train.callbacks",
    "CallbackList": "edgecl.train.callbacks",
    "average_incremental_accuracy": "edgecl.train.metrics",
    "final_average_accuracy": "edgecl.train.metrics",
    "forgetting": "edgecl.train.metrics",
    "summarize": "edgecl.train.metrics",
    "TrainConfig": "edgecl.train.trainer",
    "TrainState": "edgecl.train.trainer",
    "Trainer": "edgecl.train.trainer",
    "TrainingCancelled": "edgecl.train.trainer",
    "derive_seed": "edgecl.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgecl.train' has no attribute {name!r}")
