"""Per-image inference latency: onnxruntime vs PyTorch eager, for cps_prompt after its last task.

Two backbones: ViT-Tiny 64 px / patch 8 with the reference weights (../shared/weights, skipped when
absent) and ViT-Tiny 224 px / patch 16 with random weights (same cost as pretrained ones). The method is
CPS-Prompt with its defaults (pool 100 over 10 tasks, prefixes in blocks 0-4) in the state after task 10
(all 100 components in use, 100 classes), so both the query pass and the prompted pass run. Both engines
get the same thread count; torch and onnxruntime runs alternate so background load hits both alike.

    .venv/bin/python benchmarks/onnx_latency.py --threads 2 --batches 1 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from edgecl.backbone import FrozenViT, load_backbone
from edgecl.export import OnnxPredictor, TorchPredictor, export_model
from edgecl.methods import TaskInfo, create_method
from edgecl.train.model_io import LoadedModel

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "weights" / "vit_tiny_p8_64_tin100.safetensors"
TASKS, CLASSES_PER_TASK = 10, 10


def build(backbone: FrozenViT) -> LoadedModel:
    """cps_prompt over ``backbone`` as after its last task (all components, all classes)."""
    torch.manual_seed(0)
    method = create_method("cps_prompt", backbone, {"expected_tasks": TASKS})
    last = TASKS - 1
    method.begin_task(
        TaskInfo(
            last, list(range(last * CLASSES_PER_TASK, TASKS * CLASSES_PER_TASK)), last * CLASSES_PER_TASK
        )
    )
    method.eval()
    names = [f"class-{i:03d}" for i in range(TASKS * CLASSES_PER_TASK)]
    return LoadedModel(method, names, {"method": "cps_prompt", "seq": 0, "task": last})


def time_batches(
    fns: dict[str, Any], x: torch.Tensor, repeats: int, warmup: int
) -> dict[str, tuple[list[float], list[float]]]:
    """(wall seconds, process CPU seconds) per call of each function on ``x``, calls interleaved.

    CPU time is what a call costs without contention: on shared cores it is the steadier figure, and at
    one thread it equals the wall time on an idle machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn(x)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn(x)
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return times


def run_config(
    label: str, backbone: FrozenViT, args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    """Export, then time both engines at each batch size."""
    model = build(backbone)
    info = export_model(model, workdir / f"{label}.onnx")
    ort_pred = OnnxPredictor(info.path, providers=["CPUExecutionProvider"], threads=args.threads)
    torch_pred = TorchPredictor(model)
    s = backbone.info.img_size
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(batch))
        reps = max(3, args.repeats if batch == 1 else args.repeats // 4)
        t = time_batches({"torch": torch_pred.logits, "onnxruntime": ort_pred.logits}, x, reps, args.warmup)
        row: dict[str, Any] = {"config": label, "batch": batch, "img_size": s, "repeats": reps}
        for engine, (wall, cpu) in t.items():
            row[f"{engine}_ms_per_image"] = 1000 * statistics.median(wall) / batch
            row[f"{engine}_ms_per_image_min"] = 1000 * min(wall) / batch
            row[f"{engine}_cpu_ms_per_image"] = 1000 * statistics.median(cpu) / batch
        row["speedup"] = row["torch_ms_per_image"] / row["onnxruntime_ms_per_image"]
        row["cpu_speedup"] = row["torch_cpu_ms_per_image"] / row["onnxruntime_cpu_ms_per_image"]
        row["parity_max_abs"] = info.parity_max_abs
        rows.append(row)
        print(
            f"{label:28s} batch {batch:3d}  wall ms/img: torch {row['torch_ms_per_image']:7.2f}  onnxruntime "
            f"{row['onnxruntime_ms_per_image']:7.2f} (x{row['speedup']:.2f})   CPU ms/img: torch "
            f"{row['torch_cpu_ms_per_image']:7.2f}  onnxruntime {row['onnxruntime_cpu_ms_per_image']:7.2f} "
            f"(x{row['cpu_speedup']:.2f})",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the configurations and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both engines")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed calls at batch 1 (a quarter at larger)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--weights", type=Path, default=REFERENCE, help="reference 64 px / patch 8 weights")
    parser.add_argument("--configs", nargs="+", default=["ref64", "vit224"], choices=["ref64", "vit224"])
    parser.add_argument("--json", type=Path, help="write the rows and the environment here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "loadavg_start": os.getloadavg(),
    }
    print(json.dumps(env), flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "ref64" in args.configs:
            if args.weights.is_file():
                bb = load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, weights=args.weights)
                rows += run_config("vit_tiny_p8_64 (reference)", bb, args, Path(tmp))
            else:
                print(f"skipping ref64: {args.weights} not found", file=sys.stderr)
        if "vit224" in args.configs:
            rows += run_config(
                "vit_tiny_p16_224 (random)", load_backbone("vit_tiny_patch16_224"), args, Path(tmp)
            )
    env["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
