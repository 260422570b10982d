"""``TelemetryCallback``: meters every task's training, every phase within it, and the whole run.

It writes ``record["telemetry"]``, ``record["train_seconds"]`` and ``record["peak_memory_mb"]`` per task and
``results["telemetry"]`` for the run; ``latest()`` gives the daemon a live view of the current region. Epoch
checkpoints carry the interrupted task's figures so far, so a resumed task reports its whole training.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgecl.telemetry.backends import Backend
from edgecl.telemetry.meter import Meter, MeterResult
from edgecl.telemetry.sampler import Sampler
from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.methods.base import Phase
    from edgecl.train.trainer import Trainer

__all__ = ["TelemetryCallback"]


class TelemetryCallback(Callback):
    """Meters the run, each task's training (``on_task_start`` to ``on_train_end``, evaluation excluded)
    and each phase; idle power (``idle_seconds``) is measured once at run start and reused by every region.

    Run-level ``peak_memory_mb``/``energy_j``/``train_seconds`` in ``results["telemetry"]`` aggregate the
    tasks' training regions (max/sum); ``results["telemetry"]["run"]`` is the whole run, evaluation included.
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        *,
        backends: Sequence[Backend] | None = None,
        period_s: float = 0.1,
        idle_seconds: float = 0.0,
    ) -> None:
        if sampler is not None and backends is not None:
            raise ValueError("give a sampler or backends, not both")
        self._owns_sampler = sampler is None
        if sampler is None:
            sampler = Sampler(backends, period_s) if backends is not None else Sampler.autodetect(period_s)
        self.sampler = sampler
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._run: Meter | None = None
        self._task: Meter | None = None
        self._task_index: int | None = None
        self._task_result: MeterResult | None = None
        self._phase: Meter | None = None
        self._phase_name: str | None = None
        self._phases: dict[str, MeterResult] = {}
        self._tasks: list[MeterResult] = []
        self._carried: dict[str, Any] | None = None
        """The interrupted task's training so far, from the checkpoint this run resumed from."""
        self._carried_s = 0.0

    # -------------------------------------------------------------------------------------- hooks

    def on_run_start(self, trainer: Trainer) -> None:
        """Start sampling, measure idle power once, open the run meter."""
        self.sampler.start()
        run = Meter(self.sampler, "run", self.idle_seconds)
        run.start()
        with self._lock:
            self._run = run
            self._tasks = []
            self._carried_s = 0.0

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        """Open the task's training meter."""
        meter = Meter(self.sampler, f"task{task}", baseline=self._run)
        meter.start()
        with self._lock:
            self._task, self._task_index, self._task_result = meter, task, None
            self._phases = {}

    def on_phase_start(self, trainer: Trainer, task: int, phase: Phase) -> None:
        """Open a meter for the phase (``joint``, ``sparse`` or ``head``)."""
        self._end_phase()
        name = str(getattr(phase, "value", phase))
        meter = Meter(self.sampler, f"task{task}/{name}", baseline=self._run)
        meter.start()
        with self._lock:
            self._phase, self._phase_name = meter, name

    def on_phase_end(self, trainer: Trainer, task: int, phase: Phase) -> None:
        """Close the phase's meter."""
        self._end_phase()

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        """Close the task's training meter (evaluation follows, unmetered per task)."""
        self._end_task()

    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        """Write the task's and its phases' telemetry into ``record``."""
        self._end_task()
        result = self._task_result
        if result is None:  # on_task_start was not called for this task
            return
        phases = {k: v.to_dict() for k, v in self._phases.items()}
        record["telemetry"] = {"task": result.to_dict(), "phases": phases}
        record["train_seconds"] = result.wall_s
        record["peak_memory_mb"] = result.peak_memory_mb
        carried, self._carried = self._carried, None
        if carried is not None and carried.get("task") == task:
            self._add_carried(record, result, carried)
        self._tasks.append(result)
        with self._lock:
            self._task_result = None

    def on_run_end(self, trainer: Trainer, results: dict[str, Any]) -> None:
        """Close the run meter, write ``results["telemetry"]`` and stop the sampler."""
        try:
            self._end_task()
            run = self._run.stop() if self._run is not None and self._run.running else None
            if run is not None:
                results["telemetry"] = self._summary(run)
        finally:
            self._shutdown()

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """Close whatever is open and stop the sampler."""
        self._shutdown()

    def _add_carried(self, record: dict[str, Any], result: MeterResult, carried: dict[str, Any]) -> None:
        """A task resumed mid-way: its epochs before the restart (not trained again) count too. The task's
        ``wall_s``/``energy_j`` become whole-task figures; ``since_resume`` keeps this process's part."""
        before_s = float(carried["train_seconds"])
        task = record["telemetry"]["task"]
        task["since_resume"] = {"wall_s": result.wall_s, "energy_j": result.energy_j}
        task["wall_s"] = result.wall_s + before_s
        before_j = carried.get("energy_j")
        task["energy_j"] = (
            result.energy_j + before_j if result.energy_j is not None and before_j is not None else None
        )
        if task["energy_j"] is None and result.energy_j is not None:
            task.setdefault("nulls", {})["energy_j"] = "no energy figure for the epochs before the resume"
        record["telemetry"]["before_resume"] = carried
        record["train_seconds"] = task["wall_s"]
        peaks = [p for p in (result.peak_memory_mb, carried.get("peak_memory_mb")) if p is not None]
        record["peak_memory_mb"] = max(peaks) if peaks else None
        self._carried_s += before_s

    def on_save_checkpoint(self, trainer: Trainer, meta: dict[str, Any]) -> None:
        """Carry the current task's training time, peak and energy so far in the epoch checkpoint, so a
        resumed run reports the whole task's cost, not only what ran after the restart."""
        with self._lock:
            meter, task = self._task, self._task_index
        if meter is None or task is None or meta.get("task_complete"):
            return
        snap = meter.snapshot()
        carried = self._carried if self._carried is not None and self._carried.get("task") == task else {}
        seconds = float(snap.get("elapsed_s") or 0.0) + float(carried.get("train_seconds", 0.0))
        peaks = [p for p in (snap.get("peak_memory_mb"), carried.get("peak_memory_mb")) if p is not None]
        energy = snap.get("energy_j")
        before = carried.get("energy_j") if carried else 0.0
        meta["telemetry"] = {
            "task": task,
            "epochs_done": meta.get("epochs_done"),
            "train_seconds": seconds,
            "peak_memory_mb": max(peaks) if peaks else None,
            "energy_j": energy + before if energy is not None and before is not None else None,
        }

    def on_load_checkpoint(self, trainer: Trainer, meta: dict[str, Any]) -> None:
        """Remember what the checkpoint carried for the task it interrupted."""
        carried = meta.get("telemetry")
        self._carried = dict(carried) if isinstance(carried, dict) and not meta.get("task_complete") else None

    # ------------------------------------------------------------------------------------- queries

    def latest(self) -> dict[str, Any]:
        """Live snapshot of the innermost open region: elapsed, current RSS, peak so far, energy so far."""
        with self._lock:
            meter = self._phase or self._task or self._run
            task, phase = self._task_index if self._task else None, self._phase_name if self._phase else None
        if meter is None:
            return {"region": None}
        snap = meter.snapshot()
        return {"region": snap.pop("name"), "task": task, "phase": phase, **snap}

    # ------------------------------------------------------------------------------------ internals

    def _end_phase(self) -> None:
        with self._lock:
            meter, name = self._phase, self._phase_name
            self._phase = self._phase_name = None
        if meter is None or not meter.running or name is None:
            return
        result = meter.stop()
        key, n = name, 2
        while key in self._phases:  # the same phase twice in one task: keep both
            key, n = f"{name}#{n}", n + 1
        self._phases[key] = result

    def _end_task(self) -> None:
        self._end_phase()
        with self._lock:
            meter, self._task = self._task, None
        if meter is not None and meter.running:
            self._task_result = meter.stop()

    def _summary(self, run: MeterResult) -> dict[str, Any]:
        """``results["telemetry"]``: the run meter, the backends, and training-region aggregates."""
        tasks = self._tasks
        if tasks:
            peaks = [t.peak_memory_mb for t in tasks if t.peak_memory_mb is not None]
            peak = max(peaks) if peaks else None
            missing = next((t for t in tasks if t.energy_j is None), None)
            energy = sum(t.energy_j or 0.0 for t in tasks) if missing is None else None
            source = missing or tasks[0]
        else:
            peak, energy, source = run.peak_memory_mb, run.energy_j, run
        nulls: dict[str, str] = {}
        if energy is None:
            nulls["energy_j"] = source.nulls.get("energy_j", "no sensor")
        if peak is None:
            nulls["peak_memory_mb"] = source.nulls.get("peak_rss_mb", "no sensor")
        if not tasks:
            nulls["train_seconds"] = "not measured: no task was trained in this run"
        summary: dict[str, Any] = {
            "run": run.to_dict(),
            "backends": self.sampler.describe(),
            "period_s": self.sampler.period_s,
            "peak_memory_mb": peak,
            "energy_j": energy,
            "train_seconds": sum(t.wall_s for t in tasks) + self._carried_s if tasks else None,
            "nulls": nulls,
        }
        if self.sampler.errors:
            summary["errors"] = dict(self.sampler.errors)
        return summary

    def _shutdown(self) -> None:
        """Stop open meters quietly, then the sampler thread (and its backends if this callback made them)."""
        with self._lock:
            meters = [m for m in (self._phase, self._task, self._run) if m is not None]
            self._phase = self._task = self._run = None
        for meter in meters:
            if meter.running:
                try:
                    meter.stop()
                except Exception as exc:  # telemetry must not mask the training exception
                    self.sampler.errors["shutdown"] = f"{type(exc).__name__}: {exc}"
        if self._owns_sampler:
            self.sampler.close()
        else:
            self.sampler.stop()
