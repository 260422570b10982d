"""Jetson board power read from the INA3221 hwmon/iio files (no jtop service needed)."""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgecl.telemetry.backends.base import (
    POWER_W,
    Backend,
    Capabilities,
    Reader,
    _caps,
    read_text,
    total_rail_power,
)

DEFAULT_HWMON_GLOBS = ("/sys/bus/i2c/devices/*/hwmon/hwmon*", "/sys/bus/i2c/devices/*/iio:device*")


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
