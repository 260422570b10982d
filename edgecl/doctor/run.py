"""``run_doctor``: resolve the settings the way ``edgecl serve`` does, then run every check in order."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping

from edgecl.doctor.packages import check_cuda, check_packages
from edgecl.doctor.profile import check_profile, check_weights
from edgecl.doctor.report import DEFAULT_HOST, DEFAULT_PORT, FAIL, Check, DoctorOptions, Report, SystemPaths
from edgecl.doctor.service import check_data_dir, check_port, check_token
from edgecl.doctor.system import (
    check_jetson,
    check_platform,
    check_python,
    check_user,
    default_profile_name,
    is_jetson,
)
from edgecl.doctor.telemetry import check_jtop_socket, check_rapl, check_telemetry
from edgecl.settings import SettingLookup, read_env_file


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
    jetson = is_jetson(paths)

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
    checks.append(check_token(token, token_file, cfg.sources.get("token_file"), str(data_dir)))

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
