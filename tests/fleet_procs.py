"""Start the fleet's processes on loopback with free ports, through ``edgecl fleet server|device|run``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

EDGECL = [sys.executable, "-m", "edgecl", "fleet"]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Until something accepts on ``port`` (fails early when ``proc`` died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port} after {timeout_s} s")


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group we started (Flower's children included), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # children left in the group
            os.killpg(p.pid, signal.SIGKILL)


@contextmanager
def fleet_processes(
    tmp: Path, devices: Sequence[Sequence[str]], env: dict[str, str] | None = None
) -> Iterator[int]:
    """``edgecl fleet server`` and one ``edgecl fleet device`` per entry of ``devices`` (its extra flags);
    yields the SuperLink's port. Logs go to ``tmp/superlink.log`` and ``tmp/device-<i>.log``."""
    home = tmp / "flwr-home"  # Flower's installed apps and state: here, not in ~/.flwr
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), **(env or {})}
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = (tmp / log).open("wb")
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        link = start(
            [*EDGECL, "server", "--insecure", "--host", "127.0.0.1", "--port", str(port)], "superlink.log"
        )
        wait_port(port, 90, link)
        for i, flags in enumerate(devices):
            args = [
                *EDGECL,
                "device",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
            ]
            start([*args, *flags], f"device-{i}.log")
        yield port
    finally:
        stop(procs)
