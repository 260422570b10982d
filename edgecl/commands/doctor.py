"""``edgecl doctor``: check this machine and the configuration the daemon would run with."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``doctor`` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="check device, libraries, profile, weights, telemetry, data dir and port",
        description=(
            "Check that this machine can run edgecl as configured. Settings are resolved like "
            "`edgecl serve`: flag, EDGECL_* environment variable, the service's env file, profile, default. "
            "Exits 1 when a check fails (a blocking problem); each warning and failure says how to fix it."
        ),
    )
    parser.add_argument("--profile", metavar="NAME|PATH", help="profile to check (default: EDGECL_PROFILE)")
    parser.add_argument("--data-dir", metavar="DIR", help="data dir to check (default: EDGECL_DATA_DIR)")
    parser.add_argument(
        "--host", metavar="ADDR", help="bind address to check (default: EDGECL_HOST or 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, metavar="N", help="port to check (default: EDGECL_PORT or 8470)")
    parser.add_argument("--weights", metavar="FILE", help="backbone weights file (default: EDGECL_WEIGHTS)")
    parser.add_argument(
        "--env-file",
        metavar="FILE",
        default=None,
        help="KEY=VALUE file read after the environment (default /etc/edgecl/edgecl.env; '' for none)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks, print them, and return 1 on a blocking problem."""
    from edgecl.doctor import DEFAULT_ENV_FILE, DoctorOptions, format_report, run_doctor

    options = DoctorOptions(
        profile=args.profile,
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        weights=args.weights,
        env_file=DEFAULT_ENV_FILE if args.env_file is None else args.env_file,
    )
    report = run_doctor(options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(format_report(report))
    return report.exit_code
