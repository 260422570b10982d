"""Per-image inference cost of edgecl's engines (torch, onnxruntime fp32 / int8 / fp16, optionally the dynamo
export) against the CPS-Prompt reference's model forward, and the variants' top-1 agreement with torch fp32.

Latency: cps_prompt with its defaults (pool 100 over 10 tasks, prefixes in blocks 0-4) in the state after
task 10 (all 100 components in use, 100 classes), so both the query pass and the prompted pass run; two
backbones: ViT-Tiny 224 px / patch 16 (random weights: same cost as pretrained ones) and the shared 64 px /
patch 8 reference weights. The reference (``--reference PATH``: a checkout of the public CPS-Prompt code,
imported from there, never copied) is its ``PromptModel`` forward under ``torch.no_grad`` (as its evaluation
runs it) in the same state (task 10 of 10, 100 classes, random weights), at 224 px only (its ViT is fixed
to 224/16); it runs in its own process, driven over a pipe, so its imports cannot touch edgecl's. Each round
runs every engine in turn (interleaved, so background load hits all alike); CPU time is the steadier figure
on shared cores.

Agreement (``--holdout DIR``): cps_prompt trained on the first classes of the shared hold-out over the
reference weights, exported in each precision; top-1 agreement with torch fp32 and accuracy on the val
images of the learned classes.

    python benchmarks/onnx_latency.py --threads 1 --batches 1 16 --reference ../ref/cps-prompt \\
        --holdout ../shared/datasets/tinyimagenet-100-heldout --dynamo \\
        --json benchmarks/results/onnx_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REFERENCE_WEIGHTS = REPO.parent / "shared" / "weights" / "vit_tiny_p8_64_tin100.safetensors"
TASKS, CLASSES_PER_TASK = 10, 10
PRECISIONS = ("fp32", "int8", "fp16")
INT8_OPTIONS = {
    "int8-weights": {"per_channel": False, "activation_matmuls": False},
    "int8-weights-pc": {"per_channel": True, "activation_matmuls": False},
    "int8-all": {"per_channel": False, "activation_matmuls": True},
    "int8-all-pc": {"per_channel": True, "activation_matmuls": True},
}
"""``edgecl.export.variants.quantize_int8`` settings compared with ``--int8-options`` (``int8`` itself is the
package default)."""


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def images(batch: int, size: int) -> torch.Tensor:
    """The same normalised random batch in every process."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def time_call(
    fn: Callable[[torch.Tensor], Any], x: torch.Tensor, repeats: int
) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of ``repeats`` calls of ``fn(x)``."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn(x)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return wall, cpu


# ---- the reference, in its own process ------------------------------------------------------------------
def reference_model(path: Path) -> torch.nn.Module:
    """The reference's ``PromptModel`` (ViT-Tiny 224/16, CODA pool 100 x 8 in blocks 0-4, 100 classes) as
    after its 10th task, built from the checkout at ``path`` with random weights."""
    # its models/__init__.py chdirs and imports the whole training stack (kornia, datasets): bind the package
    # name to its directory so only the network's own modules load
    pkg = types.ModuleType("models")
    pkg.__path__ = [str(path / "models")]
    sys.modules["models"] = pkg
    sys.path.insert(0, str(path))
    import timm

    create = timm.create_model

    def offline(*args: Any, **kwargs: Any) -> Any:  # it asks timm for pretrained weights: not reachable here
        return create(*args, **{**kwargs, "pretrained": False})

    timm.create_model = offline
    from models.cps_prompt_utils.model import PromptModel  # type: ignore[import-not-found]

    args = argparse.Namespace(
        vit_type="tiny",
        reduction_ratio=0.5,
        sampling="critical_score",
        temperature=1.0,
        e_prompt_pool_size=100,
        e_prompt_length=8,
        ortho_mu=0.0,
        e_prompt_layer_idx=[0, 1, 2, 3, 4],
        n_tasks=TASKS,
    )
    torch.manual_seed(0)
    model = PromptModel(
        args,
        num_classes=TASKS * CLASSES_PER_TASK,
        pretrained=True,
        prompt_flag="coda",
        prompt_param=[100, 8, 0.0],
    )
    model.prompt.task_count = TASKS - 1
    return model.eval()


def reference_worker(path: Path, threads: int) -> int:
    """Serve timing requests ``"batch repeats"`` on stdin with JSON lines on stdout."""
    torch.set_num_threads(threads)
    model = reference_model(path)

    @torch.no_grad()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    forward(images(1, 224))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        batch, repeats = (int(v) for v in line.split())
        x = images(batch, 224)
        forward(x)  # warm-up at this batch size
        wall, cpu = time_call(forward, x, repeats)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    return 0


class Reference:
    """The reference worker process."""

    def __init__(self, path: Path, threads: int, pin: int | None) -> None:
        cmd = [sys.executable, __file__, "--reference-worker", str(path), "--threads", str(threads)]
        if pin is not None:
            cmd += ["--pin", str(pin)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready = self._reply()
        assert ready.get("ready"), ready

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the reference worker exited")
            if line.startswith("{"):
                return json.loads(line)

    def time(self, batch: int, repeats: int) -> tuple[list[float], list[float]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{batch} {repeats}\n")
        self.proc.stdin.flush()
        out = self._reply()
        return out["wall"], out["cpu"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- edgecl ----------------------------------------------------------------------------------------------
def build(backbone: Any) -> Any:
    """cps_prompt over ``backbone`` as after its last task (all components, all classes)."""
    from edgecl.methods import TaskInfo, create_method
    from edgecl.train.model_io import LoadedModel

    torch.manual_seed(0)
    method = create_method("cps_prompt", backbone, {"expected_tasks": TASKS})
    last = TASKS - 1
    first = last * CLASSES_PER_TASK
    method.begin_task(TaskInfo(last, list(range(first, TASKS * CLASSES_PER_TASK)), first))
    method.eval()
    names = [f"class-{i:03d}" for i in range(TASKS * CLASSES_PER_TASK)]
    return LoadedModel(method, names, {"method": "cps_prompt", "seq": 0, "task": last})


def int8_variant(fp32: Any, path: Path, name: str) -> Any:
    """The fp32 export quantised with ``INT8_OPTIONS[name]``, metadata kept (an ExportInfo-like record)."""
    import onnx

    from edgecl.export.variants import quantize_int8

    start = time.perf_counter()
    quantize_int8(fp32.path, path, **INT8_OPTIONS[name])
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in {**fp32.metadata, "precision": "int8"}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return types.SimpleNamespace(
        path=path, size_bytes=path.stat().st_size, seconds=time.perf_counter() - start, parity_max_abs=None
    )


def exports(model: Any, workdir: Path, label: str, dynamo: bool, int8_options: list[str]) -> dict[str, Any]:
    """ExportInfo per variant name (fp32, int8, fp16, dynamo fp32 and other int8 settings when asked)."""
    from edgecl.export import export_model

    out = {}
    for precision in PRECISIONS:
        out[precision] = export_model(model, workdir / f"{label}-{precision}.onnx", precision=precision)
    if dynamo:
        out["dynamo"] = export_model(model, workdir / f"{label}-dynamo.onnx", exporter="dynamo")
    for name in int8_options:
        out[name] = int8_variant(out["fp32"], workdir / f"{label}-{name}.onnx", name)
    for name, info in out.items():
        print(f"  exported {name}: {info.size_bytes / 1e6:.1f} MB in {info.seconds:.1f} s", flush=True)
    return out


def run_config(
    label: str, backbone: Any, args: argparse.Namespace, workdir: Path, reference: Reference | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Export, then time every engine at each batch size in interleaved rounds."""
    from edgecl.export import OnnxPredictor, TorchPredictor

    print(label, flush=True)
    model = build(backbone)
    infos = exports(model, workdir, label.split()[0], args.dynamo, args.int8_options)
    engines: dict[str, Callable[[torch.Tensor], Any]] = {"torch": TorchPredictor(model).logits}
    for name, info in infos.items():
        pred = OnnxPredictor(info.path, providers=["CPUExecutionProvider"], threads=args.threads)
        engines["onnxruntime" if name == "fp32" else f"onnxruntime-{name}"] = pred.logits
    s = backbone.info.img_size
    rows = []
    for batch in args.batches:
        x = images(batch, s)
        reps = max(2, args.repeats if batch == 1 else args.repeats // 4)
        for fn in engines.values():
            fn(x)  # warm-up
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in engines}
        use_ref = reference is not None and s == 224
        if use_ref:
            times["reference"] = ([], [])
        for _ in range(args.rounds):
            for name, fn in engines.items():
                wall, cpu = time_call(fn, x, reps)
                times[name][0].extend(wall)
                times[name][1].extend(cpu)
            if use_ref:
                assert reference is not None
                wall, cpu = reference.time(batch, reps)
                times["reference"][0].extend(wall)
                times["reference"][1].extend(cpu)
        row: dict[str, Any] = {"config": label, "batch": batch, "img_size": s, "calls": reps * args.rounds}
        for name, (wall, cpu) in times.items():
            row[f"{name}_ms_per_image"] = 1000 * statistics.median(wall) / batch
            row[f"{name}_cpu_ms_per_image"] = 1000 * statistics.median(cpu) / batch
        base = "reference" if use_ref else "torch"
        row["baseline"] = base
        for name in times:
            row[f"{name}_cpu_speedup_vs_{base}"] = (
                row[f"{base}_cpu_ms_per_image"] / row[f"{name}_cpu_ms_per_image"]
            )
        rows.append(row)
        print(
            f"  batch {batch:3d}  CPU ms/img  "
            + "  ".join(
                f"{n} {row[f'{n}_cpu_ms_per_image']:.2f} (x{row[f'{n}_cpu_speedup_vs_{base}']:.2f})"
                for n in times
            ),
            flush=True,
        )
    sizes = {
        name: {
            "size_mb": info.size_bytes / 1e6,
            "export_s": info.seconds,
            "parity_max_abs": info.parity_max_abs,
        }
        for name, info in infos.items()
    }
    return rows, sizes


def agreement(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train cps_prompt on the hold-out's first classes; each precision's top-1 agreement with torch fp32."""
    from edgecl.backbone import load_backbone
    from edgecl.data.stream import from_image_folder
    from edgecl.export import OnnxPredictor, TorchPredictor, export_model
    from edgecl.methods import create_method
    from edgecl.train import TrainConfig, Trainer
    from edgecl.train.model_io import load_model

    bb = load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, weights=args.weights)
    info = bb.info
    stream = from_image_folder(
        args.holdout,
        args.agree_tasks,
        img_size=info.img_size,
        mean=info.mean,
        std=info.std,
        num_classes=args.agree_classes,
        limit_per_class=args.agree_limit,
    )
    torch.manual_seed(0)
    method = create_method("cps_prompt", bb, {"expected_tasks": args.agree_tasks})
    start = time.perf_counter()
    model_dir = workdir / "agree-model"
    result = Trainer(
        method, stream, TrainConfig(epochs=args.agree_epochs, batch_size=16, model_dir=str(model_dir))
    ).fit()
    print(f"agreement model trained in {time.perf_counter() - start:.0f} s: {result['accuracy_matrix'][-1]}")
    model = load_model(model_dir, backbone=bb)
    test = [(x, int(y)) for task in stream.tasks for x, y in task.test]
    x = torch.stack([t for t, _ in test])
    y = torch.tensor([label for _, label in test])
    ref = torch.cat([TorchPredictor(model).logits(x[i : i + 64]) for i in range(0, len(x), 64)])
    out: dict[str, Any] = {
        "holdout": str(args.holdout),
        "classes": args.agree_classes,
        "tasks": args.agree_tasks,
        "train_images_per_class": args.agree_limit,
        "epochs": args.agree_epochs,
        "val_images": len(x),
        "torch_fp32_accuracy": float((ref.argmax(1) == y).float().mean()),
    }
    files = {}
    for precision in PRECISIONS:
        files[precision] = export_model(model, workdir / f"agree-{precision}.onnx", precision=precision)
    for name in args.int8_options:
        files[name] = int8_variant(files["fp32"], workdir / f"agree-{name}.onnx", name)
    for name, exp in files.items():
        pred = OnnxPredictor(exp.path, providers=["CPUExecutionProvider"], threads=args.threads)
        got = torch.cat([pred.logits(x[i : i + 64]) for i in range(0, len(x), 64)])
        out[name] = {
            "top1_agreement_with_torch_fp32": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "accuracy": float((got.argmax(1) == y).float().mean()),
            "max_abs_logit_diff": float((got - ref).abs().max()),
            "size_mb": exp.size_bytes / 1e6,
        }
        print(f"  {name}: {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the configurations and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for every engine (default 1)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--repeats", type=int, default=12, help="timed calls per round at batch 1 (1/4 at larger)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--pin", type=int, help="pin this process and the reference worker to this CPU")
    parser.add_argument(
        "--weights", type=Path, default=REFERENCE_WEIGHTS, help="reference 64 px / patch 8 weights"
    )
    parser.add_argument("--configs", nargs="+", default=["vit224", "ref64"], choices=["vit224", "ref64"])
    parser.add_argument(
        "--reference", type=Path, help="checkout of the CPS-Prompt reference code (224 px only)"
    )
    parser.add_argument("--dynamo", action="store_true", help="also time an export by torch.onnx dynamo=True")
    parser.add_argument("--holdout", type=Path, help="ImageFolder hold-out for the agreement check")
    parser.add_argument(
        "--int8-options",
        nargs="*",
        default=[],
        choices=sorted(INT8_OPTIONS),
        help="other int8 settings to compare",
    )
    parser.add_argument("--agree-classes", type=int, default=20)
    parser.add_argument("--agree-tasks", type=int, default=2)
    parser.add_argument("--agree-limit", type=int, default=40, help="train images per class")
    parser.add_argument("--agree-epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows and the environment here")
    parser.add_argument("--reference-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    if args.reference_worker:
        return reference_worker(args.reference_worker, args.threads)
    import onnxruntime

    torch.set_num_threads(args.threads)
    env = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "pinned_cpu": args.pin,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "loadavg_start": os.getloadavg(),
        "reference": str(args.reference) if args.reference else None,
    }
    print(json.dumps(env), flush=True)
    from edgecl.backbone import load_backbone

    rows: list[dict[str, Any]] = []
    sizes: dict[str, Any] = {}
    doc: dict[str, Any] = {"env": env}
    reference = Reference(args.reference, args.threads, args.pin) if args.reference else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for config in args.configs:
                if config == "vit224":
                    label, bb = "vit_tiny_p16_224 (random)", load_backbone("vit_tiny_patch16_224")
                elif args.weights.is_file():
                    label = "vit_tiny_p8_64 (reference weights)"
                    bb = load_backbone(
                        "vit_tiny_patch16_224", img_size=64, patch_size=8, weights=args.weights
                    )
                else:
                    print(f"skipping ref64: {args.weights} not found", file=sys.stderr)
                    continue
                r, sz = run_config(label, bb, args, Path(tmp), reference)
                rows += r
                sizes[label] = sz
            if args.holdout:
                doc["agreement"] = agreement(args, Path(tmp))
    finally:
        if reference is not None:
            reference.close()
    env["loadavg_end"] = os.getloadavg()
    doc.update(rows=rows, exports=sizes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
