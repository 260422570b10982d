"""Training-step benchmark: seconds per step and peak memory per method and mode, one process per mode.

For every method variant (CODA-Prompt, CPS-Prompt / PatchDropout at several reduction rates, L2P,
DualPrompt and every other registered method) and every mode:

* ``phase1`` -- one optimizer step of the method's first phase (SPARSE for DPCT methods, JOINT otherwise),
  exactly ``Trainer._step``: forward, backward, gradient clip, optimizer step;
* ``phase2_recompute`` -- the reference's DPCT phase-2 step: query pass and full prompted pass without
  autograd on every step, then the head step (DPCT methods only);
* ``phase2_cached`` -- edgecl's phase-2 step on cached features (DPCT methods only);
* ``cache_build`` -- the one-off phase-2 cache build (``head_features`` over ``--cache-batch`` images),
  reported per batch and per image (DPCT methods only);
* ``inference`` -- ``method(x)`` under ``torch.no_grad`` as the trainer's evaluation runs it.

Each (method, mode) runs in a fresh Python process, so its RSS high-water mark (``VmHWM``) is the peak
of that mode alone. "Idle" is the process RSS after torch, timm, the backbone, the method and the input
batch are loaded; the peak above idle is ``VmHWM - idle RSS`` (the high-water mark is reset to the
idle RSS through ``/proc/self/clear_refs`` where Linux allows it, so loading transients cannot hide the
step's peak). Times are the median of ``--steps`` steps after ``--warmup`` steps.

With ``--reference PATH`` (a laymond1/cps-prompt checkout) the reference code's own step runs beside
each pair in its own process (``reference_step.py``: its ``CPSPrompt.observe``; CODA-Prompt is its
network at reduction ratio 0; modes ``phase1``, ``phase2_recompute``, ``inference``), on the same
seeded weights and batch; ``--rounds N`` interleaves the pairs N times (the sides of a pair back to
back, alternating which first) and reports per-round ratios and their median (``side_by_side.py``);
``--kernels both`` adds edgecl's ``kernels=torch`` path (timm's modules) beside the default.

A whole-task estimate for CPS+DPCT versus CODA-Prompt follows from the per-step figures (see
:func:`task_estimate`); ``--validate-task`` also trains one short real task of each to check it.

Example (the figures in benchmarks/PERFORMANCE.md)::

    .venv/bin/python benchmarks/step_bench.py --backbone vit_tiny_patch16_224 --img-size 224 \
        --patch-size 16 --batch 16 --threads 1 --precision fp32 --steps 10 --warmup 3 \
        --out benchmarks/results/step_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side  # noqa: E402  (benchmarks/ is no package: the sibling module by path)

MODES = ("phase1", "phase2_recompute", "phase2_cached", "cache_build", "inference")
EXTRA_MODES = ("components",)
"""``components``: the phase-1 step split into query pass / forward / backward / clip + optimizer step."""
PHASE2_MODES = ("phase2_recompute", "phase2_cached", "cache_build")
CORE_VARIANTS = (
    "coda_prompt",
    "cps_prompt:reduction_rate=0.4",
    "cps_prompt:reduction_rate=0.5",
    "patchdropout:reduction_rate=0.4",
    "patchdropout:reduction_rate=0.5",
    "l2p",
    "dualprompt",
)
REFERENCE = {
    "source": "issue 13: public CPS-Prompt reference implementation, ViT-Tiny 224/16, random weights, "
    "batch 16, 1 CPU thread, fp32, one process per mode, idle RSS ~740 MB",
    "coda_prompt.phase1": {"s_per_step": 2.23, "peak_above_idle_mb": 590},
    "cps_prompt:reduction_rate=0.5.phase1": {"s_per_step": 1.44, "peak_above_idle_mb": 320},
    "cps_prompt.phase2_recompute": {"s_per_step": 1.83, "peak_above_idle_mb": 90},
    "inference": {"s_per_step": 1.53, "peak_above_idle_mb": 120},
}
RESULT_MARK = "STEP_BENCH_RESULT "
MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------------------
# memory probes (Linux first; psutil elsewhere)


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


# ---------------------------------------------------------------------------------------------------------
# variants


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value,...]`` -> (method name, config overrides); values parsed as JSON when they can be."""
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


def default_variants() -> list[str]:
    """The core variants plus every other registered method (the heads as they exist)."""
    from edgecl.methods import list_methods

    names = list_methods()
    core = [v for v in CORE_VARIANTS if parse_variant(v)[0] in names]
    seen = {parse_variant(v)[0] for v in core}
    return core + [n for n in names if n not in seen]


# ---------------------------------------------------------------------------------------------------------
# the worker: one (variant, mode) in this process


def _time_steps(fn: Callable[[], object], steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds (user + system) of each of ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _pin(spec: dict[str, Any]) -> None:
    """Pin this worker to ``spec['pin_core']`` (one core per mode process), where the OS allows it."""
    core = spec.get("pin_core")
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(core)})


def bench_input(spec: dict[str, Any], batch: int) -> tuple[Any, Any]:
    """The benchmark batch, the same for edgecl and the reference: images from their own seeded
    generator (not the global RNG, which model construction consumes differently), cyclic labels."""
    import torch

    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)) + 1)
    x = torch.randn(batch, 3, spec["img_size"], spec["img_size"], generator=gen)
    y = torch.tensor([i % spec["classes"] for i in range(batch)])
    return x, y


def _measure(fn: Callable[[], object], spec: dict[str, Any], record: dict[str, Any], x: Any) -> None:
    """Idle RSS, ``--warmup`` + ``--steps`` timed calls of ``fn``, the peak above idle: into ``record``."""
    import gc

    import torch

    gc.collect()
    idle = rss_bytes()
    maxrss_at_idle = maxrss_bytes()
    hwm_reset = reset_peak_rss()
    load_seconds = time.perf_counter() - spec["_t_start"]
    times, cpu_times = _time_steps(fn, spec["steps"], spec["warmup"])
    peak = maxrss_bytes()
    if spec.get("profile_dir"):
        record["profile"] = _profile(fn, Path(spec["profile_dir"]), record["variant"], record["mode"])
    med = statistics.median(times)
    record.update(
        {
            "batch": x.shape[0],
            "s_per_step": med,
            "s_per_step_min": min(times),
            "s_per_step_max": max(times),
            "cpu_s_per_step": statistics.median(cpu_times),
            "cpu_s_all": cpu_times,
            "steps": len(times),
            "warmup": spec["warmup"],
            "idle_rss_mb": idle / MB,
            "peak_rss_mb": peak / MB,
            "peak_above_idle_mb": max(peak - idle, 0) / MB,
            "rss_end_above_idle_mb": (rss_bytes() - idle) / MB,
            "maxrss_before_reset_mb": maxrss_at_idle / MB,
            "hwm_reset": hwm_reset,
            "input_batch_mb": x.numel() * x.element_size() / MB,
            "load_seconds": load_seconds,
            "torch_threads": torch.get_num_threads(),
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        }
    )


def run_reference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (variant, mode) of the CPS-Prompt reference code (``reference_step.py``), like
    :func:`run_worker`: same backbone weights, input, threads, memory definition and timing."""
    spec["_t_start"] = time.perf_counter()
    _pin(spec)
    import torch

    torch.set_num_threads(spec["threads"])
    import timm  # noqa: F401  (part of "idle" on both sides)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reference_step

    if spec["precision"] != "fp32" or spec["backbone"] != "vit_tiny_patch16_224" or spec["img_size"] != 224:
        raise ValueError("the reference runs only vit_tiny_patch16_224 at 224 px in fp32 (--precision fp32)")
    ref = Path(spec["reference"])
    name, overrides = parse_variant(spec["variant"])
    model = reference_step.build_reference(
        ref, name, overrides, spec["classes"], spec.get("tasks", 10), spec["epochs"], spec.get("seed", 0)
    )
    x, y = bench_input(spec, spec["batch"])
    fn = reference_step.reference_step(model, spec["mode"], x, y)
    record: dict[str, Any] = {
        "impl": "reference",
        "kernels": None,
        "variant": spec["variant"],
        "method": name,
        "mode": spec["mode"],
        "pid": os.getpid(),
        "reference": str(ref),
        "reference_commit": reference_step.reference_commit(ref),
        "reduction_ratio": model.args.reduction_ratio,
    }
    _measure(fn, spec, record, x)
    return record


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one (variant, mode); returns the result record (also printed as one JSON line)."""
    spec["_t_start"] = time.perf_counter()
    _pin(spec)
    import torch

    torch.set_num_threads(spec["threads"])
    import timm  # noqa: F401  (part of "idle": torch, timm and the model loaded)

    tuned = False
    allocator = spec.get("allocator") or ("mmap" if spec.get("tune_allocator") else None)
    if allocator:
        from edgecl.budget.allocator import setup_allocator

        tuned = setup_allocator(allocator)  # as budgeted training does (edgecl.budget.allocator)

    from edgecl.backbone import load_backbone
    from edgecl.data import synthetic_stream
    from edgecl.methods import Phase, TaskInfo, create_method
    from edgecl.train import TrainConfig, Trainer

    torch.manual_seed(spec.get("seed", 0))
    vit = load_backbone(
        spec["backbone"],
        weights=spec.get("weights"),
        img_size=spec["img_size"],
        patch_size=spec["patch_size"],
        kernels=spec.get("kernels", "auto"),
    )
    name, overrides = parse_variant(spec["variant"])
    method = create_method(name, vit, overrides)
    classes = list(range(spec["classes"]))
    info = TaskInfo(index=0, classes=classes, n_past=0)
    method.begin_task(info)
    # the trainer only for its real step / autocast / optimizer code; a 1-image-per-class stand-in stream
    stream = synthetic_stream(1, classes_per_task=spec["classes"], per_class=1, test_per_class=1, img_size=8)
    cfg = TrainConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch"],
        micro_batch_size=spec.get("micro_batch"),
        precision=spec["precision"],
    )
    trainer = Trainer(method, stream, cfg)
    trainer.optimizer = trainer._build_optimizer()
    trainer._set_lr(0)
    mode = spec["mode"]
    batch = spec["cache_batch"] if mode == "cache_build" else spec["batch"]
    x, y = bench_input(spec, batch)
    feats = torch.randn(batch, vit.embed_dim)
    first_phase = method.phase(0, spec["epochs"])
    record: dict[str, Any] = {
        "impl": "edgecl",
        "kernels": vit.kernels,
        "variant": spec["variant"],
        "method": name,
        "mode": mode,
        "pid": os.getpid(),
        "allocator_tuned": tuned,
        "allocator": allocator or "default",
    }

    fn: Callable[[], object]
    if mode == "phase1":
        record["phase"] = first_phase.value

        def fn() -> object:
            method.train()
            return trainer._step(x, y, first_phase, cached=False)

    elif mode in PHASE2_MODES and not method.has_phases:
        record["skipped"] = f"{name} has no DPCT phase 2"
        return record
    elif mode == "phase2_recompute":
        record["phase"] = Phase.HEAD.value

        def fn() -> object:
            method.train()
            return trainer._step(x, y, Phase.HEAD, cached=False)

    elif mode == "phase2_cached":
        record["phase"] = Phase.HEAD.value

        def fn() -> object:
            method.train()
            return trainer._step(feats, y, Phase.HEAD, cached=True)

    elif mode == "cache_build":
        record["phase"] = Phase.HEAD.value

        def fn() -> object:
            method.eval()
            with trainer._autocast():
                return method.head_features(x).float()

    elif mode == "inference":
        method.end_task(info, [(x, y)])

        def fn() -> object:
            method.eval()
            with torch.no_grad(), trainer._autocast():
                return method(x)

    elif mode == "components":
        record["phase"] = first_phase.value
        parts: dict[str, list[float]] = {"query": [], "forward": [], "backward": [], "clip_and_optimizer": []}

        def fn() -> object:
            assert trainer.optimizer is not None
            method.train()
            t0 = time.perf_counter()
            with torch.no_grad():
                vit.query(x)
            t1 = time.perf_counter()
            trainer.optimizer.zero_grad(set_to_none=True)
            with trainer._autocast():
                loss = method.training_loss(x, y, first_phase)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            params = [p for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if method.cfg.clip_grad is not None and params:
                torch.nn.utils.clip_grad_norm_(params, method.cfg.clip_grad)
            trainer.optimizer.step()
            t4 = time.perf_counter()
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key].append(dt)
            return loss

    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES + EXTRA_MODES}")

    if allocator and mode not in ("cache_build", "inference"):
        from edgecl.budget.allocator import at_step_boundary

        step_fn = fn

        def fn() -> object:  # what the budget guard does after every training step
            out = step_fn()
            at_step_boundary()
            return out

    _measure(fn, spec, record, x)
    if mode == "cache_build":
        record["s_per_image"] = record["s_per_step"] / batch
    if mode == "components":
        # seconds of each part (median over the timed steps); the query pass is timed alone, the forward
        # (training_loss) includes the method's own query pass where it has one
        record["parts"] = {
            k: statistics.median(v[spec["warmup"] : spec["warmup"] + spec["steps"]]) for k, v in parts.items()
        }
    if mode == "phase1" and hasattr(method, "keep_count") and first_phase is Phase.SPARSE:
        record["kept_patches"] = int(method.keep_count)
    return record


def _profile(fn: Callable[[], object], out_dir: Path, variant: str, mode: str) -> str:
    """torch.profiler over 3 more steps; writes the op table, returns its path."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(3):
            fn()
    path = out_dir / f"{variant.replace(':', '_').replace('=', '')}.{mode}.txt"
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# a short real task (validation of the whole-task estimate)


def run_task_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one real task (Trainer.fit on a synthetic stream) and time its training region."""
    import torch

    torch.set_num_threads(spec["threads"])
    from edgecl.backbone import load_backbone
    from edgecl.data import synthetic_stream
    from edgecl.methods import create_method
    from edgecl.train import Callback, TrainConfig, Trainer

    allocator = spec.get("allocator") or ("mmap" if spec.get("tune_allocator") else None)
    if allocator:
        from edgecl.budget.allocator import setup_allocator

        setup_allocator(allocator)

    torch.manual_seed(spec.get("seed", 0))
    vit = load_backbone(
        spec["backbone"],
        weights=spec.get("weights"),
        img_size=spec["img_size"],
        patch_size=spec["patch_size"],
        kernels=spec.get("kernels", "auto"),
    )
    name, overrides = parse_variant(spec["variant"])
    method = create_method(name, vit, overrides)
    per_class = max(1, spec["task_images"] // spec["classes"])
    stream = synthetic_stream(
        1,
        classes_per_task=spec["classes"],
        per_class=per_class,
        test_per_class=1,
        img_size=spec["img_size"],
        mean=vit.info.mean,
        std=vit.info.std,
    )

    class Timer(Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = self.c0 = self.c1 = 0.0
            self.epochs: list[dict[str, Any]] = []
            self._e0 = 0.0

        def on_task_start(self, trainer: Trainer, task: int) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
            if allocator:  # the budget guard's epoch-boundary work
                from edgecl.budget.allocator import at_epoch_boundary

                at_epoch_boundary()
            self._e0 = time.perf_counter()

        def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
            self.epochs.append(
                {"epoch": epoch, "phase": logs["phase"], "seconds": time.perf_counter() - self._e0}
            )

        def on_train_end(self, trainer: Trainer, task: int) -> None:
            self.t1, self.c1 = time.perf_counter(), time.process_time()

        def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
            if allocator:  # the budget guard's step-boundary work
                from edgecl.budget.allocator import at_step_boundary

                at_step_boundary()

    timer = Timer()
    cfg = TrainConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch"],
        micro_batch_size=spec.get("micro_batch"),
        precision=spec["precision"],
    )
    Trainer(method, stream, cfg, callbacks=[timer]).fit()
    images = len(stream.tasks[0].train)  # type: ignore[arg-type]
    return {
        "variant": spec["variant"],
        "images": images,
        "epochs": spec["epochs"],
        "steps_per_epoch": math.ceil(images / spec["batch"]),
        "train_seconds": timer.t1 - timer.t0,
        "train_cpu_seconds": timer.c1 - timer.c0,
        "per_epoch": timer.epochs,
        "note": "training region only (on_task_start -> on_train_end): data loading and transforms included, "
        "end-of-task evaluation excluded",
    }


# ---------------------------------------------------------------------------------------------------------
# the parent: orchestration, estimate, table, JSON


def _spawn(spec: dict[str, Any], kind: str, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec["threads"])
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else repo
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{kind}", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "variant": spec["variant"],
            "mode": spec.get("mode"),
            "error": f"timed out after {timeout:.0f} s",
        }
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return dict(json.loads(line[len(RESULT_MARK) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {
        "variant": spec["variant"],
        "mode": spec.get("mode"),
        "error": " | ".join(tail) or f"rc {proc.returncode}",
    }


def _find(results: Sequence[dict[str, Any]], variant: str, mode: str) -> dict[str, Any] | None:
    for r in results:
        if r.get("variant") == variant and r.get("mode") == mode and "s_per_step" in r:
            return r
    return None


def task_estimate(
    results: Sequence[dict[str, Any]],
    variant: str,
    coda: str,
    epochs: int,
    phase_ratio: float,
    batch: int,
    images: int,
    min_prompt_epochs: int = 1,
    key: str = "s_per_step",
) -> dict[str, Any] | None:
    """Whole-task training time of CPS+DPCT (``variant``) vs CODA-Prompt from the per-step figures.

    With S = ceil(n / B) steps per epoch, P = max(min_prompt_epochs, floor(λ·E)) phase-1 epochs and H = E − P:
    ``T_cps = P·S·t_phase1 + n·c_image + H·S·t_phase2_cached`` and ``T_coda = E·S·t_coda``. Without the cache
    phase 2 costs ``H·S·t_phase2_recompute`` instead (the reference's schedule). ``key`` picks the per-step
    figure: wall-clock ``s_per_step`` or process CPU ``cpu_s_per_step`` (steadier on a loaded machine).
    """
    p1, rec = _find(results, variant, "phase1"), _find(results, variant, "phase2_recompute")
    cached, build = _find(results, variant, "phase2_cached"), _find(results, variant, "cache_build")
    cd = _find(results, coda, "phase1")
    if not (p1 and cached and build and cd):
        return None
    steps = math.ceil(images / batch)
    p = min(epochs, max(min_prompt_epochs, math.floor(phase_ratio * epochs + 1e-9)))
    h = epochs - p
    t_p1 = p * steps * p1[key]
    t_cache = images * build[key] / build["batch"]
    t_head = h * steps * cached[key]
    t_cps = t_p1 + t_cache + t_head
    t_coda = epochs * steps * cd[key]
    out: dict[str, Any] = {
        "variant": variant,
        "figure": key,
        "formula": "T_cps = P*S*t_phase1 + n*c_image + H*S*t_phase2_cached; T_coda = E*S*t_coda; "
        "S = ceil(n/B), P = max(min_prompt_epochs, floor(lambda*E)), H = E - P",
        "images": images,
        "batch": batch,
        "epochs": epochs,
        "phase_ratio": phase_ratio,
        "phase1_epochs": p,
        "phase2_epochs": h,
        "steps_per_epoch": steps,
        "phase1_seconds": t_p1,
        "cache_build_seconds": t_cache,
        "phase2_cached_seconds": t_head,
        "cps_task_seconds": t_cps,
        "coda_task_seconds": t_coda,
        "ratio": t_cps / t_coda,
    }
    if rec:
        t_rec = t_p1 + h * steps * rec[key]
        out["cps_task_seconds_without_cache"] = t_rec
        out["ratio_without_cache"] = t_rec / t_coda
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load average, library versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in {"Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache"}:
                info[key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        info["Model name"] = platform.processor()
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    try:
        from importlib.metadata import version

        info["torch"] = version("torch")
        info["timm"] = version("timm")
    except ImportError:  # PackageNotFoundError: metadata is informational only
        pass
    return info


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the per-mode records."""
    head = (
        f"{'variant':<34} {'mode':<17} {'phase':<7} {'s/step':>8} {'min':>7} {'cpu s':>7} "
        f"{'peak>idle MB':>13} {'idle MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "s_per_step" in r:
            extra = f"  ({r['s_per_image'] * 1e3:.1f} ms/image)" if "s_per_image" in r else ""
            if "parts" in r:
                extra = "  (" + ", ".join(f"{k} {v:.3f}" for k, v in r["parts"].items()) + ")"
            lines.append(
                f"{r['variant']:<34} {r['mode']:<17} {r.get('phase', ''):<7} {r['s_per_step']:>8.3f} "
                f"{r['s_per_step_min']:>7.3f} {r['cpu_s_per_step']:>7.3f} {r['peak_above_idle_mb']:>13.0f} "
                f"{r['idle_rss_mb']:>8.0f}{extra}"
            )
        elif "skipped" not in r:
            lines.append(f"{r['variant']:<34} {r.get('mode', ''):<17} ERROR {r.get('error', '')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--backbone", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--weights", default=None, help="local backbone weights (random init when omitted)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cache-batch", type=int, default=64, help="batch of the cache_build mode (eval batch)")
    ap.add_argument(
        "--micro-batch", type=int, default=None, help="trainer micro-batch (gradient accumulation)"
    )
    ap.add_argument(
        "--tune-allocator",
        action="store_true",
        help="the old budgeted setting: glibc's mmap threshold fixed at 64 KiB (= --allocator mmap)",
    )
    ap.add_argument(
        "--allocator",
        default=None,
        metavar="MODE",
        help="set glibc up as budgeted training does: trim (its default), mmap or default, optionally "
        "NAME:KIB (edgecl.budget.allocator); training modes then do the step-boundary work too",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument(
        "--methods", default=None, help="comma-separated name[:key=value,...] (default: all variants)"
    )
    ap.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES + EXTRA_MODES)}"
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10, help="classes of the benchmarked task")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of the task (phase schedule, estimate)")
    ap.add_argument("--phase-ratio", type=float, default=0.4, help="λ of the whole-task estimate")
    ap.add_argument(
        "--task-images", type=int, default=5000, help="images per task for the whole-task estimate"
    )
    ap.add_argument("--validate-task", action="store_true", help="also train one short real task of each")
    ap.add_argument("--validate-images", type=int, default=80)
    ap.add_argument("--validate-variants", default="cps_prompt:reduction_rate=0.4,coda_prompt")
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler op table per mode here")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    ap.add_argument("--out", default="benchmarks/results/step_bench.json")
    ap.add_argument(
        "--reference",
        default=None,
        metavar="PATH",
        help="a CPS-Prompt reference checkout (laymond1/cps-prompt): measure its step beside edgecl's "
        "(coda_prompt: phase1, inference; cps_prompt: phase1, phase2_recompute, inference)",
    )
    ap.add_argument(
        "--pairs",
        default=None,
        help="variant@mode[+mode],... to run instead of every --methods x --modes combination",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (ratios taken within a round)")
    ap.add_argument(
        "--kernels",
        choices=("auto", "torch", "both"),
        default="auto",
        help="edgecl's backbone kernels (edgecl.kernels): auto = oneDNN on CPU fp32, torch = timm's "
        "modules (before issue 23), both = each, interleaved",
    )
    ap.add_argument("--pin-core", type=int, default=None, help="pin every worker process to this CPU core")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task-worker", default=None, help=argparse.SUPPRESS)
    return ap


def _split_variants(text: str) -> list[str]:
    """Split on commas that start a new variant (``a:k=1,k2=2,b`` keeps ``k2=2`` with ``a``)."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (variant, mode) in its own process, print the table, write the JSON."""
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(RESULT_MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.task_worker is not None:
        print(RESULT_MARK + json.dumps(run_task_worker(json.loads(args.task_worker))), flush=True)
        return 0
    if args.reference_worker is not None:
        print(RESULT_MARK + json.dumps(run_reference_worker(json.loads(args.reference_worker))), flush=True)
        return 0
    if args.pairs:
        pairs = side_by_side.parse_pairs(args.pairs)
        variants = list(dict.fromkeys(v for v, _ in pairs))
        modes = list(dict.fromkeys(m for _, m in pairs))
    else:
        variants = _split_variants(args.methods) if args.methods else default_variants()
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        pairs = [(v, m) for v in variants for m in modes]
    bad = [m for m in modes if m not in MODES + EXTRA_MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {MODES + EXTRA_MODES}")
    common = {
        "backbone": args.backbone,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "weights": args.weights,
        "batch": args.batch,
        "cache_batch": args.cache_batch,
        "micro_batch": args.micro_batch,
        "tune_allocator": args.tune_allocator,
        "allocator": args.allocator,
        "threads": args.threads,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "classes": args.classes,
        "epochs": args.epochs,
        "profile_dir": args.profile_dir,
        "pin_core": args.pin_core,
    }
    kernels = ["auto", "torch"] if args.kernels == "both" else [args.kernels]
    machine = machine_info()
    print(f"# {machine.get('Model name')} | load average {machine['load_average']}", flush=True)
    results: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for j, (variant, mode) in enumerate(pairs):
            jobs = [("worker", {**common, "variant": variant, "mode": mode, "kernels": k}) for k in kernels]
            ref = side_by_side.variant_ref(variant, mode) if args.reference else None
            if ref is not None:
                spec = {**common, "variant": ref, "mode": mode, "reference": args.reference}
                jobs.append(("reference-worker", spec))
            if (rnd + j) % 2:  # alternate which side runs first
                jobs.reverse()
            for kind, spec in jobs:
                rec = _spawn(spec, kind, args.timeout)
                rec.setdefault("impl", "reference" if kind == "reference-worker" else "edgecl")
                rec.setdefault("kernels", spec.get("kernels"))
                rec["round"] = rnd
                results.append(rec)
                tag = f"{rec['impl']}/{rec['kernels'] or '-'} r{rnd}"
                if "s_per_step" in rec:
                    print(
                        f"{tag:<16} {spec['variant']:<34} {mode:<17} {rec['s_per_step']:.3f} s/step  "
                        f"cpu {rec['cpu_s_per_step']:.3f}  {rec['peak_above_idle_mb']:.0f} MB above idle",
                        flush=True,
                    )
                elif "error" in rec:
                    print(f"{tag:<16} {spec['variant']:<34} {mode:<17} ERROR {rec['error']}", flush=True)
    summary = side_by_side.summarize(results)
    side_ratios = side_by_side.ratios(results, kernels)
    main_rows = [r for r in summary if r["impl"] == "edgecl" and r["kernels"] == kernels[0]]
    coda = next((v for v in variants if parse_variant(v)[0] == "coda_prompt"), "coda_prompt")
    ratios: dict[str, Any] = {}
    cd = _find(main_rows, coda, "phase1")
    for v in variants:
        p1 = _find(main_rows, v, "phase1")
        if cd and p1 and v != coda:
            ratios[v] = {
                "phase1_step_vs_coda": p1["s_per_step"] / cd["s_per_step"],
                "phase1_cpu_vs_coda": p1["cpu_s_per_step"] / cd["cpu_s_per_step"],
            }
    dpct = [v for v in variants if parse_variant(v)[0] in {"cps_prompt", "patchdropout"}]
    run = (args.epochs, args.phase_ratio, args.batch)
    estimates = [
        e
        for v in dpct
        for key in ("s_per_step", "cpu_s_per_step")
        if (e := task_estimate(main_rows, v, coda, *run, args.task_images, key=key))
    ]
    validation: list[dict[str, Any]] = []
    if args.validate_task:
        for v in _split_variants(args.validate_variants):
            rec = _spawn(
                {**common, "variant": v, "task_images": args.validate_images}, "task-worker", args.timeout
            )
            for key, field in (
                ("s_per_step", "estimated_seconds"),
                ("cpu_s_per_step", "estimated_cpu_seconds"),
            ):
                if parse_variant(v)[0] != "coda_prompt":
                    est = task_estimate(main_rows, v, coda, *run, args.validate_images, key=key)
                    rec[field] = est["cps_task_seconds"] if est else None
                elif cd:
                    rec[field] = args.epochs * math.ceil(args.validate_images / args.batch) * cd[key]
            validation.append(rec)
            print(
                f"task {v}: measured {rec.get('train_seconds', float('nan')):.1f} s "
                f"(cpu {rec.get('train_cpu_seconds', float('nan')):.1f} s), estimated "
                f"{rec.get('estimated_seconds') or float('nan'):.1f} s "
                f"(cpu {rec.get('estimated_cpu_seconds') or float('nan'):.1f} s)",
                flush=True,
            )
        done = {r["variant"]: r for r in validation if "train_seconds" in r}
        if coda in done and len(done) > 1:
            for v, r in done.items():
                if v != coda:
                    r["measured_ratio_vs_coda"] = r["train_seconds"] / done[coda]["train_seconds"]
                    r["measured_cpu_ratio_vs_coda"] = r["train_cpu_seconds"] / done[coda]["train_cpu_seconds"]
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in common.items() if k != "profile_dir"},
        "machine": machine,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_method": "peak_above_idle = VmHWM at the end - RSS when idle (torch, timm, backbone, "
        "method, inputs loaded); high-water mark reset to idle via /proc/self/clear_refs when hwm_reset",
        "reference": REFERENCE,
        "results": results,
        "summary": summary,
        "side_by_side": side_ratios,
        "ratios": ratios,
        "task_estimates": estimates,
        "task_validation": validation,
    }
    print()
    print(
        format_table(results)
        if args.rounds == 1 and not args.reference and len(kernels) == 1
        else side_by_side.format_side_table(summary, side_ratios)
    )
    for v, r in ratios.items():
        print(
            f"{v}: phase-1 step = {r['phase1_step_vs_coda']:.3f} x CODA step "
            f"(cpu time {r['phase1_cpu_vs_coda']:.3f} x)"
        )
    for e in estimates:
        print(
            f"whole task {e['variant']} [{e['figure']}]: {e['cps_task_seconds']:.0f} s vs CODA "
            f"{e['coda_task_seconds']:.0f} s (n={e['images']}) -> ratio {e['ratio']:.3f}"
            + (f" (without cache {e['ratio_without_cache']:.3f})" if "ratio_without_cache" in e else "")
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
