"""``edgecl bench``: train several methods (and seeds) each in its own subprocess, then tabulate accuracy and
memory/time/energy with ratios to a reference method, optionally the CPS ablation, with plots and files."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from edgecl.commands.train import add_run_arguments

__all__ = ["register", "run"]

PREFERRED_ORDER = (
    "cps_prompt",
    "coda_prompt",
    "patchdropout",
    "l2p",
    "dualprompt",
    "linear_probe",
    "simplecil",
)
"""Order of ``--methods all``: the paper's table, the two floors (head-only, training-free), the rest."""

_NOT_RUN_ARGS = {"func", "bench_parser", "command"}


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds is None:
        return [int(args.seed)]
    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, got {args.seeds!r}")
    return seeds


def _method_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep or "=" not in rest or not method.strip():
            raise ValueError(f"--method-set expects METHOD:KEY=VALUE, got {item!r}")
        out.setdefault(method.strip(), []).append(rest)
    return out


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The equivalent ``edgecl bench ...`` command: every option that differs from its default."""
    parts = ["edgecl", "bench"]
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_RUN_ARGS or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _order(methods: list[str], available: list[str]) -> list[str]:
    """``methods`` with ``all`` expanded to every registered method (paper order first), no duplicates."""
    first = [m for m in PREFERRED_ORDER if m in available]
    every = first + sorted(m for m in available if m not in first)
    return list(dict.fromkeys(m for name in methods for m in (every if name == "all" else [name])))


def _run_line(index: int, total: int, outcome: Any) -> str:
    from edgecl.bench.report import run_figures

    plan = outcome.plan
    head = f"[{index}/{total}] {plan.method} seed {plan.seed}"
    if not outcome.ok:
        return f"{head}: FAILED after {outcome.wall_s:.1f} s: {outcome.error}"
    f = run_figures(outcome.results)

    def num(value: float | None, fmt: str, unit: str) -> str:
        return "n/a" if value is None else f"{value:{fmt}}{unit}"

    energy = num(f["energy_j"], ".1f", " J") if f["energy_j"] is not None else "energy no sensor"
    return (
        f"{head}: {'reused' if outcome.reused else 'ok'}  FAA {100 * f['final_average_accuracy']:.2f}%  "
        f"AIA {100 * f['average_incremental_accuracy']:.2f}%  forgetting {100 * f['forgetting']:.2f}%  "
        f"peak {num(f['peak_memory_mb'], '.0f', ' MB')}  train {num(f['train_seconds'], '.1f', ' s')}  "
        f"{energy}  (child wall {outcome.wall_s:.1f} s)"
    )


def run(args: argparse.Namespace) -> int:
    """Plan, run each child sequentially, aggregate, plot, write files, print tables.

    Returns 0 when every run finished, 1 when some failed (the files and tables are written either way)."""
    from rich.console import Console

    from edgecl.bench.plots import make_plots
    from edgecl.bench.report import aggregate, print_tables, write_outputs
    from edgecl.bench.runs import ABLATION_REFERENCE, ABLATIONS, execute_run, plan_runs
    from edgecl.commands.bench_specs import prepare_specs

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs: do not squeeze the tables into 80 columns
    out_dir = Path(args.out)
    methods = _split(args.methods)
    if not methods:
        raise ValueError("--methods is empty")
    seeds = _seeds(args)
    method_sets = _method_sets(args.method_set)
    ablation_methods = [m for _, m, _ in ABLATIONS.get(args.ablation or "", ())]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = list(os.getloadavg())
    console.print(f"preparing run specs (load average {load_start[0]:.2f}) …")
    request_args = {k: v for k, v in vars(args).items() if k not in _NOT_RUN_ARGS}
    wanted = list(dict.fromkeys(methods + ablation_methods))
    prep = prepare_specs({"args": request_args, "methods": wanted, "method_sets": method_sets}, out_dir)
    methods = _order(methods, prep["methods"])
    if args.reference not in methods:
        raise ValueError(f"--reference {args.reference!r} is not among --methods ({', '.join(methods)})")
    missing = [m for m in [*methods, *ablation_methods] if m not in prep["specs"]]
    if missing:  # cannot happen unless the helper skipped a method
        raise ValueError(f"no spec for {missing}: method not registered")
    for method, flags in prep.get("dropped", {}).items():
        if method in methods or method in ablation_methods:
            console.print(f"note: {', '.join(flags)} not an option of {method}; not passed to it")

    def make_spec(method: str, seed: int) -> dict[str, Any]:
        spec = dict(prep["specs"][method])
        spec["method_options"] = dict(spec["method_options"])
        spec.update(seed=seed, progress=not args.quiet, checkpoint_dir=None, model_dir=None, resume=None)
        return spec

    plans = plan_runs(make_spec, methods, seeds, args.ablation)
    what = f"{len(methods)} methods × {len(seeds)} seeds"
    what += f", ablation {args.ablation}" if args.ablation else ""
    console.print(f"{len(plans)} runs ({what}), one subprocess each, in sequence → {out_dir}")
    outcomes = []
    for i, plan in enumerate(plans, 1):
        rows = ", ".join(label if table == "main" else f"{table}: {label}" for table, label in plan.rows)
        console.print(f"[{i}/{len(plans)}] {plan.method} seed {plan.seed} ({rows}) …")
        outcome = execute_run(
            plan,
            out_dir / "runs",
            show_output=not args.quiet,
            timeout_s=args.timeout_per_run,
            reuse=args.reuse,
        )
        outcomes.append(outcome)
        console.print(_run_line(i, len(plans), outcome), style=None if outcome.ok else "red", soft_wrap=True)

    main_rows = aggregate(outcomes, "main", methods, args.reference)
    ablation_rows = []
    if args.ablation:
        labels = [label for label, _, _ in ABLATIONS[args.ablation]]
        ablation_rows = aggregate(outcomes, "ablation", labels, ABLATION_REFERENCE[args.ablation])
    plots = [] if args.no_plots else make_plots(out_dir, main_rows, ablation_rows, outcomes)
    class_orders: dict[str, list[str]] = {}
    for o in outcomes:
        if o.ok and o.results and str(o.plan.seed) not in class_orders:
            class_orders[str(o.plan.seed)] = list(o.results.get("class_order", []))
    first_spec = plans[0].spec if plans else {}
    meta = {
        "format": "edgecl-bench/1",
        "command": command_line(args.bench_parser, args),
        "argv": list(sys.argv),
        "machine": prep["machine"],
        "settings": {k: v for k, v in first_spec.items() if k not in {"method", "method_options", "seed"}},
        "methods": methods,
        "seeds": seeds,
        "reference": args.reference,
        "ablation": args.ablation,
        "method_options": {m: prep["specs"][m]["method_options"] for m in methods if m in prep["specs"]},
        "class_orders": class_orders,
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
    }
    paths = write_outputs(out_dir, meta, main_rows, ablation_rows, outcomes, plots)
    print_tables(console, main_rows, ablation_rows)
    console.print("written: " + ", ".join(str(p) for p in [*paths.values(), *plots]))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        console.print(f"{len(failed)} of {len(outcomes)} runs failed", style="red")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``edgecl bench``."""
    p = sub.add_parser(
        "bench",
        help="benchmark methods: accuracy and memory/time/energy ratios, one subprocess per run",
        description="Train each method (and seed) in its own subprocess through the same Trainer and meters, "
        "then write results.md/.csv/.json, runs.csv and PNG plots to --out and print the tables.",
    )
    p.add_argument("--methods", default="all", help="comma-separated registered methods, or 'all' (default)")
    add_run_arguments(p)
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--out", default="bench-results", help="output directory (default bench-results)")
    p.add_argument(
        "--ablation",
        choices=["cps"],
        default=None,
        help="also run the CPS ablation: CODA-Prompt / +PatchDropout / +CPS / +PatchDropout+DPCT / +CPS+DPCT",
    )
    p.add_argument("--reference", default="cps_prompt", help="method the efficiency ratios are relative to")
    p.add_argument(
        "--method-set",
        dest="method_set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="a method config field for one method only (repeatable)",
    )
    p.add_argument("--timeout-per-run", type=float, default=None, help="kill a run after this many seconds")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse finished runs in OUT/runs with the same spec (continue an interrupted bench)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars or child output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run, bench_parser=p)
