"""``/v1/jobs``: queue a training job, list jobs, show one, cancel one."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query, Security
from starlette.exceptions import HTTPException

from edgecl.serve.auth import require_token
from edgecl.serve.context import Ctx
from edgecl.serve.errors import error_responses
from edgecl.serve.options import JobConflict
from edgecl.serve.schemas import MAX_ID, JobAccepted, JobCancelled, JobList, JobRequest, JobView
from edgecl.serve.views import job_view
from edgecl.store import JobRecord, StoreError

__all__ = ["MAX_JOB_BODY_BYTES", "router"]

log = logging.getLogger("edgecl.serve")

MAX_JOB_BODY_BYTES = 64 * 1024
"""Largest ``POST /v1/jobs`` body (FastAPI reads JSON bodies before any dependency runs)."""

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Security(require_token)])

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="job id")]


@router.post(
    "",
    status_code=202,
    response_model=JobAccepted,
    summary="Queue a training job",
    responses=error_responses(400, 401, 404, 409, 413, 422, 500),
)
async def create_job(body: JobRequest, ctx: Ctx) -> dict[str, object]:
    """Train ``task_ids`` (default: all pending tasks) with ``method``; other keys are method options."""

    def work() -> JobRecord:
        method, options = ctx.prepare_job(body)
        return ctx.store.create_job(method, body.task_ids, options)

    try:
        job = await anyio.to_thread.run_sync(work)
    except JobConflict as err:
        raise HTTPException(409, str(err)) from None
    except StoreError:
        raise
    except (ValueError, TypeError) as err:
        raise HTTPException(422, str(err)) from None
    ctx.worker.notify()
    log.info("job %s queued: method %s, tasks %s", job.id, job.method, job.task_ids)
    return {"job_id": job.id, "status": job.status, "task_ids": job.task_ids}


@router.get(
    "", response_model=JobList, summary="List jobs (newest first)", responses=error_responses(401, 422, 500)
)
async def list_jobs(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, object]:
    """The latest jobs with their status and progress."""

    def work() -> dict[str, object]:
        return {"jobs": [job_view(ctx, j) for j in ctx.store.list_jobs(limit=limit)]}

    return await anyio.to_thread.run_sync(work)


@router.get(
    "/{job_id}", response_model=JobView, summary="Job status", responses=error_responses(401, 404, 422, 500)
)
async def get_job(job_id: JobId, ctx: Ctx) -> dict[str, object]:
    """Status (queued, running, done, failed, cancelled), task, phase, epoch, progress, ETA, loss, meters."""
    job = await anyio.to_thread.run_sync(ctx.store.get_job, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} does not exist")
    return await anyio.to_thread.run_sync(job_view, ctx, job)


@router.delete(
    "/{job_id}",
    status_code=202,
    response_model=JobCancelled,
    summary="Cancel a job",
    responses=error_responses(401, 404, 409, 422, 500),
)
async def cancel_job(job_id: JobId, ctx: Ctx) -> dict[str, object]:
    """A queued job is cancelled at once; a running one stops at the next step boundary."""
    job = await anyio.to_thread.run_sync(ctx.store.request_cancel, job_id)
    ctx.worker.cancel(job_id)
    return {"job_id": job.id, "status": job.status if job.status != "running" else "cancelling"}
