"""``/v1/model`` (the model in service) and ``/v1/telemetry`` (meters of the current and latest jobs)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Security

from edgecl.serve.auth import require_token
from edgecl.serve.context import Ctx
from edgecl.serve.errors import error_responses
from edgecl.serve.schemas import ModelView, TelemetryView
from edgecl.serve.views import model_view, telemetry_view

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Security(require_token)])


@router.get(
    "/model", response_model=ModelView, summary="The model in service", responses=error_responses(401, 500)
)
async def get_model(ctx: Ctx) -> dict[str, object]:
    """Method, classes in learning order, tasks and the metrics history (accuracy matrix, forgetting)."""
    return await anyio.to_thread.run_sync(model_view, ctx)


@router.get(
    "/telemetry",
    response_model=TelemetryView,
    summary="Telemetry of the current and latest jobs",
    responses=error_responses(401, 500),
)
async def get_telemetry(ctx: Ctx) -> dict[str, object]:
    """Backends, the running job's live meters, and per-task meters of the latest jobs."""
    return await anyio.to_thread.run_sync(telemetry_view, ctx)
