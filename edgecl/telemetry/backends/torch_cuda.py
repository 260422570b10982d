"""Peak CUDA memory of this process's PyTorch allocator."""

from __future__ import annotations

from typing import ClassVar

from edgecl.telemetry.backends.base import (
    _MIB,
    CUDA_ALLOCATED_MB,
    CUDA_RESERVED_MB,
    Backend,
    Capabilities,
    _caps,
)


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
        """``torch.cuda.reset_peak_memory_stats`` (the sampler folds the old peak into open regions first)."""
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
