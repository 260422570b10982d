"""What every telemetry backend shares: the ``read()`` keys, :class:`Capabilities`, the :class:`Backend`
contract and the Jetson rail rule (used by both the jtop and the hwmon backend).

Must not import any backend module (they import this one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# Keys of ``Backend.read()``.
POWER_W = "power_w"
"""Instantaneous power in W."""
ENERGY_J = "energy_j"
"""Cumulative energy counter in J (origin arbitrary, monotone non-decreasing)."""
RSS_MB = "rss_mb"
"""Resident set size of the measured process in MiB."""
CPU_S = "cpu_s"
"""Cumulative user+system CPU seconds of the measured process."""
DEVICE_MEMORY_MB = "device_memory_mb"
"""Device-wide memory in use in MiB (NVML GPU memory, or the Jetson's unified RAM from jtop)."""
CUDA_ALLOCATED_MB = "cuda_allocated_mb"
"""``torch.cuda.max_memory_allocated`` since the last peak reset, MiB."""
CUDA_RESERVED_MB = "cuda_reserved_mb"
"""``torch.cuda.max_memory_reserved`` since the last peak reset, MiB."""

FIGURES = ("power_w", "energy_counter", "process_memory", "device_memory")
"""The figures a backend may measure (fields of :class:`Capabilities`)."""

POWER_BACKENDS = frozenset({"jtop", "hwmon", "nvml", "rapl"})
"""Backends that can measure power or energy (their absence explains a null energy)."""

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
"""Rails that carry the whole board's input power: Orin/Xavier NX, then Nano (jtop ``total_power``)."""
_MIB = float(2**20)

Reader = Callable[[Path], str]
"""Reads a (sysfs) file's text; injectable so tests can simulate root-only files."""


def read_text(path: Path) -> str:
    """Read a small sysfs file."""
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


@dataclass(frozen=True)
class Capabilities:
    """Which figures a backend can measure; ``reasons`` says why for each one it cannot."""

    power_w: bool = False
    energy_counter: bool = False
    process_memory: bool = False
    device_memory: bool = False
    reasons: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    """What the measured figures are (rails used, zones, device), for ``edgecl doctor``."""

    def measures(self) -> list[str]:
        """The figures this backend can measure."""
        return [f for f in FIGURES if getattr(self, f)]

    def reason(self, figure: str) -> str | None:
        """Why ``figure`` is not measured (None when it is)."""
        if getattr(self, figure):
            return None
        return self.reasons.get(figure, f"no {figure} sensor")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: what it measures, and why not for the rest."""
        return {
            "measures": self.measures(),
            "cannot": {f: self.reason(f) for f in FIGURES if not getattr(self, f)},
            "detail": self.detail,
        }


def _caps(
    name: str, detail: str = "", reasons: Mapping[str, str] | None = None, **measured: bool
) -> Capabilities:
    """Capabilities with a default reason ("<name> has no <figure>") for every unmeasured figure."""
    nouns = {
        "power_w": "power sensor",
        "energy_counter": "energy counter",
        "process_memory": "process-memory reading",
        "device_memory": "device-memory reading",
    }
    why = {f: f"{name} has no {nouns[f]}" for f in FIGURES if not measured.get(f, False)}
    why.update({f: r for f, r in (reasons or {}).items() if not measured.get(f, False)})
    return Capabilities(reasons=why, detail=detail, **measured)


class Backend(ABC):
    """A sensor family: ``available()`` is cheap and never raises; ``read()`` may raise (transient error)."""

    name: ClassVar[str] = "backend"
    primary: ClassVar[tuple[str, ...]] = ()
    """The figures this family exists to measure (their reasons explain an unavailable backend)."""

    def available(self) -> bool:
        """Whether this backend can measure at least one figure here."""
        return bool(self.capabilities().measures())

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can measure on this machine, with a reason for each figure it cannot."""

    @abstractmethod
    def read(self) -> dict[str, float]:
        """Instantaneous values keyed by the module's key constants (a figure it cannot measure is absent)."""

    def reset_peaks(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Restart any peak statistic the backend keeps (a measured region is starting); default no-op."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release handles or connections; default no-op."""

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for ``edgecl doctor`` and ``results.json``."""
        return {"name": self.name, "available": self.available(), **self.capabilities().to_dict()}


# ------------------------------------------------------------------------------------- Jetson rails


def total_rail_power(rails: Mapping[str, float]) -> tuple[float, str] | None:
    """Board power from per-rail powers (any unit): ``VDD_IN``, else ``POM_5V_IN``, else the sum of rails."""
    if not rails:
        return None
    upper = {k.upper(): v for k, v in rails.items()}
    for rail in TOTAL_RAILS:
        if rail in upper:
            return upper[rail], rail
    return float(sum(rails.values())), "sum of rails"
