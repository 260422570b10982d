"""What travels between the fleet server and a device, as plain dataclasses (no Flower types).

:mod:`edgecl.fleet.flower` turns these into Flower ``RecordDict`` messages and back; the in-process
simulation passes them as they are. Only trainable tensors, class names and counts appear here: never an
image or a feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgecl.fleet.aggregate import DeviceUpdate, GlobalModel

__all__ = ["EvalReply", "EvalRequest", "TrainReply", "TrainRequest"]


@dataclass
class TrainRequest:
    """Train ``task`` for one round from ``model``, with the fleet's recipe ``spec``."""

    spec: dict[str, Any]
    """The fleet's training recipe (``RunSpec`` fields); a device keeps its own local fields."""
    plan: list[list[str]]
    """Class names of each task up to ``task`` (the fleet's class order)."""
    task: int
    round: int
    model: GlobalModel
    evaluate: bool = True
    """Whether the device evaluates the received model on its own test images first."""


@dataclass
class TrainReply:
    """The device's update (None when it has no training image of the task) and its evaluation."""

    update: DeviceUpdate | None
    evaluation: list[tuple[int, int]] = field(default_factory=list)
    """(correct, total) per task 0..task of the *received* model on the device's test images."""
    train_seconds: float = 0.0
    local_accuracy: list[float] = field(default_factory=list)
    """Accuracy per task of the device's model after its local training (before aggregation)."""


@dataclass
class EvalRequest:
    """Evaluate ``model`` (and commit it as the device's model when ``save``)."""

    spec: dict[str, Any]
    plan: list[list[str]]
    model: GlobalModel
    save: bool = True


@dataclass
class EvalReply:
    """(correct, total) per task, and a digest of the parameters the device now holds."""

    evaluation: list[tuple[int, int]]
    digest: str
    model_dir: str | None = None
