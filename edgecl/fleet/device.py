"""One fleet device: trains a round through the same run assembly as ``edgecl train`` and the daemon.

A round builds a :class:`~edgecl.runner.RunSpec` (the fleet's recipe plus this device's own fields:
weights, compute device, threads, memory budget), a task stream over the device's own images in the
fleet's class order, and calls :func:`edgecl.runner.prepare_run`. The received global model is committed as
a finished model of the previous task and the run resumes from it, so the :class:`Trainer` starts the
round's task as it would on one device (CPS sampling, DPCT phases, the memory plan all apply); a callback
then loads the global tensors of the task (its components and head rows, as the server allocated them)
before the first step. Only the trainable tensors go back: the head rows of the classes the device has
images of, with their counts; with a closed-form head, the statistics of the task's fit instead of the
head (:mod:`edgecl.fleet.closed_form`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgecl.backbone import FrozenViT
from edgecl.data.stream import ImageListDataset, Task, TaskStream, scan_image_folder
from edgecl.data.transforms import build_transforms
from edgecl.fleet.aggregate import HEAD_PREFIX, DeviceUpdate, GlobalModel
from edgecl.fleet.closed_form import KeepStatistics, closed_form_statistics
from edgecl.fleet.protocol import EvalReply, EvalRequest, TrainReply, TrainRequest
from edgecl.runner import Run, RunSpec, build_backbone, prepare_run
from edgecl.train.callbacks import Callback

__all__ = ["LOCAL_FIELDS", "FleetDevice", "LocalData", "build_local_stream", "digest"]

log = logging.getLogger("edgecl.fleet")

LOCAL_FIELDS = (
    "weights",
    "device",
    "precision",
    "threads",
    "eval_batch_size",
    "memory_budget_mb",
    "profile",
    "telemetry",
    "telemetry_backends",
    "progress",
)
"""``RunSpec`` fields a device sets for itself; every other field is the fleet's recipe."""


@dataclass
class LocalData:
    """A device's own images: class name -> image files, for training and for its test set."""

    train: dict[str, list[str]]
    test: dict[str, list[str]]

    @classmethod
    def from_image_folder(
        cls, root: str | Path, limit_per_class: int | None = None, test_limit_per_class: int | None = None
    ) -> LocalData:
        """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``; optional: no local test)."""
        root = Path(root)
        train = scan_image_folder(root / "train", limit_per_class)
        test: dict[str, list[str]] = {}
        for name in ("val", "test"):
            if (root / name).is_dir():
                test = scan_image_folder(root / name, test_limit_per_class)
                break
        return cls(train, test)

    @classmethod
    def from_store(cls, data_dir: str | Path) -> LocalData:
        """The images of every task uploaded to a daemon's data dir (``edgecl serve --data-dir``), by class
        name: a task's held-out images are test images here, the others training images. The fleet's own
        class plan decides the tasks, not the upload order."""
        from edgecl.store import Store

        if not (Path(data_dir) / "edgecl.db").is_file():
            raise FileNotFoundError(
                f"no edgecl store in {data_dir} (expected {Path(data_dir) / 'edgecl.db'})"
            )
        store = Store(data_dir)
        train: dict[str, list[str]] = {}
        test: dict[str, list[str]] = {}
        for task in store.list_tasks():
            root = store.task_path(task)
            for rel, c, split in task.manifest:
                into = train if split == "train" else test
                into.setdefault(task.classes[c], []).append(str(root / rel))
        if not train:
            raise ValueError(f"the store in {data_dir} holds no training images; upload tasks first")
        return cls(train, test)

    def class_names(self) -> list[str]:
        """Classes this device has training images of, sorted."""
        return sorted(c for c, files in self.train.items() if files)


def build_local_stream(
    plan: Sequence[Sequence[str]], data: LocalData, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> TaskStream:
    """The fleet's tasks over this device's images: every class of the plan has its head row, classes the
    device has no image of simply have no training or test items here."""
    names = [c for task in plan for c in task]
    if len(set(names)) != len(names):
        raise ValueError("the fleet's class plan names a class twice")
    train_tf, eval_tf = build_transforms(img_size, mean, std)
    tasks: list[Task] = []
    start = 0
    for t, task_names in enumerate(plan):
        ids = list(range(start, start + len(task_names)))
        start += len(task_names)
        tr = [(p, i) for i in ids for p in data.train.get(names[i], [])]
        te = [(p, i) for i in ids for p in data.test.get(names[i], [])]
        train = ImageListDataset(tr, train_tf)
        tasks.append(
            Task(
                t, ids, list(task_names), train, train.with_transform(eval_tf), ImageListDataset(te, eval_tf)
            )
        )
    return TaskStream(tasks, names, source="fleet device", info={"fleet": True})


def digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over the names, shapes and bytes of ``tensors`` (equal digests: equal parameters)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class _LoadGlobal(Callback):
    """Loads the round's global tensors into the method after ``begin_task`` allocated the task."""

    def __init__(self, model: GlobalModel) -> None:
        self.model = model

    def on_task_start(self, trainer: Any, task: int) -> None:
        """Copy in place, so the task's optimizer keeps its parameters."""
        _load(trainer.method, self.model)


def _load(method: Any, model: GlobalModel) -> None:
    method.load_checkpoint_meta(model.method_meta)
    missing, unexpected = method.load_state_dict(model.tensors, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(
            f"the global model does not fit the method: missing {missing}, unexpected {unexpected}"
        )


def _counts(run: Run, task: int) -> tuple[list[int], list[str]]:
    """Training images per class of ``task`` on this device (classes with images only)."""
    t = run.stream.tasks[task]
    per: dict[int, int] = {}
    for y in t.train.labels:  # type: ignore[attr-defined]
        per[y] = per.get(y, 0) + 1
    ids = [c for c in t.classes if per.get(c, 0) > 0]
    return [per[c] for c in ids], [run.stream.class_order[c] for c in ids]


class FleetDevice:
    """Answers the server's requests with the device's own data (see the module docstring)."""

    def __init__(
        self,
        data: LocalData,
        work_dir: str | Path,
        *,
        local: dict[str, Any] | None = None,
        backbone: FrozenViT | None = None,
        model_dir: str | Path | None = None,
        name: str = "device",
    ) -> None:
        bad = sorted(set(local or {}) - set(LOCAL_FIELDS))
        if bad:
            raise ValueError(f"device settings {bad} are not local RunSpec fields; use one of {LOCAL_FIELDS}")
        self.data = data
        self.work_dir = Path(work_dir)
        self.local = dict(local or {})
        self.model_dir = Path(model_dir) if model_dir else self.work_dir / "model"
        self.name = name
        self._backbone = backbone

    # ---- assembly ------------------------------------------------------------------------------
    def spec(self, recipe: dict[str, Any]) -> RunSpec:
        """The fleet's recipe with this device's own fields; checkpoints and resume are set per round."""
        known = {f.name for f in fields(RunSpec)}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"the fleet recipe has fields RunSpec does not know: {unknown}")
        values = {k: v for k, v in recipe.items() if k not in LOCAL_FIELDS}
        values.update(self.local)
        values.update(checkpoint_dir=None, model_dir=None, resume=None)
        values.setdefault("telemetry", False)
        return RunSpec(**values)

    def backbone(self, spec: RunSpec) -> FrozenViT:
        """The frozen ViT, loaded once per process."""
        if self._backbone is None:
            self._backbone = build_backbone(spec)
        return self._backbone

    def _run(self, spec: RunSpec, plan: Sequence[Sequence[str]], extra: list[Callback] | None = None) -> Run:
        backbone = self.backbone(spec)
        info = backbone.info
        stream = build_local_stream(plan, self.data, info.img_size, info.mean, info.std)
        return prepare_run(spec, extra, backbone=backbone, stream=stream)

    def _evaluate(self, run: Run, upto: int) -> list[tuple[int, int]]:
        accs = run.trainer.evaluate(upto)
        totals = [len(run.stream.tasks[j].test) for j in range(upto + 1)]  # type: ignore[arg-type]
        return [(round(a * n), n) for a, n in zip(accs, totals, strict=True)]

    # ---- requests -------------------------------------------------------------------------------
    def classes(self) -> list[str]:
        """The answer to the server's class query."""
        return self.data.class_names()

    def train(self, req: TrainRequest) -> TrainReply:
        """One round: evaluate the received model, train the task from it, return the trainables."""
        spec = self.spec(req.spec)
        t = req.task
        keep = KeepStatistics()
        run = self._run(spec, req.plan[: t + 1], [_LoadGlobal(req.model), keep])
        _load(run.method, req.model)
        stats = closed_form_statistics(run.method)
        evaluation = self._evaluate(run, t) if req.evaluate else []
        counts, names = _counts(run, t)
        if not counts:
            log.info("%s: no training image of task %d; nothing to send", self.name, t)
            return TrainReply(None, evaluation)
        if t > 0:
            # the received model as the finished model of task t-1: the run starts at task t
            resume = self.work_dir / "round-start"
            run.trainer.config.model_dir = str(resume)
            run.trainer.save(t - 1, spec.epochs, task_complete=True)
            run.trainer.config.model_dir = None
            run.spec.resume = str(resume)
        t0 = time.perf_counter()
        results = run.fit()
        seconds = time.perf_counter() - t0
        state = run.method.trainable_state_dict()
        per_class: set[str] = set()
        if stats is not None:  # a closed-form head: its statistics go up, the head itself does not
            if keep.tensors is None:
                raise RuntimeError(
                    f"{self.name}: the closed-form head was not fitted this round (no HEAD epoch); "
                    "the fleet needs a recipe whose epochs include phase 2"
                )
            state = {k: v for k, v in {**state, **keep.tensors}.items() if k not in stats.derived}
            per_class = set(stats.rows)
        rows = torch.tensor([run.stream.class_order.index(n) for n in names], dtype=torch.long)
        tensors = {
            k: (v.index_select(0, rows) if k.startswith(HEAD_PREFIX) or k in per_class else v)
            .detach()
            .cpu()
            .clone()
            for k, v in state.items()
        }
        update = DeviceUpdate(self.name, t, req.model.version, tensors, names, counts, sum(counts))
        return TrainReply(update, evaluation, seconds, list(results["accuracy_matrix"][-1]))

    def evaluate(self, req: EvalRequest) -> EvalReply:
        """Evaluate the model on the device's test images; when ``save``, commit it as the device's model
        (a finished-model directory that ``edgecl predict``/``export`` and the daemon load)."""
        spec = self.spec(req.spec)
        last = len(req.plan) - 1
        run = self._run(spec, req.plan)
        _load(run.method, req.model)
        evaluation = self._evaluate(run, last)
        run.trainer.accuracy_matrix = [[c / n if n else 0.0 for c, n in evaluation]]
        model_dir = None
        if req.save:
            run.trainer.config.model_dir = str(self.model_dir)
            run.trainer.save(last, spec.epochs, task_complete=True)
            model_dir = str(self.model_dir)
        return EvalReply(evaluation, digest(run.method.trainable_state_dict()), model_dir)
