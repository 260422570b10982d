"""Continual-learning accuracy metrics from the accuracy matrix (PILOT / mammoth definitions)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["average_incremental_accuracy", "final_average_accuracy", "forgetting", "summarize"]

Matrix = Sequence[Sequence[float]]
"""``A[i][j]``: accuracy on task j's test classes after training task i (defined for j <= i)."""


def final_average_accuracy(acc: Matrix) -> float:
    """Mean over tasks of the accuracy on each task's classes after the last task (FAA / A_N)."""
    last = acc[-1]
    return sum(last) / len(last)


def average_incremental_accuracy(acc: Matrix) -> float:
    """Mean over steps i of the mean accuracy over tasks 0..i after step i (CAA / Ā)."""
    return sum(sum(row[: i + 1]) / (i + 1) for i, row in enumerate(acc)) / len(acc)


def forgetting(acc: Matrix) -> float:
    """Mean over earlier tasks of (best accuracy before the last step − final accuracy); 0 for one task."""
    t = len(acc)
    if t < 2:
        return 0.0
    drops = [max(acc[i][j] for i in range(j, t - 1)) - acc[-1][j] for j in range(t - 1)]
    return sum(drops) / len(drops)


def summarize(acc: Matrix) -> dict[str, float]:
    """All three metrics as a dict."""
    return {
        "final_average_accuracy": final_average_accuracy(acc),
        "average_incremental_accuracy": average_incremental_accuracy(acc),
        "forgetting": forgetting(acc),
    }
