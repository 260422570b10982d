"""Memory readers: this process's RSS (now, its breakdown, the kernel's high-water mark) and CUDA memory.

Torch-free except :func:`cuda_mb` (which imports torch only when called), so the guard, the probes and the
benchmarks read memory the same way. Figures are MiB, written MB.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "MIB",
    "cuda_mb",
    "hwm_rss_mb",
    "peak_rss_mb",
    "reset_cuda_peaks",
    "reset_peak_rss",
    "rss_breakdown_mb",
    "rss_mb",
]

MIB = float(2**20)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LIFETIME_PEAK_MB = 0.0
"""The highest RSS high-water mark seen before any :func:`reset_peak_rss` (so process peaks survive it)."""


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


def cuda_mb(kind: str, device: torch.device) -> float:
    """``allocated``/``reserved`` (now) or ``max_allocated``/``max_reserved`` (since the last peak reset)
    CUDA memory, MB (a peak across resets: :class:`~edgecl.telemetry.backends.torch_cuda.CudaPeakWatch`)."""
    import torch

    fn = {
        "allocated": torch.cuda.memory_allocated,
        "reserved": torch.cuda.memory_reserved,
        "max_allocated": torch.cuda.max_memory_allocated,
        "max_reserved": torch.cuda.max_memory_reserved,
    }[kind]
    return float(fn(device)) / MIB


def reset_cuda_peaks(device: torch.device) -> None:
    """Reset torch's CUDA peak statistics, folding the peak so far into every running ``CudaPeakWatch``
    (one implementation, in the torch_cuda telemetry backend, which resets per measured region)."""
    from edgecl.telemetry.backends.torch_cuda import reset_cuda_peaks as reset

    reset(device)
