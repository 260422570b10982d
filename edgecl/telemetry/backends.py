"""Telemetry backends: one class per sensor family, each saying what it can measure and, if not, why.

``read()`` returns instantaneous values under the key constants below. ``energy_j`` is a cumulative counter
in joules with any origin (wrap-around already unwrapped by the backend): only differences mean anything.
A backend never invents a value: a figure it cannot measure is absent from ``read()`` and carries a reason
in ``capabilities()``, so callers can report ``None`` with that reason instead of a silent 0.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "BACKENDS",
    "CPU_S",
    "CUDA_ALLOCATED_MB",
    "CUDA_RESERVED_MB",
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
    "total_rail_power",
]

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

DEFAULT_HWMON_GLOBS = ("/sys/bus/i2c/devices/*/hwmon/hwmon*", "/sys/bus/i2c/devices/*/iio:device*")
DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
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


# --------------------------------------------------------------------------------------------- Jetson


def total_rail_power(rails: Mapping[str, float]) -> tuple[float, str] | None:
    """Board power from per-rail powers (any unit): ``VDD_IN``, else ``POM_5V_IN``, else the sum of rails."""
    if not rails:
        return None
    upper = {k.upper(): v for k, v in rails.items()}
    for rail in TOTAL_RAILS:
        if rail in upper:
            return upper[rail], rail
    return float(sum(rails.values())), "sum of rails"


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


@dataclass(frozen=True)
class _Rail:
    """One INA3221 channel: either a power file (mW) or a voltage (mV) and a current (mA) file."""

    label: str
    power: Path | None = None
    volt: Path | None = None
    curr: Path | None = None


class HwmonBackend(Backend):
    """Jetson board power read straight from the INA3221 monitor files (when the jtop service is not running).

    Current layout (``hwmon*``): ``in{N}_label``, ``in{N}_input`` mV, ``curr{N}_input`` mA. Older layout
    (``iio:device*``): ``rail_name_{N}``, ``in_power{N}_input`` mW, or ``in_voltage{N}_input`` times
    ``in_current{N}_input``.
    """

    name: ClassVar[str] = "hwmon"
    primary: ClassVar[tuple[str, ...]] = ("power_w",)

    def __init__(
        self, root: str | Path | Sequence[str | Path] | None = None, reader: Reader | None = None
    ) -> None:
        if root is None:
            self.patterns = list(DEFAULT_HWMON_GLOBS)
        elif isinstance(root, (str, Path)):
            self.patterns = [str(root)]
        else:
            self.patterns = [str(r) for r in root]
        self._reader: Reader = reader or read_text
        self._rails: list[_Rail] | None = None
        self._error: str | None = None

    def _label(self, path: Path) -> str:
        return self._reader(path).strip()

    def _discover(self) -> list[_Rail]:
        """Find the INA3221 channels under the configured roots (once)."""
        if self._rails is not None:
            return self._rails
        rails: list[_Rail] = []
        seen: set[str] = set()
        for pattern in self.patterns:
            for d in sorted(Path(p) for p in glob.glob(pattern)):
                if not d.is_dir():
                    continue
                name_file = d / "name"
                if name_file.exists() and "ina3221" not in self._label(name_file).lower():
                    continue
                for rail in self._channels(d):
                    label = rail.label if rail.label not in seen else f"{rail.label}@{d.parent.name}"
                    seen.add(label)
                    rails.append(_Rail(label, rail.power, rail.volt, rail.curr))
        self._rails = rails
        return rails

    def _channels(self, d: Path) -> list[_Rail]:
        """The labelled channels of one device directory, in either layout."""
        out: list[_Rail] = []
        for f in sorted(d.glob("in*_label")):
            m = re.fullmatch(r"in(\d+)_label", f.name)
            if not m:
                continue
            n = m.group(1)
            label = self._label(f)
            volt, curr = d / f"in{n}_input", d / f"curr{n}_input"
            usable = label and label.upper() != "NC" and "sum" not in label.lower()
            if usable and volt.exists() and curr.exists():
                out.append(_Rail(label, volt=volt, curr=curr))
        for f in sorted(d.glob("in_power*_input")):
            m = re.fullmatch(r"in_power(\d+)_input", f.name)
            if m:
                out.append(_Rail(self._rail_name(d, m.group(1)), power=f))
        if not any(r.power for r in out):
            for f in sorted(d.glob("in_voltage*_input")):
                m = re.fullmatch(r"in_voltage(\d+)_input", f.name)
                current = d / f"in_current{m.group(1)}_input" if m else None
                if m and current is not None and current.exists():
                    out.append(_Rail(self._rail_name(d, m.group(1)), volt=f, curr=current))
        return out

    def _rail_name(self, d: Path, n: str) -> str:
        path = d / f"rail_name_{n}"
        return self._label(path) if path.exists() else f"rail{n}"

    def rails_w(self) -> dict[str, float]:
        """Power of every rail in W."""
        out: dict[str, float] = {}
        for rail in self._discover():
            if rail.power is not None:
                out[rail.label] = float(self._reader(rail.power)) / 1000.0
            elif rail.volt is not None and rail.curr is not None:
                out[rail.label] = float(self._reader(rail.volt)) * float(self._reader(rail.curr)) / 1e6
        return out

    def capabilities(self) -> Capabilities:
        """Power when INA3221 channels are found and readable."""
        try:
            rails = self.rails_w()
            total = total_rail_power(rails)
        except PermissionError as exc:
            why = f"INA3221 file not readable ({exc}); run as a user in the right group or chmod 0444 it"
            return _caps(self.name, reasons={"power_w": why})
        except (OSError, ValueError) as exc:
            return _caps(self.name, reasons={"power_w": f"INA3221 read failed: {exc}"})
        if total is None:
            return _caps(self.name, reasons={"power_w": f"no INA3221 files under {', '.join(self.patterns)}"})
        detail = f"rails {', '.join(rails)}; board power from {total[1]}"
        return _caps(self.name, detail, power_w=True)

    def read(self) -> dict[str, float]:
        """Board power in W."""
        total = total_rail_power(self.rails_w())
        return {} if total is None else {POWER_W: total[0]}


# ------------------------------------------------------------------------------------------------ NVML


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


# ------------------------------------------------------------------------------------------------ RAPL


def rapl_fix(path: Path | str) -> str:
    """How to make a root-only RAPL counter readable (Linux >= 5.10, CVE-2020-8694)."""
    return (
        f"RAPL {path} is root-only since Linux 5.10 (CVE-2020-8694): fix with "
        f"`sudo chmod 0444 {Path(path).parent.parent}/intel-rapl:*/energy_uj` (until reboot) or a udev rule, "
        'e.g. /etc/udev/rules.d/99-rapl.rules: ACTION=="add", SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", '
        'RUN+="/bin/chmod og+r %S%p/energy_uj" (or /etc/sysfs.conf: '
        "mode class/powercap/intel-rapl:0/energy_uj = 0444)"
    )


def _zone_order(path: Path) -> list[int]:
    """Sort key of ``intel-rapl:0:1`` -> [0, 1] (numeric, so 10 sorts after 9)."""
    return [int(i) for i in path.name.split(":")[1:] if i.isdigit()]


@dataclass
class _Zone:
    """One RAPL zone's counter with its unwrapping state."""

    label: str
    energy: Path
    max_range_uj: int | None
    last_raw: int | None = None
    total_uj: int = 0


class RaplBackend(Backend):
    """CPU package (and DRAM when present) energy from Intel RAPL powercap counters (also AMD Zen).

    Counters are µJ and wrap at ``max_energy_range_uj``; ``read()`` unwraps them into a cumulative total, so
    it must be called more often than the wrap period (hours at typical package power). ``psys`` and the
    core/uncore sub-zones are skipped because they overlap the package.
    """

    name: ClassVar[str] = "rapl"
    primary: ClassVar[tuple[str, ...]] = ("energy_counter",)

    def __init__(self, root: str | Path = DEFAULT_POWERCAP_ROOT, reader: Reader | None = None) -> None:
        self.root = Path(root)
        self._reader: Reader = reader or read_text
        self._zones: list[_Zone] | None = None
        self._error: str | None = None

    def _discover(self) -> list[_Zone]:
        """Package zones ``intel-rapl:N`` and zones named ``dram`` (top-level or ``intel-rapl:N:M``)."""
        if self._zones is not None:
            return self._zones
        zones: list[_Zone] = []
        names: dict[str, str] = {}
        entries = sorted(self.root.glob("intel-rapl:*"), key=_zone_order)
        for d in entries:
            try:
                names[d.name] = self._reader(d / "name").strip()
            except OSError:
                continue
        for d in entries:
            zone_name = names.get(d.name)
            depth = d.name.count(":")
            if zone_name is None:
                continue
            if depth == 1 and zone_name.startswith("package"):
                label = zone_name
            elif zone_name == "dram":
                parent = names.get(d.name.rsplit(":", 1)[0]) if depth > 1 else None
                label = f"{parent}/dram" if parent else f"dram-{d.name.split(':')[1]}"
            else:
                continue
            try:
                max_range: int | None = int(self._reader(d / "max_energy_range_uj"))
            except (OSError, ValueError):
                max_range = None
            zones.append(_Zone(label, d / "energy_uj", max_range))
        self._zones = zones
        return zones

    def _probe(self) -> None:
        """Read every counter once, so a root-only file is found (and explained) before sampling starts."""
        if self._error is not None or self._zones is not None:
            return
        try:
            zones = self._discover()
            if not zones:
                self._error = f"no RAPL package zones under {self.root} (not x86, or powercap not loaded)"
                return
            self.read()
        except PermissionError as exc:
            self._error = rapl_fix(exc.filename or self.root / "intel-rapl:0" / "energy_uj")
        except (OSError, ValueError) as exc:
            self._error = f"RAPL read failed: {exc}"

    def capabilities(self) -> Capabilities:
        """An energy counter per package (+ dram) when the counters are readable; else the fix."""
        self._probe()
        if self._error is not None:
            return _caps(self.name, reasons={"power_w": self._error, "energy_counter": self._error})
        zones = self._zones or []
        return _caps(
            self.name,
            f"zones {', '.join(z.label for z in zones)} (µJ counters, unwrapped)",
            {"power_w": "RAPL has counters only (energy is read as counter deltas)"},
            energy_counter=True,
        )

    def read(self) -> dict[str, float]:
        """Cumulative package+dram energy in J since this backend's first read, wrap-around unwrapped."""
        total = 0
        for z in self._discover():
            raw = int(self._reader(z.energy))
            if z.last_raw is not None:
                delta = raw - z.last_raw
                if delta < 0:  # the counter wrapped past max_energy_range_uj
                    delta = (z.max_range_uj - z.last_raw + raw) if z.max_range_uj else raw
                z.total_uj += delta
            z.last_raw = raw
            total += z.total_uj
        return {ENERGY_J: total / 1e6} if self._zones else {}


# ------------------------------------------------------------------------------------------- processes


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


class TorchCudaBackend(Backend):
    """Peak CUDA memory of this process's PyTorch allocator, reset at the start of every measured region."""

    name: ClassVar[str] = "torch_cuda"
    primary: ClassVar[tuple[str, ...]] = ("device_memory",)

    def __init__(self, device: int | str | None = None) -> None:
        self.device = device
        self._ok: bool | None = None
        self._error = ""

    def available(self) -> bool:
        """True when torch imports and ``torch.cuda.is_available()``."""
        if self._ok is None:
            try:
                import torch

                self._ok = bool(torch.cuda.is_available())
                self._error = "" if self._ok else "torch.cuda.is_available() is False (no CUDA device)"
            except Exception as exc:
                self._ok, self._error = False, f"torch unavailable: {exc}"
        return self._ok

    def capabilities(self) -> Capabilities:
        """Device memory (this process's allocated/reserved peaks) when CUDA is available."""
        if not self.available():
            return _caps(self.name, reasons={"device_memory": self._error})
        return _caps(self.name, "torch.cuda.max_memory_allocated / max_memory_reserved", device_memory=True)

    def read(self) -> dict[str, float]:
        """Peak allocated and reserved MiB since the last reset."""
        import torch

        return {
            CUDA_ALLOCATED_MB: torch.cuda.max_memory_allocated(self.device) / _MIB,
            CUDA_RESERVED_MB: torch.cuda.max_memory_reserved(self.device) / _MIB,
        }

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats`` (the sampler folds the old peak into open regions first)."""
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)


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
    """Construct backend ``name`` from the detection options."""
    if name == "jtop":
        return JtopBackend(client=jtop_client)
    if name == "hwmon":
        return HwmonBackend(root=hwmon_root)
    if name == "nvml":
        return NvmlBackend(index=nvml_index, nvml=nvml_module)
    if name == "rapl":
        return RaplBackend(root=rapl_root or DEFAULT_POWERCAP_ROOT)
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
