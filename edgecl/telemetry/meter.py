"""``Meter``: wall time, CPU time, peak memory and energy of one region of code, on a shared sampler.

Meters nest (a task meter around phase meters) on one :class:`~edgecl.telemetry.sampler.Sampler`. Every
figure is measured or ``None`` with a reason in ``nulls`` ("no sensor: ..."): a missing sensor is never 0.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgecl.telemetry.backends import (
    CPU_S,
    CUDA_ALLOCATED_MB,
    CUDA_RESERVED_MB,
    DEVICE_MEMORY_MB,
    POWER_BACKENDS,
    POWER_W,
    RSS_MB,
    PsutilBackend,
)
from edgecl.telemetry.sampler import RegionStats, Sampler

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["Meter", "MeterResult", "rss_hwm_mb"]


def rss_hwm_mb() -> float | None:
    """This process's own RSS high-water mark in MiB: ``VmHWM`` on Linux, else ``getrusage().ru_maxrss``.

    ``VmHWM`` belongs to the process's address space; ``ru_maxrss`` is seeded at exec with the parent's mark
    on Linux, so in a child of a larger process it would not rise and spikes would go unseen.
    """
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return None
    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


@dataclass
class MeterResult:
    """What a meter measured over its region; ``nulls`` gives the reason for every ``None`` figure."""

    name: str
    wall_s: float
    cpu_s: float | None
    peak_rss_mb: float | None
    peak_cuda_allocated_mb: float | None
    peak_cuda_reserved_mb: float | None
    peak_device_memory_mb: float | None
    """Device-wide memory in use (NVML GPU memory, or the Jetson's unified RAM from jtop); all processes."""
    energy_j: float | None
    energy_source: str | None
    """``counter`` (hardware counter delta), ``integrated`` (trapezoid over sampled power), or both joined."""
    mean_power_w: float | None
    idle_power_w: float | None
    energy_above_idle_j: float | None
    sources: list[str]
    period_s: float
    samples: int
    energy_by_backend: dict[str, float] = field(default_factory=dict)
    nulls: dict[str, str] = field(default_factory=dict)

    @property
    def peak_memory_mb(self) -> float | None:
        """The headline peak: CUDA allocated when CUDA was used, else the process's peak RSS."""
        return self.peak_cuda_allocated_mb if self.peak_cuda_allocated_mb is not None else self.peak_rss_mb

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (all fields; ``None`` stays ``null``)."""
        return asdict(self)


class Meter:
    """Context manager measuring one region on ``sampler`` (started here if it is not running).

    Peak RSS is the maximum of the sampled RSS and, for this process, its RSS high-water mark
    (:func:`rss_hwm_mb`): if the mark rose during the region it was set inside the region and is exactly
    the region's peak, which catches spikes shorter than the sampling period. (A mark reset inside the
    region, as the memory planner does, can only make it not rise: then the sampled peak is used, never a
    wrong one.) On CPU this is the peak of a whole process: it is the method's peak only when the process
    does nothing else.
    With ``idle_seconds > 0`` the meter first samples that long doing nothing to get the idle power; a
    ``baseline`` meter's idle power is reused instead (measure idle once, use it for every region).
    """

    def __init__(
        self, sampler: Sampler, name: str, idle_seconds: float = 0.0, *, baseline: Meter | None = None
    ) -> None:
        if idle_seconds < 0:
            raise ValueError(f"idle_seconds must be >= 0, got {idle_seconds}")
        self.sampler = sampler
        self.name = name
        self.idle_seconds = float(idle_seconds)
        self.baseline = baseline
        self.idle_power_w: float | None = None
        self.idle_reason: str | None = "not measured: idle_seconds is 0"
        self._rid: int | None = None
        self._owns_sampler = False
        self._rss_hwm0: float | None = None
        self._cpu0 = 0.0
        self._result: MeterResult | None = None

    def __enter__(self) -> Meter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._rid is not None:
            self.stop()

    @property
    def running(self) -> bool:
        """Whether the region is open."""
        return self._rid is not None

    def start(self) -> Meter:
        """Measure idle power (if asked), then open the region."""
        if self._rid is not None:
            raise RuntimeError(f"meter {self.name!r} is already running")
        if not self.sampler.running:
            self.sampler.start()
            self._owns_sampler = True
        if self.baseline is not None:
            self.idle_power_w, self.idle_reason = self.baseline.idle_power_w, self.baseline.idle_reason
        elif self.idle_seconds > 0:
            self.idle_power_w, self.idle_reason = self._measure_idle()
        self._result = None
        self._rss_hwm0 = rss_hwm_mb()
        self._cpu0 = time.process_time()
        self._rid = self.sampler.open_region()
        return self

    def _measure_idle(self) -> tuple[float | None, str | None]:
        """Mean power over ``idle_seconds`` of doing nothing, or None with the reason."""
        rid = self.sampler.open_region()
        time.sleep(self.idle_seconds)
        stats = self.sampler.close_region(rid)
        if stats.energy_j is None:
            return None, self._no_power_reason()
        if stats.wall_s <= 0:
            return None, "not measured: idle window had zero length"
        return stats.energy_j / stats.wall_s, None

    def stop(self) -> MeterResult:
        """Close the region and compute the result."""
        if self._rid is None:
            raise RuntimeError(f"meter {self.name!r} is not running")
        rid, self._rid = self._rid, None
        stats = self.sampler.close_region(rid)
        cpu_s = time.process_time() - self._cpu0
        hwm = rss_hwm_mb()
        if self._owns_sampler:
            self.sampler.stop()
            self._owns_sampler = False
        self._result = self._build(stats, cpu_s, hwm)
        return self._result

    def result(self) -> MeterResult:
        """The result of the finished region."""
        if self._result is None:
            raise RuntimeError(f"meter {self.name!r} has no result yet (not stopped)")
        return self._result

    def snapshot(self) -> dict[str, Any]:
        """The region so far (for live status): elapsed, current and peak RSS, energy and power so far."""
        stats = self.sampler.peek(self._rid) if self._rid is not None else None
        if stats is None:
            res = self._result
            if res is None:
                return {"name": self.name, "running": False}
            return {
                "name": self.name,
                "running": False,
                "elapsed_s": res.wall_s,
                "rss_mb": None,
                "peak_rss_mb": res.peak_rss_mb,
                "peak_memory_mb": res.peak_memory_mb,
                "energy_j": res.energy_j,
                "power_w": res.mean_power_w,
            }
        cuda = stats.peaks.get(CUDA_ALLOCATED_MB)
        return {
            "name": self.name,
            "running": True,
            "elapsed_s": self.sampler.clock() - stats.t0,
            "rss_mb": stats.last.get(RSS_MB),
            "peak_rss_mb": stats.peaks.get(RSS_MB),
            "peak_memory_mb": cuda if cuda is not None else stats.peaks.get(RSS_MB),
            "energy_j": stats.energy_j,
            "power_w": stats.last.get(POWER_W),
        }

    # --------------------------------------------------------------------------------------- result

    def _psutil(self) -> PsutilBackend | None:
        return next((b for b in self.sampler.backends if isinstance(b, PsutilBackend)), None)

    def _no_power_reason(self) -> str:
        """'no sensor: ' with why each sampled backend and each left-out power backend measures no power."""
        why = [b.capabilities().reason(POWER_W) or "" for b in self.sampler.backends]
        why += [f"{n}: {r}" for n, r in self.sampler.notes.items() if n in POWER_BACKENDS]
        why = [w for w in dict.fromkeys(why) if w]
        return "no sensor: " + ("; ".join(why) if why else "no telemetry backend")

    def _reason_for(self, backend_name: str, default: str) -> str:
        """'no sensor: ' with the left-out backend's reason, else ``default``."""
        note = self.sampler.notes.get(backend_name)
        return f"no sensor: {backend_name}: {note}" if note else f"no sensor: {default}"

    def _build(self, stats: RegionStats, cpu_s: float, hwm: float | None) -> MeterResult:
        nulls: dict[str, str] = {}
        psutil_backend = self._psutil()

        peak_rss = stats.peaks.get(RSS_MB)
        measuring_self = psutil_backend is None or psutil_backend.is_self
        if measuring_self and hwm is not None and self._rss_hwm0 is not None and hwm > self._rss_hwm0:
            peak_rss = max(peak_rss or 0.0, hwm)  # the high-water mark was set inside this region
        if peak_rss is None:
            nulls["peak_rss_mb"] = "no sensor: no psutil backend (and the RSS high-water mark did not rise)"

        if psutil_backend is not None:
            cpu = stats.deltas.get(CPU_S)
            if cpu is None:
                nulls["cpu_s"] = "no sensor: psutil returned fewer than two CPU-time readings"
        else:
            cpu = cpu_s  # this process's time.process_time()

        cuda_alloc = stats.peaks.get(CUDA_ALLOCATED_MB)
        cuda_res = stats.peaks.get(CUDA_RESERVED_MB)
        if cuda_alloc is None:
            nulls["peak_cuda_allocated_mb"] = self._reason_for("torch_cuda", "no torch_cuda backend")
        if cuda_res is None:
            nulls["peak_cuda_reserved_mb"] = self._reason_for("torch_cuda", "no torch_cuda backend")
        device_mem = stats.peaks.get(DEVICE_MEMORY_MB)
        if device_mem is None:
            nulls["peak_device_memory_mb"] = self._reason_for("nvml", "no NVML or jtop device-memory reading")

        energy = stats.energy_j
        wall = stats.wall_s
        mean_power = energy / wall if energy is not None and wall > 0 else None
        idle = self.idle_power_w
        above = energy - idle * wall if energy is not None and idle is not None else None
        if energy is None:
            why = self._no_power_reason()
            for key in ("energy_j", "energy_source", "mean_power_w", "energy_above_idle_j"):
                nulls[key] = why
        elif mean_power is None:
            nulls["mean_power_w"] = "not measured: zero-length region"
        if idle is None:
            nulls["idle_power_w"] = self.idle_reason or "not measured"
            nulls.setdefault("energy_above_idle_j", nulls["idle_power_w"])

        return MeterResult(
            name=self.name,
            wall_s=wall,
            cpu_s=cpu,
            peak_rss_mb=peak_rss,
            peak_cuda_allocated_mb=cuda_alloc,
            peak_cuda_reserved_mb=cuda_res,
            peak_device_memory_mb=device_mem,
            energy_j=energy,
            energy_source=stats.energy_source,
            mean_power_w=mean_power,
            idle_power_w=idle,
            energy_above_idle_j=above,
            sources=stats.sources,
            period_s=self.sampler.period_s,
            samples=stats.samples,
            energy_by_backend={name: e for name, (e, _) in stats.energy.items()},
            nulls=nulls,
        )
