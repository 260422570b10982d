"""Training under a memory budget: measure, plan, enforce.

**What the budget covers** (``memory_scope``): ``rss`` = the whole process's peak RSS (CPU); ``cuda`` =
peak ``torch.cuda.max_memory_allocated`` (discrete GPU; RSS is reported separately); ``unified`` = peak RSS
plus peak CUDA reserved memory (Jetson: CPU and GPU share one DRAM pool). Figures are MiB, written MB.

What this package owns, one module each:

* :mod:`~edgecl.budget.memory` -- RSS / ``VmHWM`` / CUDA readers and the high-water-mark reset;
* :mod:`~edgecl.budget.allocator` -- glibc set up so the RSS tracks live tensors, and trimming;
* :mod:`~edgecl.budget.probe` -- the saved-tensor counter and probe steps on a copy of the method;
* :mod:`~edgecl.budget.search` -- the linear memory model and the search over the knobs;
* :mod:`~edgecl.budget.plan` -- :class:`Plan` (``plan.apply(config, method)``) and :class:`BudgetError`;
* :mod:`~edgecl.budget.planner` -- ``Planner(method, config, profile, stream=...).plan() -> Plan``;
* :mod:`~edgecl.budget.guard` -- :class:`BudgetGuard`, the trainer callback that enforces the budget.

**Layering.** ``budget`` sits *above* the trainer: it imports ``edgecl.train`` (the guard is a
:class:`~edgecl.train.callbacks.Callback`, a plan configures a ``TrainConfig``), ``edgecl.methods`` (the
probes build a copy of the method), ``edgecl.profiles``, ``edgecl.telemetry.meter`` (the one ``VmHWM``
reader) and :mod:`edgecl.precision` (which precisions a device can train in). It must not import the
layers that assemble runs (``edgecl.runner``, ``edgecl.commands``, ``edgecl.serve``, ``edgecl.bench``), and
nothing below it may import it: the trainer's precision check lives in :mod:`edgecl.precision`, a leaf,
and the guard plugs into the trainer as a callback. ``tests/test_imports.py`` enforces both directions.

**Process exit.** torch's C++ static destructors fault ~120 MB of library code pages in while a process
exits (``import torch, timm``: 751 MB peak, 873 MB at exit), after the work is done but inside the
lifetime peak that ``time``, cgroups and ``ru_maxrss`` report; the ``edgecl`` command skips them
(:func:`edgecl.cli.exit_after`).

Names are imported lazily from their modules, so ``import edgecl.budget`` (or one of the torch-free
modules, ``memory`` and ``allocator``) does not import torch or the planner.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MIB": "edgecl.budget.memory",
    "cuda_mb": "edgecl.budget.memory",
    "hwm_rss_mb": "edgecl.budget.memory",
    "peak_rss_mb": "edgecl.budget.memory",
    "reset_cuda_peaks": "edgecl.budget.memory",
    "reset_peak_rss": "edgecl.budget.memory",
    "rss_breakdown_mb": "edgecl.budget.memory",
    "rss_mb": "edgecl.budget.memory",
    "ALLOCATOR_MODES": "edgecl.budget.allocator",
    "DEFAULT_ALLOCATOR_MODE": "edgecl.budget.allocator",
    "allocator_description": "edgecl.budget.allocator",
    "allocator_mode": "edgecl.budget.allocator",
    "at_epoch_boundary": "edgecl.budget.allocator",
    "at_step_boundary": "edgecl.budget.allocator",
    "setup_allocator": "edgecl.budget.allocator",
    "trim_allocator": "edgecl.budget.allocator",
    "SavedTensorCounter": "edgecl.budget.probe",
    "HEADROOM_MIN_MB": "edgecl.budget.search",
    "UNTUNED_FACTOR": "edgecl.budget.search",
    "BudgetError": "edgecl.budget.plan",
    "Plan": "edgecl.budget.plan",
    "Planner": "edgecl.budget.planner",
    "BudgetExceeded": "edgecl.budget.guard",
    "BudgetGuard": "edgecl.budget.guard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgecl.budget' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
