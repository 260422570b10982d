"""The one training loop of edgecl: any registered method over any task stream.

Per task: a fresh optimizer and schedule, the method's phases (JOINT, or SPARSE then HEAD for DPCT),
an optional phase-2 feature cache, an atomic checkpoint after every epoch, and an evaluation on all
classes seen so far. Meters, progress bars and the daemon plug in as callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from edgecl.data.stream import TaskStream
from edgecl.methods.base import Method, Phase, TaskInfo, describe_config
from edgecl.methods.layers import cosine_lr
from edgecl.precision import autocast_problem
from edgecl.train import checkpoint as ckpt
from edgecl.train.callbacks import Callback, CallbackList
from edgecl.train.metrics import summarize

__all__ = ["TrainConfig", "TrainState", "Trainer", "TrainingCancelled", "derive_seed"]


class TrainingCancelled(RuntimeError):
    """Raised at a step boundary after :meth:`Trainer.request_stop`."""


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from ``parts`` (seeding per task/epoch makes resume exact)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class TrainConfig:
    """Settings of the loop itself (the method's settings live in its config dataclass)."""

    epochs: int = 5
    batch_size: int = 16
    """Effective batch: one optimizer step per batch of this size."""
    micro_batch_size: int | None = None
    """Forward/backward chunk (gradient accumulation); None = the whole batch. Set by the planner."""
    eval_batch_size: int = 64
    min_steps: int = 0
    """Optimiser steps every task takes at least: when ``epochs`` x batches per epoch is fewer, each epoch
    passes over the task's data ``ceil(min_steps / (epochs x batches))`` times (phases, the per-epoch
    schedule and checkpoints keep their epochs). Small tasks (tens of images per class) otherwise get too
    few steps to learn; 0 turns it off. Recorded per task as ``passes_per_epoch``."""
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` autocast for the forward passes."""
    num_workers: int = 0
    checkpoint_dir: str | None = None
    """Resumable state, committed after every epoch."""
    model_dir: str | None = None
    """The last *finished* model (no optimizer), committed when a task completes: what predict/export
    and the daemon serve, never a half-trained task."""
    progress: bool = False
    max_tasks: int | None = None
    """Stop after this many tasks of the stream (the daemon trains one task per job step)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None and not self.micro_batch_size >= 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.precision not in {"fp32", "bf16", "fp16"}:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class TrainState:
    """Where the loop is; read by callbacks (progress, the daemon's job status)."""

    task: int = 0
    epoch: int = 0
    phase: Phase | None = None
    step: int = 0
    steps_in_epoch: int = 0
    global_step: int = 0
    planned_steps: int = 0
    last_loss: float | None = None
    micro_batch_size: int | None = None
    adaptations: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    """fp16 steps the gradient scaler skipped (an inf/NaN gradient: the loss scale was halved instead)."""


class Trainer:
    """Drives ``method`` over ``stream`` and returns the results dict (see README "results.json")."""

    def __init__(
        self,
        method: Method,
        stream: TaskStream,
        config: TrainConfig | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.method = method
        self.stream = stream
        self.config = config or TrainConfig()
        self.config.validate()
        self.callbacks = CallbackList(callbacks)
        self.device = torch.device(self.config.device)
        self.state = TrainState(micro_batch_size=self.config.micro_batch_size)
        self.records: list[dict[str, Any]] = []
        self.accuracy_matrix: list[list[float]] = []
        self.results: dict[str, Any] = {}
        self._stop = threading.Event()
        self.optimizer: torch.optim.Optimizer | None = None
        self._feature_cache: tuple[Tensor, Tensor] | None = None
        self.scaler: torch.amp.GradScaler | None = None
        """fp16's loss scaler (None in fp32/bf16, whose range needs none); made by :meth:`fit`."""
        self._frozen: list[tuple[Tensor, Tensor]] = []
        self.method.to(self.device)

    # ---- control -----------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to stop at the next step boundary (raises :class:`TrainingCancelled`)."""
        self._stop.set()

    def set_micro_batch_size(self, size: int, reason: str) -> None:
        """Change the forward/backward chunk from the next step on, and record why."""
        old = self.state.micro_batch_size or self.config.batch_size
        size = max(1, min(size, self.config.batch_size))
        if size != old:
            self.state.adaptations.append(
                {
                    "task": self.state.task,
                    "epoch": self.state.epoch,
                    "step": self.state.step,
                    "from": old,
                    "to": size,
                    "reason": reason,
                }
            )
        self.state.micro_batch_size = size

    # ---- helpers -----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _check_precision(self) -> None:
        """Refuse an autocast precision this device cannot run, before any work is done.

        The reasons live in :func:`edgecl.precision.autocast_problem` (shared with the memory planner): fp16
        is CUDA-only, and CPU bf16 kernels can kill the whole process with SIGILL, so they are tried in a
        child.
        """
        if self.config.precision == "fp32":
            return
        problem = autocast_problem(self.device, self.config.precision)
        if problem:
            raise ValueError(problem)

    def _make_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 autocast (small fp16 gradients underflow to 0 without one)."""
        if self.config.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def _loader(self, dataset: Dataset[Any], shuffle: bool, batch_size: int, seed: int) -> DataLoader[Any]:
        gen = torch.Generator()
        gen.manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=gen,
            num_workers=self.config.num_workers,
            drop_last=False,
        )

    def _task_info(self, t: int) -> TaskInfo:
        task = self.stream.tasks[t]
        return TaskInfo(index=t, classes=task.classes, n_past=min(task.classes))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.method.cfg
        groups = self.method.optimizer_param_groups()
        self._frozen = self._frozen_elements(groups)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _frozen_elements(self, groups: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
        """(parameter, full-shape bool mask) for the method's frozen elements of optimised parameters."""
        optimised = {id(p) for g in groups for p in g["params"]}
        params = dict(self.method.named_parameters())
        out = []
        for name, mask in self.method.frozen_masks().items():
            if name not in params:
                raise ValueError(f"frozen_masks() names '{name}', which is not a parameter of the method")
            p = params[name]
            if id(p) in optimised and bool(mask.any()):
                out.append((p, mask.to(p.device).expand_as(p).clone()))
        return out

    def _frozen_values(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Copies of the method's frozen elements, taken before an optimizer step."""
        return [(p, m, p.detach()[m].clone()) for p, m in self._frozen]

    @staticmethod
    def _restore_frozen(saved: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """Put the frozen elements back after the step: bit-identical whatever weight decay or Adam did."""
        with torch.no_grad():
            for p, m, values in saved:
                p[m] = values

    def _set_lr(self, epoch: int) -> None:
        cfg = self.method.cfg
        lr = cosine_lr(cfg.lr, epoch, self.config.epochs) if cfg.schedule == "cosine" else cfg.lr
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _batches(self, t: int) -> int:
        return math.ceil(len(self.stream.tasks[t].train) / self.config.batch_size)  # type: ignore[arg-type]

    def _passes(self, t: int) -> int:
        """Passes over the data per epoch so the task takes at least ``min_steps`` optimiser steps."""
        per_task = self._batches(t) * self.config.epochs
        return max(1, math.ceil(self.config.min_steps / max(per_task, 1)))

    def _steps_per_epoch(self, t: int) -> int:
        return self._batches(t) * self._passes(t)

    # ---- one optimizer step --------------------------------------------------------------------
    def _step(self, x: Tensor, y: Tensor, phase: Phase, cached: bool) -> float:
        """Forward/backward over micro-batches (halved on OOM), clip, step. Returns the batch loss."""
        assert self.optimizer is not None
        n = x.shape[0]
        while True:
            micro = min(self.state.micro_batch_size or n, n)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                total = 0.0
                for start in range(0, n, micro):
                    xs, ys = x[start : start + micro], y[start : start + micro]
                    with self._autocast():
                        loss = (
                            self.method.head_loss(xs, ys)
                            if cached
                            else self.method.training_loss(xs, ys, phase)
                        )
                    part = loss * (xs.shape[0] / n)
                    (self.scaler.scale(part) if self.scaler is not None else part).backward()
                    total += float(loss.detach()) * xs.shape[0] / n
                break
            except torch.OutOfMemoryError as err:  # also a budget guard's BudgetExceeded
                self.method.on_step_retry()  # the abandoned attempt's per-step state must not count
                if micro <= 1:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.set_micro_batch_size(
                    micro // 2, str(err).splitlines()[0] if str(err) else "out of memory"
                )
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        scaler = self.scaler if params else None  # no gradient: nothing to unscale or check
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        clip = self.method.cfg.clip_grad
        if clip is not None and params:
            torch.nn.utils.clip_grad_norm_(params, clip)
        saved = self._frozen_values()
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN
            scaler.update()
            if scaler.get_scale() < scale:
                self.state.skipped_steps += 1
                self.method.on_step_retry()  # no update happened: the step's method state is dropped
                return total
        else:
            self.optimizer.step()
        self._restore_frozen(saved)
        self.method.after_optimizer_step()
        return total

    # ---- phase-2 cache -------------------------------------------------------------------------
    def _build_cache(self, t: int) -> tuple[Tensor, Tensor]:
        """Prompted full-patch features of the task's training set, once (deterministic transform)."""
        task = self.stream.tasks[t]
        feats, labels = [], []
        self.method.eval()
        for x, y in self._loader(task.train_eval, False, self.config.eval_batch_size, 0):
            with self._autocast():
                feats.append(self.method.head_features(x.to(self.device)).float())
            labels.append(y.to(self.device))
        return torch.cat(feats), torch.cat(labels)

    def _epoch_batches(self, t: int, epoch: int, phase: Phase) -> Iterator[tuple[Tensor, Tensor, bool]]:
        """(x, y, cached) batches of one epoch; x are features when ``cached``."""
        task = self.stream.tasks[t]
        for rep in range(self._passes(t)):
            parts: tuple[int | str, ...] = (self.config.seed, t, epoch, "data") + ((rep,) if rep else ())
            seed = derive_seed(*parts)
            if phase is Phase.HEAD and self.method.phase2_cacheable():
                if self._feature_cache is None:
                    self._feature_cache = self._build_cache(t)
                feats, labels = self._feature_cache
                gen = torch.Generator()
                gen.manual_seed(seed)
                order = torch.randperm(feats.shape[0], generator=gen).to(feats.device)
                for s in range(0, feats.shape[0], self.config.batch_size):
                    idx = order[s : s + self.config.batch_size]
                    yield feats[idx], labels[idx], True
                continue
            data = task.train if self.method.phase_transform(phase) == "train" else task.train_eval
            for x, y in self._loader(data, True, self.config.batch_size, seed):
                yield x.to(self.device), y.to(self.device), False

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, upto: int) -> list[float]:
        """Accuracy on each task 0..upto's test set, predicting over all classes seen (class-IL)."""
        self.method.eval()
        accs = []
        for j in range(upto + 1):
            correct = total = 0
            for x, y in self._loader(self.stream.tasks[j].test, False, self.config.eval_batch_size, 0):
                with self._autocast():
                    logits = self.method(x.to(self.device))
                correct += int((logits.argmax(1).cpu() == y).sum())
                total += int(y.numel())
            accs.append(correct / max(total, 1))
        return accs

    # ---- checkpoints ---------------------------------------------------------------------------
    def _meta(self, t: int, epochs_done: int, task_complete: bool) -> dict[str, Any]:
        return {
            "format": "edgecl-checkpoint/1",
            "task": t,
            "epochs_done": epochs_done,
            "task_complete": task_complete,
            "method": self.method.name,
            "method_config": describe_config(self.method.cfg),
            "method_meta": self.method.checkpoint_meta(),
            "backbone": self.method.backbone.spec,
            "train_config": dataclasses.asdict(self.config),
            "class_order": self.stream.class_order,
            "classes_learned": self.stream.class_order[: self.stream.tasks[t].classes[-1] + 1]
            if task_complete
            else self.stream.class_order[: self.stream.tasks[t].classes[0]],
            "stream": {k: v for k, v in self.stream.describe().items() if k != "class_order"},
            "records": self.records,
            "accuracy_matrix": self.accuracy_matrix,
            "state": {
                "global_step": self.state.global_step,
                "micro_batch_size": self.state.micro_batch_size,
                "adaptations": self.state.adaptations,
                "skipped_steps": self.state.skipped_steps,
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            },
        }

    def save(self, t: int, epochs_done: int, task_complete: bool) -> None:
        """Commit a checkpoint of the current state (and the finished model when ``task_complete``)."""
        if task_complete and self.config.model_dir:
            model_tensors = {f"method.{k}": v for k, v in self.method.trainable_state_dict().items()}
            ckpt.save_checkpoint(self.config.model_dir, self._meta(t, epochs_done, True), model_tensors)
        if not self.config.checkpoint_dir:
            return
        tensors = {f"method.{k}": v for k, v in self.method.trainable_state_dict().items()}
        meta = self._meta(t, epochs_done, task_complete)
        self.callbacks.on_save_checkpoint(self, meta)
        if self.optimizer is not None and not task_complete:
            opt_tensors, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
            tensors.update(opt_tensors)
            meta["optimizer"] = opt_meta
        rng_tensors, rng_meta = ckpt.rng_state()
        tensors.update(rng_tensors)
        meta["rng"] = rng_meta
        ckpt.save_checkpoint(self.config.checkpoint_dir, meta, tensors)

    def _restore(self, directory: str | Path) -> tuple[int, int]:
        """Load a checkpoint; returns (task, first epoch) to continue from."""
        c = ckpt.load_checkpoint(directory)
        meta = c.meta
        if meta.get("method") != self.method.name:
            raise ValueError(
                f"checkpoint {directory} is for method '{meta.get('method')}', not '{self.method.name}'"
            )
        saved, now = list(meta["class_order"]), self.stream.class_order
        n = min(len(saved), len(now))
        if saved[:n] != now[:n] or int(meta["task"]) >= len(self.stream.tasks):
            raise ValueError(
                f"checkpoint {directory} was trained on another class order / dataset than this stream; "
                "a stream may only extend the checkpoint's classes with new tasks at the end"
            )
        self.records = list(meta["records"])
        self.accuracy_matrix = [list(r) for r in meta["accuracy_matrix"]]
        st = meta.get("state", {})
        self.state.global_step = int(st.get("global_step", 0))
        self.state.micro_batch_size = st.get("micro_batch_size", self.state.micro_batch_size)
        self.state.adaptations = list(st.get("adaptations", []))
        self.state.skipped_steps = int(st.get("skipped_steps", 0))
        if self.scaler is not None and st.get("grad_scaler"):
            self.scaler.load_state_dict(st["grad_scaler"])
        t, done = int(meta["task"]), int(meta["epochs_done"])
        self.callbacks.on_load_checkpoint(self, meta)
        if meta["task_complete"]:
            # restore into the state after task t: replay the head size etc. from meta
            self.method.load_checkpoint_meta(meta["method_meta"])
            self._load_method_tensors(c.tensors)
            return t + 1, 0
        # mid-task: begin the task (allocations), then overwrite with the saved parameters
        self.method.load_checkpoint_meta(meta["method_meta"])
        torch.manual_seed(derive_seed(self.config.seed, t, "begin"))
        self.method.begin_task(self._task_info(t))
        self._load_method_tensors(c.tensors)
        self.optimizer = self._build_optimizer()
        if "optimizer" in meta:
            self.optimizer.load_state_dict(ckpt.unflatten_optimizer(meta["optimizer"], c.tensors))
        ckpt.restore_rng(c.tensors, meta.get("rng", {}))
        return t, done

    def _load_method_tensors(self, tensors: dict[str, Tensor]) -> None:
        state = {k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")}
        missing, unexpected = self.method.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the method: missing {missing}, unexpected {unexpected}"
            )

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        """Train every task of the stream (continuing from ``resume_from`` when given); return results."""
        start_task, start_epoch = 0, 0
        self.scaler = self._make_scaler()
        if resume_from is not None:
            start_task, start_epoch = self._restore(resume_from)
        n_tasks = len(self.stream.tasks)
        if self.config.max_tasks is not None:
            n_tasks = min(n_tasks, self.config.max_tasks)
        self.state.planned_steps = sum(self._steps_per_epoch(t) for t in range(n_tasks)) * self.config.epochs
        self._check_precision()
        self.callbacks.on_run_start(self)
        try:
            for t in range(start_task, n_tasks):
                self._train_task(
                    t, start_epoch if t == start_task else 0, resumed=t == start_task and start_epoch > 0
                )
        except BaseException as exc:
            self.callbacks.on_exception(self, exc)
            raise
        self.results = self._results()
        self.callbacks.on_run_end(self, self.results)
        return self.results

    def _train_task(self, t: int, first_epoch: int, resumed: bool) -> None:
        info = self._task_info(t)
        if not resumed:
            torch.manual_seed(derive_seed(self.config.seed, t, "begin"))
            self.method.begin_task(info)
            self.optimizer = self._build_optimizer()
        self._feature_cache = None
        self.state.task = t
        self.callbacks.on_task_start(self, t)
        epochs = self.config.epochs
        phase: Phase | None = None
        for epoch in range(first_epoch, epochs):
            new_phase = self.method.phase(epoch, epochs)
            if new_phase is not phase:
                if phase is not None:
                    self.callbacks.on_phase_end(self, t, phase)
                phase = new_phase
                self.state.phase = phase
                self.callbacks.on_phase_start(self, t, phase)
            self._train_epoch(t, epoch, phase)
        if phase is not None:
            self.callbacks.on_phase_end(self, t, phase)
        self.callbacks.on_train_end(self, t)
        self._feature_cache = None
        task = self.stream.tasks[t]
        self.method.eval()
        self.method.end_task(info, self._loader(task.train_eval, False, self.config.eval_batch_size, 0))
        accs = self.evaluate(t)
        self.accuracy_matrix.append(accs)
        record: dict[str, Any] = {
            "task": t,
            "classes": [self.stream.class_order[c] for c in task.classes],
            "train_images": len(task.train),  # type: ignore[arg-type]
            "passes_per_epoch": self._passes(t),
            "accuracy": accs,
            "average_accuracy": sum(accs) / len(accs),
            **self.method.extra_metrics(),
        }
        self.callbacks.on_task_end(self, t, record)
        self.records.append(record)
        self.save(t, epochs, task_complete=True)

    def _train_epoch(self, t: int, epoch: int, phase: Phase) -> None:
        self.method.train()
        self.state.epoch = epoch
        self.state.step = 0
        self.state.steps_in_epoch = self._steps_per_epoch(t)
        torch.manual_seed(derive_seed(self.config.seed, t, epoch, "step"))
        self._set_lr(epoch)
        self.callbacks.on_epoch_start(self, t, epoch)
        losses = []
        closed_form = phase is Phase.HEAD and self.method.closed_form_head()
        if closed_form:  # one pass and a solve on the first HEAD epoch of the task, no optimiser steps
            losses.append(self._closed_form_epoch(t))
        for x, y, cached in () if closed_form else self._epoch_batches(t, epoch, phase):
            if self._stop.is_set():
                raise TrainingCancelled(f"cancelled at task {t}, epoch {epoch}, step {self.state.step}")
            self.method.train()
            loss = self._step(x, y, phase, cached)
            losses.append(loss)
            self.state.step += 1
            self.state.global_step += 1
            self.state.last_loss = loss
            self.callbacks.on_step_end(self, t, epoch, self.state.step, loss)
        self.save(t, epoch + 1, task_complete=False)
        mean_loss = sum(losses) / max(len(losses), 1)
        self.callbacks.on_epoch_end(self, t, epoch, {"loss": mean_loss, "phase": phase.value})

    def _closed_form_epoch(self, t: int) -> float:
        """A closed-form HEAD epoch: the first one per task caches and fits; returns the head loss."""
        first = self._feature_cache is None
        if first:
            self._feature_cache = self._build_cache(t)
        feats, labels = self._feature_cache
        if first:
            self.method.fit_head(feats, labels)
        with torch.no_grad():
            return float(self.method.head_loss(feats, labels))

    def _results(self) -> dict[str, Any]:
        acc = self.accuracy_matrix
        return {
            "method": self.method.name,
            "config": describe_config(self.method.cfg),
            "train_config": dataclasses.asdict(self.config),
            "backbone": self.method.backbone.spec,
            "trainable_parameters": self.method.num_trainable_parameters(),
            "dataset": {k: v for k, v in self.stream.describe().items() if k != "class_order"},
            "class_order": self.stream.class_order,
            "accuracy_matrix": acc,
            **summarize(acc),
            "tasks": self.records,
            "adaptations": self.state.adaptations,
            "grad_scaler": (
                {"scale": self.scaler.get_scale(), "skipped_steps": self.state.skipped_steps}
                if self.scaler is not None
                else None
            ),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
