"""A process's RSS and CPU time through psutil."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from edgecl.telemetry.backends.base import _MIB, CPU_S, RSS_MB, Backend, Capabilities, _caps


class PsutilBackend(Backend):
    """A process's RSS and CPU time (this process by default); no power."""

    name: ClassVar[str] = "psutil"
    primary: ClassVar[tuple[str, ...]] = ("process_memory",)

    def __init__(self, pid: int | None = None, include_children: bool = False) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.include_children = include_children
        self._proc: Any = None
        self._error: str | None = None

    @property
    def is_self(self) -> bool:
        """Whether the measured process is this one (so ``getrusage`` applies to it)."""
        return self.pid == os.getpid()

    def _process(self) -> Any:
        if self._proc is None:
            import psutil

            self._proc = psutil.Process(self.pid)
        return self._proc

    def capabilities(self) -> Capabilities:
        """Process memory, when psutil is installed and the process exists."""
        try:
            self._process().memory_info()
        except Exception as exc:
            return _caps(self.name, reasons={"process_memory": f"psutil cannot read pid {self.pid}: {exc}"})
        who = "children included" if self.include_children else "children excluded"
        return _caps(self.name, f"RSS and CPU time of pid {self.pid} ({who})", process_memory=True)

    def read(self) -> dict[str, float]:
        """RSS in MiB and user+system CPU seconds."""
        proc = self._process()
        with proc.oneshot():
            rss = float(proc.memory_info().rss)
            t = proc.cpu_times()
            cpu = t.user + t.system
            if self.include_children:
                cpu += t.children_user + t.children_system  # children already waited for
                for child in proc.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                        ct = child.cpu_times()
                        cpu += ct.user + ct.system
                    except Exception:  # the child exited between listing and reading
                        continue
        return {RSS_MB: rss / _MIB, CPU_S: cpu}
