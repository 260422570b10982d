"""onnxruntime sessions: thread settings and execution-provider choice in one place.

``providers`` take onnxruntime's own form: names, or ``(name, options)`` pairs, e.g. for a Jetson
``[("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
"trt_engine_cache_path": "/var/lib/edgecl/trt"}), "CUDAExecutionProvider", "CPUExecutionProvider"]``
(README, "ONNX inference"; untested here: this machine's onnxruntime is the CPU build). Providers this
onnxruntime lacks are skipped; CPU is the fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_PROVIDERS", "Provider", "available_providers", "session"]

Provider = str | tuple[str, dict[str, Any]]
"""An execution provider: its name, or its name with provider options."""

DEFAULT_PROVIDERS: tuple[Provider, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
"""What a session asks for when the caller names none (CUDA where this onnxruntime has it)."""


def available_providers(wanted: Sequence[Provider] | None) -> list[Provider]:
    """``wanted`` (default :data:`DEFAULT_PROVIDERS`) less those this onnxruntime lacks; CPU if none."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen = [p for p in (wanted or DEFAULT_PROVIDERS) if (p if isinstance(p, str) else p[0]) in have]
    return chosen or ["CPUExecutionProvider"]


def session(
    source: str | bytes, threads: int | None = None, providers: Sequence[Provider] | None = None
) -> Any:
    """An ``onnxruntime.InferenceSession`` with ``threads`` intra-op threads (None: onnxruntime's default)
    and full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: constant-folding notes on fp16 graphs are not news
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(source, sess_options=options, providers=available_providers(providers))
