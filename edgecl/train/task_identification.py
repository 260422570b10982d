"""The trainer callback that measures task-identity inference (TII) accuracy on the test sets.

Kept in :mod:`edgecl.train` rather than next to the task identifier (:mod:`edgecl.methods.tii`) so that
``edgecl.methods`` never imports the trainer: the callback knows the trainer, the method only its protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from edgecl.methods.tii import SupportsTaskIdentification
from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.train.trainer import Trainer

__all__ = ["TaskIdentificationCallback"]


class TaskIdentificationCallback(Callback):
    """After each task, TII accuracy on the test images of every seen task, written into the task record.

    Keys: ``task_identification_accuracy`` (over all seen test images) and
    ``task_identification_accuracy_per_task``. Methods without ``predict_task`` are skipped. Uses its own
    seeded loaders, so the global RNG (and with it exact resume) is untouched.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    @torch.no_grad()
    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        """Measure TII on tasks ``0..task``'s test sets."""
        method = trainer.method
        if not isinstance(method, SupportsTaskIdentification):
            return
        was_training = method.training
        method.eval()
        per_task, hits, total = [], 0, 0
        bs = self.batch_size or trainer.config.eval_batch_size
        for j in range(task + 1):
            gen = torch.Generator()
            gen.manual_seed(0)
            loader = DataLoader(trainer.stream.tasks[j].test, batch_size=bs, shuffle=False, generator=gen)
            h = n = 0
            for x, _ in loader:
                pred = method.predict_task(x.to(trainer.device))
                h += int((pred.cpu() == j).sum())
                n += int(pred.shape[0])
            per_task.append(h / max(n, 1))
            hits, total = hits + h, total + n
        record["task_identification_accuracy"] = hits / max(total, 1)
        record["task_identification_accuracy_per_task"] = per_task
        method.train(was_training)
