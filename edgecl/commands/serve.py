"""``edgecl serve``: run the daemon (REST API, task store, training worker) on this device."""

from __future__ import annotations

import argparse
import logging
from typing import Any

_LIMIT_FLAGS = (
    ("--max-request-mb", "max_request_mb", float, 512.0, "largest request body in MB"),
    ("--max-images-per-task", "max_images", int, 20_000, "images in one uploaded task"),
    ("--max-image-pixels", "max_image_pixels", int, 4096 * 4096, "width x height of one image"),
    ("--max-archive-members", "max_members", int, 25_000, "entries in one uploaded archive"),
)


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser = subparsers.add_parser(
        "serve",
        help="run the daemon: REST API for tasks, training jobs and predictions",
        description=(
            "Serve the edgecl REST API (docs at /docs and in the README's REST API section). "
            "Settings: flag, then the EDGECL_* "
            "environment variable, then the env file, then the profile. Every route except /healthz needs "
            "'Authorization: Bearer <token>': EDGECL_TOKEN, else EDGECL_TOKEN_FILE, else DATA_DIR/token "
            "(created with mode 0600 on first start; its path is logged)."
        ),
    )
    parser.add_argument(
        "--profile", metavar="NAME|PATH", help="device profile (EDGECL_PROFILE; default: autodetect)"
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="state folder (EDGECL_DATA_DIR; default: profile's)"
    )
    parser.add_argument("--host", metavar="ADDR", help="bind address (EDGECL_HOST; default 127.0.0.1)")
    parser.add_argument("--port", metavar="N", help="TCP port (EDGECL_PORT; default 8470)")
    parser.add_argument("--memory-budget-mb", metavar="MB", help="memory budget (EDGECL_MEMORY_BUDGET_MB)")
    parser.add_argument("--weights", metavar="FILE", help="backbone weights file (EDGECL_WEIGHTS)")
    parser.add_argument(
        "--env-file",
        metavar="FILE",
        default=None,
        help="KEY=VALUE settings read after the environment (default /etc/edgecl/edgecl.env; '' for none)",
    )
    parser.add_argument(
        "--allow-random-backbone",
        action="store_true",
        help="run with a randomly initialised ViT when no weights are configured (tests and benchmarks only)",
    )
    parser.add_argument(
        "--allow-known-classes",
        action="store_true",
        help="accept uploads with classes an earlier task already has (default: rejected with 409)",
    )
    for flag, dest, kind, default, text in _LIMIT_FLAGS:
        parser.add_argument(flag, dest=dest, type=kind, default=default, help=f"{text} (default {default:g})")
    parser.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=2,
        help="uploads received at once; more get 429 with Retry-After (default 2)",
    )
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="share of each class held out (0.1)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the settings, build the app and serve until SIGTERM/SIGINT."""
    from edgecl.data.ingest import IngestLimits
    from edgecl.serve import resolve_settings
    from edgecl.serve.config import DEFAULT_ENV_FILE
    from edgecl.serve.daemon import run_daemon

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits = IngestLimits(
        max_images=args.max_images, max_members=args.max_members, max_image_pixels=args.max_image_pixels
    )
    settings = resolve_settings(
        profile=args.profile,
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        memory_budget_mb=args.memory_budget_mb,
        weights=args.weights,
        env_file=DEFAULT_ENV_FILE if args.env_file is None else args.env_file,
        allow_random_backbone=args.allow_random_backbone,
        allow_known_classes=args.allow_known_classes,
        limits=limits,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_concurrent_uploads=args.max_concurrent_uploads,
        eval_fraction=args.eval_fraction,
    )
    log = logging.getLogger("edgecl.serve")
    for key, value in settings.describe().items():
        log.info("%s: %s", key, value)
    run_daemon(settings, args.log_level)
    return 0
