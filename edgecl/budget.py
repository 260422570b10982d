"""Training under a memory budget: measure, plan, enforce.

**What the budget covers** (``memory_scope``): ``rss`` = the whole process's peak RSS (CPU); ``cuda`` =
peak ``torch.cuda.max_memory_allocated`` (discrete GPU; RSS is reported separately); ``unified`` = peak RSS
plus peak CUDA reserved memory (Jetson: CPU and GPU share one DRAM pool). Figures are MiB, written MB.

**Planner** (:func:`plan_training`). The idle baseline is the process's RSS right before planning
(interpreter, libraries, backbone weights, the method's parameters). One training step of a (method,
micro-batch m, reduction rate r, precision) adds gradients, optimizer state (Adam: 2x the trainable
parameters), the tensors autograd saves for backward and a runtime overhead::

    peak(m) = baseline + optimizer + max(S(m) + overhead, evaluation) + input batch

``S(m)`` is counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` on probe steps (unique
storages; parameters, their views and the input excluded) at micro-batches 1, 2 and 4 of a throwaway copy
of the method (sharing the frozen backbone, on the last task so the prompt pool is at its largest) and
is linear in m (checked: the fit through 2 and 4 must predict 1). ``overhead`` is what the probe step
measurably added beyond ``S`` (the RSS high-water mark, reset before each probe via
``/proc/self/clear_refs``; on CUDA ``max_memory_allocated``): gradients and the runtime's one-time
buffers. Evaluation and phase-2 feature caching (no autograd, ``eval_batch_size``) are probed as well.
The chosen configuration is then *verified* with one probe step at its own micro-batch.

Knobs, in order: the largest micro-batch <= batch that fits (balanced chunks; gradient accumulation keeps
the effective batch), then a higher r up to ``max_reduction_rate`` for methods with a ``reduction_rate``
(CPS), then bf16 (CPU/CUDA) or fp16 (CUDA) autocast. If nothing fits, :class:`BudgetError` states the
smallest budget that would.

**Allocator.** With glibc's default dynamic mmap threshold, freed activations stay in the heap and the RSS
peak creeps up with fragmentation (ViT-Tiny 64 px, batch 16, 30 CPU steps with evaluations in between:
+127 MB after the first step, +201 MB after 20). :func:`tune_allocator` fixes the threshold at 64 KiB so
every tensor >= 64 KiB is its own mapping, returned to the OS when freed: RSS then tracks live tensors
(+111 MB, +120 MB after 20 steps), the peak is predictable and the memory really goes back to a shared
Jetson DRAM. The price is page faults: system CPU time rose from 0.7 s to 9 s over those 30 steps (user
time 14 s, unchanged); at 224 px a CPS phase-1 step went from 0.76 s to 0.98 s and a CODA step from
1.31 s to 1.83 s (benchmarks/PERFORMANCE.md). Profiles switch it with ``tune_allocator``; untuned, the
planner multiplies the measured increments by :data:`UNTUNED_FACTOR`. The environment
``MALLOC_MMAP_THRESHOLD_=65536`` does the same.

**Process exit.** torch's C++ static destructors fault ~120 MB of library code pages in while a process
exits (``import torch, timm``: 751 MB peak, 873 MB at exit), after the work is done but inside the
lifetime peak that ``time``, cgroups and ``ru_maxrss`` report; the ``edgecl`` command skips them
(:func:`edgecl.cli.exit_after`).

**Enforcement** (:class:`BudgetGuard`): inside the step, forward hooks on the method's Linear and LayerNorm
layers compare the current usage with the budget and raise :class:`BudgetExceeded` (a
``torch.OutOfMemoryError``), so the trainer's OOM path zeroes the gradients, halves the micro-batch and
redoes the whole step: no progress is lost and the effective batch is unchanged. A peak that rose over the
budget between two checks (e.g. in backward) is caught at the step's end; that step already happened, so
the micro-batch is halved from the next step on. Every adaptation is recorded in
``trainer.state.adaptations`` with the measured figure.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from edgecl.methods.base import Method, Phase, TaskInfo, describe_config
from edgecl.methods.registry import create_method
from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.data.stream import TaskStream
    from edgecl.profiles import Profile
    from edgecl.train.trainer import TrainConfig, Trainer

__all__ = [
    "BudgetError",
    "BudgetExceeded",
    "BudgetGuard",
    "Plan",
    "SavedTensorCounter",
    "apply_plan",
    "autocast_problem",
    "hwm_rss_mb",
    "peak_rss_mb",
    "plan_training",
    "reset_peak_rss",
    "rss_breakdown_mb",
    "rss_mb",
    "tune_allocator",
]

MIB = float(2**20)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIFETIME_PEAK_MB = 0.0
HEADROOM_MIN_MB = 24.0
"""Smallest automatic headroom: what probes cannot see. Measured peaks exceeded the prediction by up to
+11 MB on the shared dataset (the baseline creeps ~2 MB per task: kernels for new shapes, small-object heap)
and once by +17.6 MB on the tiny test model (file-backed RSS: torch's code pages, mapped as they first run,
grew 39 MB over a run and depend on the page cache)."""
UNTUNED_FACTOR = 1.75
"""Margin on measured increments when glibc's allocator is not tuned (measured fragmentation up to 1.7x)."""
"""The highest RSS high-water mark seen before any :func:`reset_peak_rss` (so process peaks survive it)."""


# ==== memory readers =================================================================================
def rss_mb() -> float:
    """This process's resident set size now, MB."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE / MIB
    except (OSError, IndexError, ValueError):
        import psutil

        return float(psutil.Process().memory_info().rss) / MIB


def rss_breakdown_mb() -> dict[str, float]:
    """``RssAnon`` / ``RssFile`` / ``RssShmem`` of this process now, MB (empty where /proc lacks them).

    File-backed pages (shared libraries, mapped weights) count in RSS but are the kernel's to evict and
    re-read under memory pressure from other processes, so that share of the RSS can move without any
    allocation by edgecl; plans report it so a user can tell the two apart.
    """
    keys = {b"RssAnon:": "anon", b"RssFile:": "file", b"RssShmem:": "shmem"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                key = keys.get(line.split(b"\t", 1)[0].split(b" ", 1)[0])
                if key:
                    out[key] = int(line.split()[1]) / 1024.0
    except (OSError, IndexError, ValueError):
        return {}
    return out


def hwm_rss_mb() -> float:
    """The kernel's RSS high-water mark of this process (``VmHWM``, reset by :func:`reset_peak_rss`), MB.

    Not ``getrusage().ru_maxrss`` where /proc exists: Linux seeds that at exec with the parent's
    high-water mark, so a child of a large process would "measure" its parent. One reader for the whole
    package: :func:`edgecl.telemetry.meter.rss_hwm_mb` (torch-free, shared with the telemetry meter).
    """
    from edgecl.telemetry.meter import rss_hwm_mb

    peak = rss_hwm_mb()
    return 0.0 if peak is None else peak


def peak_rss_mb() -> float:
    """The process's peak RSS since it started, MB (includes peaks from before :func:`reset_peak_rss`)."""
    return max(_LIFETIME_PEAK_MB, hwm_rss_mb())


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux ``clear_refs`` 5).

    The peak so far is remembered by :func:`peak_rss_mb`. Note that ``getrusage().ru_maxrss`` is reset as
    well; read :func:`peak_rss_mb` for the whole-process peak. Returns False where unsupported.
    """
    global _LIFETIME_PEAK_MB
    _LIFETIME_PEAK_MB = max(_LIFETIME_PEAK_MB, hwm_rss_mb())
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _cuda_mb(kind: str, device: torch.device) -> float:
    """``allocated``/``reserved`` (current) or ``max_allocated``/``max_reserved`` CUDA memory, MB."""
    fn = {
        "allocated": torch.cuda.memory_allocated,
        "reserved": torch.cuda.memory_reserved,
        "max_allocated": torch.cuda.max_memory_allocated,
        "max_reserved": torch.cuda.max_memory_reserved,
    }[kind]
    return float(fn(device)) / MIB


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            name = ctypes.util.find_library("c") or "libc.so.6"
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(name)
                if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version"):
                    _LIBC = lib
    return _LIBC


_TUNED: int | None = None


def tune_allocator(threshold_kib: int = 64) -> bool:
    """Fix glibc's mmap threshold (and trim threshold) so freed tensors are returned to the OS.

    Process-wide and idempotent; returns True when glibc was tuned (or already is via
    ``MALLOC_MMAP_THRESHOLD_``), False on other C libraries.
    """
    global _TUNED
    if _TUNED is not None or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    libc = _libc()
    if not libc:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, threshold_kib * 1024) == 1
    ok = ok and libc.mallopt(m_trim_threshold, 2 * threshold_kib * 1024) == 1
    if ok:
        _TUNED = threshold_kib
    return bool(ok)


def allocator_tuned() -> bool:
    """Whether freed tensors go back to the OS (glibc with a fixed mmap threshold)."""
    return _TUNED is not None or bool(os.environ.get("MALLOC_MMAP_THRESHOLD_"))


def allocator_description() -> str:
    """How the C allocator is set up for this process (for plans and reports)."""
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if env:
        return f"glibc, MALLOC_MMAP_THRESHOLD_={env}"
    if _TUNED is not None:
        return f"glibc, mmap threshold {_TUNED} KiB (freed tensors return to the OS)"
    return "glibc default (dynamic mmap threshold)" if _libc() else "platform default"


def trim_allocator() -> None:
    """Give free heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# ==== saved-activation counting ========================================================================
class SavedTensorCounter:
    """Counts the bytes autograd saves for backward inside the ``with`` block, once per storage.

    Views of one storage count once (the whole storage stays alive); storages in ``exclude`` (parameters,
    buffers, the input) are not counted, so a saved parameter or a ``.detach()`` view of one costs nothing.
    ``bytes_by_device`` splits the total by device type (``cpu``/``cuda``); ``max_rss_mb`` is the highest
    RSS seen at a save (a fallback peak where the kernel high-water mark cannot be reset).
    """

    def __init__(self, exclude: Iterable[Tensor] = (), sample_rss: bool = True) -> None:
        self._exclude = {self._key(t) for t in exclude if t.numel()}
        self._storages: dict[tuple[str, int], int] = {}
        self._sample = sample_rss
        self.max_rss_mb = 0.0
        self.saves = 0
        self._ctx: Any = None

    @staticmethod
    def _key(t: Tensor) -> tuple[str, int]:
        return t.device.type, t.untyped_storage().data_ptr()

    def _pack(self, t: Tensor) -> Tensor:
        self.saves += 1
        if t.layout is torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            key = (t.device.type, storage.data_ptr())
            if storage.nbytes() and key not in self._exclude:
                self._storages[key] = max(self._storages.get(key, 0), storage.nbytes())
        if self._sample:
            self.max_rss_mb = max(self.max_rss_mb, rss_mb())
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        """Total bytes of the unique saved storages."""
        return sum(self._storages.values())

    def bytes_by_device(self) -> dict[str, int]:
        """Saved bytes per device type."""
        out: dict[str, int] = {}
        for (dev, _), n in self._storages.items():
            out[dev] = out.get(dev, 0) + n
        return out


# ==== the plan ===========================================================================================
class BudgetError(ValueError):
    """Nothing fits the budget; ``minimum_mb`` is the smallest budget that would work (None if unknown)."""

    def __init__(self, message: str, minimum_mb: float | None = None) -> None:
        super().__init__(message)
        self.minimum_mb = minimum_mb


class BudgetExceeded(torch.OutOfMemoryError):
    """Raised inside a training step when measured memory is over the budget (the trainer halves)."""


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


# ==== probing ===========================================================================================
@dataclass
class _Fit:
    """Linear model of one (precision, r) configuration, per meter (``rss`` and, on CUDA, ``cuda``)."""

    precision: str
    rate: float | None
    saved_slope: dict[str, float]
    saved_intercept: dict[str, float]
    overhead: dict[str, float]
    linearity_error: float | None
    probed: dict[int, dict[str, float]]

    def saved(self, meter: str, m: int) -> float:
        return self.saved_intercept[meter] + self.saved_slope[meter] * m

    def train_inc(self, meter: str, m: int) -> float:
        measured = self.probed.get(m, {}).get(meter)
        model = self.saved(meter, m) + self.overhead[meter]
        return max(model, measured) if measured is not None else model


class _Prober:
    """Runs probe steps on a throwaway copy of the method that shares the frozen backbone."""

    def __init__(
        self, method: Method, device: torch.device, num_classes: int, task_index: int | None, meter_cuda: str
    ) -> None:
        self.device = device
        self.meter_cuda = meter_cuda  # "allocated" or "reserved"
        self.cuda = device.type == "cuda"
        self.idle_cuda = 0.0
        if self.cuda:
            torch.cuda.synchronize(device)
            self.idle_cuda = _cuda_mb(meter_cuda, device)
        self.idle_rss = rss_mb()
        self.idle_file_mb = rss_breakdown_mb().get("file")
        self.probe = create_method(method.name, method.backbone, describe_config(method.cfg))
        self.probe.to(device)
        expected = int(getattr(method.cfg, "expected_tasks", 1))
        t = (
            task_index
            if task_index is not None
            else (expected - 1 if self.probe.pool_bound_to_tasks() else 0)
        )
        per_task = max(1, math.ceil(num_classes / max(t + 1, 1)))
        n_past = max(0, num_classes - per_task)
        self.task = TaskInfo(index=t, classes=list(range(n_past, num_classes)), n_past=n_past)
        self.probe.begin_task(self.task)
        self.phase = Phase.SPARSE if self.probe.has_phases else Phase.JOINT
        trainable = self.probe.trainable_parameters(Phase.JOINT)
        self.trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
        self.grad_bytes = sum(
            p.numel() * p.element_size() for p in self.probe.trainable_parameters(self.phase)
        )
        self.own_bytes = sum(v.numel() * v.element_size() for v in self.probe.trainable_state_dict().values())
        self.static = [*self.probe.parameters(), *self.probe.buffers()]
        info = method.backbone.info
        self.image_shape = (3, info.img_size, info.img_size)

    def _batch(self, m: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, *self.image_shape, generator=gen).to(self.device)
        lo, hi = self.task.n_past, self.task.n_seen
        y = torch.randint(lo, hi, (m,), generator=gen).to(self.device)
        return x, y

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _start(self) -> bool:
        trim_allocator()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return reset_peak_rss()

    def _deltas(self, reset_ok: bool, sampled: float) -> dict[str, float]:
        peak = max(hwm_rss_mb() if reset_ok else 0.0, sampled, rss_mb())
        out = {"rss": peak - self.idle_rss - (0.0 if self.cuda else self.own_bytes / MIB)}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            out["cuda"] = (
                _cuda_mb("max_" + self.meter_cuda, self.device) - self.idle_cuda - self.own_bytes / MIB
            )
        return out

    def train_step(
        self, m: int, precision: str, rate: float | None, optimizer_step: bool = False
    ) -> dict[str, float]:
        """Forward + backward of one micro-batch; saved bytes per device and measured deltas, MB.

        ``optimizer_step`` then also clips and steps a throwaway optimizer (after the measurement), so the
        code the real steps run is loaded, and counted in the runtime overhead of the following probes.
        """
        if rate is not None:
            self.probe.cfg.reduction_rate = rate  # type: ignore[attr-defined]
        x, y = self._batch(m)
        self.probe.train()
        self.probe.zero_grad(set_to_none=True)
        reset_ok = self._start()
        t0 = time.perf_counter()
        counter = SavedTensorCounter(exclude=[*self.static, x, y])
        with self._autocast(precision), counter:
            loss = self.probe.training_loss(x, y, self.phase)
        loss.backward()
        deltas = self._deltas(reset_ok, counter.max_rss_mb)
        del loss
        if optimizer_step:
            params = [p for p in self.probe.trainable_parameters(Phase.JOINT) if p.grad is not None]
            kind = (
                torch.optim.Adam
                if getattr(self.probe.cfg, "optimizer", "adam") == "adam"
                else torch.optim.SGD
            )
            opt = kind(params, lr=1e-12)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            del opt
        self.probe.zero_grad(set_to_none=True)
        by_dev = counter.bytes_by_device()
        return {
            "micro_batch": m,
            "saved_rss": by_dev.get("cpu", 0) / MIB,
            "saved_cuda": by_dev.get("cuda", 0) / MIB,
            **{f"delta_{k}": v for k, v in deltas.items()},
            "seconds": time.perf_counter() - t0,
        }

    def eval_step(self, batch: int, precision: str) -> dict[str, float]:
        """Inference forward (evaluation, phase-2 caching) of ``batch`` images; measured deltas, MB."""
        x, _ = self._batch(batch)
        self.probe.eval()
        reset_ok = self._start()
        t0 = time.perf_counter()
        with torch.no_grad(), self._autocast(precision):
            self.probe(x)
        deltas = self._deltas(reset_ok, 0.0)
        return {
            "batch": batch,
            **{f"delta_{k}": v for k, v in deltas.items()},
            "seconds": time.perf_counter() - t0,
        }

    def close(self) -> None:
        del self.probe
        self.static = []
        trim_allocator()
        if self.cuda:
            torch.cuda.empty_cache()


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


_AUTOCAST_OK: dict[tuple[str, str], bool] = {}
_AUTOCAST_CHECK = """
import torch
x = torch.randn(8, 192, requires_grad=True)
with torch.autocast("{device}", dtype=torch.{dtype}):
    y = torch.nn.functional.linear(x, torch.randn(576, 192)).float().sum()
y.backward()
"""


def autocast_works(device_type: str, precision: str) -> bool:
    """Whether ``precision`` autocast runs on ``device_type`` without crashing, tried once in a child process.

    Some CPUs advertise AMX/AVX512-BF16 that the (virtual) machine does not enable: oneDNN's bf16 kernels
    then die with SIGILL, which no ``try`` can catch, so the first use is isolated. Cached per process.
    """
    key = (device_type, precision)
    if key not in _AUTOCAST_OK:
        import subprocess

        dtype = "bfloat16" if precision == "bf16" else "float16"
        code = _AUTOCAST_CHECK.format(device=device_type, dtype=dtype)
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
            _AUTOCAST_OK[key] = res.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _AUTOCAST_OK[key] = False
    return _AUTOCAST_OK[key]


def autocast_problem(device: torch.device, precision: str) -> str | None:
    """Why ``precision`` cannot train on ``device`` (a message that says what to use), or None if it can.

    fp16 autocast is CUDA-only here; a GPU must support bf16 for bf16; on a CPU the autocast is tried once
    in a child process (:func:`autocast_works`), since a crash there is a SIGILL no ``try`` catches.
    """
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        return f"fp16 autocast needs a CUDA device, got {device}; use bf16 or fp32"
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return f"this GPU ({device}) has no bf16; use fp16 or fp32"
        return None
    if not autocast_works(device.type, precision):
        return (
            f"{precision} autocast crashes on this {device.type} (tried in a child process: its kernels are "
            f"not supported here); train with precision fp32 (--precision fp32)"
        )
    return None


def _balanced(batch: int, micro: int) -> int:
    """The smallest micro-batch with as many chunks as ``micro`` (equal-sized chunks, same step count)."""
    steps = math.ceil(batch / micro)
    return math.ceil(batch / steps)


def _resolve_scope(scope: str, device: torch.device) -> str:
    if scope != "auto":
        if scope in ("cuda", "unified") and device.type != "cuda":
            raise ValueError(f"memory scope {scope!r} needs a CUDA device, got {device}")
        return scope
    if device.type != "cuda":
        return "rss"
    props = torch.cuda.get_device_properties(device)
    return "unified" if getattr(props, "is_integrated", False) else "cuda"


def plan_training(
    method: Method,
    budget: Profile | TaskStream | float | None = None,
    config: TrainConfig | None = None,
    *,
    profile: Profile | str | None = None,
    stream: TaskStream | None = None,
    budget_mb: float | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    device: str | torch.device | None = None,
    max_reduction_rate: float | None = None,
    allow_autocast: bool | None = None,
    eval_batch_size: int | None = None,
    memory_scope: str | None = None,
    headroom_mb: float | None = None,
    num_classes: int | None = None,
    task_index: int | None = None,
    train_images_per_task: int | None = None,
    tune_malloc: bool | None = None,
    verify: bool = True,
) -> Plan:
    """Plan micro-batch, reduction rate and precision so that training ``method`` fits the budget.

    ``budget`` (positional, for convenience) is a :class:`~edgecl.profiles.Profile`, a budget in MB or the
    :class:`~edgecl.data.stream.TaskStream`; ``profile`` (a Profile or a profile NAME|PATH) and ``stream``
    may also be given by keyword. Settings come from, in order: keyword arguments, ``config`` (the
    :class:`TrainConfig`: batch, precision, device, eval batch), the profile (its budget, batch,
    precision, ``max_reduction_rate``, ``allow_autocast``, eval batch, scope, headroom, ``tune_allocator``),
    built-in defaults. With ``stream``, one image of each dataset is loaded first (so the data pipeline's
    libraries are in the baseline) and ``num_classes`` (head size, default 100) and
    ``train_images_per_task`` (phase-2 cache) are read from it.

    Call it right before ``Trainer.fit`` with everything the run needs imported and built (the idle
    baseline is the RSS now). It leaves ``method`` and the RNG state untouched: probes run on a copy that
    shares the frozen backbone. Raises :class:`BudgetError` (a ``ValueError``) stating the smallest budget
    that would work if nothing fits.
    """
    t_start = time.perf_counter()
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        budget_mb = float(budget) if budget_mb is None else budget_mb
    elif hasattr(budget, "tasks") and hasattr(budget, "class_order"):
        stream = stream or budget  # type: ignore[assignment]
    elif budget is not None:
        profile = profile or budget  # type: ignore[assignment]
    if isinstance(profile, str):
        from edgecl.profiles import load_profile

        profile = load_profile(profile, check_method=False)
    prof = profile

    def pick(value: Any, key: str, default: Any, config_key: str | None = None) -> Any:
        if value is not None:
            return value
        if config is not None and config_key is not None:
            return getattr(config, config_key)
        return getattr(prof, key) if prof is not None else default

    budget_mb = pick(budget_mb, "memory_budget_mb", None)
    batch_size = int(pick(batch_size, "batch_size", 16, "batch_size"))
    max_rate = float(pick(max_reduction_rate, "max_reduction_rate", 0.75))
    configured_rate = getattr(method.cfg, "reduction_rate", None)
    if configured_rate is not None:
        max_rate = max(max_rate, float(configured_rate))
    device = pick(device, "device", None, "device")
    if device in (None, "auto"):
        device = next(method.parameters()).device
    dev = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if budget_mb is not None and budget_mb <= 0:
        raise ValueError(f"memory budget must be > 0 MB, got {budget_mb}")
    if pick(tune_malloc, "tune_allocator", True):
        tune_allocator()
    if stream is not None:
        _warm_up_data(stream)
        num_classes = num_classes or len(stream.class_order)
        train_images_per_task = train_images_per_task or max(len(t.train) for t in stream.tasks)  # type: ignore[arg-type]
    num_classes = num_classes or 100
    method.to(dev)
    scope = _resolve_scope(pick(memory_scope, "memory_scope", "auto"), dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        prober = _Prober(
            method, dev, num_classes, task_index, "reserved" if scope == "unified" else "allocated"
        )
        try:
            planner = _Planner(
                method,
                prober,
                scope,
                budget_mb,
                batch_size,
                headroom=pick(headroom_mb, "headroom_mb", None),
                eval_batch_size=int(pick(eval_batch_size, "eval_batch_size", 64, "eval_batch_size")),
                train_images=train_images_per_task,
                verify=verify,
            )
            precisions = _precisions(
                pick(precision, "precision", "fp32", "precision"),
                bool(pick(allow_autocast, "allow_autocast", True)),
                dev,
            )
            plan = planner.plan(precisions, _reduction_rates(method, max_rate))
        finally:
            prober.close()
    plan.planning_seconds = time.perf_counter() - t_start
    return plan


class _Planner:
    """The search behind :func:`plan_training`: probes lazily, in the order of the knobs."""

    def __init__(
        self,
        method: Method,
        prober: _Prober,
        scope: str,
        budget_mb: float | None,
        batch: int,
        *,
        headroom: float | None,
        eval_batch_size: int,
        train_images: int | None,
        verify: bool,
    ) -> None:
        self.method = method
        self.prober = prober
        self.scope = scope
        self.budget_mb = budget_mb
        self.batch = batch
        self.headroom_fixed = headroom
        self.eval_bs = eval_batch_size
        self.verify = verify
        self.cuda = prober.cuda
        self.meters = ["rss", "cuda"] if self.cuda else ["rss"]
        self.act_meter = "cuda" if self.cuda else "rss"
        adam = getattr(method.cfg, "optimizer", "adam") == "adam"
        self.opt_mb = (2.0 if adam else 0.0) * prober.trainable_bytes / MIB
        self.grad_mb = prober.grad_bytes / MIB
        self.input_mb = 2.0 * batch * math.prod(prober.image_shape) * 4 / MIB  # collated batch + device copy
        per_image = method.backbone.embed_dim * 4 + 8
        self.cache_mb = (train_images or 0) * per_image / MIB if method.phase2_cacheable() else 0.0
        self.probes: list[dict[str, Any]] = []
        self.fits: dict[tuple[str, float | None], _Fit] = {}
        self.eval_runs: dict[str, dict[int, dict[str, float]]] = {}
        self.decisions: list[str] = []
        self.candidates: list[dict[str, Any]] = []
        self.idle = {"rss": prober.idle_rss, "cuda": prober.idle_cuda}
        self.idle_budgeted = self.budgeted(self.idle)
        self.factor = 1.0 if allocator_tuned() or self.cuda else UNTUNED_FACTOR
        if self.factor != 1.0:
            self.decisions.append(
                f"allocator not tuned: measured increments x{self.factor} for heap fragmentation "
                "(set tune_allocator: true for a tighter, measured plan)"
            )

    # ---- the model ---------------------------------------------------------------------------------
    def on_device(self, meter: str) -> bool:
        """Whether ``meter`` measures the training device (where tensors, gradients and state live)."""
        return (meter == "cuda") == self.cuda

    def budgeted(self, peaks: dict[str, float]) -> float:
        """The quantity the budget covers."""
        if self.scope == "rss":
            return peaks["rss"]
        if self.scope == "cuda":
            return peaks["cuda"]
        return peaks["rss"] + peaks["cuda"]

    def peaks(
        self, fit: _Fit, m: int, ev: dict[str, float], measured: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Predicted peaks per meter: training at micro-batch ``m`` (or its ``measured`` increments) or
        evaluation, whichever is higher."""
        out = {}
        for meter in self.meters:
            dev = self.on_device(meter)
            train = measured[meter] if measured is not None else fit.train_inc(meter, m)
            evaluation = ev[meter] + self.cache_mb * dev
            inc = max(train, evaluation) * (self.factor if meter == "rss" else 1.0)
            out[meter] = self.idle[meter] + self.opt_mb * dev + inc + self.input_mb * dev
        return out

    def headroom(self, peak: float) -> float:
        """Margin kept below the budget: given, or max(24 MB, 10% of the peak above the idle baseline)."""
        if self.headroom_fixed is not None:
            return float(self.headroom_fixed)
        return max(HEADROOM_MIN_MB, 0.10 * (peak - self.idle_budgeted))

    def required(self, peak: float) -> float:
        """The budget a predicted peak needs."""
        return peak + self.headroom(peak)

    def fits_budget(self, peak: float) -> bool:
        """Whether a predicted peak plus headroom is within the budget."""
        return self.budget_mb is None or self.required(peak) <= self.budget_mb

    # ---- probes -------------------------------------------------------------------------------------
    def _record(self, kind: str, precision: str, rate: float | None, res: dict[str, float]) -> None:
        entry: dict[str, Any] = {"kind": kind, "precision": precision}
        if kind != "eval":
            entry["reduction_rate"] = rate
        entry.update({k: round(v, 3) for k, v in res.items()})
        self.probes.append(entry)

    def fit_for(self, precision: str, rate: float | None) -> _Fit:
        """The linear model of one (precision, r), from probe steps at micro-batches (1,) 2 and 4."""
        key = (precision, rate)
        if key in self.fits:
            return self.fits[key]
        sizes = sorted({1, min(2, self.batch), min(4, self.batch)})
        if self.fits and len(sizes) > 2:
            sizes = sizes[1:]  # the runtime is warm: two sizes give the slope
        runs = {}
        first = not self.fits
        for m in sizes:
            runs[m] = self.prober.train_step(m, precision, rate, optimizer_step=first and m == sizes[0])
            self._record("train", precision, rate, runs[m])
        slope, icpt, lin_err = {}, {}, None
        for meter in self.meters:
            s = {m: runs[m][f"saved_{meter}"] for m in sizes}
            if len(sizes) >= 2:
                a, b = sizes[-2], sizes[-1]
                slope[meter] = max(0.0, (s[b] - s[a]) / (b - a))
                icpt[meter] = s[a] - slope[meter] * a
                first = sizes[0]
                if len(sizes) >= 3 and meter == self.act_meter and s[first] > 0:
                    lin_err = abs(icpt[meter] + slope[meter] * first - s[first]) / s[first]
            else:
                slope[meter], icpt[meter] = s[sizes[0]] / sizes[0], 0.0
        overhead = {
            meter: max(0.0, *(runs[m][f"delta_{meter}"] - runs[m][f"saved_{meter}"] for m in sizes))
            for meter in self.meters
        }
        probed = {m: {meter: runs[m][f"delta_{meter}"] for meter in self.meters} for m in sizes}
        fit = _Fit(precision, rate, slope, icpt, overhead, lin_err, probed)
        if lin_err is not None and lin_err > 0.05:
            self.decisions.append(
                f"saved activations are not linear in the micro-batch ({lin_err:.1%} off at m={sizes[0]}); "
                "the chosen micro-batch is verified with its own probe step"
            )
        self.fits[key] = fit
        return fit

    def eval_probe(self, precision: str, bs: int) -> dict[str, float]:
        """Measured increments of an evaluation forward of ``bs`` images (probed once)."""
        runs = self.eval_runs.setdefault(precision, {})
        if bs not in runs:
            res = self.prober.eval_step(bs, precision)
            self._record("eval", precision, None, res)
            runs[bs] = {meter: res[f"delta_{meter}"] for meter in self.meters}
        return runs[bs]

    def eval_inc(self, precision: str, bs: int) -> dict[str, float]:
        """Evaluation increment at batch ``bs``: measured, or linear through batches 1 and 8."""
        small = min(8, self.eval_bs)
        d1, d2 = self.eval_probe(precision, 1), self.eval_probe(precision, small)
        runs = self.eval_runs[precision]
        out = {}
        for meter in self.meters:
            if bs in runs:
                value = runs[bs][meter]
            else:
                slope = max(0.0, (d2[meter] - d1[meter]) / (small - 1)) if small > 1 else 0.0
                below = [runs[k][meter] for k in runs if k < bs]
                value = max([d1[meter] + slope * (bs - 1), *below])
            out[meter] = value + self.grad_mb * self.on_device(meter)  # gradients outlive the last step
        return out

    def verify_micro(self, fit: _Fit, micro: int, ev: dict[str, float]) -> int | None:
        """Probe the chosen micro-batch itself; shrink it while the measurement does not fit."""
        while True:
            if micro not in fit.probed:
                res = self.prober.train_step(micro, fit.precision, fit.rate)
                self._record("verify", fit.precision, fit.rate, res)
                fit.probed[micro] = {meter: res[f"delta_{meter}"] for meter in self.meters}
                for meter in self.meters:  # the model may not predict less than was measured
                    gap = res[f"delta_{meter}"] - (fit.saved(meter, micro) + fit.overhead[meter])
                    fit.overhead[meter] += max(0.0, gap)
            if self.fits_budget(self.budgeted(self.peaks(fit, micro, ev))):
                return micro
            smaller = next(
                (
                    m
                    for m in range(micro - 1, 0, -1)
                    if self.fits_budget(self.budgeted(self.peaks(fit, m, ev)))
                ),
                None,
            )
            if smaller is None:
                return None
            micro = _balanced(self.batch, smaller)

    # ---- the search ---------------------------------------------------------------------------------
    def minimum(self, precision: str, rate: float | None) -> float:
        """Smallest budget for ``precision`` and ``rate``: micro-batch 1, evaluation in batches of 1."""
        return self.required(
            self.budgeted(self.peaks(self.fit_for(precision, rate), 1, self.eval_inc(precision, 1)))
        )

    def refuse(self, need: float, how: str, autocast: bool) -> BudgetError:
        """The error for a budget nothing fits."""
        unusable = "".join(f"; {d}" for d in self.decisions if "crashed a test process" in d)
        return BudgetError(
            f"memory budget {self.budget_mb:.0f} MB is too small to train {self.method.name} "
            f"(batch {self.batch}) on {self.prober.device}: idle baseline {self.idle_budgeted:.0f} MB; "
            f"the smallest budget that would work is {math.ceil(need)} MB "
            f"({how}{'' if autocast else '; autocast not allowed'}{unusable})",
            minimum_mb=float(math.ceil(need)),
        )

    def choose(self, precision: str, rate: float | None) -> tuple[_Fit, int, int, dict[str, float]] | None:
        """Largest micro-batch (and eval batch) that fits with ``precision`` and ``rate``; None if none."""
        fit = self.fit_for(precision, rate)
        bs = self.eval_bs
        ev = self.eval_inc(precision, bs)
        no_eval = dict.fromkeys(self.meters, 0.0)
        train_fits = self.fits_budget(self.budgeted(self.peaks(fit, 1, no_eval)))
        while train_fits and bs > 1 and not self.fits_budget(self.budgeted(self.peaks(fit, 1, ev))):
            bs = max(1, bs // 2)
            ev = self.eval_inc(precision, bs)
        ok = [m for m in range(self.batch, 0, -1) if self.fits_budget(self.budgeted(self.peaks(fit, m, ev)))]
        micro = _balanced(self.batch, ok[0]) if ok else None
        self.candidates.append(
            {
                "precision": precision,
                "reduction_rate": rate,
                "eval_batch_size": bs,
                "micro_batch_size": micro,
                "peak_micro_1_mb": round(self.budgeted(self.peaks(fit, 1, ev)), 1),
                "peak_full_batch_mb": round(self.budgeted(self.peaks(fit, self.batch, ev)), 1),
            }
        )
        if micro is None or not self.verify:
            return None if micro is None else (fit, micro, bs, ev)
        micro = self.verify_micro(fit, micro, ev)
        if micro is None:
            return None

        # evaluation predicted from small probes: measure it at the chosen batch when it could matter
        def eval_could_break(ev: dict[str, float]) -> bool:  # were the extrapolation 25% low
            worse = {k: v * 1.25 for k, v in ev.items()}
            return not self.fits_budget(self.budgeted(self.peaks(fit, micro, worse)))

        while bs not in self.eval_runs[precision] and eval_could_break(ev):
            self.eval_probe(precision, bs)
            ev = self.eval_inc(precision, bs)
            if bs == 1 or self.fits_budget(self.budgeted(self.peaks(fit, micro, ev))):
                break
            bs = max(1, bs // 2)
            ev = self.eval_inc(precision, bs)
        if not self.fits_budget(self.budgeted(self.peaks(fit, micro, ev))):
            return None
        return fit, micro, bs, ev

    def usable(self, precision: str) -> bool:
        """Whether ``precision`` can run here (CPU bf16 autocast is tried in a child process first)."""
        if precision == "fp32" or self.prober.device.type != "cpu":
            return True
        ok = autocast_works(self.prober.device.type, precision)
        note = f"{precision} autocast crashed a test process on this CPU; not used"
        if not ok and note not in self.decisions:
            self.decisions.append(note)
        return ok

    def plan(self, precisions: list[str], rates: list[float | None]) -> Plan:
        """Choose micro-batch, then r, then precision; raise :class:`BudgetError` when nothing fits.

        Lower precisions are probed only when the ones before them cannot fit."""
        self.fit_for(precisions[0], rates[0])  # the configured setting first (warms the runtime up at m=1)
        if self.budget_mb is not None:
            # refuse early: the most frugal setting (highest r, micro-batch 1, eval batch 1) of each precision
            needs: list[tuple[float, str]] = []
            for p in precisions:
                if p != precisions[0] and not self.usable(p):
                    continue
                needs.append((self.minimum(p, rates[-1]), p))
                if needs[-1][0] <= self.budget_mb:
                    break
            need, prec = min(needs)
            if need > self.budget_mb:
                rate_txt = f"r {rates[-1]:g}, " if rates[-1] is not None else ""
                raise self.refuse(need, f"micro-batch 1, {rate_txt}{prec}, eval batch 1", len(precisions) > 1)
        chosen = None
        tried = []
        for precision in precisions:
            if precision != precisions[0] and not self.usable(precision):
                continue
            tried.append(precision)
            for rate in rates:
                chosen = self.choose(precision, rate)
                if chosen is not None:
                    break
            if chosen is not None:
                break
        if chosen is None:  # only when memory does not fall with r / precision as assumed
            need, how = min((self.minimum(p, r), f"micro-batch 1, r {r}, {p}") for p in tried for r in rates)
            raise self.refuse(need, how, len(precisions) > 1)
        return self._plan(chosen, precisions, rates)

    def _plan(
        self,
        chosen: tuple[_Fit, int, int, dict[str, float]],
        precisions: list[str],
        rates: list[float | None],
    ) -> Plan:
        fit, micro, bs, ev = chosen
        batch = self.batch
        if fit.precision != precisions[0]:
            self.decisions.append(
                f"{fit.precision} autocast: {precisions[0]} did not fit even at micro-batch 1, r {rates[-1]}"
            )
        if fit.rate is not None and fit.rate != rates[0]:
            self.decisions.append(
                f"reduction rate raised {rates[0]:g} -> {fit.rate:g}: micro-batch 1 did not fit"
            )
        if micro < batch:
            full = self.budgeted(self.peaks(fit, batch, ev))
            self.decisions.append(
                f"micro-batch {micro} x {math.ceil(batch / micro)} steps: the whole batch {batch} would "
                f"peak at {full:.0f} MB (+{self.headroom(full):.0f} MB headroom)"
            )
        if bs < self.eval_bs:
            self.decisions.append(f"eval batch lowered {self.eval_bs} -> {bs} (evaluation, phase-2 caching)")
        peaks = self.peaks(fit, micro, ev)
        predicted = self.budgeted(peaks)
        verified = None
        if self.verify and micro in fit.probed:
            verified = self.budgeted(self.peaks(fit, micro, ev, measured=fit.probed[micro]))
        ev_peaks = {}
        for meter in self.meters:
            dev = self.on_device(meter)
            inc = (ev[meter] + self.cache_mb * dev) * (self.factor if meter == "rss" else 1.0)
            ev_peaks[meter] = self.idle[meter] + self.opt_mb * dev + inc + self.input_mb * dev
        backbone = self.method.backbone
        weights = sum(t.numel() * t.element_size() for t in [*backbone.parameters(), *backbone.buffers()])
        return Plan(
            method=self.method.name,
            device=str(self.prober.device),
            memory_scope=self.scope,
            budget_mb=self.budget_mb,
            batch_size=batch,
            micro_batch_size=micro,
            accumulation_steps=math.ceil(batch / micro),
            reduction_rate=fit.rate,
            precision=fit.precision,
            eval_batch_size=bs,
            idle_baseline_mb=self.prober.idle_rss,
            predicted_peak_mb=predicted,
            headroom_mb=self.headroom(predicted),
            minimum_budget_mb=float(math.ceil(self.minimum(fit.precision, fit.rate))),
            weights_mb=weights / MIB,
            trainable_mb=self.prober.trainable_bytes / MIB,
            gradients_mb=self.grad_mb,
            optimizer_mb=self.opt_mb,
            activations_mb=fit.saved(self.act_meter, micro),
            activations_per_sample_mb=fit.saved_slope[self.act_meter],
            overhead_mb=fit.overhead[self.act_meter],
            eval_peak_mb=self.budgeted(ev_peaks),
            input_mb=self.input_mb,
            predicted_peak_rss_mb=peaks["rss"],
            predicted_peak_cuda_mb=peaks.get("cuda"),
            idle_cuda_mb=self.prober.idle_cuda if self.cuda else None,
            verified_peak_mb=verified,
            linearity_error=fit.linearity_error,
            allocator=allocator_description(),
            probes=self.probes,
            candidates=self.candidates,
            decisions=self.decisions,
            idle_file_backed_mb=self.prober.idle_file_mb,
        )


# ==== applying a plan ====================================================================================
def apply_plan(
    plan: Plan,
    *targets: TrainConfig | Method | dict[str, Any],
    method_overrides: dict[str, Any] | None = None,
    method: Method | None = None,
) -> None:
    """Put ``plan`` into every target given, in any order: a :class:`TrainConfig` (micro-batch, precision,
    eval batch), a :class:`Method` (its live config's reduction rate) and a dict of method overrides
    (``reduction_rate``, so results and checkpoints record it). ``method_overrides``/``method`` may be
    given by keyword too."""
    from edgecl.train.trainer import TrainConfig

    configs = [t for t in targets if isinstance(t, TrainConfig)]
    methods = [t for t in targets if isinstance(t, Method)] + ([method] if method is not None else [])
    overrides = [t for t in targets if isinstance(t, dict)] + (
        [method_overrides] if method_overrides is not None else []
    )
    if len(configs) + len(methods) + len(overrides) != len(targets) + (method is not None) + (
        method_overrides is not None
    ):
        raise TypeError("apply_plan targets must be TrainConfig, Method or dict objects")
    for cfg in configs:
        if cfg.batch_size != plan.batch_size:
            raise ValueError(
                f"the plan is for batch {plan.batch_size}, the training config has {cfg.batch_size}"
            )
        cfg.micro_batch_size = plan.micro_batch_size
        cfg.precision = plan.precision
        cfg.eval_batch_size = plan.eval_batch_size
        cfg.validate()
    if plan.reduction_rate is None:
        return
    for opts in overrides:
        opts["reduction_rate"] = plan.reduction_rate
    for m in methods:
        m.cfg.reduction_rate = plan.reduction_rate  # type: ignore[attr-defined]
        m.cfg.validate()


# ==== enforcement ========================================================================================
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

    # ---- measurements --------------------------------------------------------------------------------
    def usage_mb(self) -> float:
        """The budgeted quantity now."""
        if self.scope == "rss":
            return rss_mb()
        if self.scope == "cuda":
            return _cuda_mb("allocated", self._device)
        return rss_mb() + _cuda_mb("reserved", self._device)

    def peak_mb(self) -> float:
        """The budgeted quantity's high-water mark (process lifetime)."""
        if self.scope == "rss":
            return peak_rss_mb()
        if self.scope == "cuda":
            return _cuda_mb("max_allocated", self._device)
        return peak_rss_mb() + _cuda_mb("max_reserved", self._device)

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
            out["peak_cuda_allocated_mb"] = round(_cuda_mb("max_allocated", self._device), 1)
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
        self._seen_adaptations = len(trainer.state.adaptations)
        self._last_peak = self.peak_mb()
        if self.in_step:
            self._install(trainer.method)

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        """Name in-step adaptations; halve from the next step if the peak rose over the budget."""
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
        if self.plan is not None:
            results.setdefault("memory_plan", self.plan.to_dict())

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """Remove the hooks."""
        self._remove()
