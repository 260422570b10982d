"""The daemon's trainer callback: a job's progress (status, ETA), persisted to the store after every epoch."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.methods.base import Phase
    from edgecl.store import JobRecord, Store
    from edgecl.train.trainer import Trainer

__all__ = ["JobProgress"]

log = logging.getLogger("edgecl.serve")


class JobProgress(Callback):
    """Tracks a job across its tasks for status, ETA and metrics; persists a snapshot after every epoch."""

    def __init__(self, store: Store, job: JobRecord, steps_per_epoch: dict[int, int], epochs: int) -> None:
        self.store = store
        self.job_id = job.id
        self.task_ids = list(job.task_ids)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.total_steps = sum(steps_per_epoch.values()) * epochs
        self._lock = threading.Lock()
        self.finished_steps = 0
        self.task_id: int | None = None
        self.position = 0
        self.phase: str | None = None
        self.epoch = 0
        self.epochs_done = 0
        self.step = 0
        self.loss: float | None = None
        self.train_time = 0.0
        self.steps_run = 0
        self.stage = "starting"
        self._t_last: float | None = None

    # ---- driven by the worker ----------------------------------------------------------------
    def task_skipped(self, task_id: int) -> None:
        """A task of the job that was already learned (before a restart)."""
        with self._lock:
            self.finished_steps += self.steps_per_epoch.get(task_id, 0) * self.epochs

    def begin_task(self, task_id: int, position: int, epochs_done: int) -> None:
        """Training of ``task_id`` starts (or resumes after ``epochs_done`` epochs)."""
        with self._lock:
            self.task_id, self.position = task_id, position
            self.epoch = self.epochs_done = epochs_done
            self.step = 0
            self.stage = "training"

    def end_task(self) -> None:
        """The task was committed."""
        with self._lock:
            if self.task_id is not None:
                self.finished_steps += self.steps_per_epoch.get(self.task_id, 0) * self.epochs
            self.epochs_done = self.epochs
            self.step = 0
            self.stage = "committed"
        self.persist()

    # ---- trainer hooks -----------------------------------------------------------------------
    def on_phase_start(self, trainer: Trainer, task: int, phase: Phase) -> None:
        """Remember the phase (joint, sparse, head)."""
        self.phase = str(getattr(phase, "value", phase))

    def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
        """Start timing the epoch's steps."""
        with self._lock:
            self.epoch, self.step = epoch, 0
            self._t_last = time.perf_counter()

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        """Count the step and its duration."""
        now = time.perf_counter()
        with self._lock:
            if self._t_last is not None:
                self.train_time += now - self._t_last
            self._t_last = now
            self.step, self.loss = step, loss
            self.steps_run += 1

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
        """The epoch's checkpoint is committed: persist progress."""
        with self._lock:
            self.epochs_done = epoch + 1
            self.step = 0
            self._t_last = None
        self.persist()

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        """Training of the task is over; evaluation and the commit follow."""
        with self._lock:
            self.stage = "evaluating"

    # ---- queries -----------------------------------------------------------------------------
    def done_steps(self) -> int:
        """Optimizer steps of this job done so far (finished tasks and committed epochs included)."""
        spe = self.steps_per_epoch.get(self.task_id or -1, 0)
        current = 0 if self.stage == "committed" else self.epochs_done * spe + self.step
        return min(self.finished_steps + current, self.total_steps)

    def mean_step_time(self) -> float | None:
        """Seconds per optimizer step measured in this process (None before the first step)."""
        return self.train_time / self.steps_run if self.steps_run else None

    def snapshot(self) -> dict[str, Any]:
        """Status fields: task, phase, epoch (1-based), progress %, ETA, latest loss, step time."""
        with self._lock:
            done = self.done_steps()
            rate = self.mean_step_time()
            remaining = self.total_steps - done
            return {
                "stage": self.stage,
                "task_id": self.task_id,
                "task_position": self.position + 1,
                "tasks_in_job": len(self.task_ids),
                "phase": self.phase,
                "epoch": min(self.epoch + 1, self.epochs) if self.stage == "training" else self.epochs_done,
                "epochs": self.epochs,
                "epochs_done": self.epochs_done,
                "step": self.step,
                "steps_in_epoch": self.steps_per_epoch.get(self.task_id or -1, 0),
                "steps_done": done,
                "steps_total": self.total_steps,
                "progress": round(100.0 * done / self.total_steps, 2) if self.total_steps else 0.0,
                "eta_s": round(remaining * rate, 1) if rate is not None else None,
                "loss": self.loss,
                "step_time_s": round(rate, 5) if rate is not None else None,
                "updated_at": time.time(),
            }

    def persist(self) -> None:
        """Write the snapshot to the store (read by status after a restart)."""
        try:
            self.store.update_progress(self.job_id, self.snapshot())
        except Exception as err:  # progress is informative; never stop training over it
            log.warning("could not persist progress of job %s: %s", self.job_id, err)
