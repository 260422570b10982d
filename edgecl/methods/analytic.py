"""Closed-form heads from one pass of features: class-mean prototypes and a ridge-regression head.

The statistics are kept across tasks without keeping images (as RanPAC and analytic-learning methods do):
per-class feature sums and counts, and the Gram matrix of the bias-augmented features. Fitting a task
overwrites that task's statistics rather than adding to them, so refitting the same task (a resumed run)
gives the same head; :meth:`AnalyticStats.commit_task` folds the task's Gram matrix into the past one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgecl.backbone import FrozenViT
from edgecl.config import FieldProblem
from edgecl.methods.base import Method, MethodConfig, TaskInfo
from edgecl.methods.layers import ExpandableHead

__all__ = [
    "PHASE2_HEADS",
    "AnalyticHeadMixin",
    "AnalyticStats",
    "Phase2Head",
    "check_head_transform",
    "class_means",
    "fit_linear_head",
    "ridge_solution",
    "set_linear_head",
]

Phase2Head = Literal["sgd", "prototype", "ridge"]
"""``phase2_head`` choices: optimiser epochs, class-mean prototypes, or a ridge-regression solve."""
PHASE2_HEADS: tuple[str, ...] = get_args(Phase2Head)


def class_means(feats: Tensor, labels: Tensor, classes: list[int]) -> Tensor:
    """Mean feature of each class in ``classes`` (``len(classes) x D``); an empty class is an error."""
    rows = []
    for c in classes:
        sel = labels == c
        if not bool(sel.any()):
            raise ValueError(f"class {c} has no training samples; a prototype needs at least one")
        rows.append(feats[sel].mean(0))
    return torch.stack(rows)


def ridge_solution(gram: Tensor, targets: Tensor, lam: float) -> Tensor:
    """``W = (G + λI)⁻¹ Q`` for the Gram matrix ``G = XᵀX`` and ``Q = XᵀY`` (float64 solve, cast back)."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    sol = torch.linalg.solve(gram.double() + lam * eye, targets.double())
    return sol.to(gram.dtype)


class AnalyticStats(nn.Module):
    """Per-class sums and counts and the Gram matrix of ``[x, 1]``, as buffers (checkpointed)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("class_sums", torch.zeros(0, dim))
        self.register_buffer("class_counts", torch.zeros(0))
        self.register_buffer("gram_past", torch.zeros(dim + 1, dim + 1))
        """Σ [x,1][x,1]ᵀ over the features of every committed task."""
        self.register_buffer("gram_task", torch.zeros(dim + 1, dim + 1))
        """The same over the current task's features (overwritten by each fit of the task)."""

    @property
    def num_classes(self) -> int:
        """Classes the statistics have rows for."""
        return int(self.class_sums.shape[0])

    def grow(self, num_classes: int) -> None:
        """Allocate zero rows up to ``num_classes`` (never shrinks)."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        sums, counts = self.class_sums, self.class_counts
        self.class_sums = torch.cat([sums, sums.new_zeros(extra, self.dim)])
        self.class_counts = torch.cat([counts, counts.new_zeros(extra)])

    def accumulate(self, feats: Tensor, labels: Tensor, classes: list[int]) -> None:
        """Set the rows of ``classes`` and the task's Gram matrix from this task's features."""
        feats = feats.to(self.class_sums.dtype)
        for c in classes:
            sel = labels == c
            self.class_sums[c] = feats[sel].sum(0)
            self.class_counts[c] = float(sel.sum())
        aug = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], 1)
        self.gram_task.copy_(aug.T @ aug)

    def commit_task(self) -> None:
        """Fold the current task's Gram matrix into the past tasks' one (at the end of a task)."""
        self.gram_past.add_(self.gram_task)
        self.gram_task.zero_()

    def means(self, upto: int) -> Tensor:
        """Class means of classes ``0 .. upto-1`` (``upto x D``)."""
        return self.class_sums[:upto] / self.class_counts[:upto].clamp_min(1.0)[:, None]

    def ridge(self, upto: int, lam: float) -> tuple[Tensor, Tensor]:
        """Ridge head over one-hot targets of classes ``0 .. upto-1``: (weight ``upto x D``, bias ``upto``).

        Solves ``(G + λI) W = Q`` with ``G`` the Gram matrix of every task's ``[x, 1]`` and
        ``Q[:, c] = Σ_{y=c} [x, 1]`` (the class sums and counts), i.e. the joint least-squares solution
        over all data seen, computed from statistics only."""
        q = torch.cat([self.class_sums[:upto], self.class_counts[:upto, None]], 1).T  # (D+1) x C
        sol = ridge_solution(self.gram_past + self.gram_task, q, lam)  # (D+1) x C
        return sol[:-1].T.contiguous(), sol[-1].contiguous()


def fit_linear_head(
    head: ExpandableHead,
    stats: AnalyticStats,
    kind: str,
    feats: Tensor,
    labels: Tensor,
    classes: list[int],
    n_seen: int,
    ridge_lambda: float,
) -> None:
    """Set a linear head from one task's cached features (``kind`` is ``prototype`` or ``ridge``).

    ``prototype``: each new class's row is its normalised mean feature, bias 0, so the argmax equals a
    cosine prototype classifier's (``‖x‖`` is common to all classes); earlier rows stay. ``ridge``: every
    row and bias from :meth:`AnalyticStats.ridge` (earlier classes re-solved with the new Gram matrix)."""
    stats.grow(n_seen)
    stats.accumulate(feats, labels, classes)
    set_linear_head(head, stats, kind, classes, n_seen, ridge_lambda)


def set_linear_head(
    head: ExpandableHead,
    stats: AnalyticStats,
    kind: str,
    classes: list[int],
    n_seen: int,
    ridge_lambda: float,
) -> None:
    """Set the head from ``stats`` alone (the solve of :func:`fit_linear_head`): ``prototype`` rows of
    ``classes``, or every ``ridge`` row up to ``n_seen``. The fleet's server calls it on summed statistics."""
    with torch.no_grad():
        if kind == "prototype":
            rows = F.normalize(stats.means(n_seen)[classes], dim=1)
            head.weight[classes] = rows.to(head.weight.dtype)
            head.bias[classes] = 0.0
        elif kind == "ridge":
            weight, bias = stats.ridge(n_seen, ridge_lambda)
            head.weight[:n_seen] = weight.to(head.weight.dtype)
            head.bias[:n_seen] = bias.to(head.bias.dtype)
        else:
            raise ValueError(f"phase2_head must be one of {PHASE2_HEADS} for a closed-form fit, got {kind!r}")


def check_head_transform(phase2_head: str, transform: str, transform_key: str) -> None:
    """A closed-form head is fitted from one deterministic feature pass: it needs ``transform_key=eval``
    (raised from a config's model validator, so the message names ``phase2_head``)."""
    if phase2_head != "sgd" and transform != "eval":
        raise FieldProblem(
            "phase2_head",
            f"{phase2_head!r} is fitted from one deterministic feature pass: set {transform_key}=eval "
            f"(got {transform!r})",
        )


class AnalyticHeadMixin(Method):
    """A head-only phase solved in closed form when the config's ``phase2_head`` is not ``sgd``.

    Put it before the method's base class (``class M(AnalyticHeadMixin, Base)``); the config needs the fields
    ``phase2_head`` and ``ridge_lambda``. The statistics exist only for a closed-form head, so ``sgd``
    checkpoints are unchanged."""

    def __init__(self, backbone: FrozenViT, cfg: MethodConfig) -> None:
        super().__init__(backbone, cfg)
        self.analytic = AnalyticStats(backbone.embed_dim) if self._phase2_head != "sgd" else None

    @property
    def _phase2_head(self) -> str:
        return str(getattr(self.cfg, "phase2_head"))  # noqa: B009  (declared by the subclass's config)

    def closed_form_head(self) -> bool:
        """The HEAD phase is a closed-form fit unless ``phase2_head=sgd``."""
        return self.analytic is not None

    def fit_head(self, feats: Tensor, labels: Tensor) -> None:
        """Prototype or ridge head from the task's cached features."""
        assert self.task is not None and self.analytic is not None, "begin_task was not called"
        lam = float(getattr(self.cfg, "ridge_lambda"))  # noqa: B009
        classes = list(self.task.classes)
        fit_linear_head(
            self.head, self.analytic, self._phase2_head, feats, labels, classes, self.task.n_seen, lam
        )

    def begin_task(self, task: TaskInfo) -> None:
        """Grow the statistics with the head (checkpoints then always hold both at one size)."""
        super().begin_task(task)
        if self.analytic is not None:
            self.analytic.grow(task.n_seen)

    def end_task(self, task: TaskInfo, loader: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Keep the task's Gram matrix for the next tasks' ridge solves."""
        super().end_task(task, loader)
        if self.analytic is not None:
            self.analytic.commit_task()

    def checkpoint_meta(self) -> dict[str, Any]:
        """Also which head the checkpoint's statistics belong to."""
        return {**super().checkpoint_meta(), "phase2_head": self._phase2_head}

    def load_checkpoint_meta(self, state: dict[str, Any]) -> None:
        """Follow the checkpoint's head and size its statistics to the saved head.

        A checkpoint from before ``phase2_head`` existed (no key) was trained with the SGD head and holds no
        statistics: it continues with ``sgd``, since a ridge solve would need the earlier tasks' Gram matrix.
        """
        super().load_checkpoint_meta(state)
        saved = str(state.get("phase2_head", "sgd"))
        if saved != self._phase2_head:
            setattr(self.cfg, "phase2_head", saved)  # noqa: B010
            self.analytic = AnalyticStats(self.backbone.embed_dim) if saved != "sgd" else None
        if self.analytic is not None:
            self.analytic.grow(int(state.get("head_classes", 0)))
