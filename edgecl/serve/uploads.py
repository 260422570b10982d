"""Turning a parsed multipart form into a stored task, or into predictions (blocking: run in a thread).

An upload is validated into its own ``staging/`` folder by :mod:`edgecl.data.ingest`, then moved into
``tasks/`` and committed by :meth:`Store.add_task` (the row last), so a failure or a crash at any point
stores nothing.
"""

from __future__ import annotations

import shutil
from typing import Any

from starlette.datastructures import FormData, UploadFile

from edgecl.data.ingest import (
    IngestedTask,
    Problem,
    UploadRejected,
    decode_image,
    detect_kind,
    ingest_archive,
    ingest_images,
    parse_labels,
    safe_display_name,
)
from edgecl.serve.context import ServeContext
from edgecl.serve.schemas import JobRequest
from edgecl.store import StoreError, TaskRecord

__all__ = ["ingest_form", "predict_images"]


def _bool_field(value: Any, name: str) -> bool:
    if value is None or value == "":
        return False
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise UploadRejected(f"'{name}' must be true or false, got {value!r}")


def _float_field(value: Any, name: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(str(value))
    except ValueError:
        raise UploadRejected(f"'{name}' must be a number, got {value!r}") from None


def ingest_form(ctx: ServeContext, form: FormData) -> tuple[TaskRecord, int | None, IngestedTask]:
    """Validate an upload into staging, then commit it: (task, auto job id, what was ingested)."""
    singles = form.getlist("file")
    many = form.getlist("files")
    uploads = [u for u in [*singles, *many] if isinstance(u, UploadFile)]
    if len(uploads) != len(singles) + len(many):
        raise UploadRejected("'file' and 'files' must be file parts (curl -F file=@PATH)")
    if not uploads:
        raise UploadRejected("no file: send an archive as 'file', or images as 'files' with 'labels'")
    if singles and many:
        raise UploadRejected("send either 'file' or 'files', not both")
    if len(singles) > 1:
        raise UploadRejected("'file' takes one archive or image; send several images as 'files'")
    name = str(form.get("name") or "").strip()
    if len(name) > 200:
        raise UploadRejected("'name' is longer than 200 characters")
    eval_fraction = _float_field(form.get("eval_fraction"), "eval_fraction", ctx.settings.eval_fraction)
    if not 0.0 <= eval_fraction <= 0.5:
        raise UploadRejected("eval_fraction must be between 0 and 0.5")
    auto_job = None
    if _bool_field(form.get("auto_train"), "auto_train"):
        method, options = ctx.prepare_job(JobRequest())
        auto_job = {"method": method, "options": options}
    labels_raw = form.get("labels")
    labels_text = labels_raw if isinstance(labels_raw, str) else None
    limits = ctx.settings.limits
    known = None
    if not ctx.settings.allow_known_classes:  # refused before any image is decoded
        with ctx.store.connect() as conn:
            known = {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, task_id FROM task_classes")}
    staging = ctx.store.new_staging_dir()
    try:
        kind = "image"
        if singles:
            fh = uploads[0].file
            kind = detect_kind(fh.read(512))
            fh.seek(0)
        if kind != "image":
            if labels_text:
                raise UploadRejected("'labels' is for image uploads; an archive's folders are its labels")
            ingested = ingest_archive(
                uploads[0].file, staging, limits, eval_fraction, kind=kind, known_classes=known
            )
        else:
            names = [safe_display_name(u.filename) for u in uploads]
            labels = parse_labels(labels_text, names, limits.max_label_length, limits.max_labels_bytes)
            ingested = ingest_images(
                [(n, u.file) for n, u in zip(names, uploads, strict=True)],
                labels,
                staging,
                limits,
                eval_fraction,
                known_classes=known,
            )
        if not name:
            name = safe_display_name(uploads[0].filename).split(".")[0] if singles else "task"
        task, job_id = ctx.store.add_task(
            staging,
            name=name,
            classes=ingested.classes,
            counts=ingested.counts,
            eval_counts=ingested.eval_counts,
            manifest=ingested.items,
            allow_known_classes=ctx.settings.allow_known_classes,
            auto_job=auto_job,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if job_id is not None:
        ctx.worker.notify()
    return task, job_id, ingested


def predict_images(ctx: ServeContext, uploads: list[UploadFile], top_k: int) -> dict[str, Any]:
    """Decode, preprocess and classify ``uploads`` with the model in service."""
    import torch

    predictor = ctx.holder.get()
    if predictor is None:
        raise StoreError("no model yet: upload tasks and train them first", 409)
    backbone = ctx.worker.backbone
    assert backbone is not None
    if ctx.eval_transform is None:
        from edgecl.data.transforms import eval_transform

        info = backbone.info
        ctx.eval_transform = eval_transform(info.img_size, info.mean, info.std)
    limits = ctx.settings.limits
    tensors, problems, names = [], [], []
    for i, up in enumerate(uploads):
        name = safe_display_name(up.filename) if up.filename else f"file #{i + 1}"
        data = up.file.read(limits.max_image_bytes + 1)
        if len(data) > limits.max_image_bytes:
            problems.append(Problem(name, "larger than the per-image limit"))
            continue
        try:
            _, rgb = decode_image(data, limits.max_image_pixels)
        except ValueError as err:
            problems.append(Problem(name, str(err)))
            continue
        tensors.append(ctx.eval_transform(rgb))
        names.append(name)
    if problems:
        raise UploadRejected(f"{len(problems)} image(s) could not be used", problems)
    probs = predictor.predict(torch.stack(tensors))
    k = max(1, min(top_k, probs.shape[1]))
    values, indices = probs.topk(k, dim=1)
    out = []
    for name, vals, idx in zip(names, values.tolist(), indices.tolist(), strict=True):
        top = [
            {"label": predictor.class_names[j], "probability": round(v, 6)}
            for v, j in zip(vals, idx, strict=True)
        ]
        out.append(
            {"file": name, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}
        )
    return {"model_version": predictor.version, "engine": predictor.engine, "predictions": out}
