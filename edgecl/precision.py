"""Device/precision support: whether an autocast precision can train on a device, and why not.

Shared by the trainer's up-front check and the memory planner's choice of precision. A leaf module (torch
only, nothing from edgecl), so the trainer can import it without importing the planner: the budget package
sits above the trainer (its guard is a trainer callback), and a precision check inside it would make
``train`` and ``budget`` import each other.
"""

from __future__ import annotations

import subprocess
import sys

import torch

__all__ = ["autocast_problem", "autocast_works"]

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
