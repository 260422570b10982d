"""Checks of the machine itself: platform, Jetson model and L4T release, the user, the interpreter; and
the shipped profile that suits this machine.
"""

from __future__ import annotations

import getpass
import os
import platform
import re
import shutil
import sys
from pathlib import Path

from edgecl.doctor.report import OK, WARN, Check, SystemPaths


def is_jetson(paths: SystemPaths) -> bool:
    """Whether this is a Jetson (L4T writes /etc/nv_tegra_release)."""
    return paths.tegra_release.exists()


def default_profile_name(paths: SystemPaths | None = None, cuda: bool | None = None) -> str:
    """The shipped profile for this machine: Jetson Orin Nano, x86 with CUDA, or CPU."""
    paths = paths or SystemPaths()
    if is_jetson(paths):
        return "jetson-orin-nano-8gb"
    if cuda is None:
        cuda = shutil.which("nvidia-smi") is not None
    return "x86-cuda" if cuda else "cpu"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpu_model(paths: SystemPaths) -> str:
    text = _read(paths.cpuinfo) or ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, flags=re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def check_platform(paths: SystemPaths) -> Check:
    """OS, CPU, cores and RAM (what the memory budget has to fit in)."""
    import psutil

    vm = psutil.virtual_memory()
    details = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(paths),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_total_mb": round(vm.total / 2**20),
        "ram_available_mb": round(vm.available / 2**20),
    }
    msg = (
        f"{details['system']} {details['machine']}, {details['cpu_model']}, "
        f"{details['cores_logical']} cores, "
        f"{details['ram_total_mb']} MB RAM ({details['ram_available_mb']} MB available)"
    )
    return Check("platform", OK, msg, details=details)


def check_jetson(paths: SystemPaths) -> Check:
    """Whether this is a Jetson, its L4T release (/etc/nv_tegra_release) and model (device tree)."""
    if not is_jetson(paths):
        return Check("jetson", OK, f"not a Jetson (no {paths.tegra_release})", details={"is_jetson": False})
    release_text = (_read(paths.tegra_release) or "").splitlines()
    first = release_text[0] if release_text else ""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    l4t = f"{m.group(1)}.{m.group(2)}" if m else None
    model = (_read(paths.device_tree_model) or "").replace("\x00", "").strip() or None
    details = {"is_jetson": True, "l4t": l4t, "model": model, "nv_tegra_release": first.strip()}
    return Check("jetson", OK, f"{model or 'Jetson (model unknown)'}, L4T R{l4t or '?'}", details=details)


def check_user() -> Check:
    """Who runs the checks: permission results (data dir, GPU nodes, jtop socket) are that user's."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.geteuid())
    try:
        import grp

        groups = sorted({grp.getgrgid(g).gr_name for g in os.getgroups()})
    except (ImportError, KeyError, OSError):
        groups = []
    details = {"user": user, "uid": os.geteuid(), "groups": groups}
    if os.geteuid() == 0:
        return Check(
            "user",
            WARN,
            "running as root: file, GPU and socket checks pass for root but may fail for the service user",
            fix="run as the service user, e.g. `sudo -u edgecl /opt/edgecl/venv/bin/edgecl doctor`",
            details=details,
        )
    return Check("user", OK, f"running as {user} (groups: {', '.join(groups) or 'none'})", details=details)


def check_python() -> Check:
    """The interpreter edgecl runs on (pyproject requires >= 3.10, so an older one cannot get here)."""
    version = platform.python_version()
    details = {"version": version, "executable": sys.executable}
    return Check("python", OK, f"Python {version} ({sys.executable})", details=details)
