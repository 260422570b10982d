"""The trainer, its callbacks, metrics and checkpoints."""

from edgecl.train.callbacks import Callback, CallbackList
from edgecl.train.metrics import average_incremental_accuracy, final_average_accuracy, forgetting, summarize
from edgecl.train.trainer import TrainConfig, Trainer, TrainingCancelled, TrainState, derive_seed

__all__ = [
    "Callback",
    "CallbackList",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingCancelled",
    "average_incremental_accuracy",
    "derive_seed",
    "final_average_accuracy",
    "forgetting",
    "summarize",
]
