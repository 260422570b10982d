"""The systemd notify protocol (``sd_notify(3)``) and a liveness watchdog, for ``Type=notify`` units.

The daemon sends ``READY=1`` once it accepts connections, ``STATUS=`` lines as it loads, ``WATCHDOG=1``
every half ``WatchdogSec=`` while its health check passes (the event loop answers and the training worker
thread runs), and ``STOPPING=1`` when it shuts down. A check that fails stops the pings, so systemd kills and
restarts a wedged daemon after ``WatchdogSec=``. Outside systemd (no ``$NOTIFY_SOCKET``) all of it is a no-op.
The protocol is a datagram per message to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

__all__ = ["SystemdNotifier", "Watchdog", "watchdog_interval"]

log = logging.getLogger("edgecl.serve")


class SystemdNotifier:
    """Sends notify messages to ``$NOTIFY_SOCKET``; silent (and ``enabled`` false) without one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether systemd (or a stand-in) listens."""
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE``) as one message; False when not under systemd or it failed."""
        if not self._address:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.setblocking(False)  # never stall the event loop on a busy receiver
                self._sock.sendto(payload, self._address)
            except OSError as err:
                if not self._warned:
                    log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), err)
                    self._warned = True
                return False
        return True

    def close(self) -> None:
        """Close the socket."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """``WatchdogSec=`` in seconds when systemd expects pings from this process (``sd_watchdog_enabled``)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return usec / 1e6


class Watchdog:
    """A thread sending ``WATCHDOG=1`` every ``interval_s`` while ``check()`` returns None (healthy);
    a string from ``check()`` is the problem: it is logged and sent as ``STATUS=``, and no ping goes out."""

    def __init__(self, notifier: SystemdNotifier, interval_s: float, check: Callable[[], str | None]) -> None:
        self.notifier = notifier
        self.interval_s = interval_s
        self.check = check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgecl-watchdog", daemon=True)
        self.pings = 0
        self.problem: str | None = None

    def start(self) -> None:
        """Start pinging."""
        self._thread.start()

    def stop(self) -> None:
        """Stop pinging (shutdown)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                problem = self.check()
            except Exception as err:  # a broken check is a failed check
                problem = f"health check raised {type(err).__name__}: {err}"
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
                self.pings += 1
            elif problem != self.problem:
                log.error("unhealthy, watchdog pings stop (systemd restarts the service): %s", problem)
                self.notifier.notify(f"STATUS=unhealthy: {problem}")
            self.problem = problem
            self._stop.wait(self.interval_s)
