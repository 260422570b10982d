"""What budgeted CPU training's allocator set-up costs per step, against glibc's defaults, interleaved.

For every round, every backbone setting and every allocator mode (:mod:`edgecl.budget.allocator`), this
runs ``benchmarks/step_bench.py --allocator MODE`` (phase-1 steps of CPS-Prompt and CODA-Prompt, each in a
fresh process; training modes do the budget guard's step-boundary work after every step). The modes of
one round run back to back, so neighbouring load hits them alike, and every ratio to the ``default`` mode
is taken within a round before the median over rounds. Pin the whole run to one core
(``taskset -c 1``): the step bench's workers inherit it.

Backbones: ``ref64`` = the shared reference ViT-Tiny 64/8 (``../shared/weights``), ``tiny224`` = ViT-Tiny
224/16 with random weights.

Example (the figures in benchmarks/PERFORMANCE.md, "The allocator")::

    taskset -c 1 nice -n 5 .venv/bin/python benchmarks/allocator_bench.py --rounds 3 \
        --modes default,mmap,trim:0,trim,trim:1024,mmap:1024 --out benchmarks/results/allocator.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "ref64": [
        "--img-size",
        "64",
        "--patch-size",
        "8",
        "--weights",
        str(ROOT.parent / "shared" / "weights" / "vit_tiny_p8_64_tin100.safetensors"),
    ],
    "tiny224": ["--img-size", "224", "--patch-size", "16"],
}
FIGURES = ("cpu_s_per_step", "s_per_step", "peak_above_idle_mb", "rss_end_above_idle_mb")


def run_round(
    backbone: str, mode: str, args: argparse.Namespace, work: Path, rnd: int
) -> list[dict[str, Any]]:
    """One step-bench invocation; its per-variant records."""
    out = work / f"{backbone}.{mode.replace(':', '_')}.{rnd}.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "step_bench.py"),
        "--backbone",
        "vit_tiny_patch16_224",
        *BACKBONES[backbone],
        "--batch",
        str(args.batch),
        "--threads",
        "1",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--methods",
        args.methods,
        "--modes",
        "phase1",
        "--allocator",
        mode,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if not out.exists():
        raise RuntimeError(f"step_bench failed ({backbone}, {mode}): {proc.stderr[-2000:]}")
    return [r for r in json.loads(out.read_text())["results"] if "s_per_step" in r]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (backbone, variant, mode) of each figure and of the within-round ratios to ``default``."""
    out = []
    keys = sorted({(r["backbone"], r["variant"], r["allocator"]) for r in rows})
    for backbone, variant, mode in keys:
        mine = [r for r in rows if (r["backbone"], r["variant"], r["allocator"]) == (backbone, variant, mode)]
        entry: dict[str, Any] = {"backbone": backbone, "variant": variant, "allocator": mode}
        for fig in FIGURES:
            entry[fig] = statistics.median(r[fig] for r in mine)
        ratios: dict[str, list[float]] = {"cpu_vs_default": [], "wall_vs_default": []}
        for r in mine:
            base = next(
                (
                    b
                    for b in rows
                    if (b["backbone"], b["variant"], b["allocator"], b["round"])
                    == (backbone, variant, "default", r["round"])
                ),
                None,
            )
            if base is not None:
                ratios["cpu_vs_default"].append(r["cpu_s_per_step"] / base["cpu_s_per_step"])
                ratios["wall_vs_default"].append(r["s_per_step"] / base["s_per_step"])
        for k, v in ratios.items():
            entry[k] = statistics.median(v) if v else None
        entry["rounds"] = len(mine)
        out.append(entry)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    """Markdown table of the summary."""
    lines = [
        "| backbone | variant | allocator | CPU s/step | x default | wall s/step | x default | "
        "peak above idle | RSS after the steps |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        cpu_x = "" if e["cpu_vs_default"] is None else f"{e['cpu_vs_default']:.3f}"
        wall_x = "" if e["wall_vs_default"] is None else f"{e['wall_vs_default']:.3f}"
        lines.append(
            f"| {e['backbone']} | {e['variant']} | {e['allocator']} | {e['cpu_s_per_step']:.3f} | {cpu_x} | "
            f"{e['s_per_step']:.3f} | {wall_x} | {e['peak_above_idle_mb']:.0f} MB | "
            f"{e['rss_end_above_idle_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backbones", default="ref64,tiny224")
    ap.add_argument("--modes", default="default,mmap,trim", help="allocator modes; 'default' is the baseline")
    ap.add_argument("--methods", default="cps_prompt:reduction_rate=0.5,coda_prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/allocator.json")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "default" not in modes:
        modes.insert(0, "default")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
                for mode in modes:
                    for rec in run_round(backbone, mode, args, Path(tmp), rnd):
                        rec.update({"backbone": backbone, "allocator": mode, "round": rnd})
                        rows.append(rec)
                        print(
                            f"round {rnd} {backbone:8s} {mode:10s} {rec['variant']:32s} "
                            f"cpu {rec['cpu_s_per_step']:.3f} s  wall {rec['s_per_step']:.3f} s  "
                            f"peak {rec['peak_above_idle_mb']:.0f} MB  "
                            f"after {rec['rss_end_above_idle_mb']:.0f} MB",
                            flush=True,
                        )
    summary = summarize(rows)
    print(table(summary))
    keep = ("backbone", "allocator", "round", "variant", "idle_rss_mb", "steps", "warmup", *FIGURES)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "summary": summary,
                "rows": [{k: r.get(k) for k in keep} for r in rows],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
