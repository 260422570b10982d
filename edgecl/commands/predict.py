"""``edgecl predict``: classify images with an exported ONNX model or a checkpoint directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``predict`` subcommand."""
    parser = subparsers.add_parser(
        "predict",
        help="classify images with an exported model (onnxruntime) or a checkpoint (torch)",
        description=(
            "Print one line per image: its path, the top-1 label and probability, then the rest of the "
            "top-k as label=probability, tab-separated. A directory argument stands for the images in it. "
            "The model is an ONNX file from `edgecl export` (run with onnxruntime) or a checkpoint "
            "directory (run with PyTorch); preprocessing (resize, center crop, normalisation) comes from "
            "the model."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of images")
    parser.add_argument(
        "--model", required=True, metavar="FILE|DIR", help="model.onnx or a checkpoint directory"
    )
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.add_argument(
        "--weights", metavar="FILE", help="backbone weights for a checkpoint whose file has moved"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="images per forward (default 32)"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.set_defaults(func=run)


def expand_images(args: list[str]) -> list[str]:
    """Files as given; directories replaced by their image files (sorted, recursively)."""
    from edgecl.data.stream import IMAGE_EXTENSIONS

    out: list[str] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(
                str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {p}")
            out.extend(found)
        else:
            out.append(arg)
    return out


def run(args: argparse.Namespace) -> int:
    """Load the model, classify, print."""
    from edgecl.export import open_predictor, topk

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    images = expand_images(args.images)
    predictor = open_predictor(args.model, weights=args.weights, batch_size=args.batch_size)
    probs, _ = predictor.predict(images)
    ranked = topk(probs, predictor.class_names, args.top_k)
    if args.json:
        info = predictor.info
        doc = {
            "model": str(args.model),
            "engine": predictor.engine,
            "precision": info.extra.get("precision", "fp32"),
            "method": info.method,
            "checkpoint_seq": info.checkpoint_seq,
            "checkpoint_task": info.checkpoint_task,
            "predictions": [
                {
                    "image": path,
                    "label": top[0][0],
                    "prob": top[0][1],
                    "top_k": [{"label": label, "prob": p} for label, p in top],
                }
                for path, top in zip(images, ranked, strict=True)
            ],
        }
        print(json.dumps(doc, indent=2))
        return 0
    for path, top in zip(images, ranked, strict=True):
        rest = "".join(f"\t{label}={p:.4f}" for label, p in top[1:])
        print(f"{path}\t{top[0][0]}\t{top[0][1]:.4f}{rest}")
    return 0
