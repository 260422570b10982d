"""Probe steps: what one training or evaluation step of a method costs, measured on a throwaway copy.

:class:`SavedTensorCounter` counts the bytes autograd saves for backward (unique storages; parameters,
their views and the input excluded). :class:`Prober` runs forward + backward (or an inference forward) of
a copy of the method that shares the frozen backbone, from a trimmed heap and a reset RSS high-water mark
(:func:`~edgecl.budget.allocator.trim_allocator`, :func:`~edgecl.budget.memory.reset_peak_rss`), in the
allocator mode training will have, so a probe measures what the training steps will do.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from edgecl.budget.allocator import trim_allocator
from edgecl.budget.memory import (
    MIB,
    cuda_mb,
    hwm_rss_mb,
    reset_cuda_peaks,
    reset_peak_rss,
    rss_breakdown_mb,
    rss_mb,
)
from edgecl.methods.base import Method, Phase, TaskInfo, describe_config
from edgecl.methods.registry import create_method

__all__ = ["Prober", "SavedTensorCounter"]


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


class Prober:
    """Runs probe steps on a throwaway copy of the method that shares the frozen backbone.

    The copy begins task ``task_index`` (default: the last expected task for methods whose prompt pool
    grows per task, so the pool is at its largest; else the first) with ``num_classes`` classes seen.
    ``meter_cuda`` is ``allocated`` or ``reserved``: which CUDA figure the deltas report.
    """

    def __init__(
        self, method: Method, device: torch.device, num_classes: int, task_index: int | None, meter_cuda: str
    ) -> None:
        self.device = device
        self.meter_cuda = meter_cuda
        self.cuda = device.type == "cuda"
        self.idle_cuda = 0.0
        if self.cuda:
            torch.cuda.synchronize(device)
            self.idle_cuda = cuda_mb(meter_cuda, device)
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
            reset_cuda_peaks(self.device)
        return reset_peak_rss()

    def _deltas(self, reset_ok: bool, sampled: float) -> dict[str, float]:
        peak = max(hwm_rss_mb() if reset_ok else 0.0, sampled, rss_mb())
        out = {"rss": peak - self.idle_rss - (0.0 if self.cuda else self.own_bytes / MIB)}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            out["cuda"] = (
                cuda_mb("max_" + self.meter_cuda, self.device) - self.idle_cuda - self.own_bytes / MIB
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
        """Free the copy and give its memory back."""
        del self.probe
        self.static = []
        trim_allocator()
        if self.cuda:
            torch.cuda.empty_cache()
