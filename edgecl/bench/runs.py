"""Plan the bench's runs and drive each one in its own child process (clean peak memory per run).

A run is one :class:`~edgecl.runner.RunSpec` (as a dict) and one seed; rows of the main table and of the
ablation that need the very same spec share one run. Runs execute strictly one after another.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ABLATIONS",
    "ABLATION_REFERENCE",
    "RunOutcome",
    "RunPlan",
    "error_summary",
    "execute_run",
    "plan_runs",
    "tail_lines",
]

ABLATIONS: dict[str, tuple[tuple[str, str, dict[str, Any]], ...]] = {
    "cps": (
        ("CODA-Prompt", "coda_prompt", {}),
        ("+PatchDropout", "patchdropout", {"phase_ratio": 1.0}),
        ("+CPS", "cps_prompt", {"phase_ratio": 1.0}),
        ("+PatchDropout+DPCT", "patchdropout", {}),
        ("+CPS+DPCT", "cps_prompt", {}),
    ),
}
"""Ablation name -> (row label, method, method options on top of the bench's) in table order. λ = 1.0
(``phase_ratio``) makes every epoch a sparse-patch epoch: no decoupled head phase, i.e. no DPCT."""

ABLATION_REFERENCE = {"cps": "+CPS+DPCT"}
"""The row whose memory and time the other ablation rows are divided by."""

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")
_TAIL_BYTES = 64 * 1024


@dataclass
class RunPlan:
    """One child process: a spec (``RunSpec`` as a dict) and the table rows it feeds."""

    run_id: str
    method: str
    seed: int
    spec: dict[str, Any]
    rows: list[tuple[str, str]] = field(default_factory=list)
    """(table, label): ``("main", "cps_prompt")``, ``("ablation", "+CPS+DPCT")``."""

    @property
    def spec_key(self) -> str:
        """Canonical JSON of the spec (equal specs are the same run)."""
        return json.dumps(self.spec, sort_keys=True)


@dataclass
class RunOutcome:
    """What one child produced: the raw results dict, or why it failed."""

    plan: RunPlan
    status: str
    """``ok`` or ``failed``."""
    returncode: int | None
    wall_s: float
    results: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    stderr_tail: str = ""
    reused: bool = False

    @property
    def ok(self) -> bool:
        """Whether the run finished and produced results."""
        return self.status == "ok" and self.results is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for results.json (raw results included)."""
        return {
            "run_id": self.plan.run_id,
            "method": self.plan.method,
            "seed": self.plan.seed,
            "rows": [{"table": t, "label": label} for t, label in self.plan.rows],
            "status": self.status,
            "returncode": self.returncode,
            "wall_seconds": self.wall_s,
            "reused": self.reused,
            "error": self.error,
            "traceback": self.traceback,
            "stderr_tail": self.stderr_tail if not self.ok else None,
            "spec": self.plan.spec,
            "results": self.results,
        }


def plan_runs(
    make_spec: Callable[[str, int], dict[str, Any]],
    methods: Sequence[str],
    seeds: Sequence[int],
    ablation: str | None = None,
) -> list[RunPlan]:
    """Runs for every (method, seed) and, with ``ablation``, every ablation row; equal specs run once.

    ``make_spec(method, seed)`` returns the bench's spec dict for that method; ablation rows update its
    ``method_options`` with theirs.
    """
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of: {', '.join(ABLATIONS)}")
    plans: dict[str, RunPlan] = {}

    def add(table: str, label: str, method: str, seed: int, spec: dict[str, Any]) -> None:
        key = json.dumps(spec, sort_keys=True)
        plan = plans.get(key)
        if plan is None:
            digest = hashlib.sha256(key.encode()).hexdigest()[:8]
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", method)
            plan = plans[key] = RunPlan(f"s{seed}-{safe}-{digest}", method, seed, spec)
        if (table, label) not in plan.rows:
            plan.rows.append((table, label))

    for seed in seeds:
        for method in methods:
            add("main", method, method, seed, make_spec(method, seed))
        for label, method, options in ABLATIONS.get(ablation or "", ()):
            spec = make_spec(method, seed)
            spec["method_options"] = {**spec.get("method_options", {}), **options}
            add("ablation", label, method, seed, spec)
    return list(plans.values())


def tail_lines(raw: bytes, n: int = 20) -> str:
    """The last ``n`` non-empty lines of a child's output, ANSI codes and carriage-return redraws removed."""
    text = _ANSI.sub("", raw.decode("utf-8", errors="replace"))
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]  # a bar redrawn with \r: keep its last state
        if parts:
            lines.append(parts[-1].rstrip())
    return "\n".join(lines[-n:])


def error_summary(returncode: int | None, tail: str, reported: str | None) -> str:
    """One line saying why a run failed: the child's own error, else the last stderr line, else the code."""
    if reported:
        return reported
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (killed: out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"child killed by {name}{hint}"
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    return last or f"child exited with code {returncode}"


def _pump(stream: IO[bytes], sink: IO[bytes] | None, tail: collections.deque[bytes]) -> None:
    """Forward a child's output to ``sink`` (live progress) and keep its last bytes."""
    size = 0
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 8192)
        if not chunk:
            return
        if sink is not None:
            try:
                sink.write(chunk)
                sink.flush()
            except (OSError, ValueError):
                sink = None
        tail.append(chunk)
        size += len(chunk)
        while size > _TAIL_BYTES and len(tail) > 1:
            size -= len(tail.popleft())


def _child_env(live: bool) -> dict[str, str]:
    """The parent's environment; with a live terminal, tell rich in the child to draw its bar."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if live:
        env["TTY_COMPATIBLE"] = "1"
        env["TTY_INTERACTIVE"] = "1"
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    return env


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def execute_run(
    plan: RunPlan,
    runs_dir: Path,
    *,
    show_output: bool = True,
    timeout_s: float | None = None,
    reuse: bool = False,
    python: str | None = None,
) -> RunOutcome:
    """Run ``plan`` in ``python -m edgecl.bench.worker`` and wait for it; never raises for a failed run.

    The child writes ``runs_dir/<run_id>/result.json``; its stdout+stderr are forwarded live to this
    process's stderr (when ``show_output``) and their tail kept for the error report. With ``reuse``, a
    finished result of the same spec already on disk is taken instead of training again.
    """
    run_dir = runs_dir / plan.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
    if reuse:
        old = _load_json(result_path)
        if old and old.get("status") == "ok" and old.get("spec") == plan.spec and old.get("results"):
            return RunOutcome(plan, "ok", 0, float(old.get("wall_seconds", 0.0)), old["results"], reused=True)
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(plan.spec, indent=1))
    sink = sys.stderr.buffer if show_output and hasattr(sys.stderr, "buffer") else None
    live = sink is not None and sys.stderr.isatty()
    cmd = [python or sys.executable, "-m", "edgecl.bench.worker", str(spec_path), str(result_path)]
    tail: collections.deque[bytes] = collections.deque()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env(live)
    )
    assert proc.stdout is not None
    pump = threading.Thread(target=_pump, args=(proc.stdout, sink, tail), daemon=True)
    pump.start()
    timed_out = False
    try:
        returncode: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        returncode = proc.wait()
    except BaseException:
        proc.kill()  # Ctrl-C: do not leave the child training on
        proc.wait()
        raise
    pump.join(timeout=5)
    proc.stdout.close()
    wall = time.perf_counter() - t0
    text_tail = tail_lines(b"".join(tail))
    (run_dir / "output_tail.txt").write_text(text_tail + "\n")
    data = _load_json(result_path) or {}
    results = data.get("results") if data.get("status") == "ok" else None
    if returncode == 0 and results is not None:
        outcome = RunOutcome(plan, "ok", returncode, wall, results, stderr_tail=text_tail)
    else:
        reported = f"timed out after {timeout_s:g} s" if timed_out else data.get("error")
        if returncode == 0 and not reported:
            reported = "child exited 0 but wrote no results"
        outcome = RunOutcome(
            plan,
            "failed",
            returncode,
            wall,
            None,
            error_summary(returncode, text_tail, reported),
            data.get("traceback"),
            text_tail,
        )
    record = outcome.to_dict()
    record["stderr_tail"] = text_tail
    result_path.write_text(json.dumps(record))
    return outcome
