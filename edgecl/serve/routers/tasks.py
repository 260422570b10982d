"""``/v1/tasks``: upload a labeled task (multipart), list tasks, show one."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Security
from starlette.exceptions import HTTPException
from starlette.requests import Request

from edgecl.data.ingest import UploadRejected
from edgecl.serve.auth import require_token
from edgecl.serve.context import Ctx
from edgecl.serve.errors import error_responses
from edgecl.serve.multipart import read_form
from edgecl.serve.options import JobConflict
from edgecl.serve.schemas import MAX_ID, TaskList, TaskUploaded, TaskView, multipart_body
from edgecl.serve.uploads import ingest_form
from edgecl.serve.views import task_view
from edgecl.store import StoreError

__all__ = ["router"]

log = logging.getLogger("edgecl.serve")

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[Security(require_token)])

TaskId = Annotated[int, Path(ge=1, le=MAX_ID, description="task id")]

UPLOAD_BODY = multipart_body(
    {
        "file": ("file", "an archive (.zip, .tar, .tar.gz; one folder per class) or one image"),
        "files": ("files", "several images (with labels)"),
        "labels": ("string", 'JSON: ["cat", "dog"] (one per file) or {"a.jpg": "cat"}'),
        "name": ("string", "a name for the task"),
        "auto_train": ("boolean", "queue a job for this task right away"),
        "eval_fraction": ("number", "share of each class held out to measure accuracy (0-0.5)"),
    }
)


@router.post(
    "",
    status_code=201,
    response_model=TaskUploaded,
    summary="Upload one labeled task",
    openapi_extra=UPLOAD_BODY,
    responses=error_responses(400, 401, 409, 413, 415, 422, 429, 500),
)
async def upload_task(request: Request, ctx: Ctx) -> dict[str, object]:
    """An archive of class folders as ``file``, or images as ``file``/``files`` plus ``labels``."""
    settings = ctx.settings
    if not ctx.upload_slots.try_acquire():
        ctx.metrics.upload("throttled")
        raise HTTPException(
            429,
            f"{ctx.upload_slots.limit} uploads are already in progress (limit --max-concurrent-uploads); "
            f"retry in {settings.upload_retry_after_s} s",
            headers={"Retry-After": str(settings.upload_retry_after_s)},
        )
    t0 = time.perf_counter()
    try:
        form = await read_form(request, ctx.store.staging_dir, max_files=settings.limits.max_images + 1)
        try:
            task, job_id, ingested = await anyio.to_thread.run_sync(ingest_form, ctx, form)
        finally:
            await form.close()
    except JobConflict as err:
        ctx.metrics.upload("rejected", seconds=time.perf_counter() - t0)
        raise StoreError(str(err), 409) from None
    except ValueError as err:  # UploadRejected, and bad auto_train options
        ctx.metrics.upload("rejected", seconds=time.perf_counter() - t0)
        if isinstance(err, UploadRejected):
            raise
        raise UploadRejected(str(err)) from None
    except BaseException:
        ctx.metrics.upload("rejected", seconds=time.perf_counter() - t0)
        raise
    finally:
        ctx.upload_slots.release()
    seconds = time.perf_counter() - t0
    ctx.metrics.upload("accepted", task.num_images, seconds)
    body = await anyio.to_thread.run_sync(task_view, ctx, task)
    body.update(
        auto_job_id=job_id, warnings=ingested.warnings, **ingested.report(), seconds=round(seconds, 3)
    )
    log.info(
        "task %s stored: %d images, classes %s (%.2f s)", task.id, task.num_images, task.classes, seconds
    )
    return body


@router.get("", response_model=TaskList, summary="List tasks", responses=error_responses(401, 500))
async def list_tasks(ctx: Ctx) -> dict[str, object]:
    """Every task with its classes, counts and status (pending, queued, training, learned)."""

    def work() -> dict[str, object]:
        active = ctx.active_jobs()
        return {"tasks": [task_view(ctx, t, active) for t in ctx.store.list_tasks()]}

    return await anyio.to_thread.run_sync(work)


@router.get(
    "/{task_id}", response_model=TaskView, summary="One task", responses=error_responses(401, 404, 422, 500)
)
async def get_task(task_id: TaskId, ctx: Ctx) -> dict[str, object]:
    """A task, or 404."""
    task = await anyio.to_thread.run_sync(ctx.store.get_task, task_id)
    if task is None:
        raise HTTPException(404, f"task {task_id} does not exist")
    return await anyio.to_thread.run_sync(task_view, ctx, task)
