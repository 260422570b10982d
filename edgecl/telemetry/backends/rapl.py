"""CPU package and DRAM energy from the Intel/AMD RAPL powercap counters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgecl.telemetry.backends.base import ENERGY_J, Backend, Capabilities, Reader, _caps, read_text

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"


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
