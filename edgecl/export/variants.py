"""Smaller/faster variants of a checked fp32 export: int8 dynamic quantisation and fp16 weights.

* ``int8``: ``onnxruntime.quantization.quantize_dynamic`` after onnxruntime's quantisation pre-processing
  (ONNX shape inference and graph optimisation): MatMul/Gemm/Conv weights stored as signed int8, activations
  quantised per batch at run time (no calibration data needed, so the daemon can make it after every task).
  The fast path on x86 CPUs with VNNI and on ARM with dot-product instructions.
* ``fp16``: onnxruntime's float16 converter (``onnxruntime.transformers.float16``; onnxconverter-common
  1.16's converter produced a graph onnxruntime refuses on these models, a Cast typed float16 whose
  ``to`` is float), inputs and outputs kept float32 so callers feed the same tensors. Half the file; meant
  for GPUs (CUDA / TensorRT on a Jetson): onnxruntime's CPU provider runs many fp16 ops through casts.

Both change the logits (measured against PyTorch fp32 by the export and by ``benchmarks/onnx_latency.py``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

__all__ = ["PRECISIONS", "Precision", "convert_fp16", "quantize_int8", "write_variant"]

Precision = Literal["fp32", "int8", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8", "fp16")


def quantize_int8(src: Path, dst: Path, per_channel: bool = False, activation_matmuls: bool = True) -> None:
    """Dynamic int8 quantisation of ``src`` into ``dst`` (weights int8, activations quantised at run time).

    ``activation_matmuls`` also quantises the MatMuls of two activations (attention's QK^T and AV), not only
    those with a weight: as fast at batch 1 and 14 % less CPU time at batch 16 on ViT-Tiny 224
    (PERFORMANCE.md, "ONNX inference", with the agreement each setting costs). ``per_channel`` (a scale per
    output channel) is off: it cost 5-10 % there. Both are measured choices on one x86 CPU, not rules.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        # symbolic shape inference cannot resolve the dynamic batch through the prompt composition;
        # ONNX's own shape inference (kept) is enough for the quantiser
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(
            str(pre),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            extra_options={"MatMulConstBOnly": not activation_matmuls},
        )


def convert_fp16(src: Path, dst: Path) -> None:
    """``src`` with float16 weights and compute into ``dst``; float32 input and output kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def write_variant(src: Path, dst: Path, precision: Precision) -> None:
    """Write the ``precision`` variant of the fp32 file ``src`` to ``dst`` (``fp32``: a copy)."""
    if precision == "int8":
        quantize_int8(src, dst)
    elif precision == "fp16":
        convert_fp16(src, dst)
    elif precision == "fp32":
        dst.write_bytes(src.read_bytes())
    else:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
