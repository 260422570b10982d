"""What every route shares: settings, store, model holder, worker, metrics, auth and the upload slots.

One :class:`ServeContext` per app (``app.state.ctx``); routes receive it through the :func:`get_ctx`
dependency (``ctx: Ctx``), never through globals.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request

from edgecl.serve.auth import AuthFailureLog, TokenAuth
from edgecl.serve.config import ServeSettings, resolve_precision
from edgecl.serve.metrics import ServeMetrics
from edgecl.serve.options import read_checkpoint_meta, resolve_method_options
from edgecl.serve.predictor import ModelHolder
from edgecl.serve.schemas import JobRequest
from edgecl.serve.worker import Worker
from edgecl.store import JobRecord, Store

__all__ = ["Ctx", "ServeContext", "UploadSlots", "get_ctx"]

TRAIN_KEYS = ("epochs", "batch_size", "micro_batch_size", "seed", "precision")


class UploadSlots:
    """At most ``limit`` uploads at a time; a request beyond it is refused at once (429), not queued, so a
    burst of uploads cannot pile up parse buffers, spool files and decoders."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max_concurrent_uploads must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self.active -= 1


@dataclass
class ServeContext:
    """Everything the routes share."""

    settings: ServeSettings
    store: Store
    holder: ModelHolder = field(default_factory=ModelHolder)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    worker: Worker = field(init=False)
    auth: TokenAuth = field(init=False)
    upload_slots: UploadSlots = field(init=False)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.worker = Worker(self.settings, self.store, self.holder)
        self.auth = TokenAuth(self.settings.token, AuthFailureLog())
        self.upload_slots = UploadSlots(self.settings.max_concurrent_uploads)
        self.predict_limiter = anyio.CapacityLimiter(self.settings.predict_concurrency)
        self.eval_transform: Any = None
        self.metrics.attach(self)

    def active_jobs(self) -> dict[int, JobRecord]:
        """task id -> the queued or running job that holds it."""
        out: dict[int, JobRecord] = {}
        for job in self.store.list_jobs(limit=1000):
            if job.status in ("queued", "running"):
                for tid in job.task_ids:
                    out[tid] = job
        return out

    def prepare_job(self, body: JobRequest) -> tuple[str, dict[str, Any]]:
        """(method, stored options) for a job request; ``ValueError`` (422) or ``JobConflict`` (409)."""
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


def get_ctx(request: Request) -> ServeContext:
    """Dependency: the app's :class:`ServeContext`."""
    return request.app.state.ctx  # type: ignore[no-any-return]


Ctx = Annotated[ServeContext, Depends(get_ctx)]
