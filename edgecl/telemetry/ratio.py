"""Efficiency ratios between methods (each figure divided by a reference method's), as in the CPS-Prompt
paper's efficiency table; a figure with no sensor stays ``None`` and renders as "no sensor", never 0.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_FIGURES", "ratio_rows", "render_ratio_table"]

DEFAULT_FIGURES = ("peak_memory_mb", "train_seconds", "energy_j")

_LABELS = {
    "peak_memory_mb": ("Peak memory", "MB"),
    "train_seconds": ("Train time", "s"),
    "energy_j": ("Energy", "J"),
}


def ratio_rows(
    results: Sequence[dict[str, Any]],
    reference: str = "cps_prompt",
    figures: Sequence[str] = DEFAULT_FIGURES,
) -> list[dict[str, Any]]:
    """One row per result (input order): ``method``, ``reference``, each figure and ``<figure>_ratio``.

    A ratio is value / reference value; None when either is None (or the reference is 0); the reference's
    own ratio is exactly 1.0. ``ValueError`` when ``reference`` is absent or appears more than once.
    """
    refs = [r for r in results if r.get("method") == reference]
    if not refs:
        have = ", ".join(sorted({str(r.get("method")) for r in results})) or "none"
        raise ValueError(f"reference method {reference!r} is not among the results (methods: {have})")
    if len(refs) > 1:
        raise ValueError(f"reference method {reference!r} appears {len(refs)} times; aggregate seeds first")
    ref = refs[0]
    rows: list[dict[str, Any]] = []
    for result in results:
        row: dict[str, Any] = {"method": result.get("method"), "reference": reference}
        for fig in figures:
            value, base = result.get(fig), ref.get(fig)
            row[fig] = value
            if value is None:
                row[f"{fig}_ratio"] = None
            elif result is ref:
                row[f"{fig}_ratio"] = 1.0
            elif base is None or base == 0:
                row[f"{fig}_ratio"] = None
            else:
                row[f"{fig}_ratio"] = float(value) / float(base)
        rows.append(row)
    return rows


def _figures(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Figures present in the rows (keys that have a ``_ratio`` twin), in row order."""
    keys = rows[0].keys() if rows else []
    return [k for k in keys if f"{k}_ratio" in keys]


def _cell(fig: str, value: Any, ratio: Any) -> str:
    """``"412.0 MB (1.00×)"``; a missing energy is "no sensor", another missing figure "n/a"."""
    if value is None:
        return "no sensor" if fig == "energy_j" else "n/a"
    unit = _LABELS.get(fig, (fig, ""))[1]
    text = f"{float(value):.1f}{' ' + unit if unit else ''}"
    return f"{text} ({ratio:.2f}×)" if ratio is not None else text


def render_ratio_table(rows: Sequence[dict[str, Any]], fmt: str = "markdown") -> str:
    """Render :func:`ratio_rows` as a markdown table or a ``rich`` table (returned as text)."""
    if fmt not in {"markdown", "rich"}:
        raise ValueError(f"fmt must be 'markdown' or 'rich', got {fmt!r}")
    figs = _figures(rows)
    reference = rows[0].get("reference", "reference") if rows else "reference"
    headers = ["Method"] + [f"{_LABELS.get(f, (f, ''))[0]} (× {reference})" for f in figs]
    body = [[str(r.get("method"))] + [_cell(f, r.get(f), r.get(f"{f}_ratio")) for f in figs] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * len(figs)) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines) + "\n"
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Efficiency relative to {reference}")
    table.add_column(headers[0])
    for header in headers[1:]:
        table.add_column(header, justify="right")
    for cells in body:
        table.add_row(*cells)
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(table)
    return buf.getvalue()
