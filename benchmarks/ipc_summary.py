"""Tabulate and plot the finished cells of ``benchmarks/ipc_study.py`` (only cells that ran; none filled).

Per (method, images per class): mean final average accuracy over the seeds that finished and a 95 %
interval that combines the seed spread (Student-t, ``t_{0.975, n-1} · s / √n``) with the test set's
sampling error (binomial, ``1.96 · √(p(1−p)/N)`` over the N test images of the last row): the seeds change
initialisation, sampling and shuffling but not the images, so a training-free method has no seed spread
and only the second term. A difference between two methods is their seed-paired mean difference with the
two halves combined the same way (the test-set terms added as if independent, which is conservative: both
methods see the same images); it is called significant when that interval excludes 0.
Writes ``OUT/summary.md`` and ``OUT/accuracy_vs_ipc.png``.

``python benchmarks/ipc_summary.py benchmarks/results/ipc_study [--against simplecil]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95 % Student-t quantiles by degrees of freedom."""


def interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t-interval over seeds, or None for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def test_halfwidth(acc_pct: float, n_test: int) -> float:
    """1.96 binomial standard errors (points) of an accuracy measured on ``n_test`` images."""
    p = min(max(acc_pct / 100, 0.0), 1.0)
    return 196 * math.sqrt(p * (1 - p) / max(n_test, 1))


def combined(values: list[float], n_test: int) -> tuple[float, float]:
    """(mean, half-width): the seed interval (0 for one seed) and the test-set term in quadrature."""
    mean, hw = interval(values)
    return mean, math.hypot(hw or 0.0, test_halfwidth(mean, n_test))


def load(out: Path) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    """(label, ipc) -> seed -> figures of every finished cell."""
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    for path in sorted((out / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        s = r["study"]
        cells[(s["label"], int(s["images_per_class"]))][int(s["seed"])] = {
            "faa": 100 * r["final_average_accuracy"],
            "aia": 100 * r["average_incremental_accuracy"],
            "forgetting": 100 * r["forgetting"],
            "train_s": sum(t.get("train_seconds") or 0.0 for t in r["tasks"]),
            "n_test": int(r["spec"]["num_classes"]) * int(r["spec"]["test_limit_per_class"]),
        }
    return cells


def fmt(values: list[float], n_test: int) -> str:
    """``mean ± hw (seeds n)``."""
    mean, hw = combined(values, n_test)
    return f"{mean:.2f} ± {hw:.2f} (n={len(values)})"


SWEEP_PREFIX = "cps "
"""Labels of the item-5 sweep cells (``cps tau=…``, ``cps mid …``, ``cps topk``): tabulated apart."""


def paired(
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]], label: str, against: str, ipc: int
) -> str:
    """Seed-paired difference ``label − against`` at ``ipc``: mean ± combined half-width, a verdict."""
    a, b = cells.get((label, ipc), {}), cells.get((against, ipc), {})
    common = sorted(set(a) & set(b))
    if not common:
        return "—"
    diffs = [a[s]["faa"] - b[s]["faa"] for s in common]
    mean, hw = interval(diffs)
    n_test = a[common[0]]["n_test"]
    ta = test_halfwidth(statistics.fmean(a[s]["faa"] for s in common), n_test)
    tb = test_halfwidth(statistics.fmean(b[s]["faa"] for s in common), n_test)
    total = math.sqrt((hw or 0.0) ** 2 + ta**2 + tb**2)
    sig = "significant" if abs(mean) > total else "not significant"
    return f"{mean:+.2f} ± {total:.2f} (n={len(common)}), {sig}"


def table(
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]], labels: list[str], ipcs: list[int]
) -> list[str]:
    """Mean ± interval per (label, ipc); "not run" where no seed finished."""
    lines = ["| method | " + " | ".join(f"{i} img/class" for i in ipcs) + " |", "|---|" + "---:|" * len(ipcs)]
    for label in labels:
        row = []
        for ipc in ipcs:
            seeds = cells.get((label, ipc), {})
            n_test = next(iter(seeds.values()))["n_test"] if seeds else 0
            row.append(fmt([v["faa"] for v in seeds.values()], n_test) if seeds else "not run")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Write the summary tables (study, paired differences, sweep, time) and the plot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="benchmarks/results/ipc_study")
    p.add_argument("--against", default="simplecil", help="paired differences to this method")
    p.add_argument("--sweep-against", default="patchdropout", help="the sweep's paired differences to this")
    args = p.parse_args(argv)
    out = Path(args.out)
    cells = load(out)
    every = list(dict.fromkeys(label for label, _ in sorted(cells, key=lambda k: k[0])))
    labels = [lb for lb in every if not lb.startswith(SWEEP_PREFIX)]
    sweep = [lb for lb in every if lb.startswith(SWEEP_PREFIX)]
    ipcs = sorted({ipc for _, ipc in cells})
    lines = table(cells, labels, ipcs)
    lines += ["", f"Paired by seed, method − {args.against} (final average accuracy, points):", ""]
    lines.append("| method | " + " | ".join(f"{i} img/class" for i in ipcs) + " |")
    lines.append("|---|" + "---:|" * len(ipcs))
    for label in labels:
        if label != args.against:
            lines.append(
                f"| {label} | " + " | ".join(paired(cells, label, args.against, i) for i in ipcs) + " |"
            )
    if sweep:
        sweep_ipcs = sorted({ipc for lb, ipc in cells if lb.startswith(SWEEP_PREFIX)})
        lines += ["", "CPS sampling sweep (final average accuracy, %; `mid` = scores of a middle block):", ""]
        lines += table(cells, ["cps_prompt", args.sweep_against, *sweep], sweep_ipcs)
        lines += ["", f"Paired by seed, sweep cell − {args.sweep_against} (points):", ""]
        lines.append("| cell | " + " | ".join(f"{i} img/class" for i in sweep_ipcs) + " |")
        lines.append("|---|" + "---:|" * len(sweep_ipcs))
        for label in ["cps_prompt", *sweep]:
            row = " | ".join(paired(cells, label, args.sweep_against, i) for i in sweep_ipcs)
            lines.append(f"| {label} | {row} |")
    lines += ["", "Training time (s, mean over seeds; CPU shared with other jobs, so only rough):", ""]
    lines.append("| method | " + " | ".join(f"{i} img/class" for i in ipcs) + " |")
    lines.append("|---|" + "---:|" * len(ipcs))
    for label in labels:
        row = []
        for ipc in ipcs:
            seeds = cells.get((label, ipc), {})
            row.append(f"{statistics.fmean(v['train_s'] for v in seeds.values()):.1f}" if seeds else "—")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in [lb for lb in labels if "lam=" not in lb and "min_steps" not in lb]:
        xs, ys, errs = [], [], []
        for ipc in ipcs:
            seeds = cells.get((label, ipc), {})
            if seeds:
                mean, hw = combined([v["faa"] for v in seeds.values()], next(iter(seeds.values()))["n_test"])
                xs.append(ipc)
                ys.append(mean)
                errs.append(hw)
        if xs:
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.set_xlabel("training images per class")
    ax.set_ylabel("final average accuracy (%)")
    ax.set_title("5 tasks x 10 held-out Tiny-ImageNet classes, ViT-Tiny 64/8 (95 % interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_ipc.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
