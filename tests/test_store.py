"""The daemon's SQLite store: WAL, all-or-nothing task commits, crash recovery, the job queue."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgecl.store import ClassConflict, Store, StoreError


def staged(store: Store, classes: list[str], per_class: int = 2) -> tuple[Path, dict[str, object]]:
    """A staging folder with fake image files, and the add_task arguments describing it."""
    staging = store.new_staging_dir()
    manifest = []
    for c, _name in enumerate(classes):
        for i in range(per_class):
            rel = f"c{c:03d}/{i:06d}.png"
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(b"png")
            manifest.append((rel, c, "eval" if i == 0 else "train"))
    return staging, {
        "classes": classes,
        "counts": dict.fromkeys(classes, per_class),
        "eval_counts": dict.fromkeys(classes, 1),
        "manifest": manifest,
    }


def add(store: Store, classes: list[str], **kwargs: object) -> int:
    staging, args = staged(store, classes)
    task, _ = store.add_task(staging, name="t", **args, **kwargs)  # type: ignore[arg-type]
    return task.id


def test_wal_and_layout(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    for d in (store.staging_dir, store.tasks_dir, store.jobs_dir):
        assert d.is_dir()
    Store(tmp_path / "data")  # reopening is idempotent


def test_add_task_moves_files_and_commits_the_row(tmp_path: Path) -> None:
    store = Store(tmp_path)
    staging, args = staged(store, ["cat", "dog"])
    task, job_id = store.add_task(staging, name="pets", **args)  # type: ignore[arg-type]
    assert job_id is None
    assert not staging.exists()
    folder = store.task_path(task)
    assert (folder / "manifest.json").is_file()
    assert all((folder / rel).is_file() for rel, _, _ in task.manifest)
    assert (task.name, task.classes, task.num_images, task.status) == ("pets", ["cat", "dog"], 4, "pending")
    assert [t.id for t in store.list_tasks()] == [task.id]


def test_known_classes_are_rejected_and_nothing_is_stored(tmp_path: Path) -> None:
    store = Store(tmp_path)
    add(store, ["cat", "dog"])
    staging, args = staged(store, ["dog", "fox"])
    with pytest.raises(ClassConflict) as err:
        store.add_task(staging, name="x", **args)  # type: ignore[arg-type]
    assert err.value.status == 409
    assert err.value.details == [{"member": "dog", "reason": "class already in task 1 (pending)"}]
    assert staging.is_dir()  # left to the caller, who deletes it
    assert len(store.list_tasks()) == 1
    assert len(list(store.tasks_dir.iterdir())) == 1
    task, _ = store.add_task(staging, name="x", allow_known_classes=True, **args)  # type: ignore[arg-type]
    assert task.classes == ["dog", "fox"]


def test_auto_job_is_queued_in_the_same_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path)
    staging, args = staged(store, ["a", "b"])
    task, job_id = store.add_task(
        staging,
        name="t",
        auto_job={"method": "cps_prompt", "options": {"epochs": 1}},
        **args,  # type: ignore[arg-type]
    )
    job = store.get_job(job_id or 0)
    assert job is not None and job.task_ids == [task.id] and job.status == "queued"


def test_a_failed_commit_leaves_no_task_folder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    staging, args = staged(store, ["a", "b"])
    with store.connect() as conn:  # make the INSERT fail after the folder was moved
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON tasks BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        store.add_task(staging, name="t", **args)  # type: ignore[arg-type]
    assert list(store.tasks_dir.iterdir()) == []
    assert store.list_tasks() == []


def test_recover_removes_interrupted_uploads(tmp_path: Path) -> None:
    store = Store(tmp_path)
    keep = add(store, ["a", "b"])
    leftover, _ = staged(store, ["c"])  # crash while validating
    orphan = store.tasks_dir / "deadbeef"  # crash after the move, before the commit
    orphan.mkdir()
    (orphan / "x.png").write_bytes(b"x")
    removed = Store(tmp_path).recover()
    assert removed == {"staging": [leftover.name], "orphan_tasks": ["deadbeef"]}
    assert not leftover.exists() and not orphan.exists()
    assert [t.id for t in store.list_tasks()] == [keep]
    task = store.get_task(keep)
    assert task is not None and store.task_path(task).is_dir()


def test_job_queue(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="no pending tasks") as err:
        store.create_job("m", None, {})
    assert err.value.status == 409
    t1, t2, t3 = add(store, ["a"]), add(store, ["b"]), add(store, ["c"])
    j1 = store.create_job("m", [t2], {"epochs": 1})
    j2 = store.create_job("m", None, {})
    assert j2.task_ids == [t1, t3]  # pending tasks not already in a job
    with pytest.raises(StoreError, match="task 2 in job 1"):
        store.create_job("m", [t2], {})
    with pytest.raises(StoreError, match="unknown task") as err:
        store.create_job("m", [99], {})
    assert err.value.status == 404
    with pytest.raises(StoreError, match="repeats"):
        store.create_job("m", [t1, t1], {})
    assert store.next_job().id == j1.id  # type: ignore[union-attr]
    store.start_job(j2.id)
    assert store.next_job().id == j2.id  # type: ignore[union-attr]  # an interrupted running job comes first
    assert store.request_cancel(j1.id).status == "cancelled"
    running = store.request_cancel(j2.id)
    assert running.status == "running" and running.cancel_requested
    with pytest.raises(StoreError, match="already cancelled"):
        store.request_cancel(j1.id)
    store.finish_job(j2.id, "cancelled")
    assert store.job_counts() == {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 2}


def test_learning_order_and_resumes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    t1, t2 = add(store, ["a"]), add(store, ["b"])
    job = store.create_job("m", [t2, t1], {})
    assert store.mark_learned(t2, job.id, {"accuracy": [1.0]}) == 0
    assert store.mark_learned(t1, job.id, None) == 1
    assert store.mark_learned(t1, job.id, None) == 1  # idempotent
    assert [t.id for t in store.learned_tasks()] == [t2, t1]
    with pytest.raises(StoreError, match="already learned"):
        store.create_job("m", [t1], {})
    store.start_job(job.id)
    store.start_job(job.id, resume={"restarted_at": 1.0})
    store.note_resume(job.id, {"task_id": t1, "epoch": 2})
    store.update_progress(job.id, {"progress": 50.0})
    store.update_results(job.id, {"tasks": [{"task_id": t2}]})
    got = store.get_job(job.id)
    assert got is not None
    assert got.resumes == [{"restarted_at": 1.0, "task_id": t1, "epoch": 2}]
    assert got.progress == {"progress": 50.0}
    store.finish_job(job.id, "done")
    got = store.get_job(job.id)
    assert got is not None and got.status == "done" and got.results == {"tasks": [{"task_id": t2}]}
    assert store.task_counts() == {"pending": 0, "learned": 2}
    assert store.image_count() == 4
