"""Aggregate the bench's runs over seeds and write ``results.md``, ``results.csv``, ``runs.csv`` and
``results.json``; print the same tables with rich.

Accuracy figures are mean ± sample std over the seeds that finished (fractions in the files, % in the
tables). Efficiency figures (peak memory, training time, energy) are means over seeds, each divided by
the reference row's with :func:`edgecl.telemetry.ratio.ratio_rows` (the reference's ratio is exactly 1.0;
a figure without a sensor stays None and renders as "no sensor").

On CPU the peak is the child's peak RSS, which includes ~0.7 GB of torch itself; ``peak_above_start_mb``
(peak RSS minus the RSS when training starts, model and data loaded, from the child's memory series) is
what training adds on top, the CPU analogue of a GPU's peak allocation. None on CUDA runs.
``train_cpu_seconds`` (the training regions' process CPU time) is much less sensitive than wall time to
other load on the machine.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecl.telemetry.ratio import ratio_rows, render_ratio_table

if TYPE_CHECKING:
    from rich.console import Console

    from edgecl.bench.runs import RunOutcome

__all__ = [
    "ACCURACY_FIGURES",
    "CSV_COLUMNS",
    "EFFICIENCY_FIGURES",
    "EXTRA_FIGURES",
    "RUNS_CSV_COLUMNS",
    "aggregate",
    "print_tables",
    "render_markdown",
    "run_figures",
    "write_outputs",
]

ACCURACY_FIGURES = ("final_average_accuracy", "average_incremental_accuracy", "forgetting")
EFFICIENCY_FIGURES = ("peak_memory_mb", "train_seconds", "energy_j")
EXTRA_FIGURES = ("peak_above_start_mb", "train_cpu_seconds")
_RATIO_FIGURES = (*EFFICIENCY_FIGURES, *EXTRA_FIGURES)

CSV_COLUMNS = (
    "table",
    "label",
    "method",
    "status",
    "seeds",
    "n_ok",
    "final_average_accuracy_mean",
    "final_average_accuracy_std",
    "average_incremental_accuracy_mean",
    "average_incremental_accuracy_std",
    "forgetting_mean",
    "forgetting_std",
    "peak_memory_mb",
    "peak_memory_mb_std",
    "peak_memory_mb_ratio",
    "train_seconds",
    "train_seconds_std",
    "train_seconds_ratio",
    "energy_j",
    "energy_j_std",
    "energy_j_ratio",
    "peak_above_start_mb",
    "peak_above_start_mb_std",
    "peak_above_start_mb_ratio",
    "train_cpu_seconds",
    "train_cpu_seconds_std",
    "train_cpu_seconds_ratio",
    "reference",
    "energy_note",
    "error",
)
"""Columns of ``results.csv``: one row per (table, label); accuracies are fractions in [0, 1]."""

RUNS_CSV_COLUMNS = (
    "run_id",
    "method",
    "seed",
    "rows",
    "status",
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "peak_memory_mb",
    "train_seconds",
    "energy_j",
    "peak_above_start_mb",
    "train_cpu_seconds",
    "wall_seconds",
    "error",
)
"""Columns of ``runs.csv``: one row per child process."""

_ACC_LABELS = {
    "final_average_accuracy": "Final avg acc (%)",
    "average_incremental_accuracy": "Avg incremental acc (%)",
    "forgetting": "Forgetting (%)",
}


# ---------------------------------------------------------------------------------------- figures


def _start_rss(results: dict[str, Any]) -> float | None:
    """RSS (MiB) when training started ("run start" in the child's memory series)."""
    series = results.get("memory_series") or {}
    start = next((e["t_s"] for e in series.get("events", []) if e.get("event") == "run start"), None)
    if start is None:
        return None
    return next((m for t, m in zip(series["t_s"], series["rss_mb"], strict=True) if t >= start), None)


def run_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one run's results dict (telemetry summary, else the per-task records)."""
    tel = results.get("telemetry") or {}
    tasks = results.get("tasks") or []
    peak = tel.get("peak_memory_mb")
    if peak is None:
        peaks = [t["peak_memory_mb"] for t in tasks if t.get("peak_memory_mb") is not None]
        peak = max(peaks) if peaks else None
    train = tel.get("train_seconds")
    if train is None and tasks and all(t.get("train_seconds") is not None for t in tasks):
        train = sum(t["train_seconds"] for t in tasks)
    cpus = [((t.get("telemetry") or {}).get("task") or {}).get("cpu_s") for t in tasks]
    train_cpu = sum(c for c in cpus if c is not None) if cpus and None not in cpus else None
    energy = tel.get("energy_j")
    start = _start_rss(results)
    on_cuda = (tel.get("run") or {}).get("peak_cuda_allocated_mb") is not None
    above = peak - start if peak is not None and start is not None and not on_cuda else None
    note = None
    if energy is None:
        note = (tel.get("nulls") or {}).get("energy_j") or ("no sensor" if tel else "telemetry off")
    return {
        "final_average_accuracy": results.get("final_average_accuracy"),
        "average_incremental_accuracy": results.get("average_incremental_accuracy"),
        "forgetting": results.get("forgetting"),
        "peak_memory_mb": peak,
        "train_seconds": train,
        "energy_j": energy,
        "energy_note": note,
        "peak_above_start_mb": above,
        "start_rss_mb": start,
        "train_cpu_seconds": train_cpu,
        "accuracy_curve": [t.get("average_accuracy") for t in tasks],
    }


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std; None when a value is missing (std None below two values)."""
    if not values or any(v is None for v in values):
        return None, None
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def aggregate(
    outcomes: Sequence[RunOutcome], table: str, labels: Sequence[str], reference: str
) -> list[dict[str, Any]]:
    """One row per label of ``table`` (in ``labels`` order): status, seeds, accuracy mean/std, efficiency
    means and their ratios to the ``reference`` row (None when the reference did not finish)."""
    rows: list[dict[str, Any]] = []
    for label in labels:
        runs = [o for o in outcomes if (table, label) in o.plan.rows]
        ok = [o for o in runs if o.ok]
        failed = [o for o in runs if not o.ok]
        status = "failed" if not ok else ("partial" if failed else "ok")
        row: dict[str, Any] = {
            "table": table,
            "label": label,
            "method": runs[0].plan.method if runs else label,
            "status": status,
            "seeds": [o.plan.seed for o in runs],
            "seeds_ok": [o.plan.seed for o in ok],
            "n_ok": len(ok),
            "run_ids": [o.plan.run_id for o in runs],
            "method_options": dict(runs[0].plan.spec.get("method_options", {})) if runs else {},
            "config": (ok[0].results or {}).get("config") if ok else None,
            "error": "; ".join(f"seed {o.plan.seed}: {o.error}" for o in failed) or None,
        }
        figs = [run_figures(o.results or {}) for o in ok]
        for fig in ACCURACY_FIGURES:
            row[f"{fig}_mean"], row[f"{fig}_std"] = _mean_std([f[fig] for f in figs])
        for fig in _RATIO_FIGURES:
            row[fig], row[f"{fig}_std"] = _mean_std([f[fig] for f in figs])
        row["energy_note"] = next((f["energy_note"] for f in figs if f["energy_note"]), None)
        curves = [f["accuracy_curve"] for f in figs]
        same = curves and all(len(c) == len(curves[0]) and None not in c for c in curves)
        row["accuracy_curve"] = [statistics.fmean(v) for v in zip(*curves, strict=True)] if same else None
        rows.append(row)
    finished = [r for r in rows if r["status"] != "failed"]
    ratios: dict[str, dict[str, Any]] = {}
    if any(r["label"] == reference for r in finished):
        inputs = [{"method": r["label"], **{f: r[f] for f in _RATIO_FIGURES}} for r in finished]
        ratios = {x["method"]: x for x in ratio_rows(inputs, reference=reference, figures=_RATIO_FIGURES)}
    for row in rows:
        row["reference"] = reference
        for fig in _RATIO_FIGURES:
            row[f"{fig}_ratio"] = ratios.get(row["label"], {}).get(f"{fig}_ratio")
    return rows


# -------------------------------------------------------------------------------------- formatting


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _fig(value: float | None, ratio: float | None, unit: str) -> str:
    if value is None:
        return "—"
    text = f"{value:.1f} {unit}"
    return f"{text} ({ratio:.2f}×)" if ratio is not None else text


def _status(row: dict[str, Any], width: int | None = None) -> str:
    if row["status"] == "ok":
        return "ok"
    text = f"{row['status'].upper()}: {row['error']}"
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], body: Sequence[Sequence[str]], align: str = "l") -> str:
    sep = ["---"] + [("---:" if align == "r" else "---")] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _accuracy_body(rows: Sequence[dict[str, Any]], width: int | None) -> list[list[str]]:
    body = []
    for r in rows:
        seeds = f"{r['n_ok']}/{len(r['seeds'])}"
        cells = [r["label"], seeds] + [_pct(r[f"{f}_mean"], r[f"{f}_std"]) for f in ACCURACY_FIGURES]
        body.append(cells + [_status(r, width)])
    return body


def _ratio_input(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["status"] == "failed":
            continue
        item: dict[str, Any] = {"method": r["label"], "reference": r["reference"]}
        for fig in EFFICIENCY_FIGURES:
            item[fig], item[f"{fig}_ratio"] = r[fig], r[f"{fig}_ratio"]
        out.append(item)
    return out


def _lambda(row: dict[str, Any]) -> str:
    config = row.get("config") or {}
    value = row["method_options"].get("phase_ratio", config.get("phase_ratio"))
    return f"{float(value):g}" if value is not None else "—"


def _ablation_body(rows: Sequence[dict[str, Any]], width: int | None) -> list[list[str]]:
    body = []
    for r in rows:
        cells = [r["label"], r["method"], _lambda(r)]
        cells += [_pct(r[f"{f}_mean"], r[f"{f}_std"]) for f in ACCURACY_FIGURES]
        cells += [_fig(r["peak_memory_mb"], r["peak_memory_mb_ratio"], "MB")]
        cells += [_fig(r.get("peak_above_start_mb"), r.get("peak_above_start_mb_ratio"), "MB")]
        cells += [_fig(r["train_seconds"], r["train_seconds_ratio"], "s")]
        cells += [_fig(r.get("train_cpu_seconds"), r.get("train_cpu_seconds_ratio"), "s")]
        body.append(cells + [_status(r, width)])
    return body


def _cpu_headers(reference: str) -> list[str]:
    return ["Method", "RSS at start", f"Peak above start (× {reference})", f"Train CPU time (× {reference})"]


def _cpu_body(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    body = []
    for r in rows:
        if r["status"] == "failed" or (
            r.get("peak_above_start_mb") is None and r.get("train_cpu_seconds") is None
        ):
            continue
        above = r.get("peak_above_start_mb")
        start = f"{r['peak_memory_mb'] - above:.1f} MB" if above is not None and r["peak_memory_mb"] else "—"
        body.append(
            [
                r["label"],
                start,
                _fig(above, r.get("peak_above_start_mb_ratio"), "MB"),
                _fig(r.get("train_cpu_seconds"), r.get("train_cpu_seconds_ratio"), "s"),
            ]
        )
    return body


_ACC_HEADERS = ["Method", "Seeds ok", *(_ACC_LABELS[f] for f in ACCURACY_FIGURES), "Status"]


_ABLATION_HEADERS = [
    "Variant",
    "Method",
    "λ",
    *(_ACC_LABELS[f] for f in ACCURACY_FIGURES),
    "Peak memory (×)",
    "Peak above start (×)",
    "Train time (×)",
    "Train CPU time (×)",
    "Status",
]


def _energy_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    notes = sorted({r["energy_note"] for r in rows if r["status"] != "failed" and r.get("energy_note")})
    return [f"Energy: {n}" for n in notes]


def _settings(meta: dict[str, Any]) -> list[tuple[str, str]]:
    s = meta.get("settings") or {}
    keys = (
        "data",
        "tasks",
        "num_classes",
        "limit_per_class",
        "test_limit_per_class",
        "class_order",
        "backbone",
        "weights",
        "img_size",
        "patch_size",
        "epochs",
        "batch_size",
        "device",
        "precision",
        "threads",
        "profile",
        "memory_budget_mb",
    )
    return [(k, str(s.get(k))) for k in keys if k in s]


def render_markdown(
    meta: dict[str, Any],
    main_rows: Sequence[dict[str, Any]],
    ablation_rows: Sequence[dict[str, Any]],
    outcomes: Sequence[RunOutcome],
    plots: Sequence[str],
) -> str:
    """``results.md``: command, machine, settings, accuracy, efficiency ratios, ablation, plots, runs."""
    out = io.StringIO()
    w = out.write
    w("# edgecl bench results\n\n")
    w(f"Command:\n\n```\n{meta['command']}\n```\n\n")
    m = meta.get("machine") or {}
    w(
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, GPU: {m.get('gpu') or 'none'}, "
        f"torch {m.get('torch')}, timm {m.get('timm')}, Python {m.get('python')}, {m.get('platform')}"
        + (f"; C allocator: {m['allocator']}" if m.get("allocator") else "")
        + ".  \n"
    )
    load = meta.get("load_average") or {}
    if load:
        w(
            "Load average (1/5/15 min) at start: "
            + "/".join(f"{x:.2f}" for x in load.get("start", []))
            + "; at end: "
            + "/".join(f"{x:.2f}" for x in load.get("end", []))
            + ".  \n"
        )
    w(
        f"Started {meta.get('started_at')}, finished {meta.get('finished_at')}; "
        f"{len(outcomes)} runs, one child process each, sequentially.\n\n"
    )
    w("Settings: " + ", ".join(f"{k}={v}" for k, v in _settings(meta)) + f"; seeds {meta.get('seeds')}.\n\n")
    w("## Accuracy (mean ± std over seeds)\n\n")
    w(_md_table(_ACC_HEADERS, _accuracy_body(main_rows, 200), "r") + "\n")
    reference = str(main_rows[0]["reference"] if main_rows else meta.get("reference"))
    w(f"## Efficiency relative to {reference}\n\n")
    w(
        "Peak memory is the training processes' peak RSS (CPU) or peak CUDA allocation (GPU); train time is "
        "the training regions' wall time (evaluation excluded); both are means over seeds.\n\n"
    )
    ratio_in = _ratio_input(main_rows)
    w(render_ratio_table(ratio_in) if ratio_in else "No run finished.\n")
    failed = [r for r in main_rows if r["status"] == "failed"]
    if failed:
        w("\nFailed (no figures): " + "; ".join(f"{r['label']} — {r['error']}" for r in failed) + "\n")
    for note in _energy_notes(main_rows):
        w(f"\n{note}\n")
    cpu = _cpu_body(main_rows)
    if cpu:
        w(
            "\nCPU-side figures: what training adds on top of the process (peak RSS minus the RSS when "
            "training starts, model and data loaded) and the training regions' process CPU time (less "
            "sensitive to other load than wall time):\n\n"
        )
        w(_md_table(_cpu_headers(reference), cpu, "r"))
    if ablation_rows:
        ref = ablation_rows[0]["reference"]
        w(
            f"\n## Ablation ({meta.get('ablation')})\n\nλ = phase_ratio: 1 = every epoch sparse (no DPCT). "
            f"(×) = ratio to {ref}.\n\n"
        )
        w(_md_table(_ABLATION_HEADERS, _ablation_body(ablation_rows, 200), "r"))
    if plots:
        w("\n## Plots\n\n" + "".join(f"![{Path(p).stem}]({Path(p).name})\n\n" for p in plots))
    w("## Runs\n\n")
    body = []
    for o in outcomes:
        f = run_figures(o.results) if o.ok and o.results else {}
        body.append(
            [
                o.plan.run_id,
                o.plan.method,
                str(o.plan.seed),
                ", ".join(label for _, label in o.plan.rows),
                "ok (reused)" if o.reused else ("ok" if o.ok else f"FAILED: {o.error}"),
                _pct(f.get("final_average_accuracy"), None),
                _fig(f.get("peak_memory_mb"), None, "MB"),
                _fig(f.get("train_seconds"), None, "s"),
                f"{o.wall_s:.1f} s",
            ]
        )
    w(
        _md_table(
            [
                "Run",
                "Method",
                "Seed",
                "Rows",
                "Status",
                "Final avg acc (%)",
                "Peak memory",
                "Train time",
                "Wall (child)",
            ],
            body,
        )
    )
    orders = meta.get("class_orders") or {}
    if orders:
        w("\n## Class order\n\n")
        for seed, order in orders.items():
            w(f"- seed {seed} ({len(order)} classes): {', '.join(order)}\n")
    return out.getvalue()


def print_tables(
    console: Console, main_rows: Sequence[dict[str, Any]], ablation_rows: Sequence[dict[str, Any]]
) -> None:
    """The accuracy, efficiency and ablation tables on ``console``."""
    from rich.table import Table

    table = Table(title="Accuracy (mean ± std over seeds)")
    for i, h in enumerate(_ACC_HEADERS):
        table.add_column(h, justify="left" if i in (0, len(_ACC_HEADERS) - 1) else "right")
    for cells in _accuracy_body(main_rows, 48):
        table.add_row(*cells, style="red" if cells[-1] != "ok" else None)
    console.print(table)
    ratio_in = _ratio_input(main_rows)
    if ratio_in:
        text = render_ratio_table(ratio_in, "rich")
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    for note in _energy_notes(main_rows):
        console.print(note, markup=False, highlight=False)
    cpu = _cpu_body(main_rows)
    if cpu:
        table = Table(title="CPU-side: peak RSS above the run's start, training CPU time")
        for i, h in enumerate(_cpu_headers(main_rows[0]["reference"])):
            table.add_column(h, justify="left" if i == 0 else "right")
        for cells in cpu:
            table.add_row(*cells)
        console.print(table)
    if ablation_rows:
        headers = _ABLATION_HEADERS
        table = Table(title=f"Ablation (× = ratio to {ablation_rows[0]['reference']})")
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i in (0, 1, len(headers) - 1) else "right")
        for cells in _ablation_body(ablation_rows, 48):
            table.add_row(*cells, style="red" if cells[-1] != "ok" else None)
        console.print(table)


# ------------------------------------------------------------------------------------------ files


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def write_outputs(
    out_dir: Path,
    meta: dict[str, Any],
    main_rows: Sequence[dict[str, Any]],
    ablation_rows: Sequence[dict[str, Any]],
    outcomes: Sequence[RunOutcome],
    plots: Sequence[str],
) -> dict[str, Path]:
    """Write results.md/.csv/.json and runs.csv into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("results.md", "results.csv", "runs.csv", "results.json")}
    paths["results.md"].write_text(render_markdown(meta, main_rows, ablation_rows, outcomes, plots))
    with paths["results.csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in [*main_rows, *ablation_rows]:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    with paths["runs.csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUNS_CSV_COLUMNS)
        writer.writeheader()
        for o in outcomes:
            f = run_figures(o.results) if o.ok and o.results else {}
            writer.writerow(
                {
                    "run_id": o.plan.run_id,
                    "method": o.plan.method,
                    "seed": o.plan.seed,
                    "rows": "; ".join(f"{t}:{label}" for t, label in o.plan.rows),
                    "status": o.status,
                    **{k: _csv_value(f.get(k)) for k in (*ACCURACY_FIGURES, *_RATIO_FIGURES)},
                    "wall_seconds": round(o.wall_s, 3),
                    "error": _csv_value(o.error),
                }
            )
    data = {
        **meta,
        "main": list(main_rows),
        "ablation": list(ablation_rows),
        "plots": [Path(p).name for p in plots],
        "runs": [o.to_dict() for o in outcomes],
    }
    paths["results.json"].write_text(json.dumps(data, indent=1))
    return paths
