"""Bearer-token authentication and the request-size limit, as plain ASGI middleware.

Every HTTP route needs ``Authorization: Bearer <token>`` except ``GET /healthz``; the check happens before
the body is read, so an unauthenticated upload costs nothing. Bodies larger than the limit are refused with
413: at once when ``Content-Length`` says so, otherwise as soon as the streamed bytes pass the limit.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BearerAuthMiddleware", "BodySizeLimitMiddleware", "RequestTooLarge", "PUBLIC_PATHS"]

PUBLIC_PATHS = frozenset({"/healthz"})


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BearerAuthMiddleware:
    """401 for any HTTP request outside :data:`PUBLIC_PATHS` without the right bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("an empty bearer token would let everyone in")
        self.app = app
        self._token = token.encode()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _send_json(
            send,
            401,
            {"detail": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"},
            [(b"www-authenticate", b'Bearer realm="edgecl"')],
        )


class RequestTooLarge(Exception):
    """The request body passed the configured size limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes (limit --max-request-mb)")
        self.limit = limit


class BodySizeLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "invalid Content-Length"}, [])
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, {"detail": str(RequestTooLarge(self.max_bytes))}, [])
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
                if received > self.max_bytes:
                    too_large = True
                    raise RequestTooLarge(self.max_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started, replied
            if too_large and not app_started:
                # the app answers the exception (e.g. with a 500): answer 413 instead, once
                if message["type"] == "http.response.start" and not replied:
                    replied = True
                    await _send_json(send, 413, {"detail": str(RequestTooLarge(self.max_bytes))}, [])
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
                await _send_json(send, 413, {"detail": str(err)}, [])
