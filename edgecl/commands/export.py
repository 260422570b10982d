"""``edgecl export``: the whole inference path of a trained model as one ONNX graph, parity-checked."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX (query pass, prompts, prompted pass, head) for onnxruntime",
        description=(
            "Export the last committed model of a checkpoint directory as one ONNX graph (dynamic batch) "
            "with its classes, method, image size and normalisation in the metadata. The graph is validated "
            "with onnx.checker and compared with PyTorch on a random batch (max |logit difference| <= 1e-4) "
            "before the file is written; a method that cannot be exported fails with the reason. "
            "--quantize int8 / --fp16 then write that variant of the checked graph, with its measured "
            "difference from PyTorch fp32."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="DIR", help="model directory (TrainConfig.model_dir)"
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="ONNX file to write (replaced atomically)"
    )
    parser.add_argument(
        "--weights", metavar="FILE", help="backbone weights, if the checkpoint's file has moved"
    )
    parser.add_argument(
        "--opset", type=int, metavar="N", help="ONNX opset (default 17; the dynamo exporter needs >= 18)"
    )
    parser.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch.onnx exporter (default torchscript: as fast at run time, exports ~35x faster)",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--quantize",
        choices=["int8"],
        help="write the int8 dynamic-quantised variant (onnxruntime.quantization; fastest on CPUs)",
    )
    precision.add_argument(
        "--fp16", action="store_true", help="write the float16 variant (half the size; for GPUs / TensorRT)"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print a one-line summary."""
    from edgecl.export import export_checkpoint

    precision = args.quantize or ("fp16" if args.fp16 else "fp32")
    info = export_checkpoint(
        args.checkpoint,
        args.out,
        weights=args.weights,
        opset=args.opset,
        exporter=args.exporter,
        precision=precision,
    )
    seq, task = info.metadata.get("checkpoint_seq") or "?", info.metadata.get("checkpoint_task") or "?"
    variant = ""
    if info.variant_top1_agreement is not None:
        variant = (
            f"; {info.precision}: max |d logit| {info.variant_max_abs:.1e}, top-1 agreement "
            f"{info.variant_top1_agreement:.0%} with torch fp32 on a random batch of {info.variant_batch}"
        )
    print(
        f"exported {info.method} ({len(info.classes)} classes, checkpoint seq {seq}, task {task}) "
        f"to {info.path}: "
        f"{info.size_bytes / 1e6:.1f} MB {info.precision}, opset {info.opset} ({info.exporter}), "
        f"{info.img_size}x{info.img_size} input, "
        f"parity max |d logit| {info.parity_max_abs:.1e} "
        f"(onnxruntime fp32 vs torch, batch {info.parity_batch})"
        f"{variant}, {info.seconds:.1f} s"
    )
    return 0
