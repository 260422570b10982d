"""NVIDIA GPU energy counter, power and device memory through NVML (nvidia-ml-py)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, ClassVar

from edgecl.telemetry.backends.base import (
    _MIB,
    DEVICE_MEMORY_MB,
    ENERGY_J,
    FIGURES,
    POWER_W,
    Backend,
    Capabilities,
    _caps,
)


class NvmlBackend(Backend):
    """NVIDIA GPU energy counter (mJ, Volta+) or power (instantaneous field, else ``nvmlDeviceGetPowerUsage``)
    and device memory in use. NOT_SUPPORTED (e.g. on Jetson) makes that figure "no sensor", never 0.
    """

    name: ClassVar[str] = "nvml"
    primary: ClassVar[tuple[str, ...]] = ("energy_counter", "power_w", "device_memory")

    def __init__(self, index: int | str | None = None, nvml: Any | None = None) -> None:
        self.index = index
        self._nvml: Any = nvml  # the pynvml module (or a stand-in), imported lazily when None
        self._handle: Any = None
        self._probed = False
        self._counter = False
        self._power_mode: str | None = None  # "instant" | "usage"
        self._memory = False
        self._reasons: dict[str, str] = {}
        self._device = ""

    def _error_text(self, exc: BaseException) -> str:
        """``NOT_SUPPORTED`` for that NVML error code, else the error's own text."""
        code = getattr(exc, "value", None)
        if self._nvml is not None and code == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
            return "NOT_SUPPORTED"
        return f"{type(exc).__name__}: {exc}"

    def _resolve_handle(self) -> Any:
        """Handle of ``index``, else of the first CUDA_VISIBLE_DEVICES entry (index or UUID), else GPU 0."""
        nvml = self._nvml
        index = self.index
        if index is None:
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            index = first or 0
        if isinstance(index, str) and not index.isdigit():
            return nvml.nvmlDeviceGetHandleByUUID(index.encode())
        return nvml.nvmlDeviceGetHandleByIndex(int(index))

    def _probe(self) -> None:
        """Initialise NVML and find out once which figures this device supports."""
        if self._probed:
            return
        self._probed = True
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._resolve_handle()
        except Exception as exc:
            why = f"NVML unavailable ({self._error_text(exc)})"
            self._reasons = dict.fromkeys(FIGURES, why)
            self._handle = None
            return
        nvml, h = self._nvml, self._handle
        try:
            name = nvml.nvmlDeviceGetName(h)
            self._device = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            self._device = "NVIDIA GPU"
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(h)
            self._counter = True
        except Exception as exc:
            self._reasons["energy_counter"] = f"NVML total energy: {self._error_text(exc)} on this device"
        if self._instant_power_mw() is not None:
            self._power_mode = "instant"
        else:
            try:
                nvml.nvmlDeviceGetPowerUsage(h)
                self._power_mode = "usage"
            except Exception as exc:
                self._reasons["power_w"] = f"NVML power: {self._error_text(exc)} on this device"
        try:
            nvml.nvmlDeviceGetMemoryInfo(h)
            self._memory = True
        except Exception as exc:
            self._reasons["device_memory"] = f"NVML memory: {self._error_text(exc)} on this device"

    def _instant_power_mw(self) -> float | None:
        """``NVML_FI_DEV_POWER_INSTANT`` in mW (Ampere+ report a 1-s average from GetPowerUsage), or None."""
        nvml = self._nvml
        field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field_id is None or not hasattr(nvml, "nvmlDeviceGetFieldValues"):
            return None
        try:
            value = nvml.nvmlDeviceGetFieldValues(self._handle, [field_id])[0]
            if int(value.nvmlReturn) != 0:
                return None
            return float(value.value.uiVal)
        except Exception:
            return None

    def capabilities(self) -> Capabilities:
        """Energy counter, power and device memory, each as far as this device supports it."""
        self._probe()
        detail = ""
        if self._handle is not None:
            power = {"instant": "instantaneous power field", "usage": "nvmlDeviceGetPowerUsage"}
            parts = ["total-energy counter" if self._counter else "", power.get(self._power_mode or "", "")]
            detail = f"{self._device}: " + ", ".join(p for p in parts if p)
        return _caps(
            self.name,
            detail,
            self._reasons,
            power_w=self._power_mode is not None,
            energy_counter=self._counter,
            device_memory=self._memory,
        )

    def read(self) -> dict[str, float]:
        """Cumulative energy in J (counter), power in W, device memory used in MiB: whichever is supported."""
        self._probe()
        nvml, h = self._nvml, self._handle
        out: dict[str, float] = {}
        if h is None:
            return out
        if self._counter:
            with contextlib.suppress(Exception):
                out[ENERGY_J] = float(nvml.nvmlDeviceGetTotalEnergyConsumption(h)) / 1000.0
        if self._power_mode == "instant":
            mw = self._instant_power_mw()
            if mw is not None:
                out[POWER_W] = mw / 1000.0
        elif self._power_mode == "usage":
            with contextlib.suppress(Exception):
                out[POWER_W] = float(nvml.nvmlDeviceGetPowerUsage(h)) / 1000.0
        if self._memory:
            with contextlib.suppress(Exception):
                out[DEVICE_MEMORY_MB] = float(nvml.nvmlDeviceGetMemoryInfo(h).used) / _MIB
        return out

    def close(self) -> None:
        """Shut NVML down if it was initialised."""
        if self._handle is not None and self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._handle = None
            self._probed = False
