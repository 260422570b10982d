"""The bench's child process: one :class:`~edgecl.runner.RunSpec` through :func:`~edgecl.runner.run_training`.

``python -m edgecl.bench.worker SPEC OUT``: SPEC is a JSON file (or a JSON string), OUT the JSON file this
writes: ``{"status": "ok", "results": {...}}`` or ``{"status": "failed", "error": ..., "traceback": ...}``
(exit code 1). ``results["memory_series"]`` is this process's RSS sampled every 0.2 s for the whole run
(start-up included) with the task/phase boundaries, for the bench's memory-over-time plot: the telemetry
meters keep aggregates only, not a full series.

The per-method specs are built by another child, :mod:`edgecl.commands.bench_specs` (it reads the ``train``
command's flags, which this library does not import).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.methods.base import Phase
    from edgecl.train.trainer import Trainer

__all__ = ["MemoryRecorder", "main"]


class MemoryRecorder:
    """A daemon thread sampling this process's RSS (MiB) every ``period_s``, plus named events."""

    def __init__(self, period_s: float = 0.2) -> None:
        import psutil  # type: ignore[import-untyped]

        self.period_s = period_s
        self._proc = psutil.Process(os.getpid())
        self._t0 = time.monotonic()
        self.samples: list[tuple[float, float]] = []
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgecl-bench-rss", daemon=True)

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def sample(self) -> None:
        """Record the current RSS."""
        try:
            rss = self._proc.memory_info().rss / 2**20
        except Exception:  # never let the recorder kill the run
            return
        self.samples.append((round(self._now(), 3), round(rss, 2)))

    def event(self, name: str) -> None:
        """Record a named moment (task/phase boundaries) with a sample."""
        self.events.append((round(self._now(), 3), name))
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def start(self) -> MemoryRecorder:
        """Start sampling."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the series as a JSON-able dict."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sample()
        return {
            "period_s": self.period_s,
            "unit": "MiB (RSS of the child process)",
            "t_s": [t for t, _ in self.samples],
            "rss_mb": [m for _, m in self.samples],
            "events": [{"t_s": t, "event": e} for t, e in self.events],
        }


class _Events(Callback):
    """Marks task and phase boundaries in the recorder's series."""

    def __init__(self, recorder: MemoryRecorder) -> None:
        self.recorder = recorder

    def on_run_start(self, trainer: Trainer) -> None:
        self.recorder.event("run start")

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        self.recorder.event(f"task {task + 1} start")

    def on_phase_start(self, trainer: Trainer, task: int, phase: Phase) -> None:
        self.recorder.event(f"task {task + 1} {getattr(phase, 'value', phase)}")

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        self.recorder.event(f"task {task + 1} eval")

    def on_run_end(self, trainer: Trainer, results: dict[str, Any]) -> None:
        self.recorder.event("run end")


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a killed child leaves no half file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Train the spec, write OUT; exit 0 on success, 1 with the error written otherwise."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edgecl.bench.worker SPEC_JSON OUT_JSON", file=sys.stderr)
        return 2
    spec_arg, out = args[0], Path(args[1])
    recorder = MemoryRecorder().start()
    try:
        from edgecl.runner import RunSpec, run_training

        text = spec_arg if spec_arg.lstrip().startswith("{") else Path(spec_arg).read_text()
        spec = RunSpec.from_json(text)
        results = run_training(spec, extra_callbacks=[_Events(recorder)])
    except BaseException as exc:
        series = recorder.stop()
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, end="")
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _write(out, {"status": "failed", "error": error, "traceback": tb, "memory_series": series})
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    results["memory_series"] = recorder.stop()
    _write(out, {"status": "ok", "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
