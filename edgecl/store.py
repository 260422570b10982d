"""The daemon's durable state: one SQLite database (WAL) plus files, all under the data dir.

Layout of ``DATA_DIR``::

    edgecl.db                 # tasks, their classes, jobs (SQLite, WAL journal)
    staging/<random>/         # uploads being validated; emptied on every start
    tasks/<random>/           # one task's images: c000/000000.jpg ... + manifest.json
    model/                    # the last committed model (the trainer's model_dir)
    jobs/<id>/checkpoint/     # a running job's resumable per-epoch checkpoint
    token                     # bearer token, created 0600 when no other token is configured

Folders are 0750 and the database files 0640 at most, whatever the umask (``edgecl serve`` also adds 0027
to its umask, which covers the files the trainer and the upload path write).

Every write that spans files and rows commits the row last: a task folder is moved from ``staging/`` into
``tasks/`` inside the transaction that inserts its row, so a crash leaves either a committed task or an
orphan folder that :meth:`Store.recover` deletes on the next start. This module knows nothing of torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_STATUSES",
    "ClassConflict",
    "JobRecord",
    "Store",
    "StoreError",
    "TaskRecord",
]

log = logging.getLogger("edgecl.serve")

SCHEMA_VERSION = 1
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    dir TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    classes TEXT NOT NULL,
    counts TEXT NOT NULL,
    eval_counts TEXT NOT NULL,
    manifest TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'learned')),
    learned_seq INTEGER UNIQUE,
    learned_at REAL,
    learned_by_job INTEGER,
    record TEXT
);
CREATE TABLE IF NOT EXISTS task_classes (
    name TEXT NOT NULL,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    PRIMARY KEY (name, task_id)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    method TEXT NOT NULL,
    task_ids TEXT NOT NULL,
    options TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    progress TEXT,
    resumes TEXT NOT NULL DEFAULT '[]',
    results TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""


class StoreError(RuntimeError):
    """A request the store refuses; ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 409, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.details = details


class ClassConflict(StoreError):
    """An upload names classes that an earlier task already has."""


def _loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


@dataclass
class TaskRecord:
    """One stored task (a row of ``tasks``)."""

    id: int
    name: str
    dir: str
    created_at: float
    classes: list[str]
    counts: dict[str, int]
    eval_counts: dict[str, int]
    manifest: list[tuple[str, int, str]]
    num_images: int
    status: str
    learned_seq: int | None
    learned_at: float | None
    learned_by_job: int | None
    record: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TaskRecord:
        """Decode a database row."""
        return cls(
            id=row["id"],
            name=row["name"],
            dir=row["dir"],
            created_at=row["created_at"],
            classes=json.loads(row["classes"]),
            counts=json.loads(row["counts"]),
            eval_counts=json.loads(row["eval_counts"]),
            manifest=[tuple(m) for m in json.loads(row["manifest"])],  # type: ignore[misc]
            num_images=row["num_images"],
            status=row["status"],
            learned_seq=row["learned_seq"],
            learned_at=row["learned_at"],
            learned_by_job=row["learned_by_job"],
            record=_loads(row["record"]),
        )


@dataclass
class JobRecord:
    """One training job (a row of ``jobs``)."""

    id: int
    status: str
    method: str
    task_ids: list[int]
    options: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    progress: dict[str, Any] | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        """Decode a database row."""
        return cls(
            id=row["id"],
            status=row["status"],
            method=row["method"],
            task_ids=json.loads(row["task_ids"]),
            options=json.loads(row["options"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            cancel_requested=bool(row["cancel_requested"]),
            error=row["error"],
            progress=_loads(row["progress"]),
            resumes=json.loads(row["resumes"]),
            results=_loads(row["results"]),
        )


DIR_MODE = 0o750
"""Mode of the data dir and its folders: the service user (and its group) only."""
FILE_MODE = 0o640
"""Mode of the database and its WAL/SHM files."""


def _restrict(path: Path, mode: int) -> None:
    """Take group-write and all other-user permissions off ``path`` (whatever the umask made it)."""
    try:
        current = path.stat().st_mode & 0o7777
        if current & ~mode:
            os.chmod(path, current & mode)
    except FileNotFoundError:
        return
    except PermissionError as err:  # not ours (e.g. a root-owned dir the service may write to)
        log.warning("cannot restrict %s to %04o: %s", path, mode, err)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Store:
    """The data dir: paths, schema, and the transactions the daemon needs."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.db_path = self.root / "edgecl.db"
        self.staging_dir = self.root / "staging"
        self.tasks_dir = self.root / "tasks"
        self.model_dir = self.root / "model"
        self.jobs_dir = self.root / "jobs"
        self.token_path = self.root / "token"
        for d in (self.root, self.staging_dir, self.tasks_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            _restrict(d, DIR_MODE)
        fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT, FILE_MODE)  # SQLite gives -wal/-shm its mode
        os.close(fd)
        for suffix in ("", "-wal", "-shm"):
            _restrict(self.db_path.with_name(self.db_path.name + suffix), FILE_MODE)
        with self.connect() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"SQLite refused WAL mode for {self.db_path} (got {mode})", status=500)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path} was written by a newer edgecl (schema {version} > {SCHEMA_VERSION})", 500
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---- connections -------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one unit of work (autocommit mode; use :meth:`transaction` to write)."""
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on an exception): one writer at a time."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- files -------------------------------------------------------------------------------
    def new_staging_dir(self) -> Path:
        """An empty folder under ``staging/`` for one upload."""
        path = self.staging_dir / uuid.uuid4().hex
        path.mkdir()
        return path

    def task_path(self, task: TaskRecord) -> Path:
        """The folder holding ``task``'s images."""
        return self.tasks_dir / task.dir

    def job_checkpoint_dir(self, job_id: int) -> Path:
        """Where job ``job_id`` keeps its resumable per-epoch checkpoint."""
        return self.jobs_dir / str(job_id) / "checkpoint"

    def remove_job_files(self, job_id: int) -> None:
        """Delete a finished job's checkpoint folder."""
        shutil.rmtree(self.jobs_dir / str(job_id), ignore_errors=True)

    def recover(self) -> dict[str, list[str]]:
        """Delete leftovers of interrupted uploads: staging folders and task folders without a row."""
        removed: dict[str, list[str]] = {"staging": [], "orphan_tasks": []}
        for child in self.staging_dir.iterdir():
            _remove(child)
            removed["staging"].append(child.name)
        with self.connect() as conn:
            known = {r[0] for r in conn.execute("SELECT dir FROM tasks")}
        for child in self.tasks_dir.iterdir():
            if child.name not in known:
                _remove(child)
                removed["orphan_tasks"].append(child.name)
        return removed

    # ---- tasks -------------------------------------------------------------------------------
    def add_task(
        self,
        staging: Path,
        *,
        name: str,
        classes: Sequence[str],
        counts: dict[str, int],
        eval_counts: dict[str, int],
        manifest: Sequence[tuple[str, int, str]],
        allow_known_classes: bool = False,
        auto_job: dict[str, Any] | None = None,
    ) -> tuple[TaskRecord, int | None]:
        """Move ``staging`` into ``tasks/`` and commit its row (last); returns the task and the auto job id.

        Raises :class:`ClassConflict` (nothing stored) when a class already belongs to another task and
        ``allow_known_classes`` is false. ``auto_job`` (``method`` and ``options``) also queues a job
        training this task, in the same transaction.
        """
        dirname = uuid.uuid4().hex
        final = self.tasks_dir / dirname
        meta = {
            "name": name,
            "classes": list(classes),
            "counts": counts,
            "eval_counts": eval_counts,
            "manifest": [list(m) for m in manifest],
        }
        (staging / "manifest.json").write_text(json.dumps(meta, indent=1))
        moved = False
        try:
            with self.transaction() as conn:
                if not allow_known_classes:
                    self._check_classes(conn, classes)
                os.replace(staging, final)
                moved = True
                _fsync_dir(self.tasks_dir)
                cur = conn.execute(
                    "INSERT INTO tasks (name, dir, created_at, classes, counts, eval_counts, manifest, "
                    "num_images) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        dirname,
                        time.time(),
                        json.dumps(list(classes)),
                        json.dumps(counts),
                        json.dumps(eval_counts),
                        json.dumps([list(m) for m in manifest]),
                        len(manifest),
                    ),
                )
                task_id = int(cur.lastrowid or 0)
                conn.executemany(
                    "INSERT OR IGNORE INTO task_classes (name, task_id) VALUES (?, ?)",
                    [(c, task_id) for c in classes],
                )
                job_id = None
                if auto_job is not None:
                    job_id = self._insert_job(
                        conn, auto_job["method"], [task_id], auto_job.get("options", {})
                    )
        except BaseException:
            if moved:
                shutil.rmtree(final, ignore_errors=True)
            raise
        task = self.get_task(task_id)
        assert task is not None
        return task, job_id

    def _check_classes(self, conn: sqlite3.Connection, classes: Sequence[str]) -> None:
        marks = ",".join("?" * len(classes))
        rows = conn.execute(
            f"SELECT tc.name, t.id, t.status FROM task_classes tc JOIN tasks t ON t.id = tc.task_id "
            f"WHERE tc.name IN ({marks}) ORDER BY t.id",
            list(classes),
        ).fetchall()
        if rows:
            details = [
                {"member": r["name"], "reason": f"class already in task {r['id']} ({r['status']})"}
                for r in rows
            ]
            names = sorted({r["name"] for r in rows})
            raise ClassConflict(
                f"class(es) {names} already belong to an earlier task; class-incremental learning takes new "
                "classes only (start the server with --allow-known-classes to accept them anyway)",
                409,
                details,
            )

    def get_task(self, task_id: int) -> TaskRecord | None:
        """The task with this id, or None."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return TaskRecord.from_row(row) if row else None

    def list_tasks(self) -> list[TaskRecord]:
        """All tasks by id."""
        with self.connect() as conn:
            return [TaskRecord.from_row(r) for r in conn.execute("SELECT * FROM tasks ORDER BY id")]

    def learned_tasks(self) -> list[TaskRecord]:
        """Tasks in the committed model, in the order they were learned."""
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT * FROM tasks WHERE status = 'learned' ORDER BY learned_seq"
            ).fetchall()
        return [TaskRecord.from_row(r) for r in rows]

    def mark_learned(self, task_id: int, job_id: int | None, record: dict[str, Any] | None) -> int:
        """Record that ``task_id`` is now part of the committed model; returns its learning position."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status, learned_seq FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise StoreError(f"task {task_id} does not exist", 404)
            if row["status"] == "learned":
                return int(row["learned_seq"])
            seq = conn.execute("SELECT COALESCE(MAX(learned_seq), -1) + 1 FROM tasks").fetchone()[0]
            conn.execute(
                "UPDATE tasks SET status = 'learned', learned_seq = ?, learned_at = ?, learned_by_job = ?, "
                "record = ? WHERE id = ?",
                (seq, time.time(), job_id, json.dumps(record, default=str) if record else None, task_id),
            )
            return int(seq)

    def image_count(self) -> int:
        """Images stored over all tasks."""
        with self.connect() as conn:
            return int(conn.execute("SELECT COALESCE(SUM(num_images), 0) FROM tasks").fetchone()[0])

    # ---- jobs --------------------------------------------------------------------------------
    def _active_task_ids(self, conn: sqlite3.Connection) -> dict[int, int]:
        out: dict[int, int] = {}
        for row in conn.execute("SELECT id, task_ids FROM jobs WHERE status IN ('queued', 'running')"):
            for tid in json.loads(row["task_ids"]):
                out[int(tid)] = int(row["id"])
        return out

    def _insert_job(
        self, conn: sqlite3.Connection, method: str, task_ids: list[int], options: dict[str, Any]
    ) -> int:
        cur = conn.execute(
            "INSERT INTO jobs (status, method, task_ids, options, created_at) VALUES ('queued', ?, ?, ?, ?)",
            (method, json.dumps(task_ids), json.dumps(options), time.time()),
        )
        return int(cur.lastrowid or 0)

    def create_job(self, method: str, task_ids: Sequence[int] | None, options: dict[str, Any]) -> JobRecord:
        """Queue a job over ``task_ids`` (default: every pending task not in a queued or running job).

        Raises :class:`StoreError` naming unknown (404), learned or already queued (409) tasks.
        """
        with self.transaction() as conn:
            active = self._active_task_ids(conn)
            pending = [
                int(r[0]) for r in conn.execute("SELECT id FROM tasks WHERE status = 'pending' ORDER BY id")
            ]
            if task_ids is None:
                ids = [t for t in pending if t not in active]
                if not ids:
                    raise StoreError("no pending tasks to train: upload a task first (POST /v1/tasks)", 409)
            else:
                ids = [int(t) for t in task_ids]
                if not ids:
                    raise StoreError("task_ids is empty", 422)
                if len(set(ids)) != len(ids):
                    raise StoreError("task_ids repeats a task", 422)
                marks = ",".join("?" * len(ids))
                rows = {
                    int(r["id"]): r["status"]
                    for r in conn.execute(f"SELECT id, status FROM tasks WHERE id IN ({marks})", ids)
                }
                missing = [t for t in ids if t not in rows]
                if missing:
                    raise StoreError(f"unknown task id(s) {missing}", 404)
                learned = [t for t in ids if rows[t] == "learned"]
                if learned:
                    raise StoreError(f"task(s) {learned} are already learned", 409)
                busy = {t: active[t] for t in ids if t in active}
                if busy:
                    raise StoreError(
                        "task(s) already in a queued or running job: "
                        + ", ".join(f"task {t} in job {j}" for t, j in busy.items()),
                        409,
                    )
            job_id = self._insert_job(conn, method, ids, options)
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: int) -> JobRecord | None:
        """The job with this id, or None."""
        with self.connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row else None

    def list_jobs(self, limit: int = 100) -> list[JobRecord]:
        """The latest ``limit`` jobs, newest first."""
        with self.connect() as conn:
            rows = conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [JobRecord.from_row(r) for r in rows]

    def next_job(self) -> JobRecord | None:
        """The job the worker should run: an interrupted running one first, else the oldest queued."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE status IN ('running', 'queued') "
                "ORDER BY CASE status WHEN 'running' THEN 0 ELSE 1 END, id LIMIT 1"
            ).fetchone()
        return JobRecord.from_row(row) if row else None

    def start_job(self, job_id: int, resume: dict[str, Any] | None = None) -> None:
        """Mark a job running (``resume`` appends to its list of resumes after a restart)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT resumes FROM jobs WHERE id = ?", (job_id,)).fetchone()
            resumes = json.loads(row["resumes"]) if row else []
            if resume is not None:
                resumes.append(resume)
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), resumes = ? "
                "WHERE id = ?",
                (time.time(), json.dumps(resumes), job_id),
            )

    def note_resume(self, job_id: int, entry: dict[str, Any]) -> None:
        """Merge details (e.g. the checkpoint epoch resumed from) into the job's latest resume entry."""
        with self.transaction() as conn:
            row = conn.execute("SELECT resumes FROM jobs WHERE id = ?", (job_id,)).fetchone()
            resumes = json.loads(row["resumes"]) if row else []
            if resumes:
                resumes[-1].update(entry)
            else:
                resumes.append(entry)
            conn.execute("UPDATE jobs SET resumes = ? WHERE id = ?", (json.dumps(resumes), job_id))

    def update_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        """Persist the job's latest progress snapshot."""
        with self.connect() as conn:
            conn.execute(
                "UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress, default=str), job_id)
            )

    def update_results(self, job_id: int, results: dict[str, Any]) -> None:
        """Persist the job's results so far (per-task records as tasks finish)."""
        with self.connect() as conn:
            conn.execute(
                "UPDATE jobs SET results = ? WHERE id = ?", (json.dumps(results, default=str), job_id)
            )

    def finish_job(
        self, job_id: int, status: str, error: str | None = None, results: dict[str, Any] | None = None
    ) -> None:
        """Set a final status (done, failed or cancelled)."""
        if status not in ("done", "failed", "cancelled"):
            raise ValueError(f"not a final job status: {status}")
        with self.connect() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, error = ?, results = COALESCE(?, results) "
                "WHERE id = ?",
                (status, time.time(), error, json.dumps(results, default=str) if results else None, job_id),
            )

    def request_cancel(self, job_id: int) -> JobRecord:
        """Cancel a queued job now, or flag a running one (the worker stops it at the next step)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} does not exist", 404)
            status = row["status"]
            if status == "queued":
                conn.execute(
                    "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_at = ? "
                    "WHERE id = ?",
                    (time.time(), job_id),
                )
            elif status == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise StoreError(f"job {job_id} is already {status}", 409)
        job = self.get_job(job_id)
        assert job is not None
        return job

    def job_counts(self) -> dict[str, int]:
        """Jobs per status (every status present, zero included)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts = dict.fromkeys(JOB_STATUSES, 0)
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts

    def task_counts(self) -> dict[str, int]:
        """Tasks per status (pending, learned)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
        counts = {"pending": 0, "learned": 0}
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts
