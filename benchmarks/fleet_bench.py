"""Fleet benchmark: (a) each device alone, (b) the fleet, (c) one device with all the data.

The shared Tiny-ImageNet hold-out (``../shared/datasets/tinyimagenet-100-heldout``, the 100 classes the
reference ViT never saw), the first ``--tasks x --classes-per-task`` classes in sorted order, the first
``--train-per-class`` training images and ``--test-per-class`` validation images of each; the reference
ViT-Tiny (64 px, patch 8) frozen; CPS-Prompt with DPCT. The training images are split over ``--devices``
devices IID or with a Dirichlet(``--alpha``) label split (:func:`edgecl.fleet.partition.partition`).

* (a) every device trains the whole stream alone on its share (the same Trainer, ``--epochs`` per task);
  reported: the mean and the range over devices of the final average accuracy on the common test set;
* (b) the fleet: the server strategy of ``edgecl fleet`` (:class:`~edgecl.fleet.server.FleetServer`) over
  in-process calls (:class:`~edgecl.fleet.server.LocalTransport`: the same aggregation, checks and device
  rounds as over Flower, no network), ``--rounds`` rounds per task of ``--local-epochs`` local epochs;
* (c) one device with all the training images, ``--epochs`` per task.

Also reported: bytes per round per device (down: the global trainables; up: the device's update) against
the whole model (backbone + trainables), rounds, and wall time of each run. One process, one thread
(``--threads``); the machine is named in the output.

Example (the figures in benchmarks/FLEET.md)::

    nice -n 5 .venv/bin/python benchmarks/fleet_bench.py --out benchmarks/results/fleet_bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgecl.backbone import FrozenViT, load_backbone  # noqa: E402
from edgecl.fleet.device import FleetDevice, LocalData, build_local_stream  # noqa: E402
from edgecl.fleet.partition import partition  # noqa: E402
from edgecl.fleet.protocol import EvalRequest  # noqa: E402
from edgecl.fleet.server import FleetConfig, FleetServer, LocalTransport  # noqa: E402
from edgecl.runner import RunSpec, machine_info, prepare_run  # noqa: E402

SHARED = REPO.parent / "shared"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (defaults: the sizes reported in FLEET.md)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "datasets" / "tinyimagenet-100-heldout"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "vit_tiny_p8_64_tin100.safetensors"))
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--classes-per-task", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--devices", type=int, nargs="+", default=[3, 10])
    p.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"], choices=["iid", "dirichlet"])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4, help="epochs per task for (a) and (c)")
    p.add_argument("--rounds", type=int, default=2, help="fleet rounds per task")
    p.add_argument("--local-epochs", type=int, default=2, help="fleet local epochs per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-central", action="store_true", help="leave (c) out (another run has it)")
    p.add_argument("--skip-alone", action="store_true", help="leave (a) out (it costs as much as (c))")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fleet_bench.json"))
    p.add_argument("--render", metavar="JSON", help="print the markdown table of a results file and exit")
    return p.parse_args(argv)


def render(out: dict[str, Any]) -> str:
    """The FLEET.md table of a results dict (accuracies in %, bytes in MB, seconds of wall time)."""
    c = out.get("central") or {"final_average_accuracy": float("nan")}
    lines = [
        "| devices | split | images per device | (a) alone: mean [min, max] | (b) fleet | (c) all data "
        "| fleet gap closed | rounds | MB down / up per round per device | whole model MB "
        "| wall s (a) / (b) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out["runs"]:
        f, a = row["fleet"], row.get("alone")
        imgs = row["images_per_device"]
        alone = (
            f"{100 * a['final_average_accuracy_mean']:.1f} [{100 * a['final_average_accuracy_min']:.1f}, "
            f"{100 * a['final_average_accuracy_max']:.1f}]"
            if a
            else "-"
        )
        gap = "-"
        if a and c["final_average_accuracy"] > a["final_average_accuracy_mean"]:
            closed = (f["final_average_accuracy"] - a["final_average_accuracy_mean"]) / (
                c["final_average_accuracy"] - a["final_average_accuracy_mean"]
            )
            gap = f"{100 * closed:.0f} %"
        lines.append(
            f"| {row['devices']} | {row['partition']} | {min(imgs)}-{max(imgs)} | {alone} "
            f"| {100 * f['final_average_accuracy']:.1f} | {100 * c['final_average_accuracy']:.1f} | {gap} "
            f"| {f['rounds']} | {f['bytes_down_per_round_per_device'] / 1e6:.2f} / "
            f"{f['bytes_up_per_round_per_device'] / 1e6:.2f} | {f['whole_model_bytes'] / 1e6:.1f} "
            f"| {a['seconds_total'] if a else 0:.0f} / {f['seconds']:.0f} |"
        )
    return "\n".join(lines)


def recipe(args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """The RunSpec fields every run shares (the fleet's recipe)."""
    return {
        "method": "cps_prompt",
        "method_options": {"expected_tasks": args.tasks, "lr": args.lr},
        "epochs": epochs,
        "batch_size": args.batch_size,
        "img_size": 64,
        "patch_size": 8,
        "seed": args.seed,
        "telemetry": False,
        "threads": args.threads,
    }


def train_alone(
    args: argparse.Namespace, backbone: FrozenViT, plan: list[list[str]], train: LocalData, test: LocalData
) -> dict[str, Any]:
    """One device trains the whole stream on ``train``; final accuracy per task on the common test set.

    The run's own stream has no test images (the per-task evaluation would cost as much as training);
    the finished model is evaluated once on the common test set.
    """
    info = backbone.info
    stream = build_local_stream(plan, LocalData(train.train, {}), info.img_size, info.mean, info.std)
    spec = RunSpec(**recipe(args, args.epochs))
    t0 = time.perf_counter()
    run = prepare_run(spec, backbone=backbone, stream=stream)
    run.fit()
    seconds = time.perf_counter() - t0
    run.trainer.stream = build_local_stream(plan, test, info.img_size, info.mean, info.std)
    accs = run.trainer.evaluate(len(plan) - 1)
    images = sum(len(f) for f in train.train.values())
    return {
        "accuracy": accs,
        "final_average_accuracy": sum(accs) / len(accs),
        "seconds": seconds,
        "images": images,
    }


def train_fleet(
    args: argparse.Namespace,
    backbone: FrozenViT,
    plan: list[list[str]],
    shards: list[LocalData],
    test: LocalData,
) -> dict[str, Any]:
    """The fleet over in-process calls; the final global model is evaluated on the common test set (the
    devices hold no test images, so no round spends time evaluating)."""
    names = [c for task in plan for c in task]
    tmp = Path(tempfile.mkdtemp(prefix="edgecl-fleet-bench-"))
    devices = {}
    for i, shard in enumerate(shards):
        devices[f"d{i}"] = FleetDevice(
            LocalData(shard.train, {}), tmp / f"d{i}", backbone=backbone, name=f"d{i}"
        )
    config = FleetConfig(
        tasks=args.tasks,
        classes=names,
        rounds=args.rounds,
        evaluate=False,
        seed=args.seed,
        spec=recipe(args, args.local_epochs),
    )
    t0 = time.perf_counter()
    server = FleetServer(config)
    try:
        result = server.run(LocalTransport(devices))
        seconds = time.perf_counter() - t0
        assert server.model is not None
        evaluator = FleetDevice(test, tmp / "evaluator", backbone=backbone, name="evaluator")
        final = evaluator.evaluate(EvalRequest(server._recipe(), plan, server.model, save=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    history = result["history"]
    accs = [c / n for c, n in final.evaluation]
    ups = [b for h in history for b in h["bytes_up"].values()]
    return {
        "accuracy": accs,
        "final_average_accuracy": sum(accs) / len(accs),
        "seconds": seconds,
        "rounds": len(history),
        "identical_parameters": len({*result["final"]["digests"].values(), final.digest}) == 1,
        "bytes_down_per_round_per_device": statistics.mean(h["bytes_down_per_device"] for h in history),
        "bytes_up_per_round_per_device": statistics.mean(ups) if ups else 0,
        "updates_per_round": statistics.mean(len(h["accepted"]) for h in history),
        "no_data_per_round": statistics.mean(len(h["no_data"]) for h in history),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every configuration; print a table and write the JSON."""
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    n_classes = args.tasks * args.classes_per_task
    full = LocalData.from_image_folder(args.data, args.train_per_class, args.test_per_class)
    names = sorted(full.train)[:n_classes]
    data = LocalData({c: full.train[c] for c in names}, {c: full.test[c] for c in names})
    test = LocalData({}, data.test)
    plan = [names[t * args.classes_per_task : (t + 1) * args.classes_per_task] for t in range(args.tasks)]
    backbone = load_backbone("vit_tiny_patch16_224", weights=args.weights, img_size=64, patch_size=8)
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    t_all = time.perf_counter()
    out: dict[str, Any] = {
        "machine": machine_info(),
        "sizes": {
            k: getattr(args, k)
            for k in (
                "tasks",
                "classes_per_task",
                "train_per_class",
                "test_per_class",
                "epochs",
                "rounds",
                "local_epochs",
                "batch_size",
                "lr",
                "alpha",
                "seed",
                "threads",
            )
        },  # fmt: skip
        "backbone_bytes": backbone_bytes,
        "runs": [],
    }
    central: dict[str, Any] = {"final_average_accuracy": float("nan"), "seconds": 0.0}
    if not args.skip_central:
        central = train_alone(args, backbone, plan, data, test)
        out["central"] = central
        print(
            f"(c) one device, all data: {central['final_average_accuracy']:.3f} in {central['seconds']:.0f} s"
        )
    for devices in args.devices:
        for mode in args.partitions:
            shards = partition(data, devices, mode, args.alpha, args.seed)
            row: dict[str, Any] = {"devices": devices, "partition": mode}
            row["images_per_device"] = [sum(len(f) for f in s.train.values()) for s in shards]
            if not args.skip_alone:
                alone = [train_alone(args, backbone, plan, s, test) for s in shards]
                faa = [a["final_average_accuracy"] for a in alone]
                row["alone"] = {
                    "final_average_accuracy_mean": statistics.mean(faa),
                    "final_average_accuracy_min": min(faa),
                    "final_average_accuracy_max": max(faa),
                    "seconds_total": sum(a["seconds"] for a in alone),
                    "devices": alone,
                }
            fleet = train_fleet(args, backbone, plan, shards, test)
            fleet["whole_model_bytes"] = backbone_bytes + fleet["bytes_down_per_round_per_device"]
            row["fleet"] = fleet
            out["runs"].append(row)
            a = row.get("alone")
            alone_txt = (
                f"alone mean {a['final_average_accuracy_mean']:.3f} "
                f"[{a['final_average_accuracy_min']:.3f}, {a['final_average_accuracy_max']:.3f}]"
                if a
                else "alone skipped"
            )
            print(
                f"{devices} devices {mode}: {alone_txt}; fleet {fleet['final_average_accuracy']:.3f} "
                f"({fleet['rounds']} rounds, {fleet['seconds']:.0f} s, "
                f"{fleet['bytes_down_per_round_per_device'] / 1e6:.2f} MB down / "
                f"{fleet['bytes_up_per_round_per_device'] / 1e6:.2f} MB up per round per device, whole model "
                f"{fleet['whole_model_bytes'] / 1e6:.1f} MB); "
                f"central {central['final_average_accuracy']:.3f}",
                flush=True,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=1))
    out["wall_seconds"] = time.perf_counter() - t_all
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(render(out))
    print(
        f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores; "
        f"total {out['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
