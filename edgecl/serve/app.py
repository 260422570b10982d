"""The FastAPI application of ``edgecl serve``: routes over the store, the worker and the model holder.

Blocking work (decoding uploads, SQLite writes, inference) runs in worker threads, so the event loop keeps
answering ``/healthz`` and status requests while a job trains in the training thread.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

import edgecl
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
from edgecl.serve.auth import BearerAuthMiddleware, BodySizeLimitMiddleware, RequestTooLarge
from edgecl.serve.config import ServeSettings, resolve_precision
from edgecl.serve.metrics import CONTENT_TYPE, Counters, MetricsWriter
from edgecl.serve.predictor import ModelHolder, check_engine
from edgecl.serve.worker import JobConflict, Worker, read_checkpoint_meta, resolve_method_options
from edgecl.store import JobRecord, Store, StoreError, TaskRecord

__all__ = ["ServeContext", "create_app"]

log = logging.getLogger("edgecl.serve")

TRAIN_KEYS = ("epochs", "batch_size", "micro_batch_size", "seed", "precision")


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


# ------------------------------------------------------------------------------------------- schemas
class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``. Any other key is a method option (e.g. ``"lr": 0.001``)."""

    model_config = ConfigDict(extra="allow")

    method: str | None = Field(default=None, description="registered method; default: the profile's method")
    task_ids: list[int] | None = Field(
        default=None, description="tasks to learn in this order; default: all pending"
    )
    epochs: int | None = Field(
        default=None, ge=1, le=10_000, description="epochs per task; default: the profile's"
    )
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    micro_batch_size: int | None = Field(default=None, ge=1, le=4096)
    seed: int | None = Field(default=None, ge=0)
    precision: str | None = Field(default=None, description="fp32, bf16, fp16 or auto")
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="method options (also top level)"
    )


class JobAccepted(BaseModel):
    """Answer of ``POST /v1/jobs``."""

    job_id: int
    status: str
    task_ids: list[int]


def _multipart(fields: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """``openapi_extra`` documenting a multipart body parsed by hand: {field: (kind, description)}."""
    kinds: dict[str, dict[str, Any]] = {
        "file": {"type": "string", "format": "binary"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "string": {"type": "string"},
        "boolean": {"type": "boolean"},
        "number": {"type": "number"},
        "integer": {"type": "integer"},
    }
    props = {name: {**kinds[kind], "description": text} for name, (kind, text) in fields.items()}
    schema = {"type": "object", "properties": props}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_UPLOAD_SCHEMA = _multipart(
    {
        "file": ("file", "an archive (.zip, .tar, .tar.gz; one folder per class) or one image"),
        "files": ("files", "several images (with labels)"),
        "labels": ("string", 'JSON: ["cat", "dog"] (one per file) or {"a.jpg": "cat"}'),
        "name": ("string", "a name for the task"),
        "auto_train": ("boolean", "queue a job for this task right away"),
        "eval_fraction": ("number", "share of each class held out to measure accuracy (0-0.5)"),
    }
)
_PREDICT_SCHEMA = _multipart(
    {
        "file": ("file", "one image"),
        "files": ("files", "several images"),
        "top_k": ("integer", "how many labels to return per image (default 5)"),
    }
)


# ------------------------------------------------------------------------------------------- context
@dataclass
class ServeContext:
    """Everything the routes share."""

    settings: ServeSettings
    store: Store
    holder: ModelHolder = field(default_factory=ModelHolder)
    counters: Counters = field(default_factory=Counters)
    worker: Worker = field(init=False)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.worker = Worker(self.settings, self.store, self.holder)
        self.predict_limiter = anyio.CapacityLimiter(self.settings.predict_concurrency)
        self._eval_tf: Any = None

    # ---- tasks -------------------------------------------------------------------------------
    def task_view(self, task: TaskRecord, active: dict[int, JobRecord] | None = None) -> dict[str, Any]:
        """A task as the API shows it (``status``: pending, queued, training or learned)."""
        active = self.active_jobs() if active is None else active
        job = active.get(task.id)
        status = task.status
        if status == "pending" and job is not None:
            status = "training" if job.status == "running" else "queued"
        record = task.record or {}
        return {
            "id": task.id,
            "name": task.name,
            "status": status,
            "classes": task.classes,
            "counts": task.counts,
            "eval_counts": task.eval_counts,
            "num_images": task.num_images,
            "created_at": _iso(task.created_at),
            "job_id": job.id if job is not None else task.learned_by_job,
            "learned_at": _iso(task.learned_at),
            "learned_position": task.learned_seq,
            "accuracy": record.get("average_accuracy"),
        }

    def active_jobs(self) -> dict[int, JobRecord]:
        """task id -> the queued or running job that holds it."""
        out: dict[int, JobRecord] = {}
        for job in self.store.list_jobs(limit=1000):
            if job.status in ("queued", "running"):
                for tid in job.task_ids:
                    out[tid] = job
        return out

    def ingest(self, form: FormData) -> tuple[TaskRecord, int | None, IngestedTask]:
        """Validate an upload into staging, then commit it (blocking: runs in a thread)."""
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
        eval_fraction = _float_field(form.get("eval_fraction"), "eval_fraction", self.settings.eval_fraction)
        if not 0.0 <= eval_fraction <= 0.5:
            raise UploadRejected("eval_fraction must be between 0 and 0.5")
        auto = _bool_field(form.get("auto_train"), "auto_train")
        auto_job = None
        if auto:
            method, options = self.prepare_job(JobRequest())
            auto_job = {"method": method, "options": options}
        labels_raw = form.get("labels")
        labels_text = labels_raw if isinstance(labels_raw, str) else None
        limits = self.settings.limits
        known = None
        if not self.settings.allow_known_classes:  # refused before any image is decoded
            with self.store.connect() as conn:
                known = {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, task_id FROM task_classes")}
        staging = self.store.new_staging_dir()
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
            task, job_id = self.store.add_task(
                staging,
                name=name,
                classes=ingested.classes,
                counts=ingested.counts,
                eval_counts=ingested.eval_counts,
                manifest=ingested.items,
                allow_known_classes=self.settings.allow_known_classes,
                auto_job=auto_job,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if job_id is not None:
            self.worker.notify()
        return task, job_id, ingested

    # ---- jobs --------------------------------------------------------------------------------
    def prepare_job(self, body: JobRequest) -> tuple[str, dict[str, Any]]:
        """(method, stored options) for a job request; ``ValueError`` (422) or :class:`JobConflict` (409)."""
        from edgecl.methods.registry import list_methods
        from edgecl.train.trainer import TrainConfig

        prof = self.settings.profile
        method = body.method or prof.method
        if method not in list_methods():
            raise ValueError(f"unknown method '{method}'; choose one of: {', '.join(list_methods())}")
        explicit = {**body.method_options, **(body.model_extra or {})}
        resolve_method_options(method, prof, explicit, read_checkpoint_meta(self.store.model_dir))
        device = self.settings.device
        options: dict[str, Any] = {
            "epochs": body.epochs or prof.epochs,
            "batch_size": body.batch_size or prof.batch_size,
            "micro_batch_size": body.micro_batch_size,
            "seed": body.seed or 0,
            "precision": resolve_precision(body.precision or prof.precision, device, prof.allow_autocast),
            "method_options": explicit,
        }
        TrainConfig(**{k: options[k] for k in TRAIN_KEYS}).validate()
        return method, options

    def job_view(self, job: JobRecord) -> dict[str, Any]:
        """A job as the API shows it: status, task, phase, epoch, progress %, ETA, loss, telemetry so far."""
        live = self.worker.live(job.id) if job.status == "running" else None
        progress = live or dict(job.progress or {})
        if job.status == "done":
            progress.update(progress=100.0, eta_s=0.0)
        tasks_done = list((job.results or {}).get("tasks", []))
        peaks = [t["peak_memory_mb"] for t in tasks_done if t.get("peak_memory_mb") is not None]
        energies = [t.get("energy_j") for t in tasks_done]
        budget = self.settings.profile.memory_budget_mb
        current = progress.pop("telemetry", None) if live else None
        peak = max(
            [*peaks, *([current["peak_memory_mb"]] if current and current.get("peak_memory_mb") else [])],
            default=None,
        )
        return {
            "job_id": job.id,
            "status": job.status,
            "method": job.method,
            "task_ids": job.task_ids,
            "task_id": progress.get("task_id"),
            "phase": progress.get("phase"),
            "epoch": progress.get("epoch"),
            "epochs": job.options.get("epochs"),
            "progress": progress.get("progress", 0.0),
            "eta_s": progress.get("eta_s"),
            "loss": progress.get("loss"),
            "step_time_s": progress.get("step_time_s"),
            "details": progress,
            "options": job.options,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "cancel_requested": job.cancel_requested,
            "error": job.error,
            "resumes": job.resumes,
            "telemetry": {
                "current": current,
                "tasks": [
                    {k: t.get(k) for k in ("task_id", "train_seconds", "peak_memory_mb", "energy_j")}
                    for t in tasks_done
                ],
                "peak_memory_mb": peak,
                "energy_j": sum(e for e in energies if e is not None)
                if energies and None not in energies
                else None,
                "memory_budget_mb": budget,
                "within_budget": None if peak is None or budget is None else peak <= budget,
            },
            "results": tasks_done,
        }

    # ---- predict -----------------------------------------------------------------------------
    def predict(self, uploads: list[UploadFile], top_k: int) -> dict[str, Any]:
        """Decode, preprocess and classify ``uploads`` (blocking: runs in a thread)."""
        import torch

        predictor = self.holder.get()
        if predictor is None:
            raise StoreError("no model yet: upload tasks and train them first", 409)
        backbone = self.worker.backbone
        assert backbone is not None
        if self._eval_tf is None:
            from edgecl.data.transforms import eval_transform

            info = backbone.info
            self._eval_tf = eval_transform(info.img_size, info.mean, info.std)
        tensors, problems, names = [], [], []
        for i, up in enumerate(uploads):
            name = safe_display_name(up.filename) if up.filename else f"file #{i + 1}"
            data = up.file.read(self.settings.limits.max_image_bytes + 1)
            if len(data) > self.settings.limits.max_image_bytes:
                problems.append(Problem(name, "larger than the per-image limit"))
                continue
            try:
                _, rgb = decode_image(data, self.settings.limits.max_image_pixels)
            except ValueError as err:
                problems.append(Problem(name, str(err)))
                continue
            tensors.append(self._eval_tf(rgb))
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

    # ---- model / telemetry / metrics ---------------------------------------------------------
    def model_view(self) -> dict[str, Any]:
        """Method, classes in learning order, tasks, metrics history of the model in service."""
        from edgecl.train.metrics import summarize

        predictor = self.holder.get()
        meta = predictor.meta if predictor is not None else read_checkpoint_meta(self.store.model_dir)
        learned = self.store.learned_tasks()
        view: dict[str, Any] = {
            "version": predictor.version if predictor is not None else 0,
            "loaded": predictor is not None,
            "engine": predictor.engine if predictor is not None else self.settings.profile.inference_engine,
            "method": None,
            "classes": [],
            "tasks": [
                {
                    "id": t.id,
                    "name": t.name,
                    "classes": t.classes,
                    "learned_at": _iso(t.learned_at),
                    "job_id": t.learned_by_job,
                }
                for t in learned
            ],
        }
        if self.worker.predictor_error:
            view["error"] = self.worker.predictor_error
        if meta is None:
            return view
        acc = meta.get("accuracy_matrix") or []
        view.update(
            method=meta.get("method"),
            method_config=meta.get("method_config"),
            classes=list(meta.get("classes_learned") or []),
            num_classes=len(meta.get("classes_learned") or []),
            backbone=meta.get("backbone"),
            metrics={
                **(summarize(acc) if acc else {}),
                "accuracy_matrix": acc,
                "history": [
                    {
                        k: r.get(k)
                        for k in (
                            "task",
                            "classes",
                            "train_images",
                            "accuracy",
                            "average_accuracy",
                            "train_seconds",
                            "peak_memory_mb",
                        )
                    }
                    for r in meta.get("records") or []
                ],
            },
        )
        return view

    def telemetry_view(self) -> dict[str, Any]:
        """Meters of the current job (live) and of the latest jobs."""
        current = self.worker.current()
        jobs = []
        for job in self.store.list_jobs(limit=10):
            tasks = list((job.results or {}).get("tasks", []))
            if tasks or job.status == "running":
                jobs.append(
                    {
                        "job_id": job.id,
                        "status": job.status,
                        "tasks": [
                            {
                                k: t.get(k)
                                for k in (
                                    "task_id",
                                    "train_seconds",
                                    "peak_memory_mb",
                                    "energy_j",
                                    "telemetry",
                                )
                            }
                            for t in tasks
                        ],
                    }
                )
        return {
            "available": self.worker.telemetry_available,
            "backends": self.worker.telemetry_backends,
            "current": None
            if current is None
            else {"job_id": current[0], **(current[1].get("telemetry") or {})},
            "jobs": jobs,
        }

    def metrics_text(self) -> str:
        """The Prometheus exposition."""
        import psutil

        w = MetricsWriter()
        c = self.counters
        jobs = self.store.job_counts()
        tasks = self.store.task_counts()
        predictor = self.holder.get()
        w.gauge("edgecl_up", "1 while the daemon runs", 1)
        w.gauge(
            "edgecl_ready", "1 when the backbone and model are loaded", 1 if self.worker.ready.is_set() else 0
        )
        w.family("edgecl_jobs", "gauge", "Jobs by status", [({"status": s}, n) for s, n in jobs.items()])
        w.family("edgecl_tasks", "gauge", "Tasks by status", [({"status": s}, n) for s, n in tasks.items()])
        w.gauge("edgecl_images_stored", "Images stored over all tasks", self.store.image_count())
        w.gauge(
            "edgecl_model_version",
            "Tasks learned by the model in service",
            predictor.version if predictor else 0,
        )
        w.gauge(
            "edgecl_classes_learned",
            "Classes of the model in service",
            len(predictor.class_names) if predictor else 0,
        )
        w.family(
            "edgecl_uploads_total",
            "counter",
            "Task uploads since start",
            [({"result": k}, v) for k, v in c.uploads.items()],
        )
        w.family(
            "edgecl_images_ingested_total",
            "counter",
            "Images accepted since start",
            [(None, c.images_ingested)],
        )
        w.family(
            "edgecl_upload_seconds_total",
            "counter",
            "Time spent validating and storing uploads",
            [(None, c.upload_seconds)],
        )
        w.family(
            "edgecl_predict_requests_total",
            "counter",
            "Prediction requests since start",
            [(None, c.predict_requests)],
        )
        w.family(
            "edgecl_predict_images_total",
            "counter",
            "Images classified since start",
            [(None, c.predict_images)],
        )
        w.histogram("edgecl_predict_latency_seconds", "Prediction request latency", c.predict_latency)
        w.gauge(
            "edgecl_process_resident_memory_bytes", "RSS of the daemon", psutil.Process().memory_info().rss
        )
        budget = self.settings.profile.memory_budget_mb
        w.gauge(
            "edgecl_memory_budget_bytes", "Memory budget of the profile", budget * 2**20 if budget else None
        )
        current = self.worker.current()
        step = current[1].get("step_time_s") if current else self.worker.last_step_time
        w.gauge("edgecl_train_step_seconds", "Mean optimizer step time of the current (or last) job", step)
        if current:
            w.gauge(
                "edgecl_job_progress_ratio",
                "Progress of the running job",
                (current[1]["progress"] or 0) / 100,
                {"job": str(current[0])},
            )
        peak, energy = self._training_totals()
        w.gauge(
            "edgecl_training_peak_memory_bytes",
            "Highest peak memory of any learned task's training",
            peak * 2**20 if peak is not None else None,
        )
        w.family(
            "edgecl_training_energy_joules_total",
            "counter",
            "Measured energy of all learned tasks' training",
            [(None, energy)],
        )
        if current and current[1].get("telemetry"):
            t = current[1]["telemetry"]
            if t.get("peak_memory_mb") is not None:
                w.gauge(
                    "edgecl_job_peak_memory_bytes",
                    "Peak memory of the running job's current region",
                    t["peak_memory_mb"] * 2**20,
                    {"job": str(current[0])},
                )
            if t.get("energy_j") is not None:
                w.gauge(
                    "edgecl_job_energy_joules",
                    "Energy of the running job's current region so far",
                    t["energy_j"],
                    {"job": str(current[0])},
                )
        return w.text()

    def _training_totals(self) -> tuple[float | None, float | None]:
        peaks, energies = [], []
        for task in self.store.learned_tasks():
            record = task.record or {}
            if record.get("peak_memory_mb") is not None:
                peaks.append(float(record["peak_memory_mb"]))
            energy = ((record.get("telemetry") or {}).get("task") or {}).get("energy_j")
            if energy is not None:
                energies.append(float(energy))
        return (max(peaks) if peaks else None), (sum(energies) if energies else None)


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


# ------------------------------------------------------------------------------------------- routes
router = APIRouter()


def _ctx(request: Request) -> ServeContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


async def _form(request: Request, max_files: int) -> FormData:
    """Parse a multipart body; files spill to temporary files past 1 MB."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data (curl -F ...)")
    return await request.form(max_files=max_files, max_fields=32, max_part_size=1024 * 1024)


@router.get("/healthz", tags=["health"], summary="Liveness (no token needed)")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: backbone and model loaded, worker running")
async def readyz(request: Request) -> JSONResponse:
    """200 when predictions and training can run, 503 with the reason otherwise."""
    ctx = _ctx(request)
    w = ctx.worker
    body: dict[str, Any] = {
        "ready": False,
        "version": edgecl.__version__,
        "settings": ctx.settings.describe(),
    }
    predictor = ctx.holder.get()
    body["model_version"] = predictor.version if predictor else 0
    if w.init_error:
        body["reason"] = f"initialisation failed: {w.init_error}"
    elif not w.ready.is_set():
        body["reason"] = "loading the backbone and the model"
    elif not w.alive:
        body["reason"] = "the training worker stopped"
    else:
        body["ready"] = True
        current = w.current()
        body["worker"] = "idle" if current is None else f"training job {current[0]}"
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.post(
    "/v1/tasks",
    status_code=201,
    tags=["tasks"],
    summary="Upload one labeled task",
    openapi_extra=_UPLOAD_SCHEMA,
)
async def upload_task(request: Request) -> JSONResponse:
    """An archive of class folders as ``file``, or images as ``file``/``files`` plus ``labels``."""
    ctx = _ctx(request)
    t0 = time.perf_counter()
    form = await _form(request, ctx.settings.limits.max_images + 1)
    try:
        task, job_id, ingested = await anyio.to_thread.run_sync(ctx.ingest, form)
    except UploadRejected as err:
        ctx.counters.upload(False)
        return JSONResponse(err.to_dict(), status_code=err.status)
    except StoreError as err:
        ctx.counters.upload(False)
        extra = {"problems": err.details} if err.details else {}
        return _error(err.status, str(err), **extra)
    except (ValueError, JobConflict) as err:
        ctx.counters.upload(False)
        return _error(409 if isinstance(err, JobConflict) else 422, str(err))
    finally:
        await form.close()
    seconds = time.perf_counter() - t0
    ctx.counters.upload(True, task.num_images, seconds)
    body = await anyio.to_thread.run_sync(ctx.task_view, task)
    body.update(
        auto_job_id=job_id, warnings=ingested.warnings, **ingested.report(), seconds=round(seconds, 3)
    )
    log.info(
        "task %s stored: %d images, classes %s (%.2f s)", task.id, task.num_images, task.classes, seconds
    )
    return JSONResponse(body, status_code=201)


@router.get("/v1/tasks", tags=["tasks"], summary="List tasks")
async def list_tasks(request: Request) -> dict[str, Any]:
    """Every task with its classes, counts and status (pending, queued, training, learned)."""
    ctx = _ctx(request)

    def work() -> dict[str, Any]:
        active = ctx.active_jobs()
        return {"tasks": [ctx.task_view(t, active) for t in ctx.store.list_tasks()]}

    return await anyio.to_thread.run_sync(work)


@router.get("/v1/tasks/{task_id}", tags=["tasks"], summary="One task")
async def get_task(task_id: int, request: Request) -> JSONResponse:
    """A task, or 404."""
    ctx = _ctx(request)
    task = await anyio.to_thread.run_sync(ctx.store.get_task, task_id)
    if task is None:
        return _error(404, f"task {task_id} does not exist")
    return JSONResponse(await anyio.to_thread.run_sync(ctx.task_view, task))


@router.post(
    "/v1/jobs", status_code=202, response_model=JobAccepted, tags=["jobs"], summary="Queue a training job"
)
async def create_job(body: JobRequest, request: Request) -> JSONResponse:
    """Train ``task_ids`` (default: all pending tasks) with ``method``; other keys are method options."""
    ctx = _ctx(request)

    def work() -> JobRecord:
        method, options = ctx.prepare_job(body)
        return ctx.store.create_job(method, body.task_ids, options)

    try:
        job = await anyio.to_thread.run_sync(work)
    except JobConflict as err:
        return _error(409, str(err))
    except StoreError as err:
        return _error(err.status, str(err))
    except (ValueError, TypeError) as err:
        return _error(422, str(err))
    ctx.worker.notify()
    log.info("job %s queued: method %s, tasks %s", job.id, job.method, job.task_ids)
    return JSONResponse({"job_id": job.id, "status": job.status, "task_ids": job.task_ids}, status_code=202)


@router.get("/v1/jobs", tags=["jobs"], summary="List jobs (newest first)")
async def list_jobs(request: Request, limit: int = 50) -> dict[str, Any]:
    """The latest jobs with their status and progress."""
    ctx = _ctx(request)

    def work() -> dict[str, Any]:
        return {"jobs": [ctx.job_view(j) for j in ctx.store.list_jobs(limit=max(1, min(limit, 1000)))]}

    return await anyio.to_thread.run_sync(work)


@router.get("/v1/jobs/{job_id}", tags=["jobs"], summary="Job status")
async def get_job(job_id: int, request: Request) -> JSONResponse:
    """Status (queued, running, done, failed, cancelled), task, phase, epoch, progress, ETA, loss, meters."""
    ctx = _ctx(request)
    job = await anyio.to_thread.run_sync(ctx.store.get_job, job_id)
    if job is None:
        return _error(404, f"job {job_id} does not exist")
    return JSONResponse(await anyio.to_thread.run_sync(ctx.job_view, job))


@router.delete("/v1/jobs/{job_id}", status_code=202, tags=["jobs"], summary="Cancel a job")
async def cancel_job(job_id: int, request: Request) -> JSONResponse:
    """A queued job is cancelled at once; a running one stops at the next step boundary."""
    ctx = _ctx(request)
    try:
        job = await anyio.to_thread.run_sync(ctx.store.request_cancel, job_id)
    except StoreError as err:
        return _error(err.status, str(err))
    ctx.worker.cancel(job_id)
    status = job.status if job.status != "running" else "cancelling"
    return JSONResponse({"job_id": job.id, "status": status}, status_code=202)


@router.post("/v1/predict", tags=["predict"], summary="Classify images", openapi_extra=_PREDICT_SCHEMA)
async def predict(request: Request) -> JSONResponse:
    """Per image: label, probability and the top-k, from the model in service (``model_version``)."""
    ctx = _ctx(request)
    t0 = time.perf_counter()
    if not ctx.worker.ready.is_set():
        return _error(503, "the model is still loading; retry shortly (GET /readyz)")
    form = await _form(request, ctx.settings.max_predict_images + 1)
    try:
        uploads = [u for u in [*form.getlist("file"), *form.getlist("files")] if isinstance(u, UploadFile)]
        if not uploads:
            return _error(422, "no image: send 'file' (one image) or 'files' (several)")
        if len(uploads) > ctx.settings.max_predict_images:
            return _error(413, f"at most {ctx.settings.max_predict_images} images per request")
        raw_k = form.get("top_k") or request.query_params.get("top_k") or "5"
        try:
            top_k = int(str(raw_k))
        except ValueError:
            return _error(422, f"top_k must be an integer, got {raw_k!r}")
        result = await anyio.to_thread.run_sync(ctx.predict, uploads, top_k, limiter=ctx.predict_limiter)
    except UploadRejected as err:
        return JSONResponse(err.to_dict(), status_code=err.status)
    except StoreError as err:
        return _error(err.status, str(err))
    finally:
        await form.close()
    ctx.counters.predict(len(uploads), time.perf_counter() - t0)
    return JSONResponse(result)


@router.get("/v1/model", tags=["model"], summary="The model in service")
async def get_model(request: Request) -> dict[str, Any]:
    """Method, classes in learning order, tasks and the metrics history (accuracy matrix, forgetting)."""
    return await anyio.to_thread.run_sync(_ctx(request).model_view)


@router.get("/v1/telemetry", tags=["model"], summary="Telemetry of the current and latest jobs")
async def get_telemetry(request: Request) -> dict[str, Any]:
    """Backends, the running job's live meters, and per-task meters of the latest jobs."""
    return await anyio.to_thread.run_sync(_ctx(request).telemetry_view)


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    """Jobs, tasks, images, model version, predict latency, peak memory, energy, step time."""
    text = await anyio.to_thread.run_sync(_ctx(request).metrics_text)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------------------- factory
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
        description="On-device continual learning: upload labeled tasks, train CPS-Prompt over a frozen ViT, "
        "predict. Every route except /healthz needs `Authorization: Bearer <token>`.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.include_router(router)

    @app.exception_handler(RequestTooLarge)
    async def too_large(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return _error(413, str(exc))

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(BearerAuthMiddleware, token=settings.token)
    return app
