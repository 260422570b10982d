"""Interleaved rounds of ``step_bench.py``: which (variant, mode) pairs run, and their medians and ratios.

Pure functions over the worker records (no torch): ``step_bench.py`` spawns the processes. A record has
``impl`` (``edgecl`` or ``reference``), ``kernels`` (edgecl's ``auto`` / ``torch``; None for the
reference), ``variant``, ``mode``, ``round`` and the per-step figures. Ratios are taken *within* a round
(the processes of one pair run back to back, so the machine's load hits both), then the median over rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

REFERENCE_MODES = {
    "coda_prompt": ("phase1", "inference"),
    "cps_prompt": ("phase1", "phase2_recompute", "inference"),
}
"""What the reference's step runs per method (its phase 2 and inference do not depend on r)."""
FIGURES = ("s_per_step", "cpu_s_per_step", "peak_above_idle_mb", "idle_rss_mb", "s_per_step_min")


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``variant@mode,variant@mode+mode,...`` -> [(variant, mode)]; variants may hold ``key=value``s."""
    out: list[tuple[str, str]] = []
    for item in _split(text):
        variant, sep, modes = item.rpartition("@")
        if not sep or not variant or not modes:
            raise ValueError(f"bad pair {item!r} in --pairs; use variant@mode (e.g. coda_prompt@phase1)")
        out.extend((variant, m) for m in modes.split("+") if m)
    return out


def _split(text: str) -> list[str]:
    """Split on commas that start a new pair (``a:k=1,k2=2@m`` keeps ``k2=2@m`` with ``a``)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if out and "@" not in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def reference_variant(name: str, options: dict[str, Any], mode: str) -> str | None:
    """The reference variant measured beside edgecl's (``name``, ``options``) in ``mode``, or None.

    Only the reduction rate carries over (the other settings are the reference's README defaults, which
    are edgecl's too); the reference's phase 2 and inference run once per method, under r = 0.5's name.
    """
    if mode not in REFERENCE_MODES.get(name, ()):
        return None
    if name == "coda_prompt":
        return name
    r = options.get("reduction_rate", 0.5) if mode == "phase1" else 0.5
    return f"{name}:reduction_rate={r}"


def key(rec: dict[str, Any]) -> tuple[str, str | None, str, str]:
    """(impl, kernels, variant, mode) of a record."""
    return rec.get("impl", "edgecl"), rec.get("kernels"), rec["variant"], rec["mode"]


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (impl, kernels, variant, mode): the median of each figure over its rounds."""
    groups: dict[tuple[str, str | None, str, str], list[dict[str, Any]]] = {}
    for rec in results:
        if "s_per_step" in rec:
            groups.setdefault(key(rec), []).append(rec)
    out = []
    for (impl, kernels, variant, mode), recs in groups.items():
        row: dict[str, Any] = {"impl": impl, "kernels": kernels, "variant": variant, "mode": mode}
        row["rounds"] = len(recs)
        for fig in FIGURES:
            row[fig] = statistics.median(r[fig] for r in recs)
        row["cpu_s_per_step_rounds"] = [r["cpu_s_per_step"] for r in recs]
        row["batch"] = recs[0]["batch"]
        if "s_per_image" in recs[0]:
            row["s_per_image"] = statistics.median(r["s_per_image"] for r in recs)
        for extra in ("phase", "kept_patches", "reduction_ratio", "reference_commit"):
            if extra in recs[0]:
                row[extra] = recs[0][extra]
        out.append(row)
    return out


def ratios(results: Sequence[dict[str, Any]], kernels: Sequence[str]) -> list[dict[str, Any]]:
    """Per edgecl (variant, mode): edgecl / reference and, with two kernel choices, auto / torch, each
    ratio taken within a round (CPU time and wall time), then the median and range over rounds."""
    by_round: dict[tuple[int, tuple[str, str | None, str, str]], dict[str, Any]] = {}
    for rec in results:
        if "s_per_step" in rec:
            by_round[(rec.get("round", 0), key(rec))] = rec
    rounds = sorted({r for r, _ in by_round})
    out: list[dict[str, Any]] = []
    pairs = sorted({(k[2], k[3]) for _, k in by_round if k[0] == "edgecl"})
    for variant, mode in pairs:
        ref_keys = {
            k
            for _, k in by_round
            if k[0] == "reference" and k[3] == mode and k[2] == variant_ref(variant, mode)
        }
        for kern in kernels:
            mine = ("edgecl", kern, variant, mode)
            comparisons = [("vs_reference", ref) for ref in ref_keys]
            if len(kernels) > 1 and kern == "auto":
                comparisons.append(("vs_torch_kernels", ("edgecl", "torch", variant, mode)))
            for label, other in comparisons:
                row: dict[str, Any] = {"variant": variant, "mode": mode, "kernels": kern, "compared": label}
                for fig in ("cpu_s_per_step", "s_per_step"):
                    vals = [
                        by_round[(r, mine)][fig] / by_round[(r, other)][fig]
                        for r in rounds
                        if (r, mine) in by_round and (r, other) in by_round
                    ]
                    if vals:
                        row[f"{fig}_ratio"] = statistics.median(vals)
                        row[f"{fig}_ratio_rounds"] = vals
                if len(row) > 4:
                    out.append(row)
    return out


def variant_ref(variant: str, mode: str) -> str | None:
    """:func:`reference_variant` of an edgecl variant string."""
    name, _, opts = variant.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        try:
            options[k] = float(v)
        except ValueError:
            options[k] = v
    return reference_variant(name, options, mode)


def format_side_table(summary: Sequence[dict[str, Any]], rat: Sequence[dict[str, Any]]) -> str:
    """Reference vs edgecl, each (variant, mode): s/step, CPU s/step, peak above idle, CPU-time ratio."""
    head = (
        f"{'impl':<10} {'kernels':<7} {'variant':<34} {'mode':<17} {'s/step':>7} {'cpu s':>7} "
        f"{'peak MB':>8}  cpu-time ratio"
    )
    lines = [head, "-" * len(head)]
    for row in sorted(
        summary, key=lambda r: (r["mode"], r["variant"], r["impl"] != "reference", r["kernels"] or "")
    ):
        extra = "  ".join(
            f"{x['compared']} {x['cpu_s_per_step_ratio']:.3f}"
            for x in rat
            if x["variant"] == row["variant"]
            and x["mode"] == row["mode"]
            and x["kernels"] == row["kernels"]
            and row["impl"] == "edgecl"
            and "cpu_s_per_step_ratio" in x
        )
        lines.append(
            f"{row['impl']:<10} {row['kernels'] or '-':<7} {row['variant']:<34} {row['mode']:<17} "
            f"{row['s_per_step']:>7.3f} {row['cpu_s_per_step']:>7.3f} "
            f"{row['peak_above_idle_mb']:>8.0f}  {extra}"
        )
    return "\n".join(lines)
