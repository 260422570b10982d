"""The app factory of ``edgecl serve``: store, context, routers, error handlers and middleware.

Blocking work (parsing uploads to disk, decoding, SQLite, inference) runs in worker threads, so the event
loop keeps answering ``/healthz`` and status requests while a job trains in the training thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi

import edgecl
from edgecl.serve.auth import BodySizeLimitMiddleware, RequestTooLarge
from edgecl.serve.config import ServeSettings
from edgecl.serve.context import ServeContext
from edgecl.serve.errors import UnhandledErrorMiddleware, error_response, install_error_handlers
from edgecl.serve.predictor import check_engine
from edgecl.serve.routers import ROUTERS
from edgecl.serve.routers.jobs import MAX_JOB_BODY_BYTES
from edgecl.store import Store

__all__ = ["api_schema", "create_app"]

log = logging.getLogger("edgecl.serve")

DESCRIPTION = (
    "On-device continual learning: upload labeled tasks, train CPS-Prompt over a frozen ViT, predict. "
    "Every route except /healthz needs `Authorization: Bearer <token>`. Every error is JSON "
    "(`detail`, and `problems` listing each offending member or field)."
)


def api_schema() -> dict[str, Any]:
    """The OpenAPI document of the API (the same for every app: it depends on no setting)."""
    return get_openapi(
        title="edgecl",
        version=edgecl.__version__,
        description=DESCRIPTION,
        routes=[route for router in ROUTERS for route in router.routes],
    )


def create_app(settings: ServeSettings) -> FastAPI:
    """The ASGI app; the store is opened and recovered now, the worker starts (and resumes) with the app."""
    check_engine(settings.profile.inference_engine)
    store = Store(settings.data_dir)
    removed = store.recover()
    if removed["staging"] or removed["orphan_tasks"]:
        log.warning(
            "removed %d interrupted uploads and %d orphan task folders",
            len(removed["staging"]),
            len(removed["orphan_tasks"]),
        )
    ctx = ServeContext(settings, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(ctx.worker.stop)

    app = FastAPI(
        title="edgecl",
        version=edgecl.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url=None,  # served by the health router, behind the token
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.auth = ctx.auth
    for router in ROUTERS:
        app.include_router(router)

    schema = api_schema()
    app.openapi = lambda: schema  # type: ignore[method-assign]
    routes = [(route.path_regex, route.methods) for router in ROUTERS for route in router.routes]
    install_error_handlers(app, ctx.auth.authorized, routes)

    @app.exception_handler(RequestTooLarge)
    async def too_large(request: Request, exc: RequestTooLarge) -> object:
        return error_response(413, str(exc))

    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        limits={"/v1/jobs": MAX_JOB_BODY_BYTES},
        hint=" (limit --max-request-mb)",
    )
    app.add_middleware(UnhandledErrorMiddleware)
    return app
