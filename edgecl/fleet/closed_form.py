"""Exact federated closed-form heads: the :class:`~edgecl.fleet.aggregate.Statistics` of a method whose
HEAD phase is a ridge or prototype fit (:class:`~edgecl.methods.analytic.AnalyticHeadMixin`).

Analytic federated learning: the statistics the head is solved from (per-class feature sums and counts,
the Gram matrix of ``[x, 1]``) are sums over images, so summing them over devices gives the statistics of
the union of their data, and solving the head from the sums gives the head one device would fit on that
union (for the same prompt). Devices send their task's class rows and Gram matrix, never the head nor the
past tasks' Gram matrix (the global one: a device does not change it within a task).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from edgecl.fleet.aggregate import HEAD_PREFIX, DeviceUpdate, Statistics
from edgecl.methods.analytic import AnalyticHeadMixin, AnalyticStats, set_linear_head
from edgecl.methods.base import Phase
from edgecl.methods.layers import ExpandableHead
from edgecl.train.callbacks import Callback

__all__ = [
    "STATS_PREFIX",
    "KeepStatistics",
    "analytic_statistics",
    "check_gram",
    "closed_form_statistics",
    "solve_head",
]

STATS_PREFIX = "analytic."
"""Where :class:`~edgecl.methods.analytic.AnalyticHeadMixin` keeps its :class:`AnalyticStats` buffers."""

SUMS, COUNTS, GRAM_PAST, GRAM_TASK = (
    f"{STATS_PREFIX}{n}" for n in ("class_sums", "class_counts", "gram_past", "gram_task")
)
WEIGHT, BIAS = f"{HEAD_PREFIX}weight", f"{HEAD_PREFIX}bias"

GRAM_RTOL = 1e-3
"""Relative tolerance of the Gram matrix's consistency checks (float32 sums of the same features taken in
another order differ by round-off; a Gram matrix of other data differs by far more)."""


def closed_form_statistics(method: Any) -> Statistics | None:
    """The statistics spec of ``method``'s closed-form head; None for an SGD head (averaged as before)."""
    if not isinstance(method, AnalyticHeadMixin) or not method.closed_form_head():
        return None
    kind = str(getattr(method.cfg, "phase2_head"))  # noqa: B009  (declared by the method's config)
    return analytic_statistics(kind, float(getattr(method.cfg, "ridge_lambda")))  # noqa: B009


def analytic_statistics(kind: str, lam: float) -> Statistics:
    """The spec of :class:`AnalyticStats` buffers for a ``kind`` (``ridge``/``prototype``) head with λ."""

    def solve(tensors: dict[str, Tensor], task_rows: list[int]) -> dict[str, Tensor]:
        return solve_head(tensors, task_rows, kind, lam)

    return Statistics(
        rows=(SUMS, COUNTS),
        count=COUNTS,
        summed=(GRAM_TASK,),
        derived=(GRAM_PAST, WEIGHT, BIAS),
        solve=solve,
        check=check_gram,
    )


def solve_head(tensors: dict[str, Tensor], task_rows: list[int], kind: str, lam: float) -> dict[str, Tensor]:
    """The head from aggregated statistics, by :func:`~edgecl.methods.analytic.set_linear_head`: every
    ``ridge`` row re-solved; ``prototype`` rows of the task's classes that have samples (the others keep
    their global rows)."""
    weight = tensors[WEIGHT]
    stats = AnalyticStats(int(weight.shape[1]))
    stats.class_sums = tensors[SUMS].clone()
    stats.class_counts = tensors[COUNTS].clone()
    stats.gram_past = tensors[GRAM_PAST].clone()
    stats.gram_task = tensors[GRAM_TASK].clone()
    head = ExpandableHead(int(weight.shape[1]))
    head.weight = nn.Parameter(weight.clone(), requires_grad=False)
    head.bias = nn.Parameter(tensors[BIAS].clone(), requires_grad=False)
    classes = [c for c in task_rows if float(stats.class_counts[c]) > 0]
    set_linear_head(head, stats, kind, classes, int(weight.shape[0]), lam)
    return {WEIGHT: head.weight.detach(), BIAS: head.bias.detach()}


def check_gram(update: DeviceUpdate) -> str | None:
    """The task's Gram matrix must belong to the class rows sent: its ``[1, 1]`` entry is the number of
    samples, its last column the sum of the features (= the sum of the class sums), and it is symmetric."""
    gram = update.tensors[GRAM_TASK].to(torch.float64)
    sums = update.tensors[SUMS].to(torch.float64)
    if float(gram[-1, -1]) != float(update.num_examples):
        return f"{GRAM_TASK} counts {float(gram[-1, -1])} samples, num_examples is {update.num_examples}"
    scale = float(gram.diagonal().abs().max())
    if not torch.allclose(gram, gram.T, rtol=0.0, atol=GRAM_RTOL * scale):
        return f"{GRAM_TASK} is not symmetric"
    if bool((gram.diagonal() < 0).any()):
        return f"{GRAM_TASK} has negative diagonal entries"
    total = sums.sum(0)
    if not torch.allclose(gram[:-1, -1], total, rtol=0.0, atol=GRAM_RTOL * (1.0 + float(total.abs().max()))):
        return f"{GRAM_TASK} does not match the class sums sent (its feature sum differs from theirs)"
    return None


class KeepStatistics(Callback):
    """On a device: the task's statistics as the HEAD fit left them, before ``end_task`` folds the task's
    Gram matrix into the past one (what the device sends); None until a closed-form fit ran."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] | None = None
        self._fitted = False

    def on_task_start(self, trainer: Any, task: int) -> None:
        """A new task: nothing fitted yet."""
        self.tensors, self._fitted = None, False

    def on_phase_start(self, trainer: Any, task: int, phase: Phase) -> None:
        """A HEAD phase with a closed-form head fits the statistics."""
        if phase is Phase.HEAD and trainer.method.closed_form_head():
            self._fitted = True

    def on_train_end(self, trainer: Any, task: int) -> None:
        """The last moment the task's Gram matrix is still apart from the past one."""
        if self._fitted:
            state = trainer.method.trainable_state_dict()
            self.tensors = {k: state[k].detach().cpu().clone() for k in (SUMS, COUNTS, GRAM_TASK)}
