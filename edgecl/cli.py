"""``edgecl`` command line: one subcommand per module in :mod:`edgecl.commands`.

Each command module exposes ``register(subparsers)`` (adds its parser and sets ``func``) and keeps its
own imports lazy, so ``edgecl --help`` stays fast on a Jetson.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

COMMANDS = ("train", "bench", "serve", "export", "predict", "doctor", "plan", "fleet")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="edgecl",
        description="On-device continual learning: CPS-Prompt with DPCT on a frozen ViT, in a memory budget",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"edgecl.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"edgecl.commands.{name}":
                continue  # command not built in this version
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgecl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"edgecl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_after(code: int) -> NoReturn:
    """End the process with ``code``; once torch is loaded, skip C++ static destructors (``os._exit``).

    torch's (and its CUDA wheel's) static destructors fault ~120 MB of library code pages in while the
    process exits (measured here: ``import torch, timm`` peaks at 751 MB, then 873 MB during exit), which
    would lift the process's lifetime peak -- what ``time``, cgroups and ``ru_maxrss`` report -- above a
    memory budget after the work is done. Python's own exit handlers still run and stdio is flushed first.
    """
    if "torch" not in sys.modules:
        raise SystemExit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def run() -> NoReturn:
    """The ``edgecl`` console script: :func:`main`, then :func:`exit_after`."""
    exit_after(main())


if __name__ == "__main__":
    run()
