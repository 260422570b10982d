"""``edgecl train``: train one method over a task stream and write results.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["METHOD_FLAGS", "add_run_arguments", "method_options_from_args", "print_results", "register"]

METHOD_FLAGS = (
    "reduction_rate",
    "temperature",
    "phase_ratio",
    "sampling",
    "lr",
    "expected_tasks",
    "pool_size",
    "top_k",
    "delta",
    "beta",
    "hdr",
    "hgm",
)
"""Method options that have their own flag (``--reduction-rate`` ...), for the most used settings. Like
``--set KEY=VALUE`` they reach the method as strings and the method's config model converts and checks
them (:func:`edgecl.methods.registry.coerce_options`), so a bad value names the option and its rule."""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``train`` and ``bench`` (data, backbone, schedule, budget)."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="synthetic",
        help="ImageFolder root with train/ and val/, 'cifar100:ROOT', or 'synthetic' (default)",
    )
    g.add_argument("--tasks", type=int, default=None, help="number of tasks (default 5)")
    g.add_argument("--num-classes", type=int, default=None, help="use only the first N classes of the order")
    g.add_argument("--limit-per-class", type=int, default=None, help="training images per class")
    g.add_argument("--test-limit-per-class", type=int, default=None, help="test images per class")
    g.add_argument("--class-order", choices=["sorted", "permuted"], default="sorted")
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=None, help="timm ViT name (default vit_tiny_patch16_224)")
    g.add_argument("--weights", default=None, help="local backbone weights (.safetensors/.pth/.npz)")
    g.add_argument(
        "--pretrained", action="store_true", help="download timm's pretrained weights (online only)"
    )
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="optimiser steps per task at least: small tasks pass over their data more often per epoch",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda or auto (default: the profile's, else cpu)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g.add_argument("--profile", default=None, help="device profile NAME or PATH (profiles/*.yaml)")
    g.add_argument(
        "--memory-budget-mb", type=float, default=None, help="memory budget (overrides the profile)"
    )
    g.add_argument("--no-telemetry", action="store_true", help="do not run the power/memory sampler")
    g = p.add_argument_group(
        "method options", "checked by the method's config model; bad values name the option and its rule"
    )
    g.add_argument("--reduction-rate", metavar="R", help="CPS r, fraction of patches dropped, in [0, 1)")
    g.add_argument("--temperature", metavar="TAU", help="CPS softmax temperature τ (> 0)")
    g.add_argument("--phase-ratio", metavar="LAMBDA", help="DPCT λ, fraction of prompt epochs, in [0, 1]")
    g.add_argument("--sampling", metavar="MODE", help="CPS patch sampling: critical, uniform or topk")
    g.add_argument("--lr", metavar="LR", help="learning rate (> 0)")
    g.add_argument(
        "--expected-tasks", metavar="N", help="tasks prompt pools are split over (default: the stream's)"
    )
    g.add_argument("--pool-size", metavar="N", help="prompt pool size (CODA, CPS, I-Prompt, L2P, Hash)")
    g.add_argument("--top-k", metavar="K", help="prompts/experts selected per image (L2P, Hash)")
    g.add_argument("--delta", metavar="D", help="Hash HDR penalty δ (>= 0)")
    g.add_argument("--beta", metavar="B", help="Hash HGM update scale β, in [0, 1]")
    g.add_argument("--hdr", action=argparse.BooleanOptionalAction, default=None, help="Hash: HDR on/off")
    g.add_argument("--hgm", action=argparse.BooleanOptionalAction, default=None, help="Hash: HGM on/off")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any method config field, e.g. --set pool_size=50 or --set layers=0,1,2 (repeatable)",
    )


def method_options_from_args(args: argparse.Namespace, method: str, *, flags: bool = True) -> dict[str, Any]:
    """The method options the flags (``flags``) and ``--set`` give, converted by ``method``'s config model.

    Unknown keys are kept (building the config names them); an unregistered method leaves them strings.
    """
    from edgecl.config import parse_assignments
    from edgecl.methods.registry import coerce_options, list_methods

    raw: dict[str, Any] = {}
    if flags:
        raw = {flag: getattr(args, flag) for flag in METHOD_FLAGS if getattr(args, flag, None) is not None}
    raw.update(parse_assignments(getattr(args, "overrides", None) or []))
    return coerce_options(method, raw) if method in list_methods() else raw


def spec_from_args(args: argparse.Namespace, method: str | None) -> Any:
    """A :class:`RunSpec` from CLI arguments, with the profile's values as defaults."""
    from edgecl.runner import RunSpec

    profile = None
    if args.profile:
        from edgecl.profiles import load_profile

        profile = load_profile(args.profile)
    spec = RunSpec()
    if profile is not None:
        spec.method = profile.method
        spec.method_options = dict(profile.method_options)
        spec.epochs, spec.batch_size, spec.threads = profile.epochs, profile.batch_size, profile.threads
        spec.eval_batch_size = profile.eval_batch_size
        spec.backbone, spec.img_size, spec.patch_size = profile.backbone, profile.img_size, profile.patch_size
        spec.weights, spec.memory_budget_mb = profile.weights, profile.memory_budget_mb
        spec.precision = profile.precision if profile.precision != "auto" else "fp32"
        spec.sampler_period_s = profile.sampler_period_s
        spec.telemetry_backends = list(profile.telemetry_backends)
        spec.device = profile.device
        spec.profile = profile.source
    if method:
        if profile is not None and method != profile.method:
            spec.method_options = {}
        spec.method = method
    for name, value in (
        ("data", args.data),
        ("tasks", args.tasks),
        ("num_classes", args.num_classes),
        ("limit_per_class", args.limit_per_class),
        ("test_limit_per_class", args.test_limit_per_class),
        ("class_order", args.class_order),
        ("backbone", args.backbone),
        ("weights", args.weights),
        ("img_size", args.img_size),
        ("patch_size", args.patch_size),
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("min_steps", args.min_steps),
        ("seed", args.seed),
        ("device", args.device),
        ("precision", args.precision),
        ("threads", args.threads),
        ("memory_budget_mb", args.memory_budget_mb),
    ):
        if value is not None:
            setattr(spec, name, value)
    if spec.device == "auto":
        import torch

        spec.device = "cuda" if torch.cuda.is_available() else "cpu"
    spec.pretrained = bool(args.pretrained)
    spec.telemetry = not args.no_telemetry
    spec.method_options.update(method_options_from_args(args, spec.method))
    return spec


def print_results(results: dict[str, Any]) -> None:
    """The per-task table and the summary line."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{results['method']} on {results['dataset']['source']}"
    if results["dataset"].get("synthetic"):
        title += "  [SYNTHETIC data]"
    table = Table(title=title)
    tii = any("task_identification_accuracy" in rec for rec in results["tasks"])
    cols = ["task", "classes", "acc (seen)", "acc (this task)", "train s", "peak MB", "energy J"]
    for col in cols + (["task id acc"] if tii else []):
        table.add_column(col, justify="right")
    for rec in results["tasks"]:
        energy = (rec.get("telemetry") or {}).get("task", {}).get("energy_j")
        row = [
            str(rec["task"] + 1),
            str(len(rec["classes"])),
            f"{100 * rec['average_accuracy']:.1f}%",
            f"{100 * rec['accuracy'][-1]:.1f}%",
            f"{rec['train_seconds']:.1f}" if rec.get("train_seconds") is not None else "-",
            f"{rec['peak_memory_mb']:.0f}" if rec.get("peak_memory_mb") is not None else "-",
            f"{energy:.1f}" if energy is not None else "no sensor",
        ]
        if tii:
            value = rec.get("task_identification_accuracy")
            row.append(f"{100 * value:.1f}%" if value is not None else "-")
        table.add_row(*row)
    console.print(table)
    console.print(
        f"final average accuracy {100 * results['final_average_accuracy']:.2f}%  "
        f"average incremental accuracy {100 * results['average_incremental_accuracy']:.2f}%  "
        f"forgetting {100 * results['forgetting']:.2f}%"
    )


def run(args: argparse.Namespace) -> int:
    """Train, print the table, write results.json."""
    from edgecl.runner import run_training

    spec = spec_from_args(args, args.method)
    spec.tasks = spec.tasks or 5
    spec.checkpoint_dir = args.checkpoint_dir
    spec.model_dir = args.model_dir
    spec.resume = args.resume
    if args.resume and not spec.checkpoint_dir:
        spec.checkpoint_dir = args.resume
    spec.progress = not args.quiet
    results = run_training(spec)
    print_results(results)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"results written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``edgecl train``."""
    p = sub.add_parser(
        "train",
        help="train a method over a task stream",
        description="Train one continual-learning method over a task stream.",
    )
    p.add_argument(
        "--method", default=None, help="registered method (default: the profile's, else cps_prompt)"
    )
    add_run_arguments(p)
    p.add_argument("--checkpoint-dir", default=None, help="write a resumable checkpoint after every epoch")
    p.add_argument("--model-dir", default=None, help="write the finished model after every task")
    p.add_argument("--resume", default=None, help="continue from the checkpoint in DIR")
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
