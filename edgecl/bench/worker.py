"""The bench's child process: one :class:`~edgecl.runner.RunSpec` through :func:`~edgecl.runner.run_training`.

``python -m edgecl.bench.worker SPEC OUT``: SPEC is a JSON file (or a JSON string), OUT the JSON file this
writes: ``{"status": "ok", "results": {...}}`` or ``{"status": "failed", "error": ..., "traceback": ...}``
(exit code 1). ``results["memory_series"]`` is this process's RSS sampled every 0.2 s for the whole run
(start-up included) with the task/phase boundaries, for the bench's memory-over-time plot: the telemetry
meters keep aggregates only, not a full series.

``python -m edgecl.bench.worker --specs REQUEST OUT`` does the parent's torch-dependent work once, so the
parent never imports torch (importing it costs ~0.7 GB of RSS, and a child's ``getrusage`` high-water mark
starts at its parent's): the per-method specs (:func:`~edgecl.commands.train.spec_from_args`, profile
honoured), the registered methods and the machine description.
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


def build_specs(request: dict[str, Any]) -> dict[str, Any]:
    """Spec dicts per method from the bench's parsed arguments (``request["args"]``).

    ``request["methods"]`` may contain ``"all"`` (every registered method). The CPS/DPCT convenience flags
    (``--reduction-rate`` ...) go only to methods whose config has that field; ``--set`` goes to every
    method and ``request["method_sets"][method]`` (``KEY=VALUE`` items) to one, both strictly (an unknown
    option fails that method's run, naming it).
    """
    import argparse
    import dataclasses

    from edgecl.commands.train import METHOD_FLAGS, _parse_overrides, spec_from_args
    from edgecl.methods.registry import get_method_class, list_methods
    from edgecl.runner import machine_info

    args = argparse.Namespace(**request["args"])
    specs: dict[str, Any] = {}
    dropped: dict[str, list[str]] = {}
    wanted = [m for name in request["methods"] for m in (list_methods() if name == "all" else [name])]
    for method in dict.fromkeys(wanted):
        spec = spec_from_args(args, method)
        spec.tasks = spec.tasks or 5
        try:
            fields = {f.name for f in dataclasses.fields(get_method_class(method).Config)}
        except ValueError:  # unknown method: its run fails and says so
            fields = None
        set_keys = set(_parse_overrides(args.overrides))
        for flag in METHOD_FLAGS:
            given = getattr(args, flag, None) is not None
            if fields is not None and given and flag not in fields and flag not in set_keys:
                spec.method_options.pop(flag, None)
                dropped.setdefault(method, []).append(flag)
        spec.method_options.update(_parse_overrides(request.get("method_sets", {}).get(method, [])))
        specs[method] = dataclasses.asdict(spec)
    return {"specs": specs, "dropped": dropped, "methods": list_methods(), "machine": machine_info()}


def _specs_main(request_arg: str, out: Path) -> int:
    try:
        request = json.loads(Path(request_arg).read_text())
        _write(out, {"status": "ok", **build_specs(request)})
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        _write(out, {"status": "failed", "error": error, "traceback": traceback.format_exc()})
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train the spec, write OUT; exit 0 on success, 1 with the error written otherwise."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--specs":
        return _specs_main(args[1], Path(args[2]))
    if len(args) != 2:
        print("usage: python -m edgecl.bench.worker [--specs] SPEC_OR_REQUEST_JSON OUT_JSON", file=sys.stderr)
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
