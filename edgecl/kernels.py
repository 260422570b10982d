"""Frozen-weight linear layers through oneDNN on a CPU: the same math as ``F.linear``, fewer passes.

The frozen ViT's linears (qkv, proj, fc1, fc2) are most of every step. On a CPU, ``F.linear`` runs
``addmm`` (the BLAS, MKL in the x86 wheels): the bias is first broadcast into the output, then the GEMM
accumulates onto it, and GELU and the residual add each make one more pass over the activations.
``torch.ops.mkldnn._linear_pointwise`` (oneDNN, which the same wheels carry) adds the bias, and
optionally GELU or a residual, inside the GEMM, and its fp32 GEMM was 10-20 % faster than MKL's at the
ViT-Tiny shapes on the machines measured (``benchmarks/PERFORMANCE.md``). The weights are frozen, so a
backward only needs the input gradient ``grad @ W``, which is the same oneDNN op on ``W.t()`` (a view;
no transposed copy is kept).

Applies only where it is the same computation: CPU tensors in fp32 outside an autocast region, with
oneDNN built in (``torch.backends.mkldnn``), and not while a graph is traced (ONNX export, TorchScript,
torch.compile / torch.export); everywhere else (CUDA, a Jetson, bf16/fp16 autocast, exports) the callers
run ``F.linear`` and timm's modules unchanged. A leaf module (torch only).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KERNEL_CHOICES", "default_kernels", "fast_applies", "frozen_linear", "onednn_available"]

KERNEL_CHOICES = ("auto", "torch")
"""``auto``: oneDNN linears where :func:`fast_applies`, else torch; ``torch``: timm/torch modules always."""

_ONEDNN: bool | None = None


def onednn_available() -> bool:
    """Whether this torch has oneDNN's pointwise-fused linear (checked once on a tiny input)."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            ok = torch.backends.mkldnn.is_available()
            if ok:
                torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), torch.ones(3, 2), None, "none", [], "")
            _ONEDNN = bool(ok)
        except (RuntimeError, AttributeError, NotImplementedError):
            _ONEDNN = False
    return _ONEDNN


def default_kernels() -> str:
    """The kernel choice when none is given: ``EDGECL_KERNELS`` (``auto`` or ``torch``), else ``auto``."""
    value = os.environ.get("EDGECL_KERNELS", "auto").strip().lower() or "auto"
    if value not in KERNEL_CHOICES:
        raise ValueError(f"EDGECL_KERNELS={value!r} is not a kernel choice; use one of {KERNEL_CHOICES}")
    return value


def _tracing() -> bool:
    """Inside an ONNX export, a TorchScript trace or a torch.compile / torch.export graph capture, which
    must see plain ``aten`` ops (no exporter knows the oneDNN op)."""
    compiler = getattr(torch, "compiler", None)
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or (compiler is not None and compiler.is_compiling())
        or (compiler is not None and getattr(compiler, "is_exporting", lambda: False)())
    )


def fast_applies(x: Tensor) -> bool:
    """Whether the oneDNN path computes what ``F.linear`` would for ``x``: CPU fp32, no autocast, and no
    graph being traced or exported."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and onednn_available()
        and not _tracing()
    )


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None) -> Tensor:
    if act is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], act)


class _FrozenLinear(torch.autograd.Function):
    """``x W^T + b`` with a frozen ``W``/``b``: forward and input gradient both in oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return _pointwise(x, weight, bias, None)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return _pointwise(grad, weight.t(), None, None), None, None


def frozen_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    fast: bool,
    *,
    gelu: str | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` for frozen parameters; with ``gelu`` (its ``approximate``) the GELU
    of it, with ``residual`` ``residual`` plus it.

    ``fast`` (from :func:`fast_applies`) picks oneDNN; the GELU / residual fusions are used only without
    autograd, since a GELU's backward needs its input, which a fused op does not keep.
    """
    if not fast:
        out = F.linear(x, weight, bias)
        if gelu is not None:
            out = F.gelu(out, approximate=gelu)
        return out if residual is None else residual + out
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        out = _FrozenLinear.apply(x, weight, bias) if x.requires_grad else _pointwise(x, weight, bias, None)
        if gelu is not None:
            out = F.gelu(out, approximate=gelu)
        return out if residual is None else residual + out
    if residual is not None:
        if gelu is not None:
            return residual + _pointwise(x, weight, bias, gelu)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return _pointwise(x, weight, bias, gelu)
