"""Trainer callbacks: the hooks meters, progress bars, checkpoints and the daemon plug into.

The trainer calls every hook of every callback in order; a callback never changes the training math.
Each hook receives the trainer, so a callback can read ``trainer.state`` (task, epoch, phase, step)
and write into ``trainer.record`` (the results of the run in progress).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgecl.methods.base import Phase
    from edgecl.train.trainer import Trainer

__all__ = ["Callback", "CallbackList"]


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_run_start(self, trainer: Trainer) -> None:
        """Before the first task (also after a resume)."""

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        """After ``method.begin_task``, before the first epoch of ``task``."""

    def on_phase_start(self, trainer: Trainer, task: int, phase: Phase) -> None:
        """When a run of epochs of one phase starts (JOINT, or SPARSE then HEAD for DPCT)."""

    def on_phase_end(self, trainer: Trainer, task: int, phase: Phase) -> None:
        """When that run of epochs ends (before evaluation)."""

    def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
        """Before the first step of an epoch."""

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        """After each optimizer step (``loss`` is the batch's mean training loss)."""

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
        """After an epoch's last step and the epoch checkpoint; ``logs`` has ``loss`` and ``phase``."""

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        """After the last epoch of ``task`` and before its evaluation (ends the training region)."""

    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        """After training and evaluating ``task``; ``record`` is the task's entry in the results
        (callbacks add keys such as ``telemetry``, ``train_seconds``, ``peak_memory_mb``)."""

    def on_run_end(self, trainer: Trainer, results: dict[str, Any]) -> None:
        """After the last task; ``results`` is the final results dict (callbacks may add keys)."""

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """When training raises (cancellation included), before the exception propagates."""

    def on_save_checkpoint(self, trainer: Trainer, meta: dict[str, Any]) -> None:
        """Before a resumable checkpoint is written: add JSON-able state under a key of your own."""

    def on_load_checkpoint(self, trainer: Trainer, meta: dict[str, Any]) -> None:
        """After a run resumes from a checkpoint, with the ``meta`` that :meth:`on_save_checkpoint` saw."""


class CallbackList(Callback):
    """Fans every hook out to a list of callbacks."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            cbs = object.__getattribute__(self, "callbacks")

            def fan_out(*args: Any, **kwargs: Any) -> None:
                for cb in cbs:
                    getattr(cb, name)(*args, **kwargs)

            return fan_out
        return object.__getattribute__(self, name)
