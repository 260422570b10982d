"""The memory planner: micro-batch, reduction rate and precision so that training fits a budget.

One calling convention for every entry point (``edgecl train``/``bench`` through the runner, the daemon,
``edgecl plan``)::

    plan = Planner(method, config, profile, stream=stream).plan()   # raises BudgetError if nothing fits
    plan.apply(config, method)

``config`` (the run's :class:`~edgecl.train.trainer.TrainConfig`) gives the batch, eval batch, precision
and device; ``profile`` (a :class:`~edgecl.profiles.Profile`, default ``Profile()``) the budget, memory
scope, headroom, highest reduction rate, whether autocast may be used and whether the allocator is set up;
``stream`` the head size, the phase-2 cache size and one image of each dataset to load first (so the data
pipeline's libraries are in the idle baseline). Without a stream, ``num_classes`` gives the head size.

**The model.** The idle baseline is the process's RSS right before planning (interpreter, libraries,
backbone weights, the method's parameters). One training step of a (method, micro-batch m, reduction rate
r, precision) adds gradients, optimizer state (Adam: 2x the trainable parameters), the tensors autograd
saves for backward and a runtime overhead::

    peak(m) = baseline + optimizer + max(S(m) + overhead, evaluation) + input batch

``S(m)`` is counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` on probe steps at
micro-batches 1, 2 and 4 of a throwaway copy of the method (:class:`~edgecl.budget.probe.Prober`; sharing
the frozen backbone, on the last task so the prompt pool is at its largest) and is linear in m (checked:
the fit through 2 and 4 must predict 1). ``overhead`` is what the probe step measurably added beyond ``S``
(the RSS high-water mark, reset before each probe via ``/proc/self/clear_refs``; on CUDA
``max_memory_allocated``): gradients and the runtime's one-time buffers. Evaluation and phase-2 feature
caching (no autograd, ``eval_batch_size``) are probed as well. The chosen configuration is then *verified*
with one probe step at its own micro-batch.

Knobs, in order (:class:`~edgecl.budget.search.Search`): the largest micro-batch <= batch that fits
(balanced chunks; gradient accumulation keeps the effective batch), then a higher r up to
``max_reduction_rate`` for methods with a ``reduction_rate`` (CPS), then bf16 (CPU/CUDA) or fp16 (CUDA)
autocast. If nothing fits, :class:`~edgecl.budget.plan.BudgetError` states the smallest budget that would.

**The allocator.** Every probe starts from a trimmed heap in the allocator mode the planner sets up
(:mod:`edgecl.budget.allocator`, ``trim``: a fixed mmap threshold, freed memory reused inside the heap,
trimmed at epoch starts and before evaluation), so a probe step's peak is that of a training step in the
same regime; the step increments it measures grow with the micro-batch there (freed transients stay in
the heap until the step ends), and the search follows the measured line rather than a constant overhead.
Steps after the first of an epoch start from the previous step's heap instead of a trimmed one; their
peaks measured a few MB above a trimmed step's (benchmarks/PERFORMANCE.md), inside the headroom.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from edgecl.budget.allocator import DEFAULT_ALLOCATOR_MODE, setup_allocator
from edgecl.budget.plan import Plan
from edgecl.budget.probe import Prober
from edgecl.budget.search import Search
from edgecl.methods.base import Method
from edgecl.precision import autocast_problem
from edgecl.profiles import Profile

if TYPE_CHECKING:
    from edgecl.data.stream import TaskStream
    from edgecl.train.trainer import TrainConfig

__all__ = ["Planner"]


class Planner:
    """Plans one run: ``Planner(method, config, profile, stream=...).plan() -> Plan``.

    ``budget_mb`` overrides the profile's budget (None: the profile's; no budget at all plans the largest
    micro-batch and reports the predicted peak). ``task_index`` is the task the probes train (default: the
    last expected task for methods whose prompt pool grows per task, else the first). ``allow_autocast``
    overrides the profile's (``edgecl plan --precision auto``). ``verify=False`` skips the probe step at
    the chosen micro-batch. Bad settings raise ``ValueError`` here, before any probing.
    """

    def __init__(
        self,
        method: Method,
        config: TrainConfig,
        profile: Profile | None = None,
        *,
        stream: TaskStream | None = None,
        budget_mb: float | None = None,
        num_classes: int | None = None,
        task_index: int | None = None,
        allow_autocast: bool | None = None,
        verify: bool = True,
    ) -> None:
        prof = profile if profile is not None else Profile()
        self.method = method
        self.config = config
        self.profile = prof
        self.stream = stream
        self.budget_mb = budget_mb if budget_mb is not None else prof.memory_budget_mb
        self.task_index = task_index
        self.allow_autocast = prof.allow_autocast if allow_autocast is None else allow_autocast
        self.verify = verify
        if config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise ValueError(f"memory budget must be > 0 MB, got {self.budget_mb}")
        self.max_rate = float(prof.max_reduction_rate)
        configured_rate = getattr(method.cfg, "reduction_rate", None)
        if configured_rate is not None:
            self.max_rate = max(self.max_rate, float(configured_rate))
        device = config.device
        self.device = next(method.parameters()).device if device in (None, "auto") else torch.device(device)
        self.precisions = _precisions(config.precision, self.allow_autocast, self.device)
        self.scope = _resolve_scope(prof.memory_scope, self.device)
        if stream is not None:
            self.num_classes = len(stream.class_order)
            tasks = [t for t in stream.tasks if t.index == task_index] or stream.tasks  # the one it trains
            self.train_images: int | None = max(len(t.train) for t in tasks)  # type: ignore[arg-type]
        else:
            self.num_classes = num_classes or 100
            self.train_images = None

    def plan(self) -> Plan:
        """Measure the idle baseline, probe, choose; raises :class:`~edgecl.budget.plan.BudgetError`.

        Call it right before ``Trainer.fit`` with everything the run needs imported and built (the idle
        baseline is the RSS now). It leaves the method and the RNG state untouched: probes run on a copy
        that shares the frozen backbone. With the profile's ``tune_allocator`` it first sets glibc up for
        budgeted training (process-wide, see :mod:`edgecl.budget.allocator`).
        """
        t_start = time.perf_counter()
        if self.profile.tune_allocator:
            setup_allocator(DEFAULT_ALLOCATOR_MODE)
        if self.stream is not None:
            _warm_up_data(self.stream)
        dev = self.device
        self.method.to(dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            prober = Prober(
                self.method,
                dev,
                self.num_classes,
                self.task_index,
                "reserved" if self.scope == "unified" else "allocated",
            )
            try:
                search = Search(
                    self.method,
                    prober,
                    self.scope,
                    self.budget_mb,
                    self.config.batch_size,
                    headroom=self.profile.headroom_mb,
                    eval_batch_size=self.config.eval_batch_size,
                    train_images=self.train_images,
                    verify=self.verify,
                )
                plan = search.plan(self.precisions, _reduction_rates(self.method, self.max_rate))
            finally:
                prober.close()
        plan.planning_seconds = time.perf_counter() - t_start
        return plan


def _reduction_rates(method: Method, max_rate: float) -> list[float | None]:
    """The configured r, then higher ones up to ``max_rate`` (0.05 steps that change k)."""
    rate = getattr(method.cfg, "reduction_rate", None)
    if rate is None or not method.has_phases:
        return [None]
    from edgecl.sampling import num_kept

    n = method.backbone.num_patches
    rates: list[float | None] = [float(rate)]
    seen = {num_kept(n, rate)}
    grid = [round(0.05 * i, 4) for i in range(1, 20)] + [max_rate]
    for r in sorted(set(grid)):
        if rate < r <= max_rate + 1e-9 and num_kept(n, r) not in seen:
            seen.add(num_kept(n, r))
            rates.append(r)
    return rates


def _precisions(start: str, allow_autocast: bool, device: torch.device) -> list[str]:
    """Precisions to try, in order: the configured one, then autocast ones the device supports."""
    first = "fp32" if start == "auto" else start
    if first == "fp16" and device.type != "cuda":
        raise ValueError(autocast_problem(device, "fp16"))
    out = [first]
    if allow_autocast or start == "auto":
        if device.type == "cuda":
            lower = ["bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
        else:
            lower = ["bf16"]
        out += [p for p in lower if p not in out and first == "fp32"]
    return out


def _warm_up_data(stream: TaskStream) -> None:
    """Load one image of each dataset of the first task (imports decoders and transforms lazily loaded)."""
    task = stream.tasks[0]
    for data in (task.train, task.train_eval, task.test):
        if len(data):  # type: ignore[arg-type]
            _ = data[0]


def _resolve_scope(scope: str, device: torch.device) -> str:
    """``auto`` -> ``rss`` on CPU, ``unified`` on an integrated GPU, ``cuda`` on a discrete one."""
    if scope != "auto":
        if scope in ("cuda", "unified") and device.type != "cuda":
            raise ValueError(f"memory scope {scope!r} needs a CUDA device, got {device}")
        return scope
    if device.type != "cuda":
        return "rss"
    props = torch.cuda.get_device_properties(device)
    return "unified" if getattr(props, "is_integrated", False) else "cuda"
