"""How the API shows tasks, jobs, the model and telemetry: dicts shaped like :mod:`edgecl.serve.schemas`.

All of these read SQLite or the worker; routes call them in a worker thread. Non-finite floats (a diverged
loss, say) become ``null``: JSON has no NaN, and a status page must not fail because training did.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import edgecl
from edgecl.serve.context import ServeContext
from edgecl.serve.options import read_checkpoint_meta
from edgecl.store import JobRecord, TaskRecord

__all__ = ["iso", "job_view", "model_view", "ready_view", "task_view", "telemetry_view"]


def iso(ts: float | None) -> str | None:
    """A UNIX time as ISO 8601 (UTC, seconds), or None."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def finite(value: Any) -> Any:
    """``value`` with every NaN/inf float (at any depth of dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def task_view(
    ctx: ServeContext, task: TaskRecord, active: dict[int, JobRecord] | None = None
) -> dict[str, Any]:
    """A task as the API shows it (``status``: pending, queued, training or learned)."""
    active = ctx.active_jobs() if active is None else active
    job = active.get(task.id)
    status = task.status
    if status == "pending" and job is not None:
        status = "training" if job.status == "running" else "queued"
    record = task.record or {}
    return finite(
        {
            "id": task.id,
            "name": task.name,
            "status": status,
            "classes": task.classes,
            "counts": task.counts,
            "eval_counts": task.eval_counts,
            "num_images": task.num_images,
            "created_at": iso(task.created_at),
            "job_id": job.id if job is not None else task.learned_by_job,
            "learned_at": iso(task.learned_at),
            "learned_position": task.learned_seq,
            "accuracy": record.get("average_accuracy"),
        }
    )


def job_view(ctx: ServeContext, job: JobRecord) -> dict[str, Any]:
    """A job: status, task, phase, epoch, progress %, ETA, loss, telemetry so far."""
    live = ctx.worker.live(job.id) if job.status == "running" else None
    progress = live or dict(job.progress or {})
    if job.status == "done":
        progress.update(progress=100.0, eta_s=0.0)
    tasks_done = list((job.results or {}).get("tasks", []))
    peaks = [t["peak_memory_mb"] for t in tasks_done if t.get("peak_memory_mb") is not None]
    energies = [t.get("energy_j") for t in tasks_done]
    budget = ctx.settings.profile.memory_budget_mb
    current = progress.pop("telemetry", None) if live else None
    if current and current.get("peak_memory_mb"):
        peaks.append(current["peak_memory_mb"])
    peak = max(peaks, default=None)
    return finite(
        {
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
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
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
                "energy_j": sum(energies) if energies and None not in energies else None,  # type: ignore[arg-type]
                "memory_budget_mb": budget,
                "within_budget": None if peak is None or budget is None else peak <= budget,
            },
            "results": tasks_done,
        }
    )


def ready_view(ctx: ServeContext) -> dict[str, Any]:
    """Readiness: ``ready`` and, when not, the ``reason``."""
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
    return body


_HISTORY_KEYS = (
    "task",
    "classes",
    "train_images",
    "accuracy",
    "average_accuracy",
    "train_seconds",
    "peak_memory_mb",
)


def model_view(ctx: ServeContext) -> dict[str, Any]:
    """Method, classes in learning order, tasks and metrics history of the model in service."""
    from edgecl.train.metrics import summarize

    predictor = ctx.holder.get()
    meta = predictor.meta if predictor is not None else read_checkpoint_meta(ctx.store.model_dir)
    view: dict[str, Any] = {
        "version": predictor.version if predictor is not None else 0,
        "loaded": predictor is not None,
        "engine": predictor.engine if predictor is not None else ctx.settings.profile.inference_engine,
        "method": None,
        "classes": [],
        "tasks": [
            {
                "id": t.id,
                "name": t.name,
                "classes": t.classes,
                "learned_at": iso(t.learned_at),
                "job_id": t.learned_by_job,
            }
            for t in ctx.store.learned_tasks()
        ],
    }
    if ctx.worker.predictor_error:
        view["error"] = ctx.worker.predictor_error
    if meta is None:
        return view
    acc = meta.get("accuracy_matrix") or []
    classes = list(meta.get("classes_learned") or [])
    view.update(
        method=meta.get("method"),
        method_config=meta.get("method_config"),
        classes=classes,
        num_classes=len(classes),
        backbone=meta.get("backbone"),
        metrics={
            **(summarize(acc) if acc else {}),
            "accuracy_matrix": acc,
            "history": [{k: r.get(k) for k in _HISTORY_KEYS} for r in meta.get("records") or []],
        },
    )
    return finite(view)


_TELEMETRY_KEYS = ("task_id", "train_seconds", "peak_memory_mb", "energy_j", "telemetry")


def telemetry_view(ctx: ServeContext) -> dict[str, Any]:
    """Meters of the current job (live) and of the latest jobs."""
    current = ctx.worker.current()
    jobs = []
    for job in ctx.store.list_jobs(limit=10):
        tasks = list((job.results or {}).get("tasks", []))
        if tasks or job.status == "running":
            jobs.append(
                {
                    "job_id": job.id,
                    "status": job.status,
                    "tasks": [{k: t.get(k) for k in _TELEMETRY_KEYS} for t in tasks],
                }
            )
    return finite(
        {
            "available": ctx.worker.telemetry_available,
            "backends": ctx.worker.telemetry_backends,
            "current": None
            if current is None
            else {"job_id": current[0], **(current[1].get("telemetry") or {})},
            "jobs": jobs,
        }
    )
