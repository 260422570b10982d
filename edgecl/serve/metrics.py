"""Prometheus metrics of the daemon (``GET /metrics``), with ``prometheus_client``.

Request counters and latency histograms are updated by the routes (:class:`ServeMetrics`); everything that
describes state (jobs and tasks by status, images stored, model version, process memory, memory budget,
training peak memory, energy and step time) is read from the store, the model holder and the worker at
scrape time by :class:`StateCollector`. Each app has its own registry, so several apps in one process (the
tests) do not share counters. ``prometheus_client``'s process collector adds the standard ``process_*``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from edgecl.serve.context import ServeContext

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "ServeMetrics", "StateCollector"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Prediction latency buckets (seconds)."""
UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upload (parse, validate, store) latency buckets (seconds)."""

MB = 2**20


class ServeMetrics:
    """The daemon's registry and the counters and histograms its routes update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.uploads = Counter("edgecl_uploads", "Task uploads since start", ["result"], registry=r)
        for result in ("accepted", "rejected", "throttled"):
            self.uploads.labels(result)
        self.images_ingested = Counter("edgecl_images_ingested", "Images accepted since start", registry=r)
        self.upload_seconds = Counter(
            "edgecl_upload_seconds", "Time spent receiving, validating and storing uploads", registry=r
        )
        self.upload_latency = Histogram(
            "edgecl_upload_latency_seconds", "Upload request latency", buckets=UPLOAD_BUCKETS, registry=r
        )
        self.predict_requests = Counter(
            "edgecl_predict_requests", "Prediction requests answered since start", registry=r
        )
        self.predict_images = Counter("edgecl_predict_images", "Images classified since start", registry=r)
        self.predict_latency = Histogram(
            "edgecl_predict_latency_seconds",
            "Prediction request latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        ProcessCollector(registry=r)

    def upload(self, result: str, images: int = 0, seconds: float = 0.0) -> None:
        """Count one upload: ``accepted``, ``rejected`` or ``throttled`` (429)."""
        self.uploads.labels(result).inc()
        if result == "accepted":
            self.images_ingested.inc(images)
        if result != "throttled":
            self.upload_seconds.inc(seconds)
            self.upload_latency.observe(seconds)

    def predict(self, images: int, seconds: float) -> None:
        """Count one answered prediction request."""
        self.predict_requests.inc()
        self.predict_images.inc(images)
        self.predict_latency.observe(seconds)

    def attach(self, ctx: ServeContext) -> None:
        """Read the daemon's state at every scrape."""
        self.registry.register(StateCollector(ctx))

    def render(self) -> bytes:
        """The exposition (text format; blocking: the state collector reads SQLite)."""
        return generate_latest(self.registry)


def _gauge(
    name: str, doc: str, value: float | None, labels: dict[str, str] | None = None
) -> Iterator[Metric]:
    if value is None:
        return
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value))
    yield family


class StateCollector(Collector):
    """Gauges read at scrape time from the store, the model holder and the worker."""

    def __init__(self, ctx: ServeContext) -> None:
        self.ctx = ctx

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the registry must not scrape the store when the collector is registered."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Every state metric; a metric without a value (no budget, no job) is left out."""
        ctx = self.ctx
        store, worker = ctx.store, ctx.worker
        predictor = ctx.holder.get()
        yield from _gauge("edgecl_up", "1 while the daemon runs", 1)
        yield from _gauge(
            "edgecl_ready", "1 when the backbone and model are loaded", 1 if worker.ready.is_set() else 0
        )
        jobs = GaugeMetricFamily("edgecl_jobs", "Jobs by status", labels=["status"])
        for status, n in store.job_counts().items():
            jobs.add_metric([status], n)
        yield jobs
        tasks = GaugeMetricFamily("edgecl_tasks", "Tasks by status", labels=["status"])
        for status, n in store.task_counts().items():
            tasks.add_metric([status], n)
        yield tasks
        yield from _gauge("edgecl_images_stored", "Images stored over all tasks", store.image_count())
        yield from _gauge(
            "edgecl_model_version",
            "Tasks learned by the model in service",
            predictor.version if predictor else 0,
        )
        yield from _gauge(
            "edgecl_classes_learned",
            "Classes of the model in service",
            len(predictor.class_names) if predictor else 0,
        )
        yield from _gauge("edgecl_process_resident_memory_bytes", "RSS of the daemon", _rss_bytes())
        budget = ctx.settings.profile.memory_budget_mb
        yield from _gauge(
            "edgecl_memory_budget_bytes", "Memory budget of the profile", budget * MB if budget else None
        )
        failures = CounterMetricFamily(
            "edgecl_auth_failures", "Requests refused for a missing or wrong token since start"
        )
        failures.add_metric([], ctx.auth.failures.total)
        yield failures
        current = worker.current()
        step = current[1].get("step_time_s") if current else worker.last_step_time
        yield from _gauge(
            "edgecl_train_step_seconds", "Mean optimizer step time of the current (or last) job", step
        )
        peak, energy = _training_totals(ctx)
        yield from _gauge(
            "edgecl_training_peak_memory_bytes",
            "Highest peak memory of any learned task's training",
            peak * MB if peak is not None else None,
        )
        if energy is not None:
            total = CounterMetricFamily(
                "edgecl_training_energy_joules", "Measured energy of all learned tasks' training"
            )
            total.add_metric([], energy)
            yield total
        if current is None:
            return
        job = {"job": str(current[0])}
        yield from _gauge(
            "edgecl_job_progress_ratio",
            "Progress of the running job",
            (current[1]["progress"] or 0) / 100,
            job,
        )
        live: dict[str, Any] = current[1].get("telemetry") or {}
        peak_now = live.get("peak_memory_mb")
        yield from _gauge(
            "edgecl_job_peak_memory_bytes",
            "Peak memory of the running job's current region",
            peak_now * MB if peak_now is not None else None,
            job,
        )
        yield from _gauge(
            "edgecl_job_energy_joules",
            "Energy of the running job's current region so far",
            live.get("energy_j"),
            job,
        )


def _rss_bytes() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.Process().memory_info().rss)


def _training_totals(ctx: ServeContext) -> tuple[float | None, float | None]:
    peaks, energies = [], []
    for task in ctx.store.learned_tasks():
        record = task.record or {}
        if record.get("peak_memory_mb") is not None:
            peaks.append(float(record["peak_memory_mb"]))
        energy = ((record.get("telemetry") or {}).get("task") or {}).get("energy_j")
        if energy is not None:
            energies.append(float(energy))
    return (max(peaks) if peaks else None), (sum(energies) if energies else None)
