"""The console script's exit: exit handlers run and output flushed, torch's C++ static destructors skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import atexit, sys
    import torch
    from edgecl.cli import exit_after
    atexit.register(lambda: print("atexit ran", flush=True))
    hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    print("HWM", hwm)
    sys.stdout.write("unflushed tail")  # no newline, no flush: exit_after must flush it
    exit_after(int(sys.argv[1]))
    """
)


def _child(code: int) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run CHILD in a fresh interpreter; return it and its ``ru_maxrss`` (KB) as the kernel saw it at exit."""
    script = (
        "import json, resource, subprocess, sys\n"
        f"p = subprocess.run([sys.executable, '-c', {CHILD!r}, sys.argv[1]],"
        " capture_output=True, text=True)\n"
        "print(json.dumps([p.returncode, p.stdout, p.stderr,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, str(code)], capture_output=True, text=True, env=env)
    rc, stdout, stderr, maxrss = json.loads(out.stdout)
    return subprocess.CompletedProcess([], rc, stdout, stderr), int(maxrss)


def test_exit_after_keeps_the_exit_code_output_and_atexit_handlers() -> None:
    proc, _ = _child(3)
    assert proc.returncode == 3, proc.stderr
    assert "unflushed tail" in proc.stdout and "atexit ran" in proc.stdout


def test_exit_after_does_not_raise_the_lifetime_peak() -> None:
    """The kernel's lifetime peak (what ``time``/cgroups see) stays at the peak the process had while working;
    a normal exit of the torch wheel faults ~120 MB of destructor code in (751 -> 873 MB measured)."""
    proc, maxrss_kb = _child(0)
    hwm_kb = int(next(line for line in proc.stdout.splitlines() if line.startswith("HWM")).split()[1])
    assert maxrss_kb - hwm_kb < 20 * 1024, (hwm_kb, maxrss_kb)


def test_exit_after_without_torch_is_a_plain_system_exit() -> None:
    """Without torch loaded (``edgecl --help``-like paths) the exit is an ordinary ``SystemExit``."""
    code = (
        "import sys\nfrom edgecl.cli import exit_after\n"
        "try:\n    exit_after(4)\n"
        "except SystemExit as e:\n    print('SystemExit', e.code, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.strip() == "SystemExit 4 False", res.stderr
