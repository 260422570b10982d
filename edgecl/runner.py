"""Assemble a training run (backbone, stream, method, trainer config) from one spec.

``edgecl train``, ``edgecl bench`` (one subprocess per method) and the demo all go through
:func:`build_run` and :func:`run_training`, so every entry point drives the same :class:`Trainer`.
"""

from __future__ import annotations

import json
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
from edgecl.train.callbacks import Callback
from edgecl.train.trainer import TrainConfig, Trainer

__all__ = ["RunSpec", "build_backbone", "build_run", "build_stream", "machine_info", "run_training"]


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
            classes_per_task=(spec.num_classes or 2 * spec.tasks) // spec.tasks,
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


def build_run(spec: RunSpec) -> tuple[Method, TaskStream, TrainConfig]:
    """Backbone, stream, method and trainer config for ``spec`` (the method is seeded by ``spec.seed``)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    backbone = build_backbone(spec)
    stream = build_stream(spec, backbone)
    options = dict(spec.method_options)
    options.setdefault("expected_tasks", max(len(stream.tasks), 1))
    torch.manual_seed(spec.seed)
    method = create_method(spec.method, backbone, options)
    config = TrainConfig(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        micro_batch_size=spec.micro_batch_size,
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


def default_callbacks(spec: RunSpec) -> list[Callback]:
    """Telemetry (when enabled), test-set task-identification accuracy (methods with ``predict_task``),
    and a progress bar (when asked)."""
    from edgecl.methods.tii import TaskIdentificationCallback

    callbacks: list[Callback] = [TaskIdentificationCallback()]
    if spec.telemetry:
        from edgecl.telemetry import TelemetryCallback, detect_backends

        backends = detect_backends(spec.telemetry_backends) if spec.telemetry_backends else None
        callbacks.append(TelemetryCallback(backends=backends, period_s=spec.sampler_period_s))
    if spec.progress:
        from edgecl.progress import ProgressCallback

        callbacks.append(ProgressCallback())
    return callbacks


def run_training(spec: RunSpec, extra_callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Build and train ``spec``; returns the results dict with the spec and the machine added."""
    method, stream, config = build_run(spec)
    # callbacks first: the sampler thread and friends are part of the idle baseline the planner measures
    callbacks = default_callbacks(spec) + list(extra_callbacks or [])
    plan = None
    if spec.memory_budget_mb is not None:
        from edgecl.budget import BudgetGuard, Planner
        from edgecl.profiles import load_profile

        profile = load_profile(spec.profile, check_method=False) if spec.profile else None
        plan = Planner(method, config, profile, stream=stream, budget_mb=spec.memory_budget_mb).plan()
        plan.apply(config, method)
        print(plan.render())
        callbacks.append(BudgetGuard(plan))  # the plan carries the memory scope (RSS, CUDA, unified)
    trainer = Trainer(method, stream, config, callbacks)
    t0 = time.perf_counter()
    results = trainer.fit(resume_from=spec.resume)
    results["wall_seconds"] = time.perf_counter() - t0
    results["spec"] = asdict(spec)
    results["machine"] = machine_info()
    if plan is not None:
        results["memory_plan"] = plan.to_dict()
    return results
