"""The GPU check of issue 20: every CUDA-facing part of edgecl run once, with figures, in one command.

Run it through ``benchmarks/gpu_check.sh OUT`` (``make check-gpu``), which sets ``PYTHONPATH`` (the
working tree, and ``.gpu/site`` with the packages installed from ``.gpu/wheels``). Steps:

1. ``doctor``: ``edgecl doctor --json`` (CUDA device, driver, NVML, which telemetry backends are live);
2. ``train:<method>``: every registered method, a short stream through :mod:`edgecl.runner` (the CLI's
   path: ``RunSpec`` -> ``prepare_run`` -> ``Trainer`` with the telemetry callback): accuracy, train time,
   CUDA peak allocated/reserved, energy and mean power per task;
3. ``budget:*``: the memory planner at a comfortable budget, one that forces a smaller micro-batch (or a
   higher reduction rate / autocast), and an impossible one (refused with the minimum that would work);
4. ``precision:*``: CPS-Prompt in fp32, bf16 and fp16 (fp16 through the GradScaler): step time, accuracy;
5. ``bench``: ``edgecl bench`` for cps_prompt, coda_prompt and patchdropout at 224/16, batch 32 (a random
   ViT-Tiny), and its memory/time/energy ratio table;
6. ``serve``: ``edgecl serve`` on loopback: upload a task, train it, predict, shut down;
7. ``export``: ONNX export, then onnxruntime (CUDA provider where the build has one, else CPU) against
   PyTorch on the device;
8. one JSON (``gpu_check.json``) and a markdown summary (``summary.md``) in the output folder, with the
   logs of every step in ``gpu_check.log``.

Each unit runs in its own process with a time limit, so a failing or hanging step records its error and the
others still run. ``--cpu-dry-run`` runs the same steps on the CPU with tiny sizes (synthetic data, a random
32 px ViT), grouping each step's units into one process to save start-up time; there, "no sensor" energy
and a refused fp16 are the expected answers. Data: ``.gpu/data`` (a class subset of the shared Tiny-ImageNet
and the reference weights, made by ``make gpu-data``) when present, else synthetic data and a random ViT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpucheck package beside this file

from gpucheck.config import (  # noqa: E402
    BUDGETS,
    DATA_SUBSET,
    PRECISIONS,
    WEIGHTS,
    CheckFailed,
    Context,
    dry_run_sizes,
    gpu_sizes,
)
from gpucheck.services import unit_bench, unit_export, unit_serve  # noqa: E402
from gpucheck.summary import render_summary  # noqa: E402
from gpucheck.training import unit_budget, unit_doctor, unit_precision, unit_train  # noqa: E402

UNITS: dict[str, Callable[[Context, str], dict[str, Any]]] = {
    "doctor": unit_doctor,
    "train": unit_train,
    "budget": unit_budget,
    "precision": unit_precision,
    "bench": unit_bench,
    "serve": unit_serve,
    "export": unit_export,
}


def run_units(ctx: Context, names: list[str]) -> None:
    """Child process: run ``names`` (``step:arg``) in order, each isolated, writing ``units/NAME.json``."""
    if ctx.sizes.device == "cpu":
        import torch

        torch.set_num_threads(1)  # the dry run is tiny; more threads only contend
    for name in names:
        step, _, arg = name.partition(":")
        record: dict[str, Any] = {"unit": name, "started_at": time.strftime("%H:%M:%S")}
        t0 = time.perf_counter()
        print(f"=== unit {name}", flush=True)
        try:
            record["result"] = UNITS[step](ctx, arg)
            record["status"] = "ok"
        except CheckFailed as err:
            record.update(status="failed", error=str(err), result=err.partial)
        except Exception as err:
            record.update(
                status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()
            )
        record["seconds"] = round(time.perf_counter() - t0, 2)
        print(
            f"=== unit {name}: {record['status']} in {record['seconds']} s {record.get('error', '')}",
            flush=True,
        )
        path = Path(ctx.work) / "units" / f"{name.replace(':', '__')}.json"
        path.write_text(json.dumps(record, indent=1, default=str))


# --------------------------------------------------------------------------------------------- parent


def plan_units(ctx: Context) -> list[list[str]]:
    """The units, grouped into processes: one unit per process on the GPU; one step per process dry."""
    from edgecl.methods.registry import list_methods

    steps = [
        ["doctor"],
        [f"train:{m}" for m in list_methods()],
        ["budget:probe", *(f"budget:{b}" for b in BUDGETS)],
        [f"precision:{p}" for p in PRECISIONS],
        ["bench"],
        ["serve"],
        ["export"],
    ]
    if ctx.dry:
        return steps
    return [[u] for group in steps for u in group]


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as err:
        info["torch"] = f"unavailable: {err}"
    return info


def run_check(ctx: Context, out_dir: Path) -> dict[str, Any]:
    """Run every unit group in a child process with time limits; write the JSON, summary and log."""
    work = Path(ctx.work)
    (work / "units").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ctx_file = work / "context.json"
    ctx_file.write_text(ctx.to_json())
    t_start = time.monotonic()
    groups = plan_units(ctx)
    units: dict[str, dict[str, Any]] = {}
    logs: list[str] = []
    for group in groups:
        step = group[0].split(":")[0]
        remaining = ctx.sizes.total_limit_s - (time.monotonic() - t_start)
        limit = min(ctx.sizes.unit_limit_s[step], remaining - 5)
        label = group[0] if len(group) == 1 else f"{step} ({len(group)} units)"
        if limit < 15:
            for u in group:
                units[u] = {
                    "unit": u,
                    "status": "skipped",
                    "error": "the check's overall time limit was reached",
                }
            continue
        log_path = work / "logs" / f"{group[0].replace(':', '__')}.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--unit",
            ",".join(group),
            "--context",
            str(ctx_file),
        ]
        t0 = time.monotonic()
        print(f"[{time.monotonic() - t_start:6.1f} s] {label} (limit {limit:.0f} s) …", flush=True)
        timed_out = False
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        text = log_path.read_text(errors="replace")
        logs.append(f"##### {label}: exit {code}{' (timed out)' if timed_out else ''}\n{text}")
        for u in group:
            path = work / "units" / f"{u.replace(':', '__')}.json"
            if path.is_file():
                units[u] = json.loads(path.read_text())
            else:
                why = f"timed out after {limit:.0f} s" if timed_out else f"process exited {code} before it"
                units[u] = {"unit": u, "status": "error", "error": why, "log_tail": text[-3000:]}
        done = [units[u]["status"] for u in group]
        print(
            f"[{time.monotonic() - t_start:6.1f} s] {label}: {', '.join(done)} "
            f"in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
    report = {
        "format": "edgecl-gpu-check/1",
        "mode": ctx.mode,
        "machine": _machine(),
        "data": ctx.data,
        "weights": ctx.weights,
        "sizes": asdict(ctx.sizes),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(ctx.started)),
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "counts": {
            s: sum(u["status"] == s for u in units.values()) for s in ("ok", "failed", "error", "skipped")
        },
        "units": units,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "summary.md").write_text(render_summary(report))
    (out_dir / "gpu_check.log").write_text("\n".join(logs))
    return report


def main(argv: list[str] | None = None) -> int:
    """Parent (``OUT [--cpu-dry-run]``) or child (``--unit NAMES --context FILE``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("out", nargs="?", help="output folder (gpu_check.json, summary.md, gpu_check.log)")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument(
        "--data", default=None, help="ImageFolder root (default .gpu/data/tin-subset, else synthetic)"
    )
    p.add_argument(
        "--weights", default=None, help="backbone weights (default .gpu/data's, else a random ViT)"
    )
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)
    p.add_argument("--context", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.unit:
        run_units(Context.from_json(Path(args.context).read_text()), args.unit.split(","))
        return 0
    if not args.out:
        p.error("the output folder is required")
    dry = args.cpu_dry_run
    sizes = dry_run_sizes() if dry else gpu_sizes()
    data = args.data or (str(DATA_SUBSET) if DATA_SUBSET.is_dir() and not dry else "synthetic")
    weights = args.weights or (str(WEIGHTS) if WEIGHTS.is_file() and not dry else None)
    work = args.work or tempfile.mkdtemp(prefix="edgecl-gpu-check-")
    ctx = Context(mode="cpu-dry-run" if dry else "gpu", work=work, data=data, weights=weights, sizes=sizes)
    report = run_check(ctx, Path(args.out))
    print(render_summary(report))
    bad = report["counts"]["failed"] + report["counts"]["error"] + report["counts"]["skipped"]
    print(f"gpu check: {report['counts']} in {report['wall_seconds']} s -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
