"""``/v1/predict``: classify images with the model in service (while jobs train)."""

from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Security
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from edgecl.data.ingest import UploadRejected
from edgecl.serve.auth import require_token
from edgecl.serve.context import Ctx
from edgecl.serve.errors import error_responses
from edgecl.serve.multipart import read_form
from edgecl.serve.schemas import PredictAnswer, multipart_body
from edgecl.serve.uploads import predict_images

__all__ = ["router"]

router = APIRouter(prefix="/v1/predict", tags=["predict"], dependencies=[Security(require_token)])

PREDICT_BODY = multipart_body(
    {
        "file": ("file", "one image"),
        "files": ("files", "several images"),
        "top_k": ("integer", "how many labels to return per image (default 5)"),
    }
)


@router.post(
    "",
    response_model=PredictAnswer,
    summary="Classify images",
    openapi_extra=PREDICT_BODY,
    responses=error_responses(400, 401, 409, 413, 415, 422, 500, 503),
)
async def predict(request: Request, ctx: Ctx) -> dict[str, object]:
    """Per image: label, probability and the top-k, from the model in service (``model_version``)."""
    t0 = time.perf_counter()
    if not ctx.worker.ready.is_set():
        raise HTTPException(503, "the model is still loading; retry shortly (GET /readyz)")
    limit = ctx.settings.max_predict_images
    form = await read_form(request, ctx.store.staging_dir, max_files=limit + 1)
    try:
        parts = [*form.getlist("file"), *form.getlist("files")]
        uploads = [u for u in parts if isinstance(u, UploadFile)]
        if len(uploads) != len(parts):
            raise UploadRejected("'file' and 'files' must be file parts (curl -F file=@PATH)")
        if not uploads:
            raise UploadRejected("no image: send 'file' (one image) or 'files' (several)")
        if len(uploads) > limit:
            raise UploadRejected(f"at most {limit} images per request", status=413)
        raw_k = form.get("top_k") or request.query_params.get("top_k") or "5"
        try:
            top_k = int(str(raw_k))
        except ValueError:
            raise UploadRejected(f"top_k must be an integer, got {raw_k!r}") from None
        result = await anyio.to_thread.run_sync(
            predict_images, ctx, uploads, top_k, limiter=ctx.predict_limiter
        )
    finally:
        await form.close()
    ctx.metrics.predict(len(uploads), time.perf_counter() - t0)
    return result
