"""Peak CUDA memory of this process's PyTorch allocator, and the one way to reset those peaks.

``torch.cuda.reset_peak_memory_stats`` is process-wide: the telemetry meters reset it per region, the
memory planner per probe, while the budget guard needs the run's peak. Every reset in edgecl goes through
:func:`reset_cuda_peaks`, which first folds the peak so far into each running :class:`CudaPeakWatch`, so a
watch's peak is the true peak since it started.
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

_WATCHES: set[CudaPeakWatch] = set()
"""The watches running now; :func:`reset_cuda_peaks` folds the peak so far into each before resetting."""
_KINDS = ("allocated", "reserved")


def _index(device: Any) -> int:
    """The CUDA device index of ``device`` (None, an int, ``"cuda:1"`` or a ``torch.device``)."""
    import torch

    if device is None:
        return int(torch.cuda.current_device())
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    return int(dev.index) if dev.index is not None else int(torch.cuda.current_device())


def _max_mb(kind: str, index: int) -> float:
    """``torch.cuda.max_memory_allocated`` or ``max_memory_reserved`` of device ``index``, MiB."""
    import torch

    read = torch.cuda.max_memory_allocated if kind == "allocated" else torch.cuda.max_memory_reserved
    return float(read(index)) / _MIB


def reset_cuda_peaks(device: Any = None) -> None:
    """``torch.cuda.reset_peak_memory_stats(device)``, after folding the peaks so far into every running
    :class:`CudaPeakWatch` of that device (so their peaks survive the reset)."""
    import torch

    index = _index(device)
    for watch in [w for w in _WATCHES if w.index == index]:
        watch.fold()
    torch.cuda.reset_peak_memory_stats(index)


class CudaPeakWatch:
    """The peak CUDA memory of one device since :meth:`start`, across any :func:`reset_cuda_peaks` in
    between (the budget guard's run peak, while the telemetry resets torch's statistics per region)."""

    def __init__(self, device: Any = None) -> None:
        self.index = _index(device)
        self._folded = dict.fromkeys(_KINDS, 0.0)

    def start(self) -> CudaPeakWatch:
        """Reset torch's peaks (through :func:`reset_cuda_peaks`) and watch from now on."""
        reset_cuda_peaks(self.index)
        self._folded = dict.fromkeys(_KINDS, 0.0)
        _WATCHES.add(self)
        return self

    def fold(self) -> None:
        """Remember torch's peaks so far (called before every reset while watching)."""
        for kind in _KINDS:
            self._folded[kind] = max(self._folded[kind], _max_mb(kind, self.index))

    def peak_mb(self, kind: str = "allocated") -> float:
        """Peak ``allocated`` or ``reserved`` MiB since :meth:`start`."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'allocated' or 'reserved', got {kind!r}")
        return max(self._folded[kind], _max_mb(kind, self.index))

    def stop(self) -> None:
        """Stop watching (resets no longer fold into this watch; :meth:`peak_mb` still answers)."""
        self.fold()
        _WATCHES.discard(self)


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
