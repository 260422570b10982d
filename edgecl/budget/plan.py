"""The memory plan: how to train within a budget, the figures it was derived from, and how to apply it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgecl.methods.base import Method
    from edgecl.train.trainer import TrainConfig

__all__ = ["BudgetError", "Plan"]


class BudgetError(ValueError):
    """Nothing fits the budget; ``minimum_mb`` is the smallest budget that would work (None if unknown)."""

    def __init__(self, message: str, minimum_mb: float | None = None) -> None:
        super().__init__(message)
        self.minimum_mb = minimum_mb


@dataclass
class Plan:
    """How to train within the budget, and the figures it was derived from (MB)."""

    method: str
    device: str
    memory_scope: str
    budget_mb: float | None
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    reduction_rate: float | None
    precision: str
    eval_batch_size: int
    idle_baseline_mb: float
    """Process RSS before training: interpreter, libraries, weights, the method's parameters."""
    predicted_peak_mb: float
    """Predicted peak of the budgeted quantity (``memory_scope``)."""
    headroom_mb: float
    minimum_budget_mb: float
    """Smallest budget with which this plan's precision and r would still fit (micro-batch 1)."""
    weights_mb: float
    trainable_mb: float
    gradients_mb: float
    optimizer_mb: float
    activations_mb: float
    """Saved activations of one micro-batch (counted with saved_tensors_hooks, linear in m)."""
    activations_per_sample_mb: float
    overhead_mb: float
    """Measured runtime overhead of a step beyond the saved activations (gradients included)."""
    eval_peak_mb: float
    """Predicted peak of evaluation / phase-2 caching (budgeted quantity)."""
    input_mb: float
    predicted_peak_rss_mb: float
    predicted_peak_cuda_mb: float | None
    idle_cuda_mb: float | None
    verified_peak_mb: float | None
    """Peak from one probe step at the chosen micro-batch (None when not verified)."""
    linearity_error: float | None
    """|S_fit(1) - S(1)| / S(1) of the saved-bytes fit through micro-batches 2 and 4."""
    allocator: str
    probes: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    planning_seconds: float = 0.0
    idle_file_backed_mb: float | None = None
    """File-backed share of the idle baseline (``RssFile``: library and weight pages the kernel may evict
    and re-read under pressure from other processes); None where /proc does not say."""

    @property
    def fits(self) -> bool:
        """Whether the predicted peak plus headroom is within the budget (True without a budget)."""
        return self.budget_mb is None or self.predicted_peak_mb + self.headroom_mb <= self.budget_mb

    def apply(self, config: TrainConfig, method: Method) -> None:
        """Put the plan into the run: micro-batch, precision and eval batch into ``config``, the reduction
        rate into ``method``'s live config (so results and checkpoints record it).

        ``config`` must have the plan's batch (a ``ValueError`` otherwise: the plan was made for another
        run); ``method`` must be the method the plan was made for.
        """
        if config.batch_size != self.batch_size:
            raise ValueError(
                f"the plan is for batch {self.batch_size}, the training config has {config.batch_size}; "
                "plan again with this config"
            )
        if method.name != self.method:
            raise ValueError(f"the plan is for method {self.method!r}, not {method.name!r}")
        config.micro_batch_size = self.micro_batch_size
        config.precision = self.precision
        config.eval_batch_size = self.eval_batch_size
        config.validate()
        if self.reduction_rate is not None:
            method.cfg.reduction_rate = self.reduction_rate  # type: ignore[attr-defined]
            method.cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able dict (stored in results.json as ``memory_plan``)."""
        d = dataclasses.asdict(self)
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}

    def _file_note(self) -> str:
        if self.idle_file_backed_mb is None:
            return ""
        return f"; {self.idle_file_backed_mb:.0f} MB of it file-backed"

    def render(self) -> str:
        """Human-readable plan."""
        scope = {"rss": "process peak RSS", "cuda": "peak CUDA allocated", "unified": "RSS + CUDA (unified)"}
        budget = "no budget" if self.budget_mb is None else f"budget {self.budget_mb:.0f} MB"
        r = "-" if self.reduction_rate is None else f"{self.reduction_rate:g}"
        what = scope.get(self.memory_scope, self.memory_scope)
        lines = [
            f"Memory plan: {self.method} on {self.device}, {budget} ({what})",
            f"  micro-batch {self.micro_batch_size} x {self.accumulation_steps} accumulation step(s) = batch "
            f"{self.batch_size}; reduction rate r {r}; precision {self.precision}; "
            f"eval batch {self.eval_batch_size}",
            f"  idle baseline        {self.idle_baseline_mb:8.1f} MB  (interpreter, libraries, weights "
            f"{self.weights_mb:.1f} MB, trainable {self.trainable_mb:.1f} MB{self._file_note()})",
            f"  + optimizer state    {self.optimizer_mb:8.1f} MB",
            f"  + saved activations  {self.activations_mb:8.1f} MB  "
            f"({self.activations_per_sample_mb:.2f} MB/sample, counted with saved_tensors_hooks)",
            f"  + runtime overhead   {self.overhead_mb:8.1f} MB  (measured on probe steps; gradients "
            f"{self.gradients_mb:.1f} MB included)",
            f"  + input batch        {self.input_mb:8.1f} MB",
            f"  = predicted peak     {self.predicted_peak_mb:8.1f} MB  "
            f"(evaluation {self.eval_peak_mb:.1f} MB)",
        ]
        if self.verified_peak_mb is not None:
            lines.append(
                f"  verified probe step  {self.verified_peak_mb:8.1f} MB  (a step at the chosen micro-batch)"
            )
        if self.memory_scope != "rss":
            lines.append(f"  host RSS (reported)  {self.predicted_peak_rss_mb:8.1f} MB")
        if self.budget_mb is not None:
            left = self.budget_mb - self.idle_baseline_mb if self.memory_scope == "rss" else None
            extra = f"; {left:.1f} MB left above the idle baseline" if left is not None else ""
            lines.append(
                f"  headroom {self.headroom_mb:.1f} MB; fits {self.budget_mb:.0f} MB: "
                f"{'yes' if self.fits else 'NO'}; smallest budget for this precision/r: "
                f"{self.minimum_budget_mb:.0f} MB{extra}"
            )
        lines.append(f"  allocator: {self.allocator}; planned in {self.planning_seconds:.1f} s")
        lines.extend(f"  - {d}" for d in self.decisions)
        return "\n".join(lines)
