"""Assemble a training run (backbone, stream, method, trainer config, callbacks, memory plan) from one spec.

``edgecl train``, ``edgecl bench`` (one subprocess per method), the demo and the daemon all go through
:func:`prepare_run` / :func:`run_training`, so every entry point drives the same :class:`Trainer` with the
same callbacks (telemetry, task identification, budget guard) and the same memory plan.

A :class:`RunSpec` is JSON (a subprocess can receive it). What JSON cannot carry is given by keyword:

* ``stream=``: the data, as any :class:`~edgecl.data.stream.TaskStream`, instead of ``spec.data`` (the
  daemon's stream over its stored tasks; a fleet client's local partition). Method options are then used as
  given: a stream that grows over a device's life does not know its final task count, so
  ``expected_tasks`` is not defaulted to its length;
* ``backbone=``: an already-loaded :class:`~edgecl.backbone.FrozenViT` (the daemon keeps one for its whole
  life), instead of loading ``spec.backbone``/``spec.weights``;
* ``profile=``: a resolved :class:`~edgecl.profiles.Profile` for the memory planner (the daemon's, with its
  flag and environment overrides) instead of loading ``spec.profile``; with a caller's stream the planner
  probes the stream's last task, the one such a run trains;
* ``extra_callbacks=``: the caller's own hooks (the daemon's progress to its store, the bench's events).

``spec.resume`` continues from any checkpoint folder: a mid-task epoch checkpoint (the task resumes at its
next epoch) or a finished model such as a committed ``model_dir`` (training continues with the stream's next
task, which is how the daemon adds a task to the model in service).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgecl.backbone import FrozenViT, load_backbone
from edgecl.data.stream import TaskStream, from_cifar100, from_image_folder
from edgecl.data.synthetic import synthetic_stream
from edgecl.methods.base import Method
from edgecl.methods.registry import create_method
from edgecl.profiles import Profile
from edgecl.train.callbacks import Callback
from edgecl.train.trainer import TrainConfig, Trainer

__all__ = [
    "Run",
    "RunSpec",
    "TolerantCallback",
    "build_backbone",
    "build_run",
    "build_stream",
    "default_callbacks",
    "machine_info",
    "prepare_run",
    "run_training",
    "telemetry_callback",
]

log = logging.getLogger("edgecl.runner")


@dataclass
class RunSpec:
    """Everything that defines one training run; JSON-able, so a subprocess can receive it."""

    method: str = "cps_prompt"
    method_options: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    """An ImageFolder root (``train/`` + ``val/``), ``cifar100:ROOT`` or ``synthetic``."""
    tasks: int = 5
    num_classes: int | None = None
    limit_per_class: int | None = None
    test_limit_per_class: int | None = None
    class_order: str = "sorted"
    backbone: str = "vit_tiny_patch16_224"
    weights: str | None = None
    pretrained: bool = False
    img_size: int | None = None
    patch_size: int | None = None
    epochs: int = 5
    batch_size: int = 16
    micro_batch_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    eval_batch_size: int | None = None
    min_steps: int | None = None
    """Optimiser steps per task at least (``TrainConfig.min_steps``); None = the trainer's default."""
    """Evaluation and phase-2 caching batch; None = the trainer's default (the planner may lower it)."""
    checkpoint_dir: str | None = None
    model_dir: str | None = None
    resume: str | None = None
    progress: bool = False
    sampler_period_s: float = 0.1
    telemetry_backends: list[str] = field(default_factory=list)
    telemetry: bool = True
    memory_budget_mb: float | None = None
    profile: str | None = None

    def to_json(self) -> str:
        """Serialise for a child process."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def build_backbone(spec: RunSpec) -> FrozenViT:
    """The frozen backbone of ``spec``; random weights only when neither weights nor pretrained is given."""
    return load_backbone(
        spec.backbone,
        weights=spec.weights,
        pretrained=spec.pretrained,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
    )


def build_stream(spec: RunSpec, backbone: FrozenViT) -> TaskStream:
    """The task stream of ``spec`` with transforms matched to the backbone's size and normalisation."""
    info = backbone.info
    common = {"img_size": info.img_size, "mean": info.mean, "std": info.std}
    if spec.data == "synthetic":
        return synthetic_stream(
            spec.tasks,
            num_classes=spec.num_classes or 2 * spec.tasks,
            per_class=spec.limit_per_class or 32,
            test_per_class=spec.test_limit_per_class or 16,
            seed=spec.seed,
            **common,  # type: ignore[arg-type]
        )
    if spec.data.startswith("cifar100:"):
        return from_cifar100(
            spec.data.split(":", 1)[1],
            spec.tasks,
            order=spec.class_order,
            seed=spec.seed,
            limit_per_class=spec.limit_per_class,
            **common,  # type: ignore[arg-type]
        )
    return from_image_folder(
        spec.data,
        spec.tasks,
        order=spec.class_order,
        seed=spec.seed,
        num_classes=spec.num_classes,
        limit_per_class=spec.limit_per_class,
        test_limit_per_class=spec.test_limit_per_class,
        **common,  # type: ignore[arg-type]
    )


def build_run(
    spec: RunSpec, *, backbone: FrozenViT | None = None, stream: TaskStream | None = None
) -> tuple[Method, TaskStream, TrainConfig]:
    """Method, stream and trainer config for ``spec`` (the method is seeded by ``spec.seed``); ``backbone``
    and ``stream`` replace the ones ``spec`` describes (see the module docstring)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    backbone = backbone if backbone is not None else build_backbone(spec)
    options = dict(spec.method_options)
    own_stream = stream is not None
    if stream is None:
        stream = build_stream(spec, backbone)
        options.setdefault("expected_tasks", max(len(stream.tasks), 1))
    torch.manual_seed(spec.seed)
    method = create_method(spec.method, backbone, options)
    tasks = len(stream.tasks)
    if not own_stream and method.pool_bound_to_tasks() and method.cfg.expected_tasks < tasks:
        raise ValueError(
            f"method '{spec.method}': expected_tasks={method.cfg.expected_tasks} is less than the stream's "
            f"{tasks} tasks; set --expected-tasks {tasks}, or leave it unset (it defaults to the task count)"
        )
    config = TrainConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        micro_batch_size=spec.micro_batch_size,
        eval_batch_size=spec.eval_batch_size or TrainConfig.eval_batch_size,
        min_steps=TrainConfig.min_steps if spec.min_steps is None else spec.min_steps,
        seed=spec.seed,
        device=spec.device,
        precision=spec.precision,
        checkpoint_dir=spec.checkpoint_dir,
        model_dir=spec.model_dir,
        progress=spec.progress,
    )
    return method, stream, config


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, cores, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    from edgecl.budget.allocator import allocator_description

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "allocator": allocator_description(),
    }


class TolerantCallback(Callback):
    """Runs another callback's hooks, logging (once per hook) instead of raising: a meter that fails must
    not stop training. Cancellation still propagates from the trainer itself."""

    def __init__(self, inner: Callback) -> None:
        self.inner = inner
        self._failed: set[str] = set()

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            inner = object.__getattribute__(self, "inner")
            failed = object.__getattribute__(self, "_failed")

            def call(*args: Any, **kwargs: Any) -> None:
                try:
                    getattr(inner, name)(*args, **kwargs)
                except Exception as err:
                    if name not in failed:
                        failed.add(name)
                        log.warning("%s.%s failed (ignored): %s", type(inner).__name__, name, err)

            return call
        return object.__getattribute__(self, name)


def telemetry_callback(spec: RunSpec) -> Callback | None:
    """The power/memory meters of ``spec`` (None when ``spec.telemetry`` is off or telemetry cannot start)."""
    if not spec.telemetry:
        return None
    from edgecl.telemetry import TelemetryCallback, detect_backends

    try:
        backends = detect_backends(spec.telemetry_backends) if spec.telemetry_backends else None
        return TelemetryCallback(backends=backends, period_s=spec.sampler_period_s)
    except Exception as err:  # a broken sensor stack must not stop training
        log.warning("telemetry disabled for this run: %s", err)
        return None


def default_callbacks(spec: RunSpec, telemetry: Callback | None = None) -> list[Callback]:
    """Test-set task-identification accuracy (methods with ``predict_task``), telemetry (``telemetry``, or
    the one ``spec`` asks for; a failing meter is logged, not fatal) and a progress bar (when asked)."""
    from edgecl.train.task_identification import TaskIdentificationCallback

    callbacks: list[Callback] = [TaskIdentificationCallback()]
    telemetry = telemetry if telemetry is not None else telemetry_callback(spec)
    if telemetry is not None:
        callbacks.append(TolerantCallback(telemetry))
    if spec.progress:
        from edgecl.progress import ProgressCallback

        callbacks.append(ProgressCallback())
    return callbacks


@dataclass
class Run:
    """A run assembled and ready: call :meth:`fit`. ``trainer`` (for ``request_stop``) and ``telemetry``
    (for live meters) are there for callers that watch a run, such as the daemon."""

    spec: RunSpec
    method: Method
    stream: TaskStream
    config: TrainConfig
    trainer: Trainer
    telemetry: Callback | None = None
    plan: Any = None
    """The memory plan (``edgecl.budget.Plan``) when ``spec.memory_budget_mb`` is set."""

    def fit(self) -> dict[str, Any]:
        """Train (resuming from ``spec.resume``); the results dict with the spec, machine and plan added."""
        t0 = time.perf_counter()
        results = self.trainer.fit(resume_from=self.spec.resume)
        results["wall_seconds"] = time.perf_counter() - t0
        results["spec"] = asdict(self.spec)
        results["machine"] = machine_info()
        if self.plan is not None:
            results["memory_plan"] = self.plan.to_dict()
        return results


def prepare_run(
    spec: RunSpec,
    extra_callbacks: list[Callback] | None = None,
    *,
    backbone: FrozenViT | None = None,
    stream: TaskStream | None = None,
    profile: Profile | None = None,
) -> Run:
    """Build everything ``spec`` needs and plan its memory budget: the one assembly of every entry point.
    ``profile`` is a resolved :class:`~edgecl.profiles.Profile` for the planner (the daemon's, with its
    flag and environment overrides) instead of loading ``spec.profile``."""
    own_stream = stream is not None
    method, stream, config = build_run(spec, backbone=backbone, stream=stream)
    # callbacks first: the sampler thread and friends are part of the idle baseline the planner measures
    telemetry = telemetry_callback(spec)
    callbacks = default_callbacks(spec, telemetry) + list(extra_callbacks or [])
    plan = None
    if spec.memory_budget_mb is not None:
        from edgecl.budget import BudgetGuard, Planner
        from edgecl.profiles import load_profile

        if profile is None and spec.profile:
            profile = load_profile(spec.profile, check_method=False)
        # a caller's stream (the daemon's, a fleet round's) ends with the task this run trains: probe that one
        task_index = len(stream.tasks) - 1 if own_stream else None
        plan = Planner(
            method, config, profile, stream=stream, budget_mb=spec.memory_budget_mb, task_index=task_index
        ).plan()
        plan.apply(config, method)
        print(plan.render())
        callbacks.append(BudgetGuard(plan))  # the plan carries the memory scope (RSS, CUDA, unified)
    trainer = Trainer(method, stream, config, callbacks)
    return Run(spec, method, stream, config, trainer, telemetry, plan)


def run_training(
    spec: RunSpec,
    extra_callbacks: list[Callback] | None = None,
    *,
    backbone: FrozenViT | None = None,
    stream: TaskStream | None = None,
    profile: Profile | None = None,
) -> dict[str, Any]:
    """Build and train ``spec`` (see :func:`prepare_run`); returns the results dict."""
    return prepare_run(spec, extra_callbacks, backbone=backbone, stream=stream, profile=profile).fit()
