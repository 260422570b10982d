"""``edgecl plan``: show how training would fit a memory budget, without training."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``plan`` subcommand."""
    parser = subparsers.add_parser(
        "plan",
        help="plan micro-batch, reduction rate and precision for a memory budget",
        description=(
            "Measure the idle baseline and probe a few training steps, then print the plan `edgecl train` "
            "would use under the budget: micro-batch and accumulation steps, CPS reduction rate, precision, "
            "eval batch, and the predicted peak. Exits 2 with the smallest workable budget when nothing fits."
        ),
    )
    parser.add_argument(
        "--profile", metavar="NAME|PATH", help="device profile (defaults for everything below)"
    )
    parser.add_argument(
        "--memory-budget-mb", type=float, metavar="MB", help="budget (overrides the profile's)"
    )
    parser.add_argument("--method", help="method name (default: the profile's, else cps_prompt)")
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, checked by the method's config model, repeatable; e.g. -o reduction_rate=0.4",
    )
    parser.add_argument("--batch-size", type=int, help="effective batch (default: profile's, else 16)")
    parser.add_argument("--eval-batch-size", type=int, help="evaluation batch (default: profile's, else 64)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], help="starting precision")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: profile's, else auto)")
    parser.add_argument("--backbone", help="timm ViT name (default: profile's)")
    parser.add_argument("--img-size", type=int, help="input size (default: profile's / the model's)")
    parser.add_argument("--patch-size", type=int, help="patch size (default: profile's / the model's)")
    parser.add_argument(
        "--weights", metavar="FILE", help="backbone weights file (default: profile's; random init)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=100, help="classes of the whole stream (head size)"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: profile's)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the probe step at the chosen micro-batch"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build backbone and method as training would, plan, print; 2 when the budget cannot be met."""
    import torch

    from edgecl.backbone import load_backbone
    from edgecl.budget import BudgetError, Planner
    from edgecl.config import parse_assignments
    from edgecl.methods import create_method
    from edgecl.methods.registry import coerce_options
    from edgecl.profiles import Profile, load_profile
    from edgecl.train.trainer import TrainConfig

    profile = (
        load_profile(args.profile, memory_budget_mb=args.memory_budget_mb)
        if args.profile
        else Profile(memory_budget_mb=args.memory_budget_mb, device="auto", precision="fp32")
    )
    method_name = args.method or profile.method
    options = dict(profile.method_options) if method_name == profile.method else {}
    options.update(coerce_options(method_name, parse_assignments(args.option, flag="--option")))
    threads = args.threads or profile.threads
    if threads:
        torch.set_num_threads(threads)
    device = args.device or profile.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(
        args.backbone or profile.backbone,
        weights=args.weights or profile.weights,
        img_size=args.img_size or profile.img_size,
        patch_size=args.patch_size or profile.patch_size,
    )
    method = create_method(method_name, backbone, options)
    precision = args.precision or profile.precision
    config = TrainConfig(
        batch_size=profile.batch_size if args.batch_size is None else args.batch_size,
        eval_batch_size=profile.eval_batch_size if args.eval_batch_size is None else args.eval_batch_size,
        precision="fp32" if precision == "auto" else precision,  # auto: fp32, lowered only to fit
        device=device,
    )
    try:
        plan = Planner(
            method,
            config,
            profile,
            num_classes=args.num_classes,
            allow_autocast=True if precision == "auto" else None,
            verify=not args.no_verify,
        ).plan()
    except BudgetError as err:
        if args.json:
            print(json.dumps({"error": str(err), "minimum_budget_mb": err.minimum_mb}, indent=2))
            return 2
        raise
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render())
    return 0
