"""PNG plots of a bench (matplotlib, Agg backend): accuracy after each task, memory over time, ratio bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecl.bench.report import EFFICIENCY_FIGURES, EXTRA_FIGURES

if TYPE_CHECKING:
    from edgecl.bench.runs import RunOutcome

__all__ = ["make_plots", "plot_accuracy", "plot_memory", "plot_ratios"]

_RATIO_LABELS = {
    "peak_memory_mb": "peak memory",
    "peak_above_start_mb": "peak above start",
    "train_seconds": "train time",
    "train_cpu_seconds": "train CPU time",
    "energy_j": "energy",
}
_FIGURES = ("peak_memory_mb", "peak_above_start_mb", "train_seconds", "train_cpu_seconds", "energy_j")
assert set(_FIGURES) == {*EFFICIENCY_FIGURES, *EXTRA_FIGURES}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Average accuracy on the tasks seen so far after each task, one line per row (mean over seeds)."""
    curves = [(r["label"], r["accuracy_curve"]) for r in rows if r.get("accuracy_curve")]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for i, (label, curve) in enumerate(curves):
        ax.plot(
            range(1, len(curve) + 1),
            [100 * a for a in curve],
            label=label,
            linestyle=styles[i % len(styles)],
            marker=markers[i % len(markers)],
            alpha=0.85,
        )
    ax.set_xlabel("after task")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.set_xticks(range(1, max(len(c) for _, c in curves) + 1))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(outcomes: Sequence[RunOutcome], labels: Sequence[str], path: Path) -> Path | None:
    """RSS of each method's child process over its run (first finished seed), from ``memory_series``."""
    series = []
    for label in labels:
        run = next((o for o in outcomes if o.ok and ("main", label) in o.plan.rows), None)
        mem = (run.results or {}).get("memory_series") if run is not None else None
        if mem and mem.get("t_s"):
            series.append((f"{label} (seed {run.plan.seed})" if run else label, mem))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, mem in series:
        (line,) = ax.plot(mem["t_s"], mem["rss_mb"], label=label, linewidth=1.2)
        start = next((e["t_s"] for e in mem.get("events", []) if e["event"] == "run start"), None)
        if start is not None:  # training starts here (model and data loaded)
            rss = next((m for t, m in zip(mem["t_s"], mem["rss_mb"], strict=True) if t >= start), None)
            if rss is not None:
                ax.plot([start], [rss], marker="o", color=line.get_color())
    ax.set_xlabel("time since the child started (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Memory over time (whole child process; dot = training starts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratios(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars of each figure's ratio to the reference (figures without a value are left out)."""
    figs = [f for f in _FIGURES if any(r.get(f"{f}_ratio") is not None for r in rows)]
    rows = [r for r in rows if any(r.get(f"{f}_ratio") is not None for f in figs)]
    if not figs or not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.5))
    width = 0.8 / len(figs)
    for i, f in enumerate(figs):
        xs = [j + (i - (len(figs) - 1) / 2) * width for j in range(len(rows))]
        ys = [r.get(f"{f}_ratio") or 0.0 for r in rows]
        bars = ax.bar(xs, ys, width, label=_RATIO_LABELS.get(f, f))
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "" for y in ys], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel(f"ratio to {rows[0]['reference']}")
    missing = [_RATIO_LABELS.get(f, f) for f in EFFICIENCY_FIGURES if f not in figs]  # energy: no sensor
    title = f"Efficiency relative to {rows[0]['reference']}"
    ax.set_title(title + (f" ({', '.join(missing)}: no sensor)" if missing else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(
    out_dir: Path,
    main_rows: Sequence[dict[str, Any]],
    ablation_rows: Sequence[dict[str, Any]],
    outcomes: Sequence[RunOutcome],
) -> list[str]:
    """All plots of a bench into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [
        plot_accuracy(main_rows, out_dir / "accuracy_per_task.png", "Accuracy after each task"),
        plot_memory(outcomes, [r["label"] for r in main_rows], out_dir / "memory_over_time.png"),
        plot_ratios(main_rows, out_dir / "efficiency_ratios.png"),
    ]
    if ablation_rows:
        made.append(
            plot_accuracy(
                ablation_rows,
                out_dir / "ablation_accuracy_per_task.png",
                "CPS ablation: accuracy after each task",
            )
        )
        made.append(plot_ratios(ablation_rows, out_dir / "ablation_ratios.png"))
    return [str(p) for p in made if p is not None]
