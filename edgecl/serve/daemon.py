"""The ``edgecl serve`` process: umask, the app, uvicorn, and the systemd readiness/watchdog protocol.

``READY=1`` goes out once uvicorn listens (``/healthz`` answers; ``/readyz`` turns 200 when the backbone is
loaded, and ``STATUS=`` says so); ``WATCHDOG=1`` every half ``WatchdogSec=`` while the event loop answers
within :data:`LOOP_TIMEOUT_S` and the training worker thread lives; ``STOPPING=1`` when SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import uvicorn

from edgecl.serve.app import create_app
from edgecl.serve.config import ServeSettings
from edgecl.serve.context import ServeContext
from edgecl.serve.notify import SystemdNotifier, Watchdog, watchdog_interval

__all__ = ["LOOP_TIMEOUT_S", "UMASK", "health_problem", "run_daemon"]

log = logging.getLogger("edgecl.serve")

UMASK = 0o027
"""Added to the process umask: files the daemon writes are never group-writable or other-readable."""
LOOP_TIMEOUT_S = 10.0
"""The event loop must run a no-op within this many seconds to count as alive."""


def health_problem(ctx: ServeContext, loop: asyncio.AbstractEventLoop | None) -> str | None:
    """None when the daemon is alive (event loop answers, worker thread runs), else what is wrong."""
    worker = ctx.worker
    if worker.init_error:
        return f"the training worker failed to initialise: {worker.init_error}"
    if not worker.alive:
        return "the training worker thread stopped"
    if loop is not None:
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(LOOP_TIMEOUT_S)
        except Exception as err:
            return f"the event loop did not answer within {LOOP_TIMEOUT_S:.0f} s ({type(err).__name__})"
    return None


class NotifyingServer(uvicorn.Server):
    """uvicorn's server, telling systemd when it is ready, alive and stopping."""

    def __init__(self, config: uvicorn.Config, ctx: ServeContext, notifier: SystemdNotifier) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.notifier = notifier
        self.watchdog: Watchdog | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start as uvicorn does, then send READY=1 and start the watchdog."""
        await super().startup(sockets)
        if not self.started:
            return
        loop = asyncio.get_running_loop()
        self.notifier.notify("READY=1", f"STATUS=serving on {self.config.host}:{self.config.port}")
        interval = watchdog_interval()
        if interval is not None:
            self.watchdog = Watchdog(self.notifier, interval / 2, lambda: self._check(loop))
            self.watchdog.start()
            log.info("systemd watchdog: pinging every %.1f s", interval / 2)

    def _check(self, loop: asyncio.AbstractEventLoop) -> str | None:
        problem = health_problem(self.ctx, loop)
        if problem is None and self.ctx.worker.ready.is_set():
            current = self.ctx.worker.current()
            predictor = self.ctx.holder.get()
            state = "idle" if current is None else f"training job {current[0]}"
            self.notifier.notify(
                f"STATUS=ready, {state}, model version {predictor.version if predictor else 0}"
            )
        return problem

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop the watchdog, send STOPPING=1, then shut down as uvicorn does."""
        if self.watchdog is not None:  # joined off the loop: its health check may be waiting on the loop
            await asyncio.to_thread(self.watchdog.stop)
        self.notifier.notify("STOPPING=1", "STATUS=stopping: finishing the current training step")
        await super().shutdown(sockets)


def run_daemon(settings: ServeSettings, log_level: str = "info", **uvicorn_options: Any) -> None:
    """Serve ``settings`` until SIGTERM/SIGINT (the worker stops at a step boundary and checkpoints)."""
    os.umask(os.umask(0) | UMASK)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        access_log=log_level == "debug",
        **uvicorn_options,
    )
    notifier = SystemdNotifier()
    try:
        NotifyingServer(config, app.state.ctx, notifier).run()
    finally:
        notifier.close()
