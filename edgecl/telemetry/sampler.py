"""A background thread that reads every backend on a fixed period and keeps running aggregates per region.

Timestamps are the sampler's own (``time.monotonic`` by default). A region (what a :class:`Meter` measures)
starts and ends with a synchronous sample, so its integral covers exactly its wall time; between those the
thread's samples refine it. Regions keep O(1) running aggregates (counter first/last, trapezoid integral,
maxima), and only a short ring buffer of raw samples is kept, so a long run does not grow memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecl.telemetry.backends import (
    CPU_S,
    CUDA_ALLOCATED_MB,
    CUDA_RESERVED_MB,
    DEVICE_MEMORY_MB,
    ENERGY_J,
    POWER_W,
    RSS_MB,
    Backend,
    detect,
)

__all__ = ["Readings", "RegionStats", "Sampler"]

Readings = dict[str, dict[str, float]]
"""One sample: backend name -> that backend's ``read()``."""

_CUMULATIVE = (ENERGY_J, CPU_S)
_PEAKS = (RSS_MB, CUDA_ALLOCATED_MB, CUDA_RESERVED_MB, DEVICE_MEMORY_MB)


@dataclass
class RegionStats:
    """Aggregates of one region between its first and its latest sample."""

    t0: float
    t1: float
    samples: int
    energy: dict[str, tuple[float, str]]
    """Backend -> (joules, ``"counter"`` or ``"integrated"``) for every backend that measured energy."""
    peaks: dict[str, float]
    """Read key (``rss_mb``, ``cuda_allocated_mb`` ...) -> maximum over the region's samples."""
    deltas: dict[str, float]
    """Cumulative key (``cpu_s``, ``energy_j``) -> last minus first, summed over backends."""
    last: dict[str, float]
    """Latest value of each read key (power summed over backends)."""
    sources: list[str] = field(default_factory=list)
    """Backends that returned readings in this region."""

    @property
    def wall_s(self) -> float:
        """Seconds between the region's first and latest sample."""
        return self.t1 - self.t0

    @property
    def energy_j(self) -> float | None:
        """Total energy over the backends that measured it (disjoint domains: GPU, CPU package, board)."""
        return sum(e for e, _ in self.energy.values()) if self.energy else None

    @property
    def energy_source(self) -> str | None:
        """``counter``, ``integrated``, ``counter+integrated`` when backends differ, or None (no sensor)."""
        kinds = sorted({k for _, k in self.energy.values()})
        return "+".join(kinds) if kinds else None


class _Region:
    """Running aggregates of one open region; updated under the sampler's lock."""

    __slots__ = (
        "cum_first",
        "cum_last",
        "cum_n",
        "integral",
        "last",
        "n",
        "peaks",
        "power_n",
        "prev_power",
        "t0",
        "t_last",
    )

    def __init__(self, t: float) -> None:
        self.t0 = self.t_last = t
        self.n = 0
        self.cum_first: dict[tuple[str, str], float] = {}
        self.cum_last: dict[tuple[str, str], float] = {}
        self.cum_n: dict[tuple[str, str], int] = {}
        self.integral: dict[str, float] = {}
        self.prev_power: dict[str, tuple[float, float]] = {}
        self.power_n: dict[str, int] = {}
        self.peaks: dict[str, float] = {}
        self.last: Readings = {}

    def update(self, t: float, readings: Readings) -> None:
        """Fold one sample in: counters' first/last, trapezoid step of power, maxima."""
        self.n += 1
        self.t_last = t
        for name, values in readings.items():
            self.last[name] = values
            for key in _CUMULATIVE:
                v = values.get(key)
                if v is not None:
                    ck = (name, key)
                    self.cum_first.setdefault(ck, v)
                    self.cum_last[ck] = v
                    self.cum_n[ck] = self.cum_n.get(ck, 0) + 1
            p = values.get(POWER_W)
            if p is not None:
                prev = self.prev_power.get(name)
                step = 0.5 * (prev[1] + p) * (t - prev[0]) if prev is not None else 0.0
                self.integral[name] = self.integral.get(name, 0.0) + step
                self.prev_power[name] = (t, p)
                self.power_n[name] = self.power_n.get(name, 0) + 1
            for key in _PEAKS:
                v = values.get(key)
                if v is not None and v > self.peaks.get(key, float("-inf")):
                    self.peaks[key] = v

    def stats(self) -> RegionStats:
        """Energy per backend (counter delta, else integrated power), maxima, deltas and latest values."""
        energy: dict[str, tuple[float, str]] = {}
        deltas: dict[str, float] = {}
        for (name, key), first in self.cum_first.items():
            if self.cum_n[(name, key)] < 2:
                continue
            delta = self.cum_last[(name, key)] - first
            deltas[key] = deltas.get(key, 0.0) + delta
            if key == ENERGY_J:
                energy[name] = (delta, "counter")
        for name, n in self.power_n.items():
            counter = energy.get(name)
            # A coarse counter (NVML updates every 20-100 ms) may not have ticked in a short region.
            if n >= 2 and (counter is None or (counter[0] <= 0.0 < self.integral[name])):
                energy[name] = (self.integral[name], "integrated")
        last: dict[str, float] = {}
        for values in self.last.values():
            for key, v in values.items():
                last[key] = last.get(key, 0.0) + v if key == POWER_W else v
        peaks = dict(self.peaks)
        return RegionStats(self.t0, self.t_last, self.n, energy, peaks, deltas, last, list(self.last))


class Sampler:
    """Samples ``backends`` every ``period_s`` on a daemon thread; thread-safe regions and history.

    ``notes`` maps backends that were left out to why (shown as the reason of a null figure).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        period_s: float = 0.1,
        *,
        clock: Callable[[], float] = time.monotonic,
        notes: Mapping[str, str] | None = None,
        history: int = 600,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.backends = list(backends)
        self.period_s = float(period_s)
        self.clock = clock
        self.notes = dict(notes or {})
        self.errors: dict[str, str] = {}
        """Backend name -> its latest read error (a failing backend is skipped for that sample)."""
        self._lock = threading.Lock()
        self._regions: dict[int, _Region] = {}
        self._next_id = 0
        self._history: deque[tuple[float, Readings]] = deque(maxlen=history)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def autodetect(cls, period_s: float = 0.1, names: Sequence[str] | None = None, **options: Any) -> Sampler:
        """A sampler over the autodetected (or ``names``) backends, noting why the others were left out."""
        found = detect(names, **options)
        return cls(found.backends, period_s, notes=found.rejected)

    # ----------------------------------------------------------------------------------- the thread

    @property
    def running(self) -> bool:
        """Whether the sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Sampler:
        """Start the sampling thread (no-op when running)."""
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgecl-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the sampling thread and wait for it (regions stay usable with synchronous samples)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(2.0, 5 * self.period_s))

    def close(self) -> None:
        """Stop the thread and release every backend."""
        self.stop()
        for backend in self.backends:
            try:
                backend.close()
            except Exception as exc:
                self.errors[backend.name] = f"close failed: {exc}"

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        """Sample on a fixed schedule (missed ticks are skipped, not bunched)."""
        deadline = time.monotonic()
        while True:
            deadline += self.period_s
            delay = deadline - time.monotonic()
            if delay < 0:
                deadline, delay = time.monotonic(), 0.0
            if self._stop.wait(delay):
                return
            try:
                self.sample()
            except Exception as exc:  # never let telemetry kill the run; keep the reason
                self.errors["sampler"] = f"{type(exc).__name__}: {exc}"

    # ---------------------------------------------------------------------------------- sampling

    def _read_all(self) -> Readings:
        readings: Readings = {}
        for backend in self.backends:
            try:
                values = backend.read()
            except Exception as exc:
                self.errors[backend.name] = f"{type(exc).__name__}: {exc}"
                continue
            if values:
                readings[backend.name] = values
        return readings

    def _sample_locked(self) -> float:
        t = self.clock()
        readings = self._read_all()
        self._history.append((t, readings))
        for region in self._regions.values():
            region.update(t, readings)
        return t

    def sample(self) -> float:
        """Take one sample now (also what the thread calls); returns its timestamp."""
        with self._lock:
            return self._sample_locked()

    def open_region(self) -> int:
        """Start a region: fold the current peaks into open regions, reset backend peaks, seed the region."""
        with self._lock:
            if self._regions:
                self._sample_locked()
            for backend in self.backends:
                try:
                    backend.reset_peaks()
                except Exception as exc:
                    self.errors[backend.name] = f"reset_peaks failed: {exc}"
            rid = self._next_id
            self._next_id += 1
            region = _Region(self.clock())
            self._regions[rid] = region
            self._sample_locked()
            region.t0 = region.t_last
            return rid

    def close_region(self, rid: int) -> RegionStats:
        """End a region with a final sample and return its aggregates."""
        with self._lock:
            self._sample_locked()
            return self._regions.pop(rid).stats()

    def peek(self, rid: int) -> RegionStats | None:
        """A region's aggregates so far (None when it is not open); does not sample."""
        with self._lock:
            region = self._regions.get(rid)
            return region.stats() if region is not None else None

    def mark(self) -> float:
        """A timestamp on the sampler's clock, for :meth:`samples_since`."""
        return self.clock()

    def samples_since(self, mark: float) -> list[tuple[float, Readings]]:
        """Raw samples taken at or after ``mark`` that are still in the ring buffer (oldest first)."""
        with self._lock:
            return [(t, r) for t, r in self._history if t >= mark]

    def describe(self) -> list[dict[str, Any]]:
        """Every backend used (what it measures) and every one left out (why)."""
        used = [{**b.describe(), "used": True} for b in self.backends]
        left = [{"name": n, "available": False, "used": False, "reason": r} for n, r in self.notes.items()]
        return used + left
