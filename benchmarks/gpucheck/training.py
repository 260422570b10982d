"""Units of the training steps: doctor, every method, the memory budget, the three precisions."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpucheck.config import Context, _require


def _method_options(ctx: Context, method: str, tasks: int) -> dict[str, Any]:
    """``expected_tasks`` (and a small pool in the dry run) for ``method``, only keys it has."""
    import dataclasses

    from edgecl.methods.registry import get_method_class

    config = get_method_class(method).Config
    fields = getattr(config, "model_fields", None)  # pydantic config models; dataclasses before them
    names = set(fields) if fields is not None else {f.name for f in dataclasses.fields(config)}
    opts: dict[str, Any] = {}
    if "expected_tasks" in names:
        opts["expected_tasks"] = tasks
    if ctx.sizes.pool_size is not None and "pool_size" in names:
        opts["pool_size"] = ctx.sizes.pool_size
    return opts


def _spec(ctx: Context, method: str, **overrides: Any) -> Any:
    """The :class:`~edgecl.runner.RunSpec` of the standard short stream (overrides by keyword)."""
    from edgecl.runner import RunSpec

    s = ctx.sizes
    spec = RunSpec(
        method=method,
        data=ctx.data,
        tasks=s.tasks,
        num_classes=s.classes,
        limit_per_class=s.per_class,
        test_limit_per_class=s.test_per_class,
        backbone=s.backbone if ctx.weights is None else "vit_tiny_patch16_224",
        weights=ctx.weights,
        img_size=s.img if ctx.weights is None else None,
        patch_size=s.patch if ctx.weights is None else None,
        epochs=s.epochs,
        batch_size=s.batch,
        device=s.device,
        precision="fp32",
        seed=0,
        sampler_period_s=0.1,
        threads=1 if ctx.dry else None,
    )
    if ctx.weights is not None:  # the reference ViT-Tiny is 64 px, patch 8
        spec.img_size, spec.patch_size = 64, 8
    for key, value in overrides.items():
        setattr(spec, key, value)
    if "method_options" not in overrides:
        spec.method_options = _method_options(ctx, method, spec.tasks)
    return spec


def _synthetic_spec(ctx: Context, method: str, **overrides: Any) -> Any:
    """A spec on synthetic images at the big size (224/16 on the GPU) with a random ViT."""
    s = ctx.sizes
    base = {
        "data": "synthetic",
        "weights": None,
        "backbone": s.big_backbone,
        "img_size": s.big_img,
        "patch_size": s.big_patch,
        "batch_size": s.big_batch,
        "limit_per_class": s.big_per_class,
        "test_limit_per_class": max(4, s.big_per_class // 4),
    }
    return _spec(ctx, method, **{**base, **overrides})


def _task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: accuracy, time, CUDA peaks, energy and power (with the null reasons) from results.json."""
    rows = []
    for rec in results["tasks"]:
        tel = (rec.get("telemetry") or {}).get("task") or {}
        nulls = tel.get("nulls") or {}
        rows.append(
            {
                "task": rec["task"],
                "classes": len(rec["classes"]),
                "average_accuracy": rec["average_accuracy"],
                "accuracy_this_task": rec["accuracy"][-1],
                "train_seconds": rec.get("train_seconds"),
                "peak_memory_mb": rec.get("peak_memory_mb"),
                "peak_rss_mb": tel.get("peak_rss_mb"),
                "peak_cuda_allocated_mb": tel.get("peak_cuda_allocated_mb"),
                "peak_cuda_reserved_mb": tel.get("peak_cuda_reserved_mb"),
                "energy_j": tel.get("energy_j"),
                "energy_source": tel.get("energy_source"),
                "mean_power_w": tel.get("mean_power_w"),
                "energy_null_reason": nulls.get("energy_j"),
                "cuda_null_reason": nulls.get("peak_cuda_allocated_mb"),
            }
        )
    return rows


def _check_telemetry(ctx: Context, rows: list[dict[str, Any]], out: dict[str, Any] | None = None) -> None:
    """Energy is a measured number on the GPU; on the CPU a number or null with a reason, never 0."""
    for r in rows:
        energy = r["energy_j"]
        if energy is None:
            _require(ctx.sizes.device != "cuda", f"task {r['task']}: no energy on the GPU ({r})", out)
            _require(
                str(r["energy_null_reason"] or "").startswith("no sensor"),
                f"task {r['task']}: null energy without a 'no sensor' reason: {r['energy_null_reason']!r}",
                out,
            )
        else:
            _require(
                energy > 0, f"task {r['task']}: energy {energy} J is not a measured positive number", out
            )
        if ctx.sizes.device == "cuda":
            _require(r["peak_cuda_allocated_mb"] is not None, f"task {r['task']}: no CUDA peak", out)
            _require(r["mean_power_w"] is not None, f"task {r['task']}: no mean power", out)
        else:
            _require(r["peak_cuda_allocated_mb"] is None, "a CUDA peak on a CPU run", out)


def _max(values: list[float | None]) -> float | None:
    """The largest of the measured values (None when none was measured)."""
    measured = [v for v in values if v is not None]
    return max(measured) if measured else None


def _steps(results: dict[str, Any]) -> int:
    """Optimizer steps of a run (from the per-task image counts, the batch and the epochs)."""
    cfg = results["train_config"]
    return sum(math.ceil(rec["train_images"] / cfg["batch_size"]) for rec in results["tasks"]) * cfg["epochs"]


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- units


def unit_doctor(ctx: Context, arg: str) -> dict[str, Any]:
    """``edgecl doctor --json`` as a user would run it, plus ``nvidia-smi``'s view where it exists."""
    profile = "cpu" if ctx.dry else "x86-cuda"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "edgecl", "doctor", "--json", "--profile", profile, "--env-file", ""]
    cmd += ["--data-dir", str(Path(ctx.work) / "doctor-data"), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ctx.work)
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    telemetry = checks["telemetry"]["details"]
    backends = {b["name"]: b for b in telemetry.get("backends", [])}
    out: dict[str, Any] = {
        "exit_code": proc.returncode,
        "status": report["status"],
        "not_ok": {n: f"{c['status']}: {c['message']}" for n, c in checks.items() if c["status"] != "ok"},
        "cuda": checks["cuda"]["details"],
        "packages": checks["packages"]["details"],
        "telemetry_available": telemetry.get("available"),
        "power_sources": telemetry.get("power_sources"),
        "nvml": backends.get("nvml"),
        "torch_cuda": backends.get("torch_cuda"),
    }
    smi = (
        subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,power.draw,power.limit",
                "--format=csv",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if not ctx.dry and _which("nvidia-smi")
        else None
    )
    out["nvidia_smi"] = smi.stdout.strip() if smi is not None else None
    _require(proc.returncode == report["exit_code"], "exit code differs from the report's", out)
    if ctx.dry:
        _require("psutil" in (out["telemetry_available"] or []), "psutil backend not live", out)
    else:
        _require(
            bool(out["cuda"].get("available")),
            f"doctor sees no CUDA device: {checks['cuda']['message']}",
            out,
        )
        _require("nvml" in (out["telemetry_available"] or []), f"NVML not live: {backends.get('nvml')}", out)
        _require("torch_cuda" in (out["telemetry_available"] or []), "torch_cuda backend not live", out)
    return out


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def unit_train(ctx: Context, method: str) -> dict[str, Any]:
    """One method over the standard stream through the runner (the path of ``edgecl train``)."""
    from edgecl.runner import run_training

    spec = _spec(ctx, method)
    t0 = time.perf_counter()
    results = run_training(spec)
    rows = _task_rows(results)
    chance = 1.0 / ctx.sizes.classes
    out = {
        "method": method,
        "device": results["train_config"]["device"],
        "wall_s": round(time.perf_counter() - t0, 2),
        "final_average_accuracy": results["final_average_accuracy"],
        "chance": chance,
        "steps": _steps(results),
        "tasks": rows,
        "telemetry_sources": (results.get("telemetry") or {}).get("run", {}).get("sources"),
        "adaptations": results.get("adaptations"),
    }
    _check_telemetry(ctx, rows, out)
    _free_gpu()
    return out


def _planner_inputs(ctx: Context) -> tuple[Any, Any]:
    """(spec, resolved profile) of the budget runs: CPS-Prompt, one task, one epoch, at the big size."""
    from edgecl.profiles import load_profile

    spec = _synthetic_spec(ctx, "cps_prompt", tasks=1, num_classes=2, epochs=1)
    spec.profile = "cpu" if ctx.dry else "x86-cuda"
    profile = load_profile(spec.profile, check_method=False)
    return spec, profile


def _plan_without_budget(ctx: Context) -> Any:
    """The planner's answer for the budget runs with no budget (full batch), in this process."""
    import gc

    from edgecl.budget import Planner
    from edgecl.runner import build_run

    spec, profile = _planner_inputs(ctx)
    method, stream, config = build_run(spec)
    plan = Planner(method, config, profile, stream=stream, budget_mb=None).plan()
    del method, stream
    gc.collect()
    return plan


def _tight(plan: Any) -> float | None:
    """A budget halfway between micro-batch 1's minimum and the full batch's need (None: no room)."""
    need = plan.predicted_peak_mb + plan.headroom_mb
    return (
        float(math.floor((plan.minimum_budget_mb + need) / 2)) if need - plan.minimum_budget_mb >= 8 else None
    )


def unit_budget(ctx: Context, which: str) -> dict[str, Any]:
    """``probe``: plan without a budget and choose the three budgets; else train under one of them.

    The tight budget is derived again in its own unit from a fresh plan: the idle baseline (RSS on a CPU)
    moves between processes and after earlier runs, and the gap it must fall into is only what the full
    batch's activations add to micro-batch 1's need.
    """
    budgets_file = Path(ctx.work) / "budgets.json"
    if which == "probe":
        plan = _plan_without_budget(ctx)
        need = plan.predicted_peak_mb + plan.headroom_mb
        minimum = plan.minimum_budget_mb
        budgets = {
            "comfortable": float(math.ceil(need * 1.5 + 64)),
            "tight": _tight(plan),
            "impossible": float(max(1, math.floor(minimum / 2))),
        }
        out = {
            "memory_scope": plan.memory_scope,
            "batch_size": plan.batch_size,
            "micro_batch_size": plan.micro_batch_size,
            "predicted_peak_mb": plan.predicted_peak_mb,
            "headroom_mb": plan.headroom_mb,
            "minimum_budget_mb": minimum,
            "idle_baseline_mb": plan.idle_baseline_mb,
            "activations_per_sample_mb": plan.activations_per_sample_mb,
            "reduction_rate": plan.reduction_rate,
            "precision": plan.precision,
            "budgets": budgets,
        }
        budgets_file.write_text(json.dumps(out))
        return out
    from edgecl.budget import BudgetError
    from edgecl.runner import prepare_run

    _require(budgets_file.is_file(), "the budget probe did not run (no budgets.json)")
    probe = json.loads(budgets_file.read_text())
    budget = probe["budgets"][which]
    fresh = None
    if which == "tight":
        fresh = _plan_without_budget(ctx)
        budget = _tight(fresh)
    if budget is None:
        return {"budget": None, "skipped": "full batch needs < 8 MB above the minimum: nothing to force"}
    spec, profile = _planner_inputs(ctx)
    spec.memory_budget_mb = budget
    out: dict[str, Any] = {"budget_mb": budget}
    if fresh is not None:
        out["derived_from"] = {
            "idle_baseline_mb": fresh.idle_baseline_mb,
            "minimum_budget_mb": fresh.minimum_budget_mb,
            "full_batch_need_mb": fresh.predicted_peak_mb + fresh.headroom_mb,
        }
    try:
        try:
            run = prepare_run(spec, profile=profile)
        except BudgetError as err:
            if which != "tight" or fresh is None or err.minimum_mb is None:
                raise
            # The idle baseline (RSS on a CPU) grew between the fresh plan and this one (seen: +7 MB over a
            # 15 MB gap): keep the budget halfway into the gap, measured from the minimum the planner now has.
            gap = fresh.predicted_peak_mb + fresh.headroom_mb - fresh.minimum_budget_mb
            budget = float(math.floor(err.minimum_mb + gap / 2))
            out.update(
                budget_mb=budget,
                retried_from={"budget_mb": spec.memory_budget_mb, "minimum_mb": err.minimum_mb},
            )
            spec.memory_budget_mb = budget
            try:
                run = prepare_run(spec, profile=profile)
            except BudgetError as again:
                if fresh.memory_scope != "rss":
                    raise
                # A CPU's RSS baseline moves with every plan in this process (seen: +52 MB on the retry), so
                # a budget inside a gap of a few MB cannot be pinned here; the CUDA scope has no such drift.
                out.update(minimum_mb=again.minimum_mb)
                return {**out, "skipped": "RSS baseline moved past the tight gap between plans (CPU only)"}
    except BudgetError as err:
        out.update(refused=True, message=str(err).splitlines()[0], minimum_mb=err.minimum_mb)
        _require(which == "impossible", f"budget {budget} MB ({which}) refused: {err}")
        _require(err.minimum_mb is not None and err.minimum_mb > budget, "refusal without a larger minimum")
        return out
    _require(which != "impossible", f"the impossible budget {budget} MB was accepted")
    plan = run.plan
    results = run.fit()
    guard = results.get("memory_budget") or {}
    rows = _task_rows(results)
    measured = {
        "guard_peak_mb": guard.get("peak_mb"),
        "telemetry_peak_cuda_allocated_mb": _max([r["peak_cuda_allocated_mb"] for r in rows]),
        "telemetry_peak_rss_mb": _max([r["peak_rss_mb"] for r in rows]),
    }
    out.update(
        refused=False,
        memory_scope=plan.memory_scope,
        micro_batch_size=plan.micro_batch_size,
        batch_size=plan.batch_size,
        reduction_rate=plan.reduction_rate,
        precision=plan.precision,
        predicted_peak_mb=plan.predicted_peak_mb,
        decisions=plan.decisions,
        adaptations=results.get("adaptations"),
        violations=guard.get("violations"),
        within_budget=guard.get("within_budget"),
        **measured,
        final_average_accuracy=results["final_average_accuracy"],
    )
    if plan.memory_scope == "rss":  # the process peak includes the planner's probes: use the task region
        peak = measured["telemetry_peak_rss_mb"]
    else:
        peak = measured["guard_peak_mb"]
    out["measured_peak_mb"] = peak
    _require(peak is not None and peak <= budget, f"measured peak {peak} MB > budget {budget} MB")
    if which == "tight":
        forced = (
            plan.micro_batch_size < plan.batch_size
            or plan.precision != probe["precision"]
            or plan.reduction_rate != probe["reduction_rate"]
        )
        _require(forced, "the tight budget did not change the micro-batch, r or precision")
    _free_gpu()
    return out


def unit_precision(ctx: Context, precision: str) -> dict[str, Any]:
    """CPS-Prompt over the standard stream in ``precision`` (the planner's precision step, by hand)."""
    from edgecl.runner import run_training

    spec = _spec(ctx, "cps_prompt", precision=precision)
    try:
        results = run_training(spec)
    except ValueError as err:
        if ctx.dry and precision != "fp32":  # fp16 is CUDA-only; CPU bf16 may be refused by this CPU
            return {"precision": precision, "refused": True, "message": str(err), "expected": True}
        raise
    rows = _task_rows(results)
    train_s = sum(r["train_seconds"] or 0.0 for r in rows)
    steps = _steps(results)
    out = {
        "precision": precision,
        "refused": False,
        "final_average_accuracy": results["final_average_accuracy"],
        "chance": 1.0 / ctx.sizes.classes,
        "train_seconds": train_s,
        "steps": steps,
        "step_ms": 1000 * train_s / max(steps, 1),
        "grad_scaler": results.get("grad_scaler"),
        "energy_j": sum(r["energy_j"] for r in rows) if all(r["energy_j"] for r in rows) else None,
        "peak_cuda_allocated_mb": _max([r["peak_cuda_allocated_mb"] for r in rows]),
    }
    if precision == "fp16":
        scaler = results.get("grad_scaler")
        _require(scaler is not None, "fp16 trained without a GradScaler", out)
        _require(scaler["skipped_steps"] < steps, f"the GradScaler skipped every step: {scaler}", out)
        _require(math.isfinite(scaler["scale"]) and scaler["scale"] > 0, f"bad loss scale {scaler}", out)
    if not ctx.dry:
        _require(out["final_average_accuracy"] > 0.0, f"{precision}: accuracy 0", out)
    _check_telemetry(ctx, rows, out)
    _free_gpu()
    return out
