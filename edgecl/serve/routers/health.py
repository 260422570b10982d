"""Health (``/healthz`` public, ``/readyz``), Prometheus ``/metrics``, and the API schema and docs."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.requests import Request

from edgecl.serve.auth import require_token
from edgecl.serve.context import Ctx
from edgecl.serve.errors import error_responses
from edgecl.serve.metrics import CONTENT_TYPE
from edgecl.serve.schemas import Health, Ready
from edgecl.serve.views import ready_view

__all__ = ["public", "router"]

public = APIRouter(tags=["health"])
router = APIRouter(tags=["health"], dependencies=[Security(require_token)])


@public.get(
    "/healthz", response_model=Health, summary="Liveness (no token needed)", responses=error_responses(500)
)
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: backbone and model loaded, worker running",
    responses={
        503: {"model": Ready, "description": "Not ready: `reason` says why"},
        **error_responses(401, 500),
    },
)
async def readyz(ctx: Ctx, response: Response) -> dict[str, object]:
    """200 when predictions and training can run, 503 with the reason otherwise."""
    body = ready_view(ctx)
    if not body["ready"]:
        response.status_code = 503
    return body


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 500),
    },
)
async def metrics(ctx: Ctx) -> Response:
    """Jobs, tasks, images, model version, uploads and predictions (count, latency), memory, energy."""
    payload = await anyio.to_thread.run_sync(ctx.metrics.render)
    return Response(payload, media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema (behind the token, like everything but /healthz)."""
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI over /openapi.json."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")
