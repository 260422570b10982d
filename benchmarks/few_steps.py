"""Why prompt methods fall below the linear-head floor with few optimiser steps (issue #22 item 3).

Runs named variants in one process over one stream (the shared hold-out by default: 5 tasks x 10 classes,
20 images per class, 2 epochs) and prints, per variant, the final average accuracy and three diagnostics:

- ``recency``: the share of the final evaluation's predictions that fall in the last task's classes (1/T
  when the heads of all tasks compete fairly; larger means the newest head rows win by logit scale);
- ``task0_til_first`` / ``task0_til_last``: task-incremental accuracy on task 1 (argmax over task 1's own
  classes) right after task 1 and after the last task: the features of old images moving under later
  prompts lower it, a shared head cannot (its rows for task 1 do not change);
- ``task0_feat_cos``: mean cosine between task 1's test features after task 1 and after the last task.

Each finished variant is written to ``OUT/<variant>.json`` at once and skipped when present (resumable).
``python benchmarks/few_steps.py --variants cps,cps_const,... --out benchmarks/results/few_steps``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from edgecl.runner import RunSpec, build_backbone, build_stream, machine_info, prepare_run
from edgecl.train import Callback, Trainer

VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (method, method options, trainer options)
    "cps": ("cps_prompt", {}, {}),
    "cps_const": ("cps_prompt", {"schedule": "constant"}, {}),
    "cps_proto": ("cps_prompt", {"phase2_head": "prototype"}, {}),
    "cps_ridge": ("cps_prompt", {"phase2_head": "ridge"}, {}),
    "cps_frozen_prompt": ("cps_prompt", {}, {"freeze_prompt": True}),
    "coda": ("coda_prompt", {}, {}),
    "coda_const": ("coda_prompt", {"schedule": "constant"}, {}),
    "patchdropout": ("patchdropout", {}, {}),
    "linear": ("linear_probe", {}, {}),
    "linear_const": ("linear_probe", {"schedule": "constant"}, {}),
    "linear_ridge": ("linear_probe", {"phase2_head": "ridge"}, {}),
    "linear_unmasked": ("linear_probe", {}, {"unmasked": True}),
    "linear_ms100": ("linear_probe", {}, {"min_steps": 100}),
    "linear_ms300": ("linear_probe", {}, {"min_steps": 300}),
    "linear_ms1000": ("linear_probe", {}, {"min_steps": 1000}),
    "linear_const_ms300": ("linear_probe", {"schedule": "constant"}, {"min_steps": 300}),
    "linear_lr1e-2": ("linear_probe", {"lr": 0.01}, {}),
    "linear_proto": ("linear_probe", {"phase2_head": "prototype"}, {}),
    "cps_ms100": ("cps_prompt", {}, {"min_steps": 100}),
    "simplecil": ("simplecil", {}, {}),
}


class Diagnostics(Callback):
    """Task-1 features and task-IL accuracy after the first and the last task; recency at the end."""

    def __init__(self, n_tasks: int) -> None:
        self.n_tasks = n_tasks
        self.first: torch.Tensor | None = None
        self.out: dict[str, float] = {}

    @torch.no_grad()
    def _task0(self, trainer: Trainer) -> tuple[torch.Tensor, float]:
        task = trainer.stream.tasks[0]
        lo, hi = task.classes[0], task.classes[-1] + 1
        feats, correct, total = [], 0, 0
        trainer.method.eval()
        for x, y in trainer._loader(task.test, False, 64, 0):
            f = trainer.method.features(x)
            feats.append(f)
            correct += int(((trainer.method.logits(f)[:, lo:hi].argmax(1) + lo) == y).sum())
            total += int(y.numel())
        return torch.cat(feats), correct / total

    @torch.no_grad()
    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        if task == 0:
            self.first, self.out["task0_til_first"] = self._task0(trainer)
        if task == self.n_tasks - 1 and self.first is not None:
            last, self.out["task0_til_last"] = self._task0(trainer)
            self.out["task0_feat_cos"] = float(torch.nn.functional.cosine_similarity(self.first, last).mean())
            lo = trainer.stream.tasks[task].classes[0]
            newest = total = 0
            for j in range(task + 1):
                for x, _ in trainer._loader(trainer.stream.tasks[j].test, False, 64, 0):
                    pred = trainer.method(x).argmax(1)
                    newest += int((pred >= lo).sum())
                    total += int(pred.numel())
            self.out["recency"] = newest / total
        record.update(self.out if task == self.n_tasks - 1 else {})


class FeatureMemo:
    """Memoises the frozen backbone's plain forward by input bytes: variants over one stream then share the
    frozen features of the same (deterministically transformed) batches. Changes no result, only time."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.memo: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).digest()
        if key not in self.memo:
            self.misses += 1
            self.memo[key] = self.fn(x)
        else:
            self.hits += 1
        return self.memo[key].clone()


def run_variant(name: str, base: RunSpec, backbone: Any, stream: Any) -> dict[str, Any]:
    """Train one variant over the shared backbone and stream; the results dict with the diagnostics."""
    method, options, trainer_opts = VARIANTS[name]
    spec = RunSpec(**{**base.__dict__, "method": method, "method_options": dict(options)})
    spec.method_options.setdefault("expected_tasks", len(stream.tasks))
    if "min_steps" in trainer_opts:
        spec.min_steps = int(trainer_opts["min_steps"])
    diag = Diagnostics(len(stream.tasks))
    run = prepare_run(spec, [diag], backbone=backbone, stream=stream)
    if trainer_opts.get("freeze_prompt"):  # the prompt stays at its initialisation: only the head learns
        for p in run.method.prompt.parameters():
            p.requires_grad_(False)
        original = run.method.begin_task

        def begin(task: Any) -> None:
            original(task)
            for p in run.method.prompt.parameters():
                p.requires_grad_(False)

        run.method.begin_task = begin  # type: ignore[method-assign]
    if trainer_opts.get("unmasked"):  # plain CE over every seen class (no masking of earlier tasks)
        import torch.nn.functional as F

        def head_loss(feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            assert run.method.task is not None
            return F.cross_entropy(run.method.logits(feats)[:, : run.method.task.n_seen], y)

        run.method.head_loss = head_loss  # type: ignore[method-assign]
    t0 = time.perf_counter()
    results = run.fit()
    results["variant"] = {"name": name, "method": method, "options": options, "trainer": trainer_opts}
    results["diagnostics"] = diag.out
    results["train_seconds_total"] = sum(t.get("train_seconds") or 0.0 for t in results["tasks"])
    results["wall_seconds"] = time.perf_counter() - t0
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the variants named on the command line; print one line per variant."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="cps,linear,simplecil")
    p.add_argument("--out", default="benchmarks/results/few_steps")
    p.add_argument("--data", default="../shared/datasets/tinyimagenet-100-heldout")
    p.add_argument("--weights", default="../shared/weights/vit_tiny_p8_64_tin100.safetensors")
    p.add_argument("--limit-per-class", type=int, default=20)
    p.add_argument("--test-limit-per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = RunSpec(
        data=args.data,
        weights=args.weights,
        img_size=64,
        patch_size=8,
        tasks=5,
        num_classes=50,
        limit_per_class=args.limit_per_class,
        test_limit_per_class=args.test_limit_per_class,
        epochs=args.epochs,
        seed=args.seed,
        threads=1,
    )
    backbone = build_backbone(base)
    backbone.features = FeatureMemo(backbone.features)  # type: ignore[method-assign]
    stream = build_stream(base, backbone)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        path = out / f"{name}_ipc{args.limit_per_class}_e{args.epochs}_s{args.seed}.json"
        if path.exists():
            res = json.loads(path.read_text())
        else:
            res = run_variant(name, base, backbone, stream)
            res["machine"] = machine_info()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            os.replace(tmp, path)
        d, acc = res["diagnostics"], res["accuracy_matrix"]
        til = f"{100 * d.get('task0_til_first', 0):.1f}->{100 * d.get('task0_til_last', 0):.1f}%"
        print(
            f"{name:18s} FAA {100 * res['final_average_accuracy']:5.2f}%  task1 {100 * acc[0][0]:5.1f}%  "
            f"recency {d.get('recency', float('nan')):.2f}  task1 TIL {til}  "
            f"feat cos {d.get('task0_feat_cos', float('nan')):.3f}  train {res['train_seconds_total']:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
