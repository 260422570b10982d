"""The training worker: one thread that runs queued jobs in order through the one :class:`Trainer`.

A job trains its tasks one at a time. For each task the worker builds a :class:`TaskStream` of every task
already learned (in learning order) plus this one, and resumes the trainer from

* the job's own mid-task checkpoint (``jobs/<id>/checkpoint``) when it holds this exact stream (the daemon
  was killed or stopped during this task: training continues from the last finished epoch), else
* the committed model (``model/``), whose class order is exactly the learned classes, so the trainer starts
  the new task after them, else from scratch (the first task).

When the trainer commits the task (``TrainConfig.model_dir``), the worker marks it learned in the store and
swaps the predictor atomically. Cancellation and shutdown stop the trainer at the next step boundary; a job
stopped by a shutdown stays ``running`` and resumes by itself on the next start.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgecl.store import JobRecord, Store, TaskRecord
from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.backbone import FrozenViT
    from edgecl.data.stream import TaskStream
    from edgecl.methods.base import Phase
    from edgecl.profiles import Profile
    from edgecl.serve.config import ServeSettings
    from edgecl.serve.predictor import ModelHolder
    from edgecl.train.trainer import Trainer

__all__ = [
    "ADJUSTABLE_OPTIONS",
    "JobConflict",
    "JobProgress",
    "Worker",
    "build_stream",
    "optional_telemetry",
    "read_checkpoint_meta",
    "resolve_method_options",
]

log = logging.getLogger("edgecl.serve")

STALLED_RESTARTS = 2
"""A job whose last this-many restarts (plus the first run) all ended at the same point fails instead."""

ADJUSTABLE_OPTIONS = frozenset({"lr", "optimizer", "weight_decay", "schedule", "clip_grad"})
"""Method options a later job may change; all others are fixed by the first learned task (shapes)."""


class JobConflict(ValueError):
    """A job that cannot continue the committed model (another method, or changed structural options)."""


def optional_telemetry() -> ModuleType | None:
    """:mod:`edgecl.telemetry` when installed (it meters training); None otherwise."""
    try:
        return importlib.import_module("edgecl.telemetry")
    except ImportError as err:
        log.warning("telemetry unavailable (%s): jobs run without meters", err)
        return None


def read_checkpoint_meta(directory: Path) -> dict[str, Any] | None:
    """The committed metadata of a checkpoint folder (no tensors loaded), or None when there is none."""
    from edgecl.train.checkpoint import META

    path = directory / META
    if not path.is_file():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def resolve_method_options(
    method: str, profile: Profile, explicit: dict[str, Any], model_meta: dict[str, Any] | None
) -> dict[str, Any]:
    """The method options a job trains with; ``ValueError`` for bad ones, :class:`JobConflict` when the job
    cannot continue the committed model."""
    from edgecl.methods.registry import build_config

    if model_meta is None:
        base = dict(profile.method_options) if method == profile.method else {}
        options = {**base, **explicit}
        build_config(method, options)
        return options
    if model_meta.get("method") != method:
        raise JobConflict(
            f"the model in service was trained with method '{model_meta.get('method')}'; later tasks must "
            f"use the same method (got '{method}')"
        )
    saved = dict(model_meta.get("method_config") or {})
    fixed = sorted(
        k for k, v in explicit.items() if k not in ADJUSTABLE_OPTIONS and _norm(saved.get(k)) != _norm(v)
    )
    if fixed:
        raise JobConflict(
            f"option(s) {fixed} are fixed once the first task is learned (the model has "
            f"{ {k: saved.get(k) for k in fixed} }); only {sorted(ADJUSTABLE_OPTIONS)} may change"
        )
    options = {**saved, **{k: v for k, v in explicit.items() if k in ADJUSTABLE_OPTIONS}}
    build_config(method, options)
    return options


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train_count(task: TaskRecord) -> int:
    """Training images of a task (all images when none are held out)."""
    n = sum(1 for _, _, split in task.manifest if split == "train")
    return n or task.num_images


def build_stream(
    store: Store, tasks: Sequence[TaskRecord], img_size: int, mean: Sequence[float], std: Sequence[float]
) -> TaskStream:
    """A class-incremental stream over stored tasks: global class ids follow task order; each task's held-out
    images are its test set (its training images when it has none)."""
    from edgecl.data.stream import ImageListDataset, Task, TaskStream
    from edgecl.data.transforms import build_transforms

    train_tf, eval_tf = build_transforms(img_size, mean, std)
    out: list[Task] = []
    order: list[str] = []
    for i, task in enumerate(tasks):
        root = store.task_path(task)
        offset = len(order)
        train = [(str(root / rel), offset + c) for rel, c, split in task.manifest if split == "train"]
        test = [(str(root / rel), offset + c) for rel, c, split in task.manifest if split == "eval"]
        train = train or list(test)
        train_ds = ImageListDataset(train, train_tf)
        out.append(
            Task(
                i,
                list(range(offset, offset + len(task.classes))),
                list(task.classes),
                train_ds,
                train_ds.with_transform(eval_tf),
                ImageListDataset(test or train, eval_tf),
            )
        )
        order += task.classes
    return TaskStream(
        out, order, source=f"edgecl-store:{store.root}", info={"task_ids": [t.id for t in tasks]}
    )


class _Guarded(Callback):
    """Runs another callback's hooks, logging (once per hook) instead of raising: a telemetry failure must not
    stop training. Cancellation and shutdown still propagate from the trainer itself."""

    def __init__(self, inner: Callback) -> None:
        self.inner = inner
        self._failed: set[str] = set()

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            inner = object.__getattribute__(self, "inner")
            failed = object.__getattribute__(self, "_failed")

            def call(*args: Any, **kwargs: Any) -> None:
                try:
                    getattr(inner, name)(*args, **kwargs)
                except Exception as err:
                    if name not in failed:
                        failed.add(name)
                        log.warning("%s.%s failed (ignored): %s", type(inner).__name__, name, err)

            return call
        return object.__getattribute__(self, name)


class JobProgress(Callback):
    """Tracks a job across its tasks for status, ETA and metrics; persists a snapshot after every epoch."""

    def __init__(self, store: Store, job: JobRecord, steps_per_epoch: dict[int, int], epochs: int) -> None:
        self.store = store
        self.job_id = job.id
        self.task_ids = list(job.task_ids)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.total_steps = sum(steps_per_epoch.values()) * epochs
        self._lock = threading.Lock()
        self.finished_steps = 0
        self.task_id: int | None = None
        self.position = 0
        self.phase: str | None = None
        self.epoch = 0
        self.epochs_done = 0
        self.step = 0
        self.loss: float | None = None
        self.train_time = 0.0
        self.steps_run = 0
        self.stage = "starting"
        self._t_last: float | None = None

    # ---- driven by the worker ----------------------------------------------------------------
    def task_skipped(self, task_id: int) -> None:
        """A task of the job that was already learned (before a restart)."""
        with self._lock:
            self.finished_steps += self.steps_per_epoch.get(task_id, 0) * self.epochs

    def begin_task(self, task_id: int, position: int, epochs_done: int) -> None:
        """Training of ``task_id`` starts (or resumes after ``epochs_done`` epochs)."""
        with self._lock:
            self.task_id, self.position = task_id, position
            self.epoch = self.epochs_done = epochs_done
            self.step = 0
            self.stage = "training"

    def end_task(self) -> None:
        """The task was committed."""
        with self._lock:
            if self.task_id is not None:
                self.finished_steps += self.steps_per_epoch.get(self.task_id, 0) * self.epochs
            self.epochs_done = self.epochs
            self.step = 0
            self.stage = "committed"
        self.persist()

    # ---- trainer hooks -----------------------------------------------------------------------
    def on_phase_start(self, trainer: Trainer, task: int, phase: Phase) -> None:
        """Remember the phase (joint, sparse, head)."""
        self.phase = str(getattr(phase, "value", phase))

    def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
        """Start timing the epoch's steps."""
        with self._lock:
            self.epoch, self.step = epoch, 0
            self._t_last = time.perf_counter()

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        """Count the step and its duration."""
        now = time.perf_counter()
        with self._lock:
            if self._t_last is not None:
                self.train_time += now - self._t_last
            self._t_last = now
            self.step, self.loss = step, loss
            self.steps_run += 1

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
        """The epoch's checkpoint is committed: persist progress."""
        with self._lock:
            self.epochs_done = epoch + 1
            self.step = 0
            self._t_last = None
        self.persist()

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        """Training of the task is over; evaluation and the commit follow."""
        with self._lock:
            self.stage = "evaluating"

    # ---- queries -----------------------------------------------------------------------------
    def done_steps(self) -> int:
        """Optimizer steps of this job done so far (finished tasks and committed epochs included)."""
        spe = self.steps_per_epoch.get(self.task_id or -1, 0)
        current = 0 if self.stage == "committed" else self.epochs_done * spe + self.step
        return min(self.finished_steps + current, self.total_steps)

    def mean_step_time(self) -> float | None:
        """Seconds per optimizer step measured in this process (None before the first step)."""
        return self.train_time / self.steps_run if self.steps_run else None

    def snapshot(self) -> dict[str, Any]:
        """Status fields: task, phase, epoch (1-based), progress %, ETA, latest loss, step time."""
        with self._lock:
            done = self.done_steps()
            rate = self.mean_step_time()
            remaining = self.total_steps - done
            return {
                "stage": self.stage,
                "task_id": self.task_id,
                "task_position": self.position + 1,
                "tasks_in_job": len(self.task_ids),
                "phase": self.phase,
                "epoch": min(self.epoch + 1, self.epochs) if self.stage == "training" else self.epochs_done,
                "epochs": self.epochs,
                "epochs_done": self.epochs_done,
                "step": self.step,
                "steps_in_epoch": self.steps_per_epoch.get(self.task_id or -1, 0),
                "steps_done": done,
                "steps_total": self.total_steps,
                "progress": round(100.0 * done / self.total_steps, 2) if self.total_steps else 0.0,
                "eta_s": round(remaining * rate, 1) if rate is not None else None,
                "loss": self.loss,
                "step_time_s": round(rate, 5) if rate is not None else None,
                "updated_at": time.time(),
            }

    def persist(self) -> None:
        """Write the snapshot to the store (read by status after a restart)."""
        try:
            self.store.update_progress(self.job_id, self.snapshot())
        except Exception as err:  # progress is informative; never stop training over it
            log.warning("could not persist progress of job %s: %s", self.job_id, err)


@dataclasses.dataclass
class _Running:
    """The job the worker is running now."""

    job_id: int
    progress: JobProgress
    trainer: Trainer | None = None
    telemetry: Any = None
    cancelled: bool = False


class Worker:
    """One thread: initialise the backbone and the predictor, then run jobs in order forever."""

    def __init__(self, settings: ServeSettings, store: Store, holder: ModelHolder) -> None:
        self.settings = settings
        self.store = store
        self.holder = holder
        self.backbone: FrozenViT | None = None
        self.ready = threading.Event()
        self.init_error: str | None = None
        self.predictor_error: str | None = None
        self.telemetry_backends: list[dict[str, Any]] | None = None
        self.last_step_time: float | None = None
        self._thread = threading.Thread(target=self._main, name="edgecl-worker", daemon=True)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._current: _Running | None = None
        self._telemetry_module: ModuleType | None = None

    # ---- control (any thread) ----------------------------------------------------------------
    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the running job at the next step boundary (it stays ``running`` and resumes on the next
        start) and end the thread."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self._current is not None and self._current.trainer is not None:
                self._current.trainer.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the training worker did not stop within %.0f s", timeout)

    def cancel(self, job_id: int) -> None:
        """Stop job ``job_id`` at the next step boundary if it is running here."""
        with self._lock:
            cur = self._current
            if cur is None or cur.job_id != job_id:
                return
            cur.cancelled = True
            if cur.trainer is not None:
                cur.trainer.request_stop()

    @property
    def telemetry_available(self) -> bool:
        """Whether :mod:`edgecl.telemetry` meters the jobs."""
        return self._telemetry_module is not None

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    def live(self, job_id: int) -> dict[str, Any] | None:
        """Live progress and telemetry of ``job_id`` when it is the running job."""
        with self._lock:
            cur = self._current
        if cur is None or cur.job_id != job_id:
            return None
        out = cur.progress.snapshot()
        out["telemetry"] = self._latest(cur)
        return out

    def current(self) -> tuple[int, dict[str, Any]] | None:
        """(job id, live progress) of the running job, or None when idle."""
        with self._lock:
            cur = self._current
        if cur is None:
            return None
        out = cur.progress.snapshot()
        out["telemetry"] = self._latest(cur)
        return cur.job_id, out

    @staticmethod
    def _latest(cur: _Running) -> dict[str, Any] | None:
        tele = cur.telemetry
        if tele is None:
            return None
        try:
            return tele.latest()  # type: ignore[no-any-return]
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"}

    # ---- thread ------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._initialize()
        except Exception as err:
            log.exception("initialisation failed")
            self.init_error = f"{type(err).__name__}: {err}"
            return
        self.ready.set()
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                job = self.store.next_job()
            except Exception:
                log.exception("cannot read the job queue")
                job = None
            if job is None:
                self._wake.wait(2.0)
                continue
            self._run_job(job)

    def _initialize(self) -> None:
        import torch

        from edgecl.backbone import load_backbone

        prof = self.settings.profile
        if prof.threads:
            torch.set_num_threads(int(prof.threads))
        device = self.settings.device
        t0 = time.perf_counter()
        if prof.weights is None:
            log.warning("random backbone (no weights, --allow-random-backbone): for tests only")
            torch.manual_seed(self.settings.backbone_seed)  # the same random ViT on every start
        self.backbone = load_backbone(
            prof.backbone, weights=prof.weights, img_size=prof.img_size, patch_size=prof.patch_size
        ).to(device)
        log.info("backbone %s loaded on %s in %.1f s", prof.backbone, device, time.perf_counter() - t0)
        meta = read_checkpoint_meta(self.store.model_dir)
        if meta is not None:
            self._check_backbone(meta)
            self._reconcile(meta)
            self._swap_model()
        self._telemetry_module = optional_telemetry()
        if self._telemetry_module is not None:
            try:
                self.telemetry_backends = self._telemetry_module.describe_backends()
            except Exception as err:
                log.warning("telemetry backends could not be described: %s", err)

    def _check_backbone(self, meta: dict[str, Any]) -> None:
        assert self.backbone is not None
        saved, now = meta.get("backbone") or {}, self.backbone.spec  # type: ignore[attr-defined]
        diff = [k for k in ("name", "img_size", "patch_size") if saved.get(k) != now.get(k)]
        if (saved.get("weights") is None) != (now.get("weights") is None):
            diff.append("weights")
        if diff:
            raise RuntimeError(
                f"the model in {self.store.model_dir} was trained on backbone "
                f"{ {k: saved.get(k) for k in diff} } but this profile loads "
                f"{ {k: now.get(k) for k in diff} }; serve with the same backbone settings and weights, "
                "or use a new --data-dir"
            )
        if saved.get("weights") and now.get("weights") and saved["weights"] != now["weights"]:
            log.warning(
                "the model was trained with weights %s; now using %s", saved["weights"], now["weights"]
            )

    def _reconcile(self, meta: dict[str, Any]) -> None:
        """Mark tasks learned that the committed model holds but the database does not (a crash between the
        model commit and the row update)."""
        learned = self.store.learned_tasks()
        db_classes = [c for t in learned for c in t.classes]
        model_classes = list(meta.get("classes_learned") or [])
        if model_classes == db_classes:
            return
        if model_classes[: len(db_classes)] != db_classes:
            raise RuntimeError(
                f"the model in {self.store.model_dir} holds classes {model_classes[:8]}... which do not "
                f"match the learned tasks in {self.store.db_path}; restore the data dir from a backup or use "
                "a new one"
            )
        extra = model_classes[len(db_classes) :]
        records = list(meta.get("records") or [])
        job = self.store.next_job()
        in_job = list(job.task_ids) if job is not None and job.status == "running" else []
        pending = [t.id for t in self.store.list_tasks() if t.status == "pending" and t.id not in in_job]
        for tid in in_job + pending:
            task = self.store.get_task(tid)
            if (
                not extra
                or task is None
                or task.status == "learned"
                or extra[: len(task.classes)] != task.classes
            ):
                continue
            seq = len(self.store.learned_tasks())
            job_id = job.id if job is not None and tid in in_job else None
            self.store.mark_learned(tid, job_id, records[seq] if seq < len(records) else None)
            log.warning("task %s was committed to the model before a crash; marked learned", tid)
            extra = extra[len(task.classes) :]
        if extra:
            log.error("the committed model has classes no task accounts for: %s", extra[:8])

    def _swap_model(self) -> None:
        """Load the committed model for the profile's engine and put it in service (torch as a fallback when
        the ONNX export fails, so predictions never lag behind the committed model)."""
        from edgecl.serve.predictor import build_predictor

        assert self.backbone is not None
        engine = self.settings.profile.inference_engine
        errors = []
        for candidate in dict.fromkeys([engine, "torch"]):
            try:
                predictor = build_predictor(
                    candidate,
                    self.store.model_dir,
                    self.backbone,
                    self.settings.device,
                    self.store.root / "onnx",
                )
            except Exception as err:
                log.exception("the committed model could not be loaded with %s", candidate)
                errors.append(f"{candidate}: {type(err).__name__}: {err}")
                continue
            self.predictor_error = "; ".join(errors) or None
            self.holder.swap(predictor)
            log.info(
                "model version %d in service (%d classes, %s)",
                predictor.version,
                len(predictor.class_names),
                predictor.engine,
            )
            return
        self.predictor_error = "; ".join(errors)

    # ---- jobs --------------------------------------------------------------------------------
    def _run_job(self, job: JobRecord) -> None:
        from edgecl.train.trainer import TrainingCancelled

        if job.cancel_requested:  # cancelled while the daemon was down
            self.store.finish_job(job.id, "cancelled")
            self.store.remove_job_files(job.id)
            return
        restarted = job.status == "running"
        tasks = {tid: self.store.get_task(tid) for tid in job.task_ids}
        resume = None
        if restarted:
            at = {
                "learned": sum(1 for t in tasks.values() if t is not None and t.status == "learned"),
                "task_id": (job.progress or {}).get("task_id"),
                "epochs_done": (job.progress or {}).get("epochs_done", 0),
            }
            previous = [r.get("at") for r in job.resumes[-STALLED_RESTARTS:]]
            if len(previous) == STALLED_RESTARTS and all(p == at for p in previous):
                reason = (
                    f"the daemon stopped {STALLED_RESTARTS + 1} times at the same point of this job ({at}) "
                    "without progress, e.g. a crash in native code: see the service log; not resumed again"
                )
                log.error("job %s failed: %s", job.id, reason)
                self.store.finish_job(job.id, "failed", reason)
                self.store.remove_job_files(job.id)
                return
            resume = {"restarted_at": time.time(), "at": at}
        self.store.start_job(job.id, resume=resume)
        batch = int(job.options["batch_size"])
        spe = {tid: math.ceil(train_count(t) / batch) for tid, t in tasks.items() if t is not None}
        progress = JobProgress(self.store, job, spe, int(job.options["epochs"]))
        running = _Running(job.id, progress)
        with self._lock:
            self._current = running
        results: dict[str, Any] = dict(job.results or {})
        results.setdefault("tasks", [])
        status: str = "done"
        error: str | None = None
        log.info("job %s %s: tasks %s", job.id, "resumes" if restarted else "starts", job.task_ids)
        try:
            for position, tid in enumerate(job.task_ids):
                if self._stopping.is_set():
                    return
                meta = read_checkpoint_meta(self.store.model_dir)
                if meta is not None and int(meta["task"]) + 1 != len(self.store.learned_tasks()):
                    self._reconcile(meta)  # the model was committed but the row update was lost
                task = self.store.get_task(tid)
                if task is None:
                    raise RuntimeError(f"task {tid} no longer exists")
                if task.status == "learned":
                    progress.task_skipped(tid)
                    continue
                if running.cancelled or self._cancel_flag(job.id):
                    raise TrainingCancelled(f"cancelled before task {tid}")
                results["tasks"].append(self._train_task(job, task, position, running))
                self.store.update_results(job.id, results)
        except TrainingCancelled:
            if self._stopping.is_set() and not running.cancelled:
                log.info(
                    "job %s stopped by shutdown; it resumes from its checkpoint on the next start", job.id
                )
                return
            status = "cancelled"
        except Exception as err:
            log.exception("job %s failed", job.id)
            status, error = "failed", f"{type(err).__name__}: {err}"
        finally:
            self.last_step_time = progress.mean_step_time() or self.last_step_time
            with self._lock:
                self._current = None
        if status == "done":
            progress.stage = "done"
        progress.persist()
        self.store.finish_job(job.id, status, error, results)
        self.store.remove_job_files(job.id)
        log.info("job %s %s%s", job.id, status, f": {error}" if error else "")

    def _cancel_flag(self, job_id: int) -> bool:
        job = self.store.get_job(job_id)
        return bool(job and job.cancel_requested)

    def _train_task(
        self, job: JobRecord, task: TaskRecord, position: int, running: _Running
    ) -> dict[str, Any]:
        from edgecl.methods.registry import create_method
        from edgecl.train.trainer import TrainConfig, Trainer

        assert self.backbone is not None
        info = self.backbone.info
        model_meta = read_checkpoint_meta(self.store.model_dir)
        learned = self.store.learned_tasks()
        stream = build_stream(self.store, [*learned, task], info.img_size, info.mean, info.std)
        if model_meta is not None and int(model_meta["task"]) + 1 != len(learned):
            raise RuntimeError(
                f"the committed model has {int(model_meta['task']) + 1} tasks but the store lists "
                f"{len(learned)} learned; restart the daemon to reconcile"
            )
        if model_meta is None and learned:
            raise RuntimeError(f"{len(learned)} tasks are learned but {self.store.model_dir} holds no model")
        options = resolve_method_options(
            job.method, self.settings.profile, dict(job.options.get("method_options") or {}), model_meta
        )
        ckpt_dir = self.store.job_checkpoint_dir(job.id)
        resume_from: Path | None = self.store.model_dir if model_meta is not None else None
        epochs_done = 0
        saved = read_checkpoint_meta(ckpt_dir)
        if (
            saved is not None
            and not saved.get("task_complete")
            and saved.get("class_order") == stream.class_order
            and int(saved.get("task", -1)) == len(learned)
            and saved.get("method") == job.method
        ):
            resume_from, epochs_done = ckpt_dir, int(saved.get("epochs_done", 0))
            self.store.note_resume(job.id, {"task_id": task.id, "epoch": epochs_done})
            log.info("job %s: task %s resumes after epoch %d", job.id, task.id, epochs_done)
        method = create_method(job.method, self.backbone, options)
        opts = job.options
        config = TrainConfig(
            epochs=int(opts["epochs"]),
            batch_size=int(opts["batch_size"]),
            micro_batch_size=opts.get("micro_batch_size"),
            seed=int(opts.get("seed", 0)),
            eval_batch_size=int(getattr(self.settings.profile, "eval_batch_size", 64)),
            device=self.settings.device,
            precision=str(opts.get("precision", "fp32")),
            checkpoint_dir=str(ckpt_dir),
            model_dir=str(self.store.model_dir),
        )
        callbacks: list[Callback] = [running.progress]
        plan = self._plan_budget(method, config, stream)
        if plan is not None:
            guard, plan_summary = plan
            callbacks.append(guard)
        telemetry = self._telemetry_callback()
        if telemetry is not None:
            callbacks.append(_Guarded(telemetry))
        trainer = Trainer(method, stream, config, callbacks)
        with self._lock:
            running.trainer, running.telemetry = trainer, telemetry
            if running.cancelled or self._stopping.is_set():
                trainer.request_stop()
        running.progress.begin_task(task.id, position, epochs_done)
        trainer.fit(resume_from=resume_from)
        record = trainer.records[-1]
        self.store.mark_learned(task.id, job.id, record)
        running.progress.end_task()
        self._swap_model()
        return {
            "task_id": task.id,
            "classes": record.get("classes"),
            "accuracy": record.get("accuracy"),
            "average_accuracy": record.get("average_accuracy"),
            "train_seconds": record.get("train_seconds"),
            "peak_memory_mb": record.get("peak_memory_mb"),
            "energy_j": ((record.get("telemetry") or {}).get("task") or {}).get("energy_j"),
            "telemetry": record.get("telemetry"),
            "resumed_after_epoch": epochs_done or None,
            "memory_plan": plan[1] if plan is not None else None,
            "memory_budget": record.get("memory_budget"),
        }

    def _plan_budget(
        self, method: Any, config: Any, stream: TaskStream
    ) -> tuple[Callback, dict[str, Any]] | None:
        """Fit the task into the profile's memory budget with :mod:`edgecl.budget` (micro-batch, reduction
        rate, precision; applied to ``config`` and ``method``) and return its guard; None without a budget.
        ``BudgetError`` (nothing fits: it names the smallest workable budget) fails the job."""
        prof = self.settings.profile
        if prof.memory_budget_mb is None:
            return None
        try:
            budget = importlib.import_module("edgecl.budget")
        except ImportError as err:
            log.warning(
                "no memory planner (%s): training without enforcing the %s MB budget",
                err,
                prof.memory_budget_mb,
            )
            return None
        task = stream.tasks[-1]
        plan = budget.Planner(method, config, prof, stream=stream, task_index=task.index).plan()
        plan.apply(config, method)
        summary = {
            k: getattr(plan, k, None)
            for k in (
                "budget_mb",
                "memory_scope",
                "micro_batch_size",
                "accumulation_steps",
                "reduction_rate",
                "precision",
                "eval_batch_size",
                "predicted_peak_mb",
                "idle_baseline_mb",
                "planning_seconds",
            )
        }
        log.info("memory plan for task %d: %s", task.index, summary)
        return budget.BudgetGuard(plan), summary

    def _telemetry_callback(self) -> Callback | None:
        mod = self._telemetry_module
        if mod is None:
            return None
        prof = self.settings.profile
        try:
            if prof.telemetry_backends:
                backends = mod.detect_backends(list(prof.telemetry_backends))
                return mod.TelemetryCallback(backends=backends, period_s=prof.sampler_period_s)  # type: ignore
            return mod.TelemetryCallback(period_s=prof.sampler_period_s)  # type: ignore[no-any-return]
        except Exception as err:
            log.warning("telemetry disabled for this task: %s", err)
            return None
