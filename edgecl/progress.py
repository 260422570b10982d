"""Progress bars on the training loop, as a trainer callback (rich, to stderr)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.train.trainer import Trainer

__all__ = ["ProgressCallback"]


class ProgressCallback(Callback):
    """One bar per epoch (steps) under a run-level bar (all planned steps), plus a line per task."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self._run: Any = None
        self._epoch: Any = None

    def on_run_start(self, trainer: Trainer) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self._run = self.progress.add_task(
            f"{trainer.method.name}",
            total=trainer.state.planned_steps,
            completed=trainer.state.global_step,
            loss="",
        )

    def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
        assert self.progress is not None
        if self._epoch is not None:
            self.progress.remove_task(self._epoch)
        phase = trainer.state.phase.value if trainer.state.phase else ""
        self._epoch = self.progress.add_task(
            f"  task {task + 1} epoch {epoch + 1} [{phase}]", total=trainer.state.steps_in_epoch, loss=""
        )

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        assert self.progress is not None
        self.progress.update(self._epoch, advance=1, loss=f"loss {loss:.3f}")
        self.progress.update(self._run, completed=trainer.state.global_step)

    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        self.console.print(
            f"task {task + 1}: average accuracy on seen tasks {100 * record['average_accuracy']:.1f}%"
        )

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_run_end(self, trainer: Trainer, results: dict[str, Any]) -> None:
        self._stop()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._stop()
