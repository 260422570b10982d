"""Print a markdown table of paired runs written by ``benchmarks/methods_compare.sh``.

Usage: ``python benchmarks/methods_summary.py benchmarks/results/methods/A.json [B.json ...]``. Columns:
final average / average incremental accuracy and forgetting (%), training wall and CPU seconds summed over
tasks (evaluation excluded) and, for DPCT methods, the head phase's CPU seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _phase_cpu(result: dict[str, Any], phase: str) -> float | None:
    total, seen = 0.0, False
    for task in result["tasks"]:
        for name, region in task.get("telemetry", {}).get("phases", {}).items():
            if name == phase and region.get("cpu_s") is not None:
                total += float(region["cpu_s"])
                seen = True
    return total if seen else None


def row(path: Path) -> str:
    """One table row for the results file ``path``."""
    r = json.loads(path.read_text())
    wall = sum(float(t["train_seconds"]) for t in r["tasks"])
    cpu = sum(float(t["telemetry"]["task"]["cpu_s"]) for t in r["tasks"])
    head = _phase_cpu(r, "head")
    cells = [
        path.stem,
        f"{100 * r['final_average_accuracy']:.2f}",
        f"{100 * r['average_incremental_accuracy']:.2f}",
        f"{100 * r['forgetting']:.2f}",
        f"{wall:.1f} s",
        f"{cpu:.1f} s",
        "" if head is None else f"{head:.1f} s",
    ]
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    """Print the header and one row per file."""
    cols = ["run", "final avg acc (%)", "avg incr acc (%)", "forgetting (%)", "train wall", "train CPU"]
    print("| " + " | ".join([*cols, "head-phase CPU"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        print(row(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
