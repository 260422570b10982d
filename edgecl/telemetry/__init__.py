"""Telemetry: measured peak memory, time and energy of every training region (jtop, hwmon, NVML, RAPL,
psutil, torch.cuda), with a reason instead of a number wherever a sensor is missing.

``TelemetryCallback`` is imported lazily: it pulls in ``edgecl.train`` (and torch), which ``edgecl doctor``
and the sampler itself do not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgecl.telemetry.backends import (
    BACKENDS,
    Backend,
    Capabilities,
    Detection,
    HwmonBackend,
    JtopBackend,
    NvmlBackend,
    PsutilBackend,
    RaplBackend,
    TorchCudaBackend,
    describe_backends,
    detect,
    detect_backends,
)
from edgecl.telemetry.meter import Meter, MeterResult
from edgecl.telemetry.ratio import ratio_rows, render_ratio_table
from edgecl.telemetry.sampler import RegionStats, Sampler

if TYPE_CHECKING:
    from edgecl.telemetry.callback import TelemetryCallback

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "Detection",
    "HwmonBackend",
    "JtopBackend",
    "Meter",
    "MeterResult",
    "NvmlBackend",
    "PsutilBackend",
    "RaplBackend",
    "RegionStats",
    "Sampler",
    "TelemetryCallback",
    "TorchCudaBackend",
    "describe_backends",
    "detect",
    "detect_backends",
    "ratio_rows",
    "render_ratio_table",
]


def __getattr__(name: str) -> Any:
    """Import ``TelemetryCallback`` on first use (PEP 562), keeping ``import edgecl.telemetry`` light."""
    if name == "TelemetryCallback":
        from edgecl.telemetry.callback import TelemetryCallback

        return TelemetryCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
