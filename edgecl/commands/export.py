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
            "before the file is written; a method that cannot be exported fails with the reason."
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
    parser.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset, >= 17 (default 17)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print a one-line summary."""
    from edgecl.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out, weights=args.weights, opset=args.opset)
    seq, task = info.metadata.get("checkpoint_seq") or "?", info.metadata.get("checkpoint_task") or "?"
    folded = f", folded constants: {', '.join(info.folded_ops)}" if info.folded_ops else ""
    print(
        f"exported {info.method} ({len(info.classes)} classes, checkpoint seq {seq}, task {task}) "
        f"to {info.path}: "
        f"{info.size_bytes / 1e6:.1f} MB, opset {info.opset}, {info.img_size}x{info.img_size} input, "
        f"parity max |d logit| {info.parity_max_abs:.1e} (onnxruntime vs torch, batch {info.parity_batch}), "
        f"{info.seconds:.1f} s{folded}"
    )
    return 0
