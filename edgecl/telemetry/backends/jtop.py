"""Jetson board power and unified RAM through jetson-stats' jtop service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from edgecl.telemetry.backends.base import (
    DEVICE_MEMORY_MB,
    FIGURES,
    POWER_W,
    Backend,
    Capabilities,
    _caps,
    total_rail_power,
)


def jtop_total_power_w(power: Mapping[str, Any]) -> tuple[float, str] | None:
    """Total board power in W from jtop's ``jetson.power`` dict (rails in mW), and the rail it came from.

    Uses the rails (same rule as jtop's ``total_power``); ``power['tot']`` only when there are no rails.
    """
    rails: dict[str, float] = {}
    for rail, values in (power.get("rail") or {}).items():
        if isinstance(values, Mapping) and values.get("online", True) and values.get("power") is not None:
            rails[str(rail)] = float(values["power"])
    total = total_rail_power(rails)
    if total is not None:
        return total[0] / 1000.0, total[1]
    tot = power.get("tot")
    if isinstance(tot, Mapping) and tot.get("power") is not None:
        return float(tot["power"]) / 1000.0, f"tot ({tot.get('name', 'jtop')})"
    return None


class JtopBackend(Backend):
    """Jetson board power (VDD_IN / POM_5V_IN / sum of rails) and RAM in use, via jetson-stats' jtop service.

    jtop refreshes at its own ``interval_s``; the sampler integrates power over its own timestamps because
    jtop's ``avg`` is a running ``(power + old_avg) / 2``, not a time average.
    """

    name: ClassVar[str] = "jtop"
    primary: ClassVar[tuple[str, ...]] = ("power_w", "device_memory")

    def __init__(self, client: Any | None = None, interval_s: float = 0.5) -> None:
        self._client = client
        self._owns_client = client is None
        self.interval_s = interval_s
        self._error: str | None = None

    def _jetson(self) -> Any | None:
        """The jtop client, started lazily on first use (None with ``_error`` set when that fails)."""
        if self._client is not None or self._error is not None:
            return self._client
        try:
            from jtop import jtop  # type: ignore[import-not-found]
        except ImportError:
            self._error = "jetson-stats is not installed (pip install 'edgecl[jetson]')"
            return None
        try:
            client = jtop(interval=self.interval_s)
            client.start()
        except Exception as exc:  # jtop raises JtopException when jtop.service is not running
            self._error = f"jtop service not reachable ({exc}); start it: sudo systemctl restart jtop.service"
            return None
        self._client = client
        return client

    def _ram_used_mb(self, jetson: Any) -> float | None:
        """RAM in use in MiB from ``jetson.memory['RAM']['used']`` (kB), when jtop reports it."""
        ram = (getattr(jetson, "memory", None) or {}).get("RAM")
        if isinstance(ram, Mapping) and ram.get("used") is not None:
            return float(ram["used"]) / 1024.0
        return None

    def capabilities(self) -> Capabilities:
        """Power when jtop lists rails; RAM (unified CPU/GPU memory) when it reports it."""
        try:
            jetson = self._jetson()
            if jetson is None:
                why = self._error or "jtop unavailable"
                return _caps(self.name, reasons=dict.fromkeys(FIGURES, why))
            total = jtop_total_power_w(getattr(jetson, "power", None) or {})
            ram = self._ram_used_mb(jetson)
        except Exception as exc:
            return _caps(self.name, reasons=dict.fromkeys(FIGURES, f"jtop read failed: {exc}"))
        reasons = {
            "power_w": "jtop reports no power rails on this board",
            "energy_counter": "jtop has no energy counter (power is integrated)",
            "device_memory": "jtop reports no RAM figure",
        }
        detail = f"board power from {total[1]}" if total else ""
        return _caps(self.name, detail, reasons, power_w=total is not None, device_memory=ram is not None)

    def read(self) -> dict[str, float]:
        """Board power in W and RAM in use in MiB."""
        jetson = self._jetson()
        if jetson is None:
            return {}
        out: dict[str, float] = {}
        total = jtop_total_power_w(getattr(jetson, "power", None) or {})
        if total is not None:
            out[POWER_W] = total[0]
        ram = self._ram_used_mb(jetson)
        if ram is not None:
            out[DEVICE_MEMORY_MB] = ram
        return out

    def close(self) -> None:
        """Close the jtop connection if this backend opened it."""
        if self._owns_client and self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
