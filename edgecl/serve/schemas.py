"""Request and response models of the REST API: what ``/openapi.json`` promises is what the routes send.

Responses are validated against these models by FastAPI, so a route that drifts from its schema fails
loudly (in the tests) instead of documenting one thing and sending another. Free-form parts (method
options, telemetry meters, per-task records) are objects whose keys are listed in the README.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_ID",
    "Health",
    "JobAccepted",
    "JobCancelled",
    "JobList",
    "JobRequest",
    "JobView",
    "ModelView",
    "PredictAnswer",
    "Ready",
    "TaskList",
    "TaskUploaded",
    "TaskView",
    "TelemetryView",
    "multipart_body",
]

MAX_ID = 2**63 - 1
"""Largest id SQLite stores; larger ones are refused (422) before any lookup."""

Id = Annotated[int, Field(ge=1, le=MAX_ID)]
JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class _Open(BaseModel):
    """A response object that may grow keys in later versions."""

    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------------------- requests
class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``. Any other key is a method option (e.g. ``"lr": 0.001``)."""

    model_config = ConfigDict(extra="allow")

    method: str | None = Field(default=None, description="registered method; default: the profile's method")
    task_ids: list[Id] | None = Field(
        default=None, max_length=1000, description="tasks to learn in this order; default: all pending"
    )
    epochs: int | None = Field(
        default=None, ge=1, le=10_000, description="epochs per task; default: the profile's"
    )
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    micro_batch_size: int | None = Field(default=None, ge=1, le=4096)
    seed: int | None = Field(default=None, ge=0, le=MAX_ID)
    precision: Literal["fp32", "bf16", "fp16", "auto"] | None = Field(
        default=None, description="fp32, bf16, fp16 or auto (the profile's when absent)"
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="method options (also accepted at the top level)"
    )


def multipart_body(fields: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """``openapi_extra`` documenting a multipart body read by hand: {field: (kind, description)}."""
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


# ------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok"]


class Ready(_Open):
    """``GET /readyz`` (200 ready, 503 not yet, with the reason)."""

    ready: bool
    version: str = Field(description="edgecl version")
    settings: dict[str, Any]
    model_version: int
    reason: str | None = Field(default=None, description="why not ready")
    worker: str | None = Field(default=None, description="idle, or the job it trains")


# ------------------------------------------------------------------------------------------- tasks
class TaskView(_Open):
    """One stored task."""

    id: int
    name: str
    status: Literal["pending", "queued", "training", "learned"]
    classes: list[str]
    counts: dict[str, int]
    eval_counts: dict[str, int]
    num_images: int
    created_at: str | None
    job_id: int | None = Field(description="the job that holds or learned it")
    learned_at: str | None
    learned_position: int | None = Field(description="0-based position in the model's learning order")
    accuracy: float | None = Field(description="accuracy over the classes seen when it was learned")


class DuplicateMember(BaseModel):
    """A member dropped because another member of its class has the same bytes."""

    member: str
    same_as: str


class TaskUploaded(TaskView):
    """Answer of ``POST /v1/tasks`` (201)."""

    auto_job_id: int | None = Field(description="the job queued by auto_train=true")
    warnings: list[str]
    duplicates: list[DuplicateMember] = Field(default_factory=list, description="dropped (at most 50 listed)")
    duplicates_not_listed: int | None = Field(default=None, description="dropped duplicates beyond the 50")
    seconds: float = Field(description="time to receive, validate and store the upload")


class TaskList(BaseModel):
    """``GET /v1/tasks``."""

    tasks: list[TaskView]


# ------------------------------------------------------------------------------------------- jobs
class JobAccepted(BaseModel):
    """Answer of ``POST /v1/jobs`` (202)."""

    job_id: int
    status: JobStatus
    task_ids: list[int]


class JobCancelled(BaseModel):
    """Answer of ``DELETE /v1/jobs/{id}`` (202)."""

    job_id: int
    status: Literal["cancelled", "cancelling"]


class JobTelemetry(_Open):
    """Meters of a job: the live region, each finished task, and totals against the budget."""

    current: dict[str, Any] | None
    tasks: list[dict[str, Any]]
    peak_memory_mb: float | None
    energy_j: float | None
    memory_budget_mb: float | None
    within_budget: bool | None


class JobView(_Open):
    """One job with its progress and meters."""

    job_id: int
    status: JobStatus
    method: str
    task_ids: list[int]
    task_id: int | None = Field(description="the task training now (null while the job sets up)")
    phase: str | None
    epoch: int | None
    epochs: int | None
    progress: float = Field(description="percent of the job's optimizer steps done")
    eta_s: float | None
    loss: float | None
    step_time_s: float | None
    details: dict[str, Any]
    options: dict[str, Any]
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    cancel_requested: bool
    error: str | None
    resumes: list[dict[str, Any]]
    telemetry: JobTelemetry
    results: list[dict[str, Any]]


class JobList(BaseModel):
    """``GET /v1/jobs``."""

    jobs: list[JobView]


# ------------------------------------------------------------------------------------------- predict
class LabelScore(BaseModel):
    """A label and its probability."""

    label: str
    probability: float


class Prediction(BaseModel):
    """The prediction for one image."""

    file: str
    label: str
    probability: float
    top_k: list[LabelScore]


class PredictAnswer(BaseModel):
    """Answer of ``POST /v1/predict``."""

    model_version: int
    engine: str
    predictions: list[Prediction]


# ------------------------------------------------------------------------------------------- model
class LearnedTask(BaseModel):
    """A task of the model in service."""

    id: int
    name: str
    classes: list[str]
    learned_at: str | None
    job_id: int | None


class ModelView(_Open):
    """``GET /v1/model``."""

    version: int
    loaded: bool
    engine: str
    method: str | None
    classes: list[str]
    tasks: list[LearnedTask]
    error: str | None = None
    method_config: dict[str, Any] | None = None
    num_classes: int | None = None
    backbone: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


class TelemetryView(_Open):
    """``GET /v1/telemetry``."""

    available: bool
    backends: list[dict[str, Any]] | None
    current: dict[str, Any] | None
    jobs: list[dict[str, Any]]
