"""Seconds per training step and peak memory of I-Prompt next to CPS-Prompt and CODA-Prompt.

I-Prompt selects its prompts inside the one prompted pass; CODA-Prompt (and CPS-Prompt's phase 1) first
runs a no-grad query pass through the whole ViT. This script measures what that costs per step.

Every (backbone, variant, mode) runs in its own Python process, so its ``VmHWM`` is that mode's peak:

* ``train`` -- one optimizer step of the method's first phase, exactly ``Trainer._step`` (forward,
  backward, gradient clip, Adam step): JOINT for I-Prompt / CODA-Prompt, SPARSE (critical patches) for
  CPS-Prompt;
* ``infer`` -- ``method(x)`` under ``torch.no_grad`` as the trainer's evaluation runs it.

Memory: "idle" is the process RSS once torch, timm, the backbone, the method and the batch are loaded;
the RSS high-water mark is then reset to it through ``/proc/self/clear_refs`` (Linux) so loading
transients cannot hide the step's peak; ``peak_above_idle_mb = VmHWM - idle``. Time: median of
``--steps`` steps after ``--warmup`` steps, both wall (``s_per_step``) and this process's CPU time
(``cpu_s_per_step``; with one thread it is the compute time and barely moves when other jobs share the
cores, while wall time does).

Backbones: ``tiny224`` = ViT-Tiny 224/16 with random weights (197 tokens); ``ref64`` = the shared
reference ViT-Tiny 64/8 (65 tokens, ``../shared/weights/vit_tiny_p8_64_tin100.safetensors``).

Example::

    .venv/bin/python benchmarks/iprompt_step_cost.py --backbones tiny224,ref64 --batch 16 --threads 1 \
        --steps 10 --warmup 3 --out /tmp/iprompt_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECL_SHARED", REPO.parent / "shared"))
BACKBONES: dict[str, dict[str, Any]] = {
    "tiny224": {"img_size": 224, "patch_size": 16, "weights": None},
    "ref64": {
        "img_size": 64,
        "patch_size": 8,
        "weights": str(SHARED / "weights" / "vit_tiny_p8_64_tin100.safetensors"),
    },
}
DEFAULT_VARIANTS = ("iprompt", "cps_prompt", "coda_prompt")
MODES = ("train", "infer")
MARK = "IPROMPT_STEP_COST "
MB = 1024.0 * 1024.0


def rss_bytes() -> int:
    """Current resident set size of this process (``edgecl.budget.rss_mb``), bytes."""
    from edgecl.budget import MIB, rss_mb

    return int(rss_mb() * MIB)


def maxrss_bytes() -> int:
    """This process's RSS high-water mark in bytes (``VmHWM``; not ``ru_maxrss``, which Linux seeds at exec
    with the parent's mark, so a worker of a larger parent would report the parent)."""
    from edgecl.budget import MIB, hwm_rss_mb

    return int(hwm_rss_mb() * MIB)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (``edgecl.budget.reset_peak_rss``)."""
    from edgecl.budget import reset_peak_rss as reset

    return reset()


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value,...]`` -> (method, overrides); values are JSON when they parse as JSON."""
    name, _, opts = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"bad option {item!r} in {spec!r}; use name:key=value,key=value")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return name, overrides


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (backbone, variant, mode) in this process."""
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    from edgecl.backbone import load_backbone
    from edgecl.data import synthetic_stream
    from edgecl.methods import TaskInfo, create_method
    from edgecl.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    bb = BACKBONES[spec["backbone"]]
    vit = load_backbone(
        "vit_tiny_patch16_224", img_size=bb["img_size"], patch_size=bb["patch_size"], weights=bb["weights"]
    )
    name, overrides = parse_variant(spec["variant"])
    method = create_method(name, vit, {"expected_tasks": spec["expected_tasks"], **overrides})
    classes = list(range(spec["classes"]))
    info = TaskInfo(index=0, classes=classes, n_past=0)
    method.begin_task(info)
    # the trainer only for its real step / optimizer code; a stand-in one-task stream
    stream = synthetic_stream(1, classes_per_task=spec["classes"], per_class=1, test_per_class=1, img_size=8)
    trainer = Trainer(method, stream, TrainConfig(epochs=spec["epochs"], batch_size=spec["batch"]))
    trainer.optimizer = trainer._build_optimizer()
    trainer._set_lr(0)
    x = torch.randn(spec["batch"], 3, bb["img_size"], bb["img_size"])
    y = torch.tensor([classes[i % len(classes)] for i in range(spec["batch"])])
    phase = method.phase(0, spec["epochs"])

    fn: Callable[[], object]
    if spec["mode"] == "train":

        def fn() -> object:
            method.train()
            return trainer._step(x, y, phase, cached=False)

    else:

        def fn() -> object:
            method.eval()
            with torch.no_grad():
                return method(x)

    gc.collect()
    idle = rss_bytes()
    hwm_reset = reset_peak_rss()
    for _ in range(spec["warmup"]):
        fn()
    times, cpu = [], []
    for _ in range(spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = maxrss_bytes()
    return {
        "backbone": spec["backbone"],
        "variant": spec["variant"],
        "mode": spec["mode"],
        "phase": phase.value if spec["mode"] == "train" else "eval",
        "s_per_step": statistics.median(times),
        "cpu_s_per_step": statistics.median(cpu),
        "s_min": min(times),
        "s_max": max(times),
        "steps": len(times),
        "idle_rss_mb": idle / MB,
        "peak_rss_mb": peak / MB,
        "peak_above_idle_mb": max(peak - idle, 0) / MB,
        "hwm_reset": hwm_reset,
        "trainable_params": sum(p.numel() for p in method.trainable_parameters(phase)),
        "tokens": vit.info.seq_len,
        "threads": torch.get_num_threads(),
    }


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; an ``error`` record when it fails."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec["threads"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    base = {k: spec[k] for k in ("backbone", "variant", "mode")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**base, "error": " | ".join(tail) or f"rc {proc.returncode}"}


def table(results: list[dict[str, Any]]) -> str:
    """A plain-text table; "vs CODA" compares CPU seconds per train step (robust to shared cores)."""
    coda = {
        r["backbone"]: r["cpu_s_per_step"]
        for r in results
        if r.get("variant") == "coda_prompt" and r.get("mode") == "train" and "s_per_step" in r
    }
    head = (
        f"{'backbone':9} {'variant':34} {'mode':6} {'phase':7} {'s/step':>8} {'cpu s':>7} {'vs CODA':>8} "
        f"{'peak>idle MB':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['backbone']:9} {r['variant']:34} {r['mode']:6} ERROR {r['error']}")
            continue
        rel = ""
        if r["mode"] == "train" and r["backbone"] in coda:
            rel = f"{r['cpu_s_per_step'] / coda[r['backbone']]:.2f}x"
        lines.append(
            f"{r['backbone']:9} {r['variant']:34} {r['mode']:6} {r['phase']:7} {r['s_per_step']:8.3f} "
            f"{r['cpu_s_per_step']:7.3f} {rel:>8} {r['peak_above_idle_mb']:13.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every (backbone, variant, mode) in its own process, print and save."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--backbones", default="tiny224,ref64", help=f"comma list of {sorted(BACKBONES)}")
    p.add_argument(
        "--variants",
        default=";".join(DEFAULT_VARIANTS),
        help="semicolon-separated name[:key=value,...], e.g. 'iprompt;iprompt:prompt_target=cls_token'",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--classes", type=int, default=10, help="classes of the stand-in task")
    p.add_argument("--epochs", type=int, default=2, help="epochs per task (picks CPS's first phase)")
    p.add_argument("--expected-tasks", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    p.add_argument("--out", type=Path, default=None, help="write all records as JSON here")
    args = p.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    results = []
    for backbone in filter(None, args.backbones.split(",")):
        if backbone not in BACKBONES:
            p.error(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
        weights = BACKBONES[backbone]["weights"]
        if weights is not None and not Path(weights).is_file():
            print(f"skipping {backbone}: weights not found at {weights}", file=sys.stderr)
            continue
        for variant in variants:
            for mode in filter(None, args.modes.split(",")):
                spec = {
                    "backbone": backbone,
                    "variant": variant,
                    "mode": mode,
                    "batch": args.batch,
                    "threads": args.threads,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "classes": args.classes,
                    "epochs": args.epochs,
                    "expected_tasks": args.expected_tasks,
                }
                rec = spawn(spec, args.timeout)
                results.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
