"""``edgecl doctor``: can this machine run edgecl as configured, and if not, what exactly to fix.

Each check returns ``ok``, ``warn`` (works, but something is missing or degraded) or ``fail`` (``edgecl
serve`` or training cannot work as configured). Every warn/fail message ends with the fix. Settings are
resolved the way ``edgecl serve`` resolves them: command-line flag, then the ``EDGECL_*`` environment
variable, then ``/etc/edgecl/edgecl.env`` (the service's EnvironmentFile), then the profile, then the
built-in default, so ``sudo -u edgecl edgecl doctor`` checks what the systemd service will use.
"""

from __future__ import annotations

import errno
import getpass
import json
import os
import platform
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecl.settings import SettingLookup, read_env_file

if TYPE_CHECKING:
    from edgecl.profiles import Profile

__all__ = [
    "DEFAULT_ENV_FILE",
    "Check",
    "DoctorOptions",
    "Report",
    "SystemPaths",
    "default_profile_name",
    "format_report",
    "read_env_file",
    "run_doctor",
]

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}

DEFAULT_ENV_FILE = "/etc/edgecl/edgecl.env"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
NO_WEIGHTS = "none: pass --weights FILE, nothing can be downloaded offline"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
"""Formats :func:`edgecl.backbone.load_state_dict_file` and timm's ``.npz`` loader accept."""
MIN_FREE_MB = 1024
"""Less free space than this in the data dir is a warning (checkpoints, datasets and exports live there)."""
PACKAGES = ("torch", "torchvision", "timm", "onnxruntime", "numpy", "psutil", "fastapi", "jetson-stats")
REQUIRED_PACKAGES = ("torch", "torchvision", "timm")


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


# ------------------------------------------------------------------------------------------ settings


def _is_jetson(paths: SystemPaths) -> bool:
    return paths.tegra_release.exists()


def default_profile_name(paths: SystemPaths | None = None, cuda: bool | None = None) -> str:
    """The shipped profile for this machine: Jetson Orin Nano, x86 with CUDA, or CPU."""
    paths = paths or SystemPaths()
    if _is_jetson(paths):
        return "jetson-orin-nano-8gb"
    if cuda is None:
        cuda = shutil.which("nvidia-smi") is not None
    return "x86-cuda" if cuda else "cpu"


# -------------------------------------------------------------------------------------------- checks


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
    if not _is_jetson(paths):
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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _install_fix(jetson: bool) -> str:
    if jetson:
        return (
            "install the L4T PyTorch for the system python3 (sudo pip3 install --index-url "
            "https://pypi.jetson-ai-lab.io/jp6/cu126 torch==2.8.0 torchvision==0.23.0), then rerun "
            "deploy/install.sh; never PyPI's torch on a Jetson"
        )
    return "pip install -c constraints.txt . (or rerun deploy/install.sh)"


def check_packages(jetson: bool, engine: str | None) -> Check:
    """Versions of the libraries edgecl runs on; torch, torchvision and timm are required."""
    versions = {name: _version(name) for name in PACKAGES}
    try:
        import edgecl

        versions["edgecl"] = edgecl.__version__
    except ImportError:  # pragma: no cover - we are running inside edgecl
        versions["edgecl"] = None
    missing = [p for p in REQUIRED_PACKAGES if versions[p] is None]
    if engine == "onnxruntime" and versions["onnxruntime"] is None:
        missing.append("onnxruntime")
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    if missing:
        return Check(
            "packages",
            FAIL,
            f"missing {', '.join(missing)} ({shown})",
            fix=_install_fix(jetson),
            details=versions,
        )
    return Check("packages", OK, shown, details=versions)


def check_cuda(jetson: bool, device: str | None) -> Check:
    """Whether torch sees a CUDA device; a ``device: cuda`` profile without one is blocking."""
    details: dict[str, Any] = {"available": False}
    try:
        import torch
    except Exception as err:  # an L4T wheel with a missing shared library raises OSError, not ImportError
        return Check(
            "cuda",
            FAIL,
            f"torch cannot be imported ({type(err).__name__}: {err})",
            fix=_install_fix(jetson),
            details={"available": False, "error": str(err)},
        )
    details["torch"] = torch.__version__
    details["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        details.update(
            available=True,
            device_count=torch.cuda.device_count(),
            name=torch.cuda.get_device_name(index),
            capability=f"{props.major}.{props.minor}",
            total_memory_mb=round(props.total_memory / 2**20),
        )
        return Check(
            "cuda",
            OK,
            f"{details['name']} (sm_{props.major}{props.minor}, {details['total_memory_mb']} MB), "
            f"torch {torch.__version__} built for CUDA {torch.version.cuda}",
            details=details,
        )
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
        fix = (
            _install_fix(True)
            if jetson
            else "install a CUDA build of torch (constraints.txt pins one) and a matching NVIDIA driver"
        )
    elif jetson:
        why = "torch is a CUDA build but sees no GPU"
        fix = (
            "add the user to the video and render groups (sudo usermod -aG video,render USER; the service "
            "gets them from SupplementaryGroups=) and, in Docker, run with --runtime nvidia"
        )
    else:
        why = f"torch is built for CUDA {torch.version.cuda} but sees no GPU"
        fix = (
            "check `nvidia-smi` works and the driver supports that CUDA version; in Docker pass --gpus all "
            "(nvidia-container-toolkit)"
        )
    if device == "cuda":
        return Check("cuda", FAIL, f"the profile needs CUDA but {why}", fix=fix, details=details)
    return Check("cuda", OK, f"no CUDA ({why}): training and inference run on the CPU", details=details)


def _float_or_none(value: Any, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number of MB, got {value!r}") from err
    if number <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return number


def check_profile(
    name: str, source: str, budget_override: Any, budget_source: str | None
) -> tuple[Check, Profile | None]:
    """Load the profile; report its device and memory budget (the env override wins) against the RAM."""
    from edgecl.profiles import list_profiles, load_profile

    try:
        profile = load_profile(name)
    except (ValueError, FileNotFoundError, OSError) as err:
        return (
            Check(
                "profile",
                FAIL,
                f"profile {name!r} ({source}) cannot be loaded: {err}",
                fix=(
                    "pass --profile NAME|PATH or set EDGECL_PROFILE (and EDGECL_PROFILES_DIR); available: "
                    f"{', '.join(list_profiles()) or 'none found'}"
                ),
                details={"name": name, "source": source},
            ),
            None,
        )
    import psutil

    try:
        override = _float_or_none(budget_override, "EDGECL_MEMORY_BUDGET_MB")
    except ValueError as err:
        return (
            Check(
                "profile",
                FAIL,
                str(err),
                fix="set EDGECL_MEMORY_BUDGET_MB to a number of MB, or empty for the profile's budget",
            ),
            profile,
        )
    budget = override if override is not None else profile.memory_budget_mb
    vm = psutil.virtual_memory()
    total_mb, avail_mb = vm.total / 2**20, vm.available / 2**20
    details = {
        "name": profile.name,
        "source": profile.source,
        "selected_by": source,
        "device": profile.device,
        "precision": profile.precision,
        "method": profile.method,
        "backbone": profile.backbone,
        "inference_engine": profile.inference_engine,
        "memory_budget_mb": budget,
        "memory_budget_source": budget_source if override is not None else "profile",
    }
    budget_text = "no memory budget" if budget is None else f"memory budget {budget:.0f} MB"
    msg = f"{profile.name} ({profile.source}): device {profile.device}, {profile.precision}, {budget_text}"
    if budget is not None and budget > total_mb:
        return (
            Check(
                "profile",
                WARN,
                f"{msg}, more than this machine's {total_mb:.0f} MB RAM",
                fix="lower memory_budget_mb in the profile or EDGECL_MEMORY_BUDGET_MB",
                details=details,
            ),
            profile,
        )
    if budget is not None and budget > avail_mb:
        return (
            Check(
                "profile",
                WARN,
                f"{msg}, but only {avail_mb:.0f} MB RAM is available now",
                fix=(
                    "stop other services (on a Jetson `sudo systemctl set-default multi-user.target` frees "
                    "the desktop's ~0.8 GB) or lower the budget"
                ),
                details=details,
            ),
            profile,
        )
    return Check("profile", OK, msg, details=details), profile


def _describe_weights(path: Path) -> str:
    """Cheap integrity check of a weights file's container; raises ValueError when it is damaged."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("truncated safetensors file (no header)")
            (size,) = struct.unpack("<Q", head)
            if size > path.stat().st_size - 8:
                raise ValueError("truncated safetensors file (header larger than the file)")
            header = json.loads(fh.read(size))
        tensors = [k for k in header if k != "__metadata__"]
        return f"safetensors, {len(tensors)} tensors"
    if suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise ValueError("not a valid .npz (zip) archive")
        return "numpy .npz archive"
    with path.open("rb") as fh:
        fh.read(1)
    return f"{suffix[1:]} checkpoint"


def check_weights(weights: str | None, source: str | None) -> Check:
    """Backbone weights must be a local file: an offline device cannot download them."""
    if not weights:
        return Check(
            "weights",
            WARN,
            f"backbone weights: {NO_WEIGHTS}",
            fix="copy the backbone file to the device and pass --weights FILE or set EDGECL_WEIGHTS",
            details={"path": None},
        )
    path = Path(weights).expanduser()
    details: dict[str, Any] = {"path": str(path), "source": source}
    fix = "pass --weights FILE or set EDGECL_WEIGHTS to a .safetensors, .pth/.pt/.bin/.ckpt or .npz file"
    if not path.is_file():
        return Check(
            "weights", FAIL, f"backbone weights {path} ({source}) not found", fix=fix, details=details
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        return Check(
            "weights",
            FAIL,
            f"backbone weights {path}: unsupported format '{path.suffix}'",
            fix=fix,
            details=details,
        )
    try:
        kind = _describe_weights(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return Check("weights", FAIL, f"backbone weights {path} unreadable: {err}", fix=fix, details=details)
    details.update(size_mb=round(path.stat().st_size / 2**20, 1), format=kind)
    return Check("weights", OK, f"{path} ({kind}, {details['size_mb']} MB)", details=details)


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


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def check_data_dir(data_dir: str, source: str) -> Check:
    """The data dir must be a writable folder (a temp file is made and removed) with room for checkpoints."""
    path = Path(data_dir).expanduser()
    details: dict[str, Any] = {"path": str(path), "source": source}
    fix = f"sudo install -d -o edgecl -g edgecl -m 0750 {path} (or pass --data-dir / set EDGECL_DATA_DIR)"
    if path.exists() and not path.is_dir():
        return Check(
            "data_dir", FAIL, f"data dir {path} exists but is not a folder", fix=fix, details=details
        )
    if not path.exists():
        base = _existing_ancestor(path)
        details["exists"] = False
        if base.is_dir() and os.access(base, os.W_OK | os.X_OK):
            return Check(
                "data_dir",
                WARN,
                f"data dir {path} ({source}) does not exist yet",
                fix=f"mkdir -p {path}, or let the service's StateDirectory= create /var/lib/edgecl",
                details=details,
            )
        return Check(
            "data_dir",
            FAIL,
            f"data dir {path} does not exist and {base} is not writable",
            fix=fix,
            details=details,
        )
    details["exists"] = True
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".edgecl-doctor-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return Check(
            "data_dir",
            FAIL,
            f"data dir {path} is not writable ({err.strerror or err})",
            fix=f"sudo chown -R edgecl:edgecl {path} (the user running edgecl), or pass --data-dir",
            details=details,
        )
    free_mb = shutil.disk_usage(path).free / 2**20
    details["free_mb"] = round(free_mb)
    if free_mb < MIN_FREE_MB:
        return Check(
            "data_dir",
            WARN,
            f"data dir {path} is writable but only {free_mb:.0f} MB is free",
            fix="free disk space or move the data dir to a larger disk (EDGECL_DATA_DIR)",
            details=details,
        )
    return Check("data_dir", OK, f"{path} writable, {free_mb:.0f} MB free", details=details)


def _answers_healthz(host: str, port: int) -> bool:
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in connect:
        connect = f"[{connect}]"
    try:
        with urllib.request.urlopen(f"http://{connect}:{port}/healthz", timeout=0.5) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_port(host: str, port: int) -> Check:
    """Bind ``host:port`` the way uvicorn does (SO_REUSEADDR) to see whether serve could listen there."""
    details: dict[str, Any] = {"host": host, "port": port}
    fix = f"stop what listens there (`ss -ltnp 'sport = :{port}'`) or choose another --port / EDGECL_PORT"
    if not 0 < port < 65536:
        return Check(
            "port", FAIL, f"port {port} is out of range", fix="use a port in 1024-65535", details=details
        )
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return Check(
            "port",
            FAIL,
            f"bind address {host!r} does not resolve ({err})",
            fix="set EDGECL_HOST",
            details=details,
        )
    family, socktype, proto, _, addr = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as err:
            details["errno"] = err.errno
            if err.errno == errno.EADDRINUSE:
                if _answers_healthz(host, port):
                    details["healthz"] = True
                    return Check(
                        "port",
                        WARN,
                        f"{host}:{port} is in use by a server answering /healthz (edgecl already running?)",
                        fix=f"fine if that is the edgecl service; otherwise {fix}",
                        details=details,
                    )
                return Check(
                    "port", FAIL, f"{host}:{port} is in use by another program", fix=fix, details=details
                )
            if err.errno == errno.EACCES:
                return Check(
                    "port",
                    FAIL,
                    f"no permission to bind port {port}",
                    fix="use a port >= 1024",
                    details=details,
                )
            if err.errno == errno.EADDRNOTAVAIL:
                return Check(
                    "port",
                    FAIL,
                    f"{host} is not an address of this machine",
                    fix="set EDGECL_HOST to 127.0.0.1, 0.0.0.0 or one of this machine's addresses",
                    details=details,
                )
            return Check("port", FAIL, f"cannot bind {host}:{port}: {err}", fix=fix, details=details)
    return Check("port", OK, f"{host}:{port} is free", details=details)


def check_token(token: str | None, token_file: str | None, source: str | None) -> Check:
    """The daemon needs a bearer token; a token file is preferred over EDGECL_TOKEN in the environment."""
    if token:
        return Check(
            "token",
            OK,
            "bearer token from EDGECL_TOKEN (prefer EDGECL_TOKEN_FILE: the environment is visible to others)",
            details={"from": "EDGECL_TOKEN"},
        )
    fix = (
        "create one: (umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE), "
        "owned by the service user, and set EDGECL_TOKEN_FILE=FILE"
    )
    if not token_file:
        return Check(
            "token", WARN, "no EDGECL_TOKEN_FILE or EDGECL_TOKEN set", fix=fix, details={"from": None}
        )
    path = Path(token_file)
    details = {"from": "EDGECL_TOKEN_FILE", "path": str(path), "source": source}
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        return Check(
            "token", WARN, f"token file {path} unreadable ({err.strerror or err})", fix=fix, details=details
        )
    if not text:
        return Check("token", WARN, f"token file {path} is empty", fix=fix, details=details)
    mode = stat.S_IMODE(path.stat().st_mode)
    details["mode"] = f"{mode:04o}"
    if mode & 0o077:
        return Check(
            "token",
            WARN,
            f"token file {path} has mode {mode:04o}, readable by others",
            fix=f"chmod 0600 {path}",
            details=details,
        )
    return Check("token", OK, f"token file {path} (mode {mode:04o})", details=details)


# ----------------------------------------------------------------------------------------------- run


def run_doctor(
    options: DoctorOptions | None = None,
    environ: Mapping[str, str] | None = None,
    paths: SystemPaths | None = None,
) -> Report:
    """Run every check for this machine; ``environ`` defaults to ``os.environ``."""
    options = options or DoctorOptions()
    environ = os.environ if environ is None else environ
    paths = paths or SystemPaths()
    env_file: dict[str, str] = {}
    env_file_path = options.env_file or ""
    env_file_note = "not used"
    if env_file_path:
        try:
            env_file = read_env_file(env_file_path)
            env_file_note = "read"
        except FileNotFoundError:
            env_file_note = "absent"
        except (OSError, UnicodeDecodeError) as err:
            env_file_note = f"unreadable ({getattr(err, 'strerror', None) or err})"
    cfg = SettingLookup(environ, env_file, env_file_path)
    jetson = _is_jetson(paths)

    profile_name = cfg.get("profile", options.profile, "--profile", "EDGECL_PROFILE")
    if profile_name is None:
        profile_name = default_profile_name(paths)
        cfg.sources["profile"] = "autodetected for this machine"
    budget = cfg.get("memory_budget_mb", None, "", "EDGECL_MEMORY_BUDGET_MB")
    weights = cfg.get("weights", options.weights, "--weights", "EDGECL_WEIGHTS")
    host = cfg.get("host", options.host, "--host", "EDGECL_HOST") or DEFAULT_HOST
    port_value = cfg.get("port", options.port, "--port", "EDGECL_PORT")
    token = cfg.get("token", None, "", "EDGECL_TOKEN")
    token_file = cfg.get("token_file", None, "", "EDGECL_TOKEN_FILE")
    data_dir = cfg.get("data_dir", options.data_dir, "--data-dir", "EDGECL_DATA_DIR")
    profiles_dir = cfg.get("profiles_dir", None, "", "EDGECL_PROFILES_DIR")

    checks = [check_platform(paths), check_jetson(paths), check_user(), check_python()]
    saved_profiles_dir = os.environ.get("EDGECL_PROFILES_DIR")
    if profiles_dir:  # the profile loader reads EDGECL_PROFILES_DIR from the process environment
        os.environ["EDGECL_PROFILES_DIR"] = str(profiles_dir)
    try:
        profile_check, profile = check_profile(
            str(profile_name), cfg.sources["profile"], budget, cfg.sources.get("memory_budget_mb")
        )
    finally:
        if profiles_dir:
            if saved_profiles_dir is None:
                os.environ.pop("EDGECL_PROFILES_DIR", None)
            else:
                os.environ["EDGECL_PROFILES_DIR"] = saved_profiles_dir
    checks.append(check_packages(jetson, profile.inference_engine if profile else None))
    checks.append(check_cuda(jetson, profile.device if profile else None))
    checks.append(profile_check)
    if weights is None and profile is not None and profile.weights:
        weights, cfg.sources["weights"] = profile.weights, "profile"
    checks.append(check_weights(weights, cfg.sources.get("weights")))
    checks.append(check_telemetry())
    if platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}:
        checks.append(check_rapl(paths))
    if jetson:
        checks.append(check_jtop_socket(paths))
    if data_dir is None:
        data_dir = profile.data_dir if profile is not None else "/var/lib/edgecl"
        cfg.sources["data_dir"] = "profile" if profile is not None else "default"
    checks.append(check_data_dir(str(data_dir), cfg.sources["data_dir"]))
    try:
        port = int(port_value) if port_value is not None else DEFAULT_PORT
    except (TypeError, ValueError):
        checks.append(
            Check("port", FAIL, f"port {port_value!r} is not a number", fix="set EDGECL_PORT to e.g. 8470")
        )
    else:
        checks.append(check_port(str(host), port))
    checks.append(check_token(token, token_file, cfg.sources.get("token_file")))

    settings = {
        "profile": str(profile_name),
        "data_dir": str(data_dir),
        "host": str(host),
        "port": port_value if port_value is not None else DEFAULT_PORT,
        "weights": weights,
        "token_file": token_file,
        "env_file": {"path": env_file_path or None, "status": env_file_note},
        "sources": dict(sorted(cfg.sources.items())),
    }
    return Report(checks=checks, settings=settings)


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
