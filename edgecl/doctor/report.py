"""The doctor's verdicts: :class:`Check`, the :class:`Report` of all checks, the options and the system
paths the checks read, and the text form of a report.

Imports no other doctor module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}

DEFAULT_ENV_FILE = "/etc/edgecl/edgecl.env"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470


@dataclass
class Check:
    """One verdict: ``status`` is ok|warn|fail; a warn/fail ``message`` ends with the fix (also ``fix``)."""

    name: str
    status: str
    message: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _RANK:
            raise ValueError(f"check status must be one of {sorted(_RANK)}, got {self.status!r}")
        if self.fix and self.fix not in self.message:
            self.message = f"{self.message}. Fix: {self.fix}"


@dataclass
class DoctorOptions:
    """What to check; None means "as serve would resolve it" (environment, env file, profile, default)."""

    profile: str | None = None
    data_dir: str | None = None
    host: str | None = None
    port: int | None = None
    weights: str | None = None
    env_file: str | None = DEFAULT_ENV_FILE
    """KEY=VALUE file read after the process environment; None or "" reads none."""


@dataclass
class SystemPaths:
    """Files the checks read; tests point them at fakes to simulate a Jetson or a RAPL machine."""

    tegra_release: Path = Path("/etc/nv_tegra_release")
    device_tree_model: Path = Path("/proc/device-tree/model")
    jtop_socket: Path = Path("/run/jtop.sock")
    powercap_root: Path = Path("/sys/class/powercap")
    cpuinfo: Path = Path("/proc/cpuinfo")


@dataclass
class Report:
    """All checks plus the settings they were run with."""

    checks: list[Check]
    settings: dict[str, Any]

    @property
    def status(self) -> str:
        """The worst status of any check."""
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    @property
    def exit_code(self) -> int:
        """1 when a check failed (a blocking problem), else 0."""
        return 1 if self.status == FAIL else 0

    def get(self, name: str) -> Check:
        """The check called ``name`` (``KeyError`` if it did not run)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form printed by ``edgecl doctor --json``."""
        counts = {s: sum(c.status == s for c in self.checks) for s in _RANK}
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "counts": counts,
            "settings": self.settings,
            "checks": [asdict(c) for c in self.checks],
        }


def format_report(report: Report) -> str:
    """Human-readable report: one line per check, then a summary."""
    width = max(len(c.name) for c in report.checks)
    s = report.settings
    lines = [
        f"edgecl doctor: profile {s['profile']}, data dir {s['data_dir']}, {s['host']}:{s['port']}, "
        f"env file {s['env_file']['path'] or '-'} ({s['env_file']['status']})"
    ]
    for c in report.checks:
        lines.append(f"  {c.status.upper() if c.status != OK else 'ok':<4}  {c.name:<{width}}  {c.message}")
    counts = report.to_dict()["counts"]
    verdict = "blocking problems: fix the FAIL lines" if report.exit_code else "ready"
    lines.append(f"{counts[FAIL]} failed, {counts[WARN]} warnings, {counts[OK]} ok: {verdict}")
    return "\n".join(lines)
