"""Bearer-token authentication (a FastAPI dependency), its rate-limited failure log, and the body-size limit.

Every route except ``GET /healthz`` depends on :func:`require_token`: routers declare it once
(``APIRouter(dependencies=[Security(require_token)])``), no route handles tokens itself, and the OpenAPI
schema carries the ``bearer`` security scheme. Multipart bodies are parsed inside the handlers, after the
dependency, so an unauthenticated upload costs nothing; JSON bodies, which FastAPI reads before any
dependency, are capped at a few KB by :class:`BodySizeLimitMiddleware`, and a validation error without the
token answers 401 (see :mod:`edgecl.serve.errors`).

Failed attempts are logged without the token, at most one line per client per 10 s with the count.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "PUBLIC_PATHS",
    "AuthFailureLog",
    "BodySizeLimitMiddleware",
    "RequestTooLarge",
    "TokenAuth",
    "require_token",
    "unauthorized_response",
]

log = logging.getLogger("edgecl.serve")

PUBLIC_PATHS = frozenset({"/healthz"})
UNAUTHORIZED = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgecl"'}

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="The daemon's token (EDGECL_TOKEN, EDGECL_TOKEN_FILE or DATA_DIR/token)",
)


class AuthFailureLog:
    """Logs failed authentications: the first from a client at once, then at most one line per
    ``interval_s`` with how many failed since the last line. The token is never logged."""

    def __init__(
        self,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
        max_clients: int = 1024,
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.logger = logger
        self.max_clients = max_clients
        self.total = 0
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[float, int]] = {}
        """client -> (time of its last logged line, failures since then)."""

    def record(self, client: str, path: str) -> bool:
        """Count one failure from ``client``; returns whether a line was logged."""
        now = self.clock()
        with self._lock:
            self.total += 1
            last, pending = self._clients.get(client, (None, 0))
            pending += 1
            if last is not None and now - last < self.interval_s:
                self._clients[client] = (last, pending)
                return False
            self._clients[client] = (now, 0)
            if len(self._clients) > self.max_clients:  # forget clients quiet for a whole interval
                self._clients = {c: v for c, v in self._clients.items() if now - v[0] < self.interval_s}
        if last is None or pending == 1:
            self.logger.warning("authentication failed: %s %s (missing or wrong bearer token)", client, path)
        else:
            self.logger.warning(
                "authentication failed: %s, %d times in the last %.0f s (latest %s)",
                client,
                pending,
                now - last,
                path,
            )
        return True


@dataclass
class TokenAuth:
    """The daemon's bearer token and its failure log (``app.state.auth``)."""

    token: str
    failures: AuthFailureLog

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("an empty bearer token would let everyone in")
        self._expected = self.token.encode()

    def check_header(self, value: str | bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (constant-time compare)."""
        if not value:
            return False
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        scheme, _, credentials = raw.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected)

    def authorized(self, request: Request) -> bool:
        """Whether ``request`` may see anything beyond :data:`PUBLIC_PATHS`."""
        return request.url.path in PUBLIC_PATHS or self.check_header(request.headers.get("authorization"))

    def record_failure(self, request: Request) -> None:
        """Log (rate-limited) a request refused for its token."""
        client = request.client.host if request.client else "unknown client"
        self.failures.record(client, f"{request.method} {request.url.path}")


def _auth(request: Request) -> TokenAuth:
    return request.app.state.auth  # type: ignore[no-any-return]


async def require_token(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme)
) -> None:
    """Dependency of every protected router: 401 unless the request carries the token."""
    auth = _auth(request)  # ``credentials`` declares the scheme in OpenAPI; the check reads the header
    if credentials is not None and auth.check_header(request.headers.get("authorization")):
        return
    auth.record_failure(request)
    raise HTTPException(401, UNAUTHORIZED, headers=CHALLENGE)


def unauthorized_response(request: Request) -> JSONResponse:
    """The 401 answer (and its log entry) for a request refused outside the dependency."""
    _auth(request).record_failure(request)
    return JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers=CHALLENGE)


# ------------------------------------------------------------------------------------------- body size
async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class RequestTooLarge(Exception):
    """The request body passed the size limit of its route."""

    def __init__(self, limit: int, hint: str = "") -> None:
        super().__init__(f"request body larger than {limit} bytes{hint}")
        self.limit = limit


class BodySizeLimitMiddleware:
    """413 (JSON) for request bodies over the limit of their path (``limits``, else ``max_bytes``): at once
    when ``Content-Length`` says so, before anything else looks at the request, otherwise as soon as the
    streamed bytes pass it."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, limits: Mapping[str, int] | None = None, hint: str = ""
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = dict(limits or {})
        self.hint = hint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope.get("path", ""), self.max_bytes)
        hint = self.hint if limit == self.max_bytes else ""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "invalid Content-Length"})
                    return
                if declared > limit:
                    await _send_json(send, 413, {"detail": str(RequestTooLarge(limit, hint))})
                    return
        received = 0
        app_started = False
        too_large = False
        replied = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise RequestTooLarge(limit, hint)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started, replied
            if too_large and not app_started:
                # the app answered the exception its own way: answer 413 instead, once
                if message["type"] == "http.response.start" and not replied:
                    replied = True
                    await _send_json(send, 413, {"detail": str(RequestTooLarge(limit, hint))})
                return
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except RequestTooLarge as err:
            if app_started:
                raise
            if not replied:
                await _send_json(send, 413, {"detail": str(err)})
