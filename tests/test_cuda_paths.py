"""CPU-side tests of the CUDA-only paths found by reading the code for the GPU check (issue 20).

* fp16 training had no gradient scaler: small fp16 gradients underflow to 0 and an inf gradient is applied.
  The scaler path is run here with fp32 arithmetic (autocast replaced by a no-op), where scaling by a power
  of two and unscaling again is exact, so it must give the fp32 run's tensors; an inf loss must skip that
  step and halve the scale.
* ``torch.cuda.reset_peak_memory_stats`` is process-wide: the telemetry meters reset it per region, so the
  budget guard, which read ``max_memory_allocated``, reported the last region's peak as the run's (and,
  without telemetry, the planner probes' peak). Stand-in ``torch.cuda`` functions (the same
  peak-since-reset semantics) show the guard now reports the run's true peak.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from edgecl.backbone import FrozenViT
from edgecl.budget import BudgetGuard
from edgecl.data import synthetic_stream
from edgecl.methods import create_method
from edgecl.methods.base import Phase
from edgecl.telemetry.backends import TorchCudaBackend
from edgecl.telemetry.backends import torch_cuda as torch_cuda_module
from edgecl.train import trainer as trainer_module
from edgecl.train.trainer import TrainConfig, Trainer

MIB = 2**20


def _fit(vit: FrozenViT, precision: str, poison_step: int | None = None) -> tuple[Trainer, dict[str, Any]]:
    """cps_prompt on one small synthetic task; ``poison_step`` makes that step's loss inf."""
    torch.manual_seed(0)
    method = create_method("cps_prompt", vit, {"expected_tasks": 1, "pool_size": 10})
    if poison_step is not None:
        calls = {"n": 0}
        real = method.training_loss

        def training_loss(x: torch.Tensor, y: torch.Tensor, phase: Phase) -> torch.Tensor:
            calls["n"] += 1
            loss = real(x, y, phase)
            return loss * float("inf") if calls["n"] == poison_step else loss

        method.training_loss = training_loss  # type: ignore[method-assign]
    stream = synthetic_stream(1, classes_per_task=2, per_class=4, test_per_class=2, img_size=32)
    trainer = Trainer(method, stream, TrainConfig(epochs=2, batch_size=4, precision=precision))
    return trainer, trainer.fit()


@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let precision fp16 run on this CPU with fp32 arithmetic: the scaler path without fp16 kernels."""
    monkeypatch.setattr(trainer_module, "autocast_problem", lambda device, precision: None)
    monkeypatch.setattr(Trainer, "_autocast", lambda self: contextlib.nullcontext())


def test_fp16_scaler_path_equals_fp32_when_nothing_overflows(tiny_vit: FrozenViT, fp16_on_cpu: None) -> None:
    fp32_trainer, fp32 = _fit(tiny_vit, "fp32")
    fp16_trainer, fp16 = _fit(tiny_vit, "fp16")
    assert fp32["grad_scaler"] is None and fp32_trainer.scaler is None
    assert fp16["grad_scaler"] == {"scale": 65536.0, "skipped_steps": 0}
    assert fp16["accuracy_matrix"] == fp32["accuracy_matrix"]
    a, b = fp32_trainer.method.trainable_state_dict(), fp16_trainer.method.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:  # gradients were clipped after unscaling, else the clipped steps would differ
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def test_fp16_inf_gradient_skips_the_step_and_halves_the_scale(
    tiny_vit: FrozenViT, fp16_on_cpu: None
) -> None:
    trainer, results = _fit(tiny_vit, "fp16", poison_step=2)
    assert results["grad_scaler"] == {"scale": 32768.0, "skipped_steps": 1}
    for key, value in trainer.method.trainable_state_dict().items():
        assert torch.isfinite(value).all(), key  # the inf gradient was never applied


class FakeCuda:
    """``torch.cuda``'s allocator statistics: peak since the last reset, in bytes, for one device."""

    def __init__(self) -> None:
        self.allocated = 0
        self.peak = 0

    def use(self, mb: float) -> None:
        self.allocated = int(mb * MIB)
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch_cuda_module, "_WATCHES", set())
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)

    def reset(self, device: Any = None) -> None:
        self.peak = self.allocated


def test_budget_guard_keeps_the_cuda_peak_across_telemetry_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    guard = BudgetGuard(500.0, memory_scope="cuda", in_step=False)
    trainer = SimpleNamespace(device=torch.device("cuda"), state=SimpleNamespace(adaptations=[]))
    cuda.use(2000.0)  # a planner probe before the run: not the run's peak
    cuda.use(50.0)
    guard.on_run_start(trainer)  # type: ignore[arg-type]
    assert guard.peak_mb() == 50.0
    cuda.use(900.0)  # a step over the budget
    cuda.use(100.0)
    TorchCudaBackend(device="cuda").reset_peaks()  # the telemetry opens its next region
    cuda.use(300.0)
    assert torch.cuda.max_memory_allocated() == 300 * MIB  # torch itself forgot the 900 MB
    summary = guard.summary()
    assert summary["peak_mb"] == 900.0 and summary["peak_cuda_allocated_mb"] == 900.0
    assert summary["within_budget"] is False
    cuda.use(950.0)
    assert guard.peak_mb() == 950.0  # and a later, higher peak still counts
    guard.on_run_end(trainer, results := {})  # type: ignore[arg-type]
    assert results["memory_budget"]["peak_mb"] == 950.0 and not torch_cuda_module._WATCHES
