"""Every error the API answers, in one JSON shape (:class:`ErrorBody`), and the handlers that make it so.

* route errors (:class:`~edgecl.data.ingest.UploadRejected`, :class:`~edgecl.store.StoreError`,
  :class:`~edgecl.serve.options.JobConflict`, ``HTTPException``) keep their status and reason;
* request validation (FastAPI's 422) is rewritten to the same shape: a one-line ``detail`` plus one
  ``problems`` entry per offending field (``member`` is its location, e.g. ``body.task_ids.0``);
* 405 lists every method the path allows in ``Allow`` (Starlette names only the first matching route's);
* without a valid token, a 400, 404, 405 or 422 answers 401 instead, so an unauthenticated client learns
  nothing about routes or bodies (``GET /healthz`` excepted);
* anything else is caught by :class:`UnhandledErrorMiddleware`: the traceback is logged with an
  ``error_id``, and the client gets a JSON 500 naming that id, never a ``text/plain`` page.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgecl.data.ingest import UploadRejected
from edgecl.serve.auth import unauthorized_response
from edgecl.store import StoreError

__all__ = [
    "ErrorBody",
    "ProblemItem",
    "UnhandledErrorMiddleware",
    "error_response",
    "error_responses",
    "install_error_handlers",
]

log = logging.getLogger("edgecl.serve")

_MAX_PROBLEMS = 50

DESCRIPTIONS = {
    400: "Malformed request (bad multipart body, JSON that cannot be parsed, bad Content-Length)",
    401: "Missing or wrong bearer token",
    404: "No such task or job",
    409: "Conflicts with the current state (known class, learned task, another method, no model yet)",
    413: "Too large: request body, images, archive members or classes over their limits",
    415: "Wrong content type (uploads are multipart/form-data)",
    422: "Invalid request: the fields, files or options named in `problems`",
    429: "Too many uploads at once; retry after `Retry-After` seconds",
    500: "Internal error; the daemon logged its traceback under `error_id`",
    503: "Not ready yet (the backbone and model are loading); retry shortly",
}


class ProblemItem(BaseModel):
    """One offending member, file or field of a request and why it was refused."""

    member: str = Field(description="archive member, file name, field location or class")
    reason: str


class ErrorBody(BaseModel):
    """The body of every error answer."""

    detail: str = Field(description="what went wrong and what to do")
    problems: list[ProblemItem] | None = Field(
        default=None, description="every offending member, file or field (at most 50)"
    )
    problems_not_listed: int | None = Field(default=None, description="offending items beyond the 50 listed")
    error_id: str | None = Field(default=None, description="500 only: the id of the logged traceback")


def error_response(
    status: int,
    detail: str,
    problems: Iterable[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A JSON error answer in the :class:`ErrorBody` shape."""
    body: dict[str, Any] = {"detail": detail}
    items = [{"member": str(p.get("member", "")), "reason": str(p.get("reason", ""))} for p in problems or []]
    if items:
        body["problems"] = items[:_MAX_PROBLEMS]
        if len(items) > _MAX_PROBLEMS:
            body["problems_not_listed"] = len(items) - _MAX_PROBLEMS
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, headers=headers)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with :class:`ErrorBody` (and its headers where it has any)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": DESCRIPTIONS[code]}
        if code == 401:
            entry["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "description": 'Bearer realm="edgecl"'}
            }
        if code == 429:
            entry["headers"] = {
                "Retry-After": {
                    "schema": {"type": "integer"},
                    "description": "seconds to wait before retrying",
                }
            }
        out[code] = entry
    return out


def _allowed_methods(path: str, routes: Sequence[tuple[re.Pattern[str], Iterable[str]]]) -> list[str]:
    """Every method some route accepts for ``path``."""
    methods: set[str] = set()
    for regex, route_methods in routes:
        if regex.match(path):
            methods |= set(route_methods)
    return sorted(methods)


def _validation_problems(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        out.append({"member": loc or "request", "reason": str(err.get("msg", "invalid"))})
    return out


def install_error_handlers(
    app: FastAPI,
    authorized: Callable[[Request], bool],
    routes: Sequence[tuple[re.Pattern[str], Iterable[str]]],
) -> None:
    """Register the JSON handlers on ``app``; ``authorized(request)`` says whether it carries the token,
    ``routes`` are (path regex, methods) of every route (for ``Allow``)."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code in (400, 404, 405) and not authorized(request):
            return unauthorized_response(request)
        headers = dict(exc.headers or {})
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 405:
            allowed = _allowed_methods(request.url.path, routes)
            headers["Allow"] = ", ".join(allowed)
            detail = (
                f"method {request.method} not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
            )
        elif exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path} (the API is described at /openapi.json)"
        return error_response(exc.status_code, detail, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not authorized(request):
            return unauthorized_response(request)
        problems = _validation_problems(exc)
        first = problems[0] if problems else {"member": "request", "reason": "invalid"}
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return error_response(422, f"invalid request: {first['member']}: {first['reason']}{more}", problems)

    @app.exception_handler(UploadRejected)
    async def upload_rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        body = exc.to_dict()
        return error_response(exc.status, body["detail"], body.get("problems"))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        details = exc.details if isinstance(exc.details, list) else None
        return error_response(exc.status, str(exc), details)


class UnhandledErrorMiddleware:
    """The last line: any exception a route did not handle becomes a logged traceback and a JSON 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.error(
                "unhandled error %s in %s %s", error_id, scope.get("method"), scope.get("path"), exc_info=exc
            )
            if started:  # part of the answer is out: nothing valid can follow, close the connection
                raise
            response = error_response(
                500,
                f"internal error {error_id}: {type(exc).__name__}; the daemon logged the traceback "
                "(journalctl -u edgecl)",
                error_id=error_id,
            )
            await response(scope, receive, send)
