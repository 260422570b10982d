"""``edgecl doctor``: can this machine run edgecl as configured, and if not, what exactly to fix.

Each check returns ``ok``, ``warn`` (works, but something is missing or degraded) or ``fail`` (``edgecl
serve`` or training cannot work as configured). Every warn/fail message ends with the fix. Settings are
resolved the way ``edgecl serve`` resolves them: command-line flag, then the ``EDGECL_*`` environment
variable, then ``/etc/edgecl/edgecl.env`` (the service's EnvironmentFile), then the profile, then the
built-in default, so ``sudo -u edgecl edgecl doctor`` checks what the systemd service will use.

Modules, one per family of checks: ``report`` (verdicts and the report), ``system`` (machine, user,
interpreter), ``packages`` (libraries, CUDA), ``profile`` (profile, budget, weights), ``telemetry`` (sensors),
``service`` (data dir, port, token) and ``run`` (settings resolution and the order of the checks). The doctor
imports torch, FastAPI and the telemetry backends only inside the checks that need them, so it still runs
(and says what is missing) where they are broken.
"""

from __future__ import annotations

from edgecl.doctor.packages import PACKAGES, REQUIRED_PACKAGES, check_cuda, check_packages
from edgecl.doctor.profile import NO_WEIGHTS, WEIGHT_SUFFIXES, check_profile, check_weights
from edgecl.doctor.report import (
    DEFAULT_ENV_FILE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FAIL,
    OK,
    WARN,
    Check,
    DoctorOptions,
    Report,
    SystemPaths,
    format_report,
)
from edgecl.doctor.run import run_doctor
from edgecl.doctor.service import MIN_FREE_MB, check_data_dir, check_port, check_token
from edgecl.doctor.system import (
    check_jetson,
    check_platform,
    check_python,
    check_user,
    default_profile_name,
)
from edgecl.doctor.telemetry import check_jtop_socket, check_rapl, check_telemetry
from edgecl.settings import read_env_file

__all__ = [
    "DEFAULT_ENV_FILE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "FAIL",
    "MIN_FREE_MB",
    "NO_WEIGHTS",
    "OK",
    "PACKAGES",
    "REQUIRED_PACKAGES",
    "WARN",
    "WEIGHT_SUFFIXES",
    "Check",
    "DoctorOptions",
    "Report",
    "SystemPaths",
    "check_cuda",
    "check_data_dir",
    "check_jetson",
    "check_jtop_socket",
    "check_packages",
    "check_platform",
    "check_port",
    "check_profile",
    "check_python",
    "check_rapl",
    "check_telemetry",
    "check_token",
    "check_user",
    "check_weights",
    "default_profile_name",
    "format_report",
    "read_env_file",
    "run_doctor",
]
