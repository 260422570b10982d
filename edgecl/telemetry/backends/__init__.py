"""Telemetry backends: one module per sensor family, each saying what it can measure and, if not, why.

``read()`` returns instantaneous values under the key constants below. ``energy_j`` is a cumulative counter
in joules with any origin (wrap-around already unwrapped by the backend): only differences mean anything.
A backend never invents a value: a figure it cannot measure is absent from ``read()`` and carries a reason
in ``capabilities()``, so callers can report ``None`` with that reason instead of a silent 0.

Modules: ``base`` (keys, :class:`Capabilities`, :class:`Backend`), one per backend (``jtop``, ``hwmon``,
``nvml``, ``rapl``, ``psutil``, ``torch_cuda``), and here the registry and autodetection. Backend modules
import only ``base`` (never each other, never torch at import time); nothing here imports ``edgecl.train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl.telemetry.backends.base import (
    CPU_S,
    CUDA_ALLOCATED_MB,
    CUDA_RESERVED_MB,
    DEVICE_MEMORY_MB,
    ENERGY_J,
    FIGURES,
    POWER_BACKENDS,
    POWER_W,
    RSS_MB,
    Backend,
    Capabilities,
    read_text,
    total_rail_power,
)
from edgecl.telemetry.backends.hwmon import DEFAULT_HWMON_GLOBS, HwmonBackend
from edgecl.telemetry.backends.jtop import JtopBackend, jtop_total_power_w
from edgecl.telemetry.backends.nvml import NvmlBackend
from edgecl.telemetry.backends.psutil import PsutilBackend
from edgecl.telemetry.backends.rapl import DEFAULT_POWERCAP_ROOT, RaplBackend, rapl_fix
from edgecl.telemetry.backends.torch_cuda import TorchCudaBackend

__all__ = [
    "BACKENDS",
    "CPU_S",
    "CUDA_ALLOCATED_MB",
    "CUDA_RESERVED_MB",
    "DEFAULT_HWMON_GLOBS",
    "DEFAULT_POWERCAP_ROOT",
    "DEVICE_MEMORY_MB",
    "ENERGY_J",
    "FIGURES",
    "POWER_BACKENDS",
    "POWER_W",
    "RSS_MB",
    "Backend",
    "Capabilities",
    "Detection",
    "HwmonBackend",
    "JtopBackend",
    "NvmlBackend",
    "PsutilBackend",
    "RaplBackend",
    "TorchCudaBackend",
    "describe_backends",
    "detect",
    "detect_backends",
    "jtop_total_power_w",
    "rapl_fix",
    "read_text",
    "total_rail_power",
]

# ----------------------------------------------------------------------------------------- detection

BACKENDS: dict[str, type[Backend]] = {
    "jtop": JtopBackend,
    "hwmon": HwmonBackend,
    "nvml": NvmlBackend,
    "rapl": RaplBackend,
    "psutil": PsutilBackend,
    "torch_cuda": TorchCudaBackend,
}
"""Every backend by name, in autodetection order."""


def _build(
    name: str,
    *,
    pid: int | None = None,
    include_children: bool = False,
    hwmon_root: str | Path | None = None,
    rapl_root: str | Path | None = None,
    jtop_client: Any | None = None,
    nvml_module: Any | None = None,
    nvml_index: int | str | None = None,
    cuda_device: int | str | None = None,
) -> Backend:
    """Construct backend ``name`` from the detection options.

    The sysfs backends get this package's ``read_text`` (looked up at call time), so replacing
    ``edgecl.telemetry.backends.read_text`` simulates root-only files for every detection path.
    """
    if name == "jtop":
        return JtopBackend(client=jtop_client)
    if name == "hwmon":
        return HwmonBackend(root=hwmon_root, reader=read_text)
    if name == "nvml":
        return NvmlBackend(index=nvml_index, nvml=nvml_module)
    if name == "rapl":
        return RaplBackend(root=rapl_root or DEFAULT_POWERCAP_ROOT, reader=read_text)
    if name == "psutil":
        return PsutilBackend(pid=pid, include_children=include_children)
    if name == "torch_cuda":
        return TorchCudaBackend(device=cuda_device)
    raise ValueError(f"unknown telemetry backend {name!r}; known: {', '.join(BACKENDS)}")


def _why_not(backend: Backend) -> str:
    """One line: why an unavailable backend measures nothing (the reasons of its primary figures)."""
    caps = backend.capabilities()
    reasons = dict.fromkeys(r for f in backend.primary if (r := caps.reason(f)))
    return "; ".join(reasons) or "unavailable"


@dataclass
class Detection:
    """The backends to sample, and why each other backend was left out (for null reasons and doctor)."""

    backends: list[Backend]
    rejected: dict[str, str]
    """Backend name -> why it is not used."""

    def describe(self) -> list[dict[str, Any]]:
        """Every backend considered: ``name, available, used, measures, cannot, detail`` (or ``reason``)."""
        used = [{**b.describe(), "used": True} for b in self.backends]
        left = [{"name": n, "available": False, "used": False, "reason": r} for n, r in self.rejected.items()]
        return used + left


def detect(names: Sequence[str] | None = None, **options: Any) -> Detection:
    """Autodetect the available backends (``names=None``) or build the forced list (``detect_backends``)."""
    if names is not None:
        chosen: list[Backend] = []
        for name in names:
            backend = _build(name, **options)
            if not backend.available():
                raise ValueError(f"telemetry backend {name!r} is not available here: {_why_not(backend)}")
            chosen.append(backend)
        return Detection(chosen, {})
    chosen, rejected = [], {}
    for name in BACKENDS:
        if name == "hwmon" and any(b.name == "jtop" for b in chosen):
            rejected[name] = "not needed: jtop reads the same INA3221 sensors"
            continue
        backend = _build(name, **options)
        if backend.available():
            chosen.append(backend)
        else:
            rejected[name] = _why_not(backend)
            backend.close()
    return Detection(chosen, rejected)


def detect_backends(names: Sequence[str] | None = None, **options: Any) -> list[Backend]:
    """Available backends in autodetection order (jtop, else hwmon; nvml; rapl; psutil; torch_cuda), or the
    forced ``names`` (``ValueError`` for an unknown or unavailable one).

    Options: ``pid, include_children, hwmon_root, rapl_root, jtop_client, nvml_module, nvml_index,
    cuda_device``.
    """
    return detect(names, **options).backends


def describe_backends(names: Sequence[str] | None = None, **options: Any) -> list[dict[str, Any]]:
    """For ``edgecl doctor``: every backend, whether it is available, what it measures or why not."""
    out = []
    for name in names if names is not None else BACKENDS:
        backend = _build(name, **options)
        try:
            out.append(backend.describe())
        finally:
            backend.close()
    return out
