"""Peak CUDA memory of this process's PyTorch allocator, and the one way to reset those peaks.

``torch.cuda.reset_peak_memory_stats`` is process-wide: the telemetry meters reset it per region, the
memory planner per probe, while the budget guard needs the run's peak. Every reset in edgecl goes through
:func:`reset_cuda_peaks`, which remembers the peak so far, so :func:`cuda_lifetime_peak_mb` stays the
process's true peak (as :func:`edgecl.budget.memory.peak_rss_mb` does for RSS).
"""

from __future__ import annotations

from typing import Any, ClassVar

from edgecl.telemetry.backends.base import (
    _MIB,
    CUDA_ALLOCATED_MB,
    CUDA_RESERVED_MB,
    Backend,
    Capabilities,
    _caps,
)

_FOLDED_MB: dict[tuple[int, str], float] = {}
"""(device index, ``allocated``/``reserved``) -> the highest peak seen before a :func:`reset_cuda_peaks`."""


def _index(device: Any) -> int:
    """The CUDA device index of ``device`` (None, an int, ``"cuda:1"`` or a ``torch.device``)."""
    import torch

    if device is None:
        return int(torch.cuda.current_device())
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    return int(dev.index) if dev.index is not None else int(torch.cuda.current_device())


def reset_cuda_peaks(device: Any = None) -> None:
    """``torch.cuda.reset_peak_memory_stats(device)``, after folding the peaks so far into the lifetime
    peaks that :func:`cuda_lifetime_peak_mb` reports."""
    import torch

    index = _index(device)
    for kind, peak in (
        ("allocated", torch.cuda.max_memory_allocated(index)),
        ("reserved", torch.cuda.max_memory_reserved(index)),
    ):
        _FOLDED_MB[(index, kind)] = max(_FOLDED_MB.get((index, kind), 0.0), float(peak) / _MIB)
    torch.cuda.reset_peak_memory_stats(index)


def cuda_lifetime_peak_mb(kind: str, device: Any = None) -> float:
    """The process's peak ``allocated`` or ``reserved`` CUDA memory in MiB, across every
    :func:`reset_cuda_peaks` (the peak since the last reset alone is ``torch.cuda.max_memory_*``)."""
    import torch

    if kind not in ("allocated", "reserved"):
        raise ValueError(f"kind must be 'allocated' or 'reserved', got {kind!r}")
    index = _index(device)
    now = (
        torch.cuda.max_memory_allocated(index)
        if kind == "allocated"
        else torch.cuda.max_memory_reserved(index)
    )
    return max(_FOLDED_MB.get((index, kind), 0.0), float(now) / _MIB)


class TorchCudaBackend(Backend):
    """Peak CUDA memory of this process's PyTorch allocator, reset at the start of every measured region."""

    name: ClassVar[str] = "torch_cuda"
    primary: ClassVar[tuple[str, ...]] = ("device_memory",)

    def __init__(self, device: int | str | None = None) -> None:
        self.device = device
        self._ok: bool | None = None
        self._error = ""

    def available(self) -> bool:
        """True when torch imports and ``torch.cuda.is_available()``."""
        if self._ok is None:
            try:
                import torch

                self._ok = bool(torch.cuda.is_available())
                self._error = "" if self._ok else "torch.cuda.is_available() is False (no CUDA device)"
            except Exception as exc:
                self._ok, self._error = False, f"torch unavailable: {exc}"
        return self._ok

    def capabilities(self) -> Capabilities:
        """Device memory (this process's allocated/reserved peaks) when CUDA is available."""
        if not self.available():
            return _caps(self.name, reasons={"device_memory": self._error})
        return _caps(self.name, "torch.cuda.max_memory_allocated / max_memory_reserved", device_memory=True)

    def read(self) -> dict[str, float]:
        """Peak allocated and reserved MiB since the last reset."""
        import torch

        return {
            CUDA_ALLOCATED_MB: torch.cuda.max_memory_allocated(self.device) / _MIB,
            CUDA_RESERVED_MB: torch.cuda.max_memory_reserved(self.device) / _MIB,
        }

    def reset_peaks(self) -> None:
        """Reset the peak statistics through :func:`reset_cuda_peaks` (so the run's peak survives it; the
        sampler folds the old peak into open regions first)."""
        reset_cuda_peaks(self.device)
