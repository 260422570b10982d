"""The fleet's aggregation: checks one device's update, then sample-weighted FedAvg aligned by class name.

Pure torch, no Flower: the Flower ServerApp and the in-process simulation both call these functions.

* Tensors outside the head (prompt components, keys, attention vectors) are averaged whole, each device
  weighted by its training images of the round. Components a device did not train this task are the
  global's own values on every device, so their average is the global value again.
* Head rows are keyed by class name. A device sends the rows of the task's classes it has images of (with
  their image counts); a class row is the count-weighted mean of the rows sent for it, and a class no
  device sent this round keeps its global row. Rows of earlier tasks are never sent (the task's loss masks
  them) and stay global.
* An update is refused, with a logged reason, before it can enter the average: wrong task or model
  version, names or shapes that are not the global model's, unknown or repeated class names, counts that
  do not add up, non-finite or non-float values.
* A closed-form head (ridge or prototype, :mod:`edgecl.methods.analytic`) is not averaged: its sufficient
  statistics are summed (per-class rows by class name, the task's Gram matrix whole) and the head is solved
  again from the sums (:class:`Statistics`, which :mod:`edgecl.fleet.closed_form` builds for a method), so
  the global head is the one a single device would fit on the union of the accepted devices' data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HEAD_PREFIX",
    "DeviceUpdate",
    "GlobalModel",
    "Statistics",
    "aggregate",
    "check_update",
    "head_names",
]

log = logging.getLogger("edgecl.fleet")

HEAD_PREFIX = "head."
"""Trainable tensors whose first dimension is the class (one row per class name)."""


@dataclass
class GlobalModel:
    """The fleet's model: the method's trainable tensors, head rows in ``classes`` order."""

    tensors: dict[str, Tensor]
    classes: list[str]
    """Name of each head row (the fleet's class order, up to the current task)."""
    method_meta: dict[str, Any] = field(default_factory=dict)
    """The method's ``checkpoint_meta()`` for these tensors (head size, current prompt task)."""
    task: int = -1
    """The task these tensors are inside (its components and rows allocated); -1 before any task."""
    version: int = 0
    """Aggregations so far; an update names the version it trained from."""

    def nbytes(self) -> int:
        """Bytes of the tensors (what one message down to a device carries, framing aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class DeviceUpdate:
    """What one device returns after training a round: trainable tensors and its sample counts."""

    node: str
    task: int
    version: int
    """The global version the device started from."""
    tensors: dict[str, Tensor]
    """Every non-head tensor whole; head tensors with the rows of ``head_classes`` only."""
    head_classes: list[str]
    class_counts: list[int]
    """Training images of each of ``head_classes`` on the device."""
    num_examples: int

    def nbytes(self) -> int:
        """Bytes of the tensors (the message up to the server, framing aside)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Statistics:
    """How a closed-form head's sufficient statistics aggregate: summed, not averaged, then solved.

    Statistics add over devices (a sum of per-device sums is the sum over the union of their data), so the
    server sums them and sets the head from the sums with ``solve`` instead of averaging solutions."""

    rows: tuple[str, ...]
    """Class-indexed tensors (one row per class name): a device sends the rows of its ``head_classes``;
    the task's rows are the sums of the rows sent (zero for a class nobody sent), earlier rows stay."""
    count: str
    """The one of ``rows`` that holds each class's sample count: it must equal the declared class counts."""
    summed: tuple[str, ...]
    """Tensors sent whole and summed over the accepted devices (e.g. the task's Gram matrix)."""
    derived: tuple[str, ...]
    """Tensors devices do not send: kept from the global model, or set by ``solve`` (the head itself)."""
    solve: Callable[[dict[str, Tensor], list[int]], dict[str, Tensor]]
    """``solve(tensors, task_rows)``: the tensors it sets (the head) from the aggregated ``tensors``."""
    check: Callable[[DeviceUpdate], str | None] | None = None
    """Further consistency checks of one update's statistics (why it is refused, or None)."""


def head_names(names: Sequence[str], head_prefix: str = HEAD_PREFIX) -> list[str]:
    """The tensor names among ``names`` that are class-indexed head rows."""
    return [n for n in names if n.startswith(head_prefix)]


def check_update(
    update: DeviceUpdate,
    model: GlobalModel,
    task_classes: Sequence[str],
    head_prefix: str = HEAD_PREFIX,
    stats: Statistics | None = None,
) -> str | None:
    """Why ``update`` cannot enter the average of ``model``'s next version (None when it can).

    ``task_classes`` are the class names of the task being trained: the only head rows a device may send.
    With ``stats`` the update carries no ``stats.derived`` tensor, and its count rows must match its counts.
    """
    if update.task != model.task:
        return f"update is for task {update.task}, the round trains task {model.task}"
    if update.version != model.version:
        return f"update was trained from model version {update.version}, the round sent {model.version}"
    if isinstance(update.num_examples, bool) or not isinstance(update.num_examples, int):
        return f"num_examples must be an integer, got {update.num_examples!r}"
    if update.num_examples < 1:
        return f"num_examples must be >= 1, got {update.num_examples}"
    derived = set(stats.derived) if stats is not None else set()
    expected, got = set(model.tensors) - derived, set(update.tensors)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        return f"tensor names differ from the global model: missing {missing[:5]}, unexpected {extra[:5]}"
    allowed = set(task_classes)
    if len(set(update.head_classes)) != len(update.head_classes):
        return "head_classes has repeated names"
    unknown = sorted(set(update.head_classes) - allowed)
    if unknown:
        return f"head rows for classes outside the task: {unknown[:5]}"
    if len(update.class_counts) != len(update.head_classes):
        return f"{len(update.class_counts)} class counts for {len(update.head_classes)} head rows"
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in update.class_counts):
        return f"class counts must be integers >= 1, got {list(update.class_counts)[:5]}"
    if sum(update.class_counts) != update.num_examples:
        return f"class counts add up to {sum(update.class_counts)}, num_examples is {update.num_examples}"
    rows = len(update.head_classes)
    row_names = set(stats.rows) if stats is not None else set()
    for name, ref in model.tensors.items():
        if name in derived:
            continue
        t = update.tensors[name]
        if not isinstance(t, Tensor):
            return f"{name} is not a tensor"
        if not t.is_floating_point():
            return f"{name} has dtype {t.dtype}, a floating-point tensor was expected"
        per_class = name.startswith(head_prefix) or name in row_names
        shape = (rows, *ref.shape[1:]) if per_class else tuple(ref.shape)
        if tuple(t.shape) != shape:
            return f"{name} has shape {tuple(t.shape)}, expected {shape}"
        if not bool(torch.isfinite(t).all()):
            return f"{name} has non-finite values"
    if stats is not None:
        sent = update.tensors[stats.count].to(torch.float64)
        if not torch.equal(sent, torch.tensor(update.class_counts, dtype=torch.float64)):
            return (
                f"{stats.count} rows {sent.tolist()[:5]} differ from the declared class counts "
                f"{list(update.class_counts)[:5]}"
            )
        if stats.check is not None:
            return stats.check(update)
    return None


def aggregate(
    model: GlobalModel,
    updates: Sequence[DeviceUpdate],
    task_classes: Sequence[str],
    head_prefix: str = HEAD_PREFIX,
    stats: Statistics | None = None,
) -> tuple[GlobalModel, dict[str, str]]:
    """The next global model from the updates that pass :func:`check_update`, and the refused ones.

    Returns ``(model, {node: reason})``. With no acceptable update the tensors are the old ones (and the
    version is unchanged: the round did not happen). With ``stats`` (a closed-form head) the statistics are
    summed and the head is ``stats.solve`` of the sums; without, the head rows are averaged.
    """
    accepted: list[DeviceUpdate] = []
    refused: dict[str, str] = {}
    for u in updates:
        reason = check_update(u, model, task_classes, head_prefix, stats)
        if reason is None:
            accepted.append(u)
        else:
            refused[u.node] = reason
            log.warning("refused the update of node %s: %s", u.node, reason)
    if not accepted:
        return model, refused
    row_of = {name: i for i, name in enumerate(model.classes)}
    total = float(sum(u.num_examples for u in accepted))
    out: dict[str, Tensor] = {}
    for name, ref in model.tensors.items():
        if stats is not None and name in (*stats.rows, *stats.summed, *stats.derived):
            out[name] = _summed(name, ref, accepted, stats, [row_of[c] for c in task_classes], row_of)
        elif name.startswith(head_prefix):
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            weight = torch.zeros(ref.shape[0], dtype=torch.float64)
            for u in accepted:
                idx = torch.tensor([row_of[c] for c in u.head_classes], dtype=torch.long)
                counts = torch.tensor(u.class_counts, dtype=torch.float64)
                t = u.tensors[name].to(torch.float64)
                acc.index_add_(0, idx, t * counts.view(-1, *([1] * (t.dim() - 1))))
                weight.index_add_(0, idx, counts)
            new = ref.to(torch.float64).clone()
            sent = weight > 0
            new[sent] = acc[sent] / weight[sent].view(-1, *([1] * (ref.dim() - 1)))
            out[name] = new.to(ref.dtype)
        else:
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for u in accepted:
                acc += u.tensors[name].to(torch.float64) * (u.num_examples / total)
            out[name] = acc.to(ref.dtype)
    if stats is not None:
        out.update(stats.solve(out, [row_of[c] for c in task_classes]))
    new_model = GlobalModel(out, list(model.classes), dict(model.method_meta), model.task, model.version + 1)
    return new_model, refused


def _summed(
    name: str,
    ref: Tensor,
    accepted: Sequence[DeviceUpdate],
    stats: Statistics,
    task_rows: list[int],
    row_of: dict[str, int],
) -> Tensor:
    """One statistics tensor of the next model: task rows summed by class, whole tensors summed, derived
    tensors kept (until ``stats.solve`` sets them)."""
    if name in stats.derived:
        return ref.clone()
    if name in stats.summed:
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u in accepted:
            acc += u.tensors[name].to(torch.float64)
        return acc.to(ref.dtype)
    new = ref.to(torch.float64).clone()
    new[task_rows] = 0.0  # a task class no accepted device sent has no data in this round's sums
    for u in accepted:
        idx = torch.tensor([row_of[c] for c in u.head_classes], dtype=torch.long)
        new.index_add_(0, idx, u.tensors[name].to(torch.float64))
    return new.to(ref.dtype)


def weighted_accuracy(pairs: Sequence[tuple[int, int]]) -> float:
    """Pooled accuracy of (correct, total) pairs; NaN when there is nothing to count."""
    correct = sum(c for c, _ in pairs)
    total = sum(n for _, n in pairs)
    return correct / total if total else math.nan
