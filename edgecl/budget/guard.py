"""Enforcement: :class:`BudgetGuard`, the trainer callback that keeps training within the budget.

Inside the step, forward hooks on the method's Linear and LayerNorm layers compare the current usage with
the budget and raise :class:`BudgetExceeded` (a ``torch.OutOfMemoryError``), so the trainer's OOM path
zeroes the gradients, halves the micro-batch and redoes the whole step: no progress is lost and the
effective batch is unchanged. A peak that rose over the budget between two checks (e.g. in backward) is
caught at the step's end; that step already happened, so the micro-batch is halved from the next step on.
Every adaptation is recorded in ``trainer.state.adaptations`` with the measured figure. At every step
boundary, and around evaluation, the guard lets the allocator give freed memory back
(:func:`~edgecl.budget.allocator.at_step_boundary`), so each step starts where the planner's probes did.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgecl.budget.allocator import at_epoch_boundary, at_step_boundary, trim_allocator
from edgecl.budget.memory import cuda_mb, peak_rss_mb, rss_mb
from edgecl.budget.plan import Plan
from edgecl.telemetry.backends.torch_cuda import CudaPeakWatch
from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.methods.base import Method
    from edgecl.train.trainer import Trainer

__all__ = ["BudgetExceeded", "BudgetGuard"]


class BudgetExceeded(torch.OutOfMemoryError):
    """Raised inside a training step when measured memory is over the budget (the trainer halves)."""


class BudgetGuard(Callback):
    """Keeps training within the budget: halves the micro-batch when measured memory goes over it.

    Checks (``memory_scope`` decides what is measured): (1) inside each training step, after the forward
    of every Linear/LayerNorm layer (at most every 0.2 ms), the current usage; over budget it raises
    :class:`BudgetExceeded`, which the trainer handles like a CUDA OOM (zero the gradients, halve, redo the
    step; nothing lost). (2) At each step's end, the high-water mark; if it rose over the budget during the
    step (e.g. in backward), the micro-batch is halved from the next step on. At micro-batch 1 over budget,
    ``strict`` re-raises (training stops: the budget cannot be held); otherwise the violation is recorded.
    Writes ``results["memory_budget"]`` and ``record["memory_budget"]`` per task.
    """

    def __init__(
        self,
        budget: Plan | float,
        *,
        memory_scope: str | None = None,
        strict: bool = True,
        in_step: bool = True,
    ) -> None:
        self.plan = budget if isinstance(budget, Plan) else None
        if isinstance(budget, Plan):
            if budget.budget_mb is None:
                raise ValueError("BudgetGuard needs a plan made with a memory budget")
            self.budget_mb = float(budget.budget_mb)
        else:
            self.budget_mb = float(budget)
        self.scope = memory_scope or (self.plan.memory_scope if self.plan else "rss")
        self.strict = strict
        self.in_step = in_step
        self.violations: list[dict[str, Any]] = []
        self._trainer: Trainer | None = None
        self._handles: list[Any] = []
        self._device = torch.device("cpu")
        self._last_peak = 0.0
        self._pending: list[str] = []
        self._seen_adaptations = 0
        self._flagged: dict[str, int] | None = None
        self._checked_at = 0.0
        self._cuda_watch: CudaPeakWatch | None = None

    # ---- measurements --------------------------------------------------------------------------------
    def usage_mb(self) -> float:
        """The budgeted quantity now."""
        if self.scope == "rss":
            return rss_mb()
        if self.scope == "cuda":
            return cuda_mb("allocated", self._device)
        return rss_mb() + cuda_mb("reserved", self._device)

    def peak_mb(self) -> float:
        """The budgeted quantity's high-water mark: RSS over the process lifetime; CUDA since the run started,
        across the telemetry's per-region resets of torch's peak statistics (a :class:`CudaPeakWatch`)."""
        if self.scope == "rss":
            return peak_rss_mb()
        if self.scope == "cuda":
            return self._cuda_peak("allocated")
        return peak_rss_mb() + self._cuda_peak("reserved")

    def _cuda_peak(self, kind: str) -> float:
        """Peak CUDA ``kind`` MB since :meth:`on_run_start` (torch's since-reset peak before that)."""
        if self._cuda_watch is None:
            return cuda_mb(f"max_{kind}", self._device)
        return self._cuda_watch.peak_mb(kind)

    def summary(self) -> dict[str, Any]:
        """What the guard saw (stored in results as ``memory_budget``)."""
        peak = self.peak_mb()
        out: dict[str, Any] = {
            "budget_mb": self.budget_mb,
            "memory_scope": self.scope,
            "peak_mb": round(peak, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "within_budget": peak <= self.budget_mb,
            "violations": self.violations,
        }
        if self._device.type == "cuda":
            out["peak_cuda_allocated_mb"] = round(self._cuda_peak("allocated"), 1)
        if self.plan is not None:
            out["predicted_peak_mb"] = round(self.plan.predicted_peak_mb, 1)
        return out

    # ---- in-step check ------------------------------------------------------------------------------
    def _micro(self) -> int:
        assert self._trainer is not None
        return self._trainer.state.micro_batch_size or self._trainer.config.batch_size

    def _check(self, module: nn.Module, inputs: Any, output: Any) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.method.training:
            return
        now = time.perf_counter()
        if now - self._checked_at < 2e-4:  # at most one reading per 0.2 ms
            return
        self._checked_at = now
        use = self.usage_mb()
        if use <= self.budget_mb:
            return
        trim_allocator()
        use = self.usage_mb()
        if use <= self.budget_mb:
            return
        micro = self._micro()
        msg = (
            f"measured {self.scope} {use:.0f} MB > budget {self.budget_mb:.0f} MB during the step "
            f"(micro-batch {micro})"
        )
        where = self._where()
        if micro <= 1 and not self.strict:
            if self._flagged == where:
                return
            self._flagged = where
        self.violations.append(
            {
                **where,
                "measured_mb": round(use, 1),
                "micro_batch_size": micro,
                "action": "redo step with half the micro-batch" if micro > 1 else "none (micro-batch 1)",
            }
        )
        if micro > 1 or self.strict:
            self._pending.append(msg)
            raise BudgetExceeded(msg)

    def _where(self) -> dict[str, Any]:
        assert self._trainer is not None
        st = self._trainer.state
        return {"task": st.task, "epoch": st.epoch, "step": st.step}

    def _install(self, method: Method) -> None:
        # leaf layers: the backbone's fast paths call blocks piecewise, but always through these modules
        modules = [m for m in method.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]
        self._handles = [m.register_forward_hook(self._check) for m in modules or [method]]

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- hooks -------------------------------------------------------------------------------------
    def on_run_start(self, trainer: Trainer) -> None:
        """Attach to the trainer, note the starting peak and install the in-step checks."""
        self._trainer = trainer
        self._device = trainer.device
        if self._device.type == "cuda":  # the run's peak, not the planner probes' before it
            self._cuda_watch = CudaPeakWatch(self._device).start()
        self._seen_adaptations = len(trainer.state.adaptations)
        self._last_peak = self.peak_mb()
        if self.in_step:
            self._install(trainer.method)

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        """Name in-step adaptations; halve from the next step if the peak rose over the budget; let the
        allocator give the step's freed memory back."""
        for entry in trainer.state.adaptations[self._seen_adaptations :]:
            if self._pending and entry.get("reason") == "out of memory":
                entry["reason"] = self._pending.pop(0)
        self._pending.clear()
        peak = self.peak_mb()
        if peak > self.budget_mb and peak > self._last_peak + 0.5:
            micro = self._micro()
            self.violations.append(
                {
                    **self._where(),
                    "measured_peak_mb": round(peak, 1),
                    "micro_batch_size": micro,
                    "action": "halve from the next step" if micro > 1 else "none (micro-batch 1)",
                }
            )
            if micro > 1:
                trainer.set_micro_batch_size(
                    micro // 2,
                    f"measured peak {peak:.0f} MB > budget {self.budget_mb:.0f} MB (from the next step)",
                )
        self._last_peak = max(self._last_peak, peak)
        self._seen_adaptations = len(trainer.state.adaptations)
        at_step_boundary()

    def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
        """Start the epoch from a trimmed heap (checkpoints and evaluations ran since the last step)."""
        at_epoch_boundary()

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        """Evaluation and end-of-task statistics start from a trimmed heap, as their probes did."""
        at_epoch_boundary()

    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        """Add the peak so far to the task's record."""
        record["memory_budget"] = {
            "budget_mb": self.budget_mb,
            "peak_mb": round(self.peak_mb(), 1),
            "micro_batch_size": self._micro(),
        }

    def on_run_end(self, trainer: Trainer, results: dict[str, Any]) -> None:
        """Remove the hooks and store the summary in the results."""
        self._remove()
        results["memory_budget"] = self.summary()
        if self._cuda_watch is not None:
            self._cuda_watch.stop()
        if self.plan is not None:
            results.setdefault("memory_plan", self.plan.to_dict())

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """Remove the hooks (and stop watching the CUDA peak)."""
        self._remove()
        if self._cuda_watch is not None:
            self._cuda_watch.stop()
