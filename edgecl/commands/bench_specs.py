"""The bench's spec helper: the bench's parsed arguments -> one :class:`~edgecl.runner.RunSpec` per method.

``python -m edgecl.commands.bench_specs REQUEST OUT`` does the bench parent's torch-dependent work once in
a child, so the parent never imports torch (importing it costs ~0.7 GB of RSS, and a child's
``getrusage`` high-water mark starts at its parent's): the per-method specs
(:func:`~edgecl.commands.train.spec_from_args`, profile honoured), the registered methods and the machine
description. It lives with the commands because it reads the ``train`` command's flags: the
:mod:`edgecl.bench` library below the commands never imports them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from edgecl.bench.runs import error_summary, tail_lines

__all__ = ["build_specs", "prepare_specs"]


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a killed child leaves no half file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def build_specs(request: dict[str, Any]) -> dict[str, Any]:
    """Spec dicts per method from the bench's parsed arguments (``request["args"]``).

    ``request["methods"]`` may contain ``"all"`` (every registered method). The CPS/DPCT convenience flags
    (``--reduction-rate`` ...) go only to methods whose config has that field; ``--set`` goes to every
    method and ``request["method_sets"][method]`` (``KEY=VALUE`` items) to one, both strictly (an unknown
    option fails that method's run, naming it).
    """
    import argparse
    import dataclasses

    from edgecl.commands.train import METHOD_FLAGS, method_options_from_args, spec_from_args
    from edgecl.config import parse_assignments
    from edgecl.methods.registry import get_method_class, list_methods
    from edgecl.runner import machine_info

    args = argparse.Namespace(**request["args"])
    specs: dict[str, Any] = {}
    dropped: dict[str, list[str]] = {}
    wanted = [m for name in request["methods"] for m in (list_methods() if name == "all" else [name])]
    set_keys = set(parse_assignments(args.overrides))
    for method in dict.fromkeys(wanted):
        spec = spec_from_args(args, method)
        spec.tasks = spec.tasks or 5
        try:
            fields = set(get_method_class(method).Config.model_fields)
        except ValueError:  # unknown method: its run fails and says so
            fields = None
        for flag in METHOD_FLAGS:
            given = getattr(args, flag, None) is not None
            if fields is not None and given and flag not in fields and flag not in set_keys:
                spec.method_options.pop(flag, None)
                dropped.setdefault(method, []).append(flag)
        one = argparse.Namespace(overrides=request.get("method_sets", {}).get(method, []))
        spec.method_options.update(method_options_from_args(one, method, flags=False))
        specs[method] = dataclasses.asdict(spec)
    return {"specs": specs, "dropped": dropped, "methods": list_methods(), "machine": machine_info()}


def prepare_specs(request: dict[str, Any], work_dir: Path, python: str | None = None) -> dict[str, Any]:
    """Per-method spec dicts, registered methods and the machine, from a helper child (this module).

    Raises ``ValueError`` with the helper's error (a bad profile, say)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    req_path, out_path = work_dir / "specs_request.json", work_dir / "specs.json"
    req_path.write_text(json.dumps(request, indent=1))
    out_path.unlink(missing_ok=True)
    cmd = [python or sys.executable, "-m", "edgecl.commands.bench_specs", str(req_path), str(out_path)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    data = _load_json(out_path) or {}
    req_path.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)
    if proc.returncode != 0 or data.get("status") != "ok":
        tail = tail_lines(proc.stdout + proc.stderr)
        why = error_summary(proc.returncode, tail, data.get("error"))
        raise ValueError(f"could not build the run specs: {why}")
    return data


def main(argv: list[str] | None = None) -> int:
    """``REQUEST OUT``: write the specs (or the error) to OUT; exit 0, or 1 with the error written."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edgecl.commands.bench_specs REQUEST_JSON OUT_JSON", file=sys.stderr)
        return 2
    request_arg, out = args[0], Path(args[1])
    try:
        request = json.loads(Path(request_arg).read_text())
        _write(out, {"status": "ok", **build_specs(request)})
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        _write(out, {"status": "failed", "error": error, "traceback": traceback.format_exc()})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
