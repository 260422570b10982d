"""The training worker: one thread that runs queued jobs in order, each task through :mod:`edgecl.runner`.

A job trains its tasks one at a time. For each task the worker builds a :class:`TaskStream` over the store
(every task already learned, in learning order, plus this one) and a :class:`~edgecl.runner.RunSpec` from the
profile and the job, and hands both, with its loaded backbone and its progress callback, to
:func:`~edgecl.runner.prepare_run`: the method, callbacks (telemetry, task identification, budget guard) and
memory plan are assembled exactly as for ``edgecl train``. The run resumes from

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
import logging
import math
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgecl.serve.options import read_checkpoint_meta, resolve_method_options, train_count
from edgecl.serve.progress import JobProgress
from edgecl.serve.stream import build_stream
from edgecl.store import JobRecord, Store, TaskRecord

if TYPE_CHECKING:
    from edgecl.backbone import FrozenViT
    from edgecl.runner import RunSpec
    from edgecl.serve.config import ServeSettings
    from edgecl.serve.predictor import ModelHolder
    from edgecl.train.trainer import Trainer

__all__ = ["STALLED_RESTARTS", "Worker", "optional_telemetry"]

log = logging.getLogger("edgecl.serve")

STALLED_RESTARTS = 2
"""A job whose last this-many restarts (plus the first run) all ended at the same point fails instead."""


def optional_telemetry() -> ModuleType | None:
    """:mod:`edgecl.telemetry` when installed (it meters training); None otherwise."""
    try:
        return importlib.import_module("edgecl.telemetry")
    except ImportError as err:
        log.warning("telemetry unavailable (%s): jobs run without meters", err)
        return None


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
        """Train ``task`` on top of the committed model through :func:`edgecl.runner.prepare_run` (the
        assembly of ``edgecl train``), with the job's progress as the daemon's own callback."""
        from edgecl.runner import prepare_run

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
        spec = self.run_spec(job, options, ckpt_dir, resume_from)
        run = prepare_run(
            spec, [running.progress], backbone=self.backbone, stream=stream, profile=self.settings.profile
        )
        if run.plan is not None:
            log.info("memory plan for task %d: %s", len(learned), run.plan.to_dict())
        with self._lock:
            running.trainer, running.telemetry = run.trainer, run.telemetry
            if running.cancelled or self._stopping.is_set():
                run.trainer.request_stop()
        running.progress.begin_task(task.id, position, epochs_done)
        results = run.fit()
        record = run.trainer.records[-1]
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
            "memory_plan": results.get("memory_plan"),
            "memory_budget": record.get("memory_budget"),
        }

    def run_spec(
        self, job: JobRecord, method_options: dict[str, Any], checkpoint_dir: Path, resume: Path | None
    ) -> RunSpec:
        """The :class:`~edgecl.runner.RunSpec` of one task of ``job``: the profile's backbone, schedule,
        telemetry and budget, the job's options, the store's model and checkpoint folders."""
        from edgecl.runner import RunSpec

        prof, opts = self.settings.profile, job.options
        return RunSpec(
            method=job.method,
            method_options=dict(method_options),
            data=f"edgecl-store:{self.store.root}",
            tasks=len(self.store.learned_tasks()) + 1,
            backbone=prof.backbone,
            weights=prof.weights,
            img_size=prof.img_size,
            patch_size=prof.patch_size,
            epochs=int(opts["epochs"]),
            batch_size=int(opts["batch_size"]),
            micro_batch_size=opts.get("micro_batch_size"),
            seed=int(opts.get("seed", 0)),
            device=self.settings.device,
            precision=str(opts.get("precision", "fp32")),
            threads=prof.threads,
            eval_batch_size=prof.eval_batch_size,
            checkpoint_dir=str(checkpoint_dir),
            model_dir=str(self.store.model_dir),
            resume=str(resume) if resume is not None else None,
            sampler_period_s=prof.sampler_period_s,
            telemetry_backends=list(prof.telemetry_backends),
            telemetry=self._telemetry_module is not None,
            memory_budget_mb=prof.memory_budget_mb,
            profile=prof.source or None,
        )
