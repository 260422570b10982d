"""Checks of the sensors: which telemetry backends measure what here, RAPL readability, the jtop socket."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from edgecl.doctor.report import OK, WARN, Check, SystemPaths


def _load_describe_backends() -> Callable[[], list[dict[str, Any]]]:
    try:
        from edgecl.telemetry import describe_backends  # type: ignore[attr-defined]
    except ImportError:
        from edgecl.telemetry.backends import describe_backends
    return describe_backends


def check_telemetry() -> Check:
    """Which telemetry backends work here and what each measures; no power backend means no energy figures."""
    try:
        describe = _load_describe_backends()
        backends = describe()
    except Exception as err:  # telemetry must never stop the doctor
        return Check(
            "telemetry",
            WARN,
            f"telemetry backends could not be listed ({type(err).__name__}: {err})",
            fix="reinstall edgecl (pip install .) so edgecl.telemetry is complete",
        )
    usable = [b for b in backends if b.get("available")]
    power = [b for b in usable if {"power_w", "energy_counter"} & set(b.get("measures", []))]
    parts = [f"{b['name']} ({', '.join(b.get('measures', []))})" for b in usable]
    power_sources = [str(b["name"]) for b in power]
    details = {
        "available": [b["name"] for b in usable],
        "power_sources": power_sources,
        "power_sensor": bool(power),
        "backends": backends,
    }
    measured = "; ".join(parts) or "no backend available"
    if power:
        return Check("telemetry", OK, f"{measured}; power from {', '.join(power_sources)}", details=details)
    reasons = []
    for b in backends:
        if b["name"] in ("jtop", "hwmon", "nvml", "rapl"):
            why = (b.get("cannot") or {}).get("power_w") or b.get("reason") or "unavailable"
            reasons.append(f"{b['name']}: {why}")
    return Check(
        "telemetry",
        WARN,
        f"{measured}; no power sensor: energy per task is reported as null ({'; '.join(reasons)})",
        fix=(
            "on a Jetson install jetson-stats (jtop service); on x86 make RAPL readable (see the rapl check) "
            "or use an NVIDIA GPU with NVML energy support; otherwise energy cannot be measured here"
        ),
        details=details,
    )


_RAPL_FIX = (
    "energy_uj is root-only since Linux 5.10 (CVE-2020-8694): `sudo chmod 0444 "
    "/sys/class/powercap/intel-rapl:*/energy_uj` (until reboot) or the udev rule in the README "
    "(section 'Deploy on a Jetson Orin Nano')"
)


def check_rapl(paths: SystemPaths) -> Check:
    """Intel/AMD RAPL package energy counters: present, and readable by this user."""
    files = sorted(paths.powercap_root.glob("intel-rapl:*/energy_uj"))
    if not files:
        return Check(
            "rapl",
            OK,
            f"no RAPL zones under {paths.powercap_root} (virtual machine, or intel_rapl not loaded)",
            details={"zones": [], "readable": []},
        )
    readable, unreadable = [], []
    for f in files:
        try:
            int(f.read_text().strip())
            readable.append(str(f.parent.name))
        except (OSError, ValueError):
            unreadable.append(str(f.parent.name))
    details = {"zones": [f.parent.name for f in files], "readable": readable}
    if unreadable:
        return Check(
            "rapl", WARN, f"RAPL zones {', '.join(unreadable)} not readable", fix=_RAPL_FIX, details=details
        )
    return Check("rapl", OK, f"RAPL readable: {', '.join(readable)}", details=details)


def check_jtop_socket(paths: SystemPaths) -> Check:
    """The jetson-stats service socket that the jtop telemetry backend talks to."""
    sock = paths.jtop_socket
    details: dict[str, Any] = {"path": str(sock), "exists": sock.exists()}
    if not sock.exists():
        return Check(
            "jtop",
            WARN,
            f"{sock} missing: the jtop service is not running, so no power rails are read",
            fix=(
                "sudo pip3 install -U jetson-stats && sudo systemctl restart jtop.service, then rerun "
                "deploy/install.sh (it adds edgecl to the jtop group); in Docker mount "
                "-v /run/jtop.sock:/run/jtop.sock"
            ),
            details=details,
        )
    is_socket = stat.S_ISSOCK(sock.stat().st_mode)
    access = os.access(sock, os.R_OK | os.W_OK)
    details.update(is_socket=is_socket, accessible=access)
    if not is_socket:
        return Check(
            "jtop",
            WARN,
            f"{sock} is not a socket",
            fix="sudo systemctl restart jtop.service",
            details=details,
        )
    if not access:
        return Check(
            "jtop",
            WARN,
            f"{sock} exists but this user cannot use it",
            fix=(
                "sudo usermod -aG jtop $USER (the service gets it from SupplementaryGroups=); in Docker add "
                "--group-add $(getent group jtop | cut -d: -f3)"
            ),
            details=details,
        )
    return Check("jtop", OK, f"{sock} reachable", details=details)
