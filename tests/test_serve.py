"""The daemon end to end: a real ``edgecl serve`` (uvicorn) in a subprocess on a free loopback port, driven
with httpx. A tiny random ViT (32 px, patch 8, seeded) stands in for real weights; data are SYNTHETIC."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from edgecl.data.synthetic import write_synthetic_folder

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TOKEN = "test-token-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

PROFILE = """\
description: serve tests (random tiny ViT; SYNTHETIC data)
device: cpu
precision: fp32
allow_autocast: false
method: cps_prompt
method_options:
  expected_tasks: 5
  pool_size: 10
  lr: 0.01
batch_size: 8
epochs: 1
threads: 1
backbone: vit_tiny_patch16_224
img_size: 32
patch_size: 8
weights: null
sampler_period_s: 0.2
inference_engine: torch
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m edgecl serve`` in its own process group, with its log in ``workdir/server-N.log``."""

    def __init__(
        self, workdir: Path, data_dir: Path, *extra: str, profile: str = PROFILE, umask: int | None = None
    ) -> None:
        self.profile_text = profile
        self.workdir = workdir
        self.data_dir = data_dir
        self.extra = list(extra)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "server.log"
        self.starts = 0
        self.umask = umask
        self.notify: socket.socket | None = None
        """A stand-in for systemd's notify socket (see :meth:`listen_notify`)."""

    def listen_notify(self) -> None:
        """Receive the daemon's sd_notify datagrams (as systemd does, at once), with a 1 s watchdog."""
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.workdir / "notify.sock"))
        self.notify.settimeout(0.2)
        self.notified: list[str] = []

        def read() -> None:
            while self.notify is not None:
                with contextlib.suppress(TimeoutError, OSError):
                    self.notified.append(self.notify.recv(4096).decode())

        threading.Thread(target=read, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> Server:
        profile = self.workdir / "profile.yaml"
        profile.write_text(self.profile_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
        env.update(EDGECL_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
        if self.notify is not None:
            env.update(NOTIFY_SOCKET=str(self.workdir / "notify.sock"), WATCHDOG_USEC="1000000")
        self.starts += 1
        self.log_path = self.workdir / f"server-{self.starts}.log"
        cmd = [
            sys.executable,
            "-m",
            "edgecl",
            "serve",
            "--profile",
            str(profile),
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--allow-random-backbone",
            "--env-file",
            "",
            *self.extra,
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
                umask=-1 if self.umask is None else self.umask,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", headers=AUTH, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if self.notify is not None:  # the daemon is gone: the reader drains its last datagrams, then ends
            time.sleep(0.5)
            sock, self.notify = self.notify, None
            threading.Timer(0.5, sock.close).start()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def make(
        *extra: str, data_dir: Path | None = None, profile: str = PROFILE, umask: int | None = None
    ) -> Server:
        server = Server(tmp_path, data_dir or tmp_path / "data", *extra, profile=profile, umask=umask)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with small limits, for auth and bad-input tests (it never trains)."""
    workdir = tmp_path_factory.mktemp("api")
    server = Server(
        workdir,
        workdir / "data",
        "--max-request-mb",
        "1",
        "--max-image-pixels",
        "250000",
        "--max-archive-members",
        "50",
    )
    server.start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------- data
def synthetic_task(root: Path, classes: int, per_class: int, offset: int = 0, fmt: str = "JPEG") -> Path:
    """SYNTHETIC class folders (synthetic-NNN/...) under ``root``."""
    write_synthetic_folder(root, classes, per_class, img_size=32, fmt=fmt, class_offset=offset)
    return root


def archive(folder: Path, fmt: str) -> Path:
    return Path(shutil.make_archive(str(folder), fmt, root_dir=folder))


def image_bytes(size: int = 32, fmt: str = "JPEG", color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wait_job(client: httpx.Client, job_id: int, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: Any = None
    while time.monotonic() < deadline:
        try:
            job = client.get(f"/v1/jobs/{job_id}").json()
        except httpx.TransportError as err:  # a kept-alive connection closed under heavy load: poll again
            job = f"{type(err).__name__}: {err}"
            time.sleep(0.5)
            continue
        if job["status"] in ("done", "failed", "cancelled"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {job}")


def store_state(server: Server, client: httpx.Client) -> tuple[Any, list[str], list[str]]:
    tasks = client.get("/v1/tasks").json()
    files = sorted(str(p.relative_to(server.data_dir)) for p in (server.data_dir / "tasks").rglob("*"))
    staging = sorted(p.name for p in (server.data_dir / "staging").iterdir())
    return tasks, files, staging


# ------------------------------------------------------------------------------------------- auth
def test_token_is_required_everywhere_but_healthz(api_server: Server) -> None:
    anon = api_server.client(token=None)
    wrong = api_server.client(token="not-the-token")
    assert anon.get("/healthz").json() == {"status": "ok"}
    for method, path in [
        ("GET", "/readyz"),
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/1"),
        ("POST", "/v1/tasks"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/1"),
        ("DELETE", "/v1/jobs/1"),
        ("POST", "/v1/predict"),
        ("GET", "/v1/model"),
        ("GET", "/v1/telemetry"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ]:
        for client in (anon, wrong):
            r = client.request(method, path)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
    ok = api_server.client()
    assert ok.get("/readyz").json()["ready"] is True
    assert "/v1/tasks" in ok.get("/openapi.json").json()["paths"]
    assert "swagger" in ok.get("/docs").text.lower()


# ------------------------------------------------------------------------------------------- bad input
def _cases() -> dict[str, tuple[dict[str, Any], int, str, str | None]]:
    """name -> (httpx request kwargs, status, text in detail/reasons, offending member or None)."""
    good = image_bytes()
    truncated = image_bytes(64)[:300]
    two = {"cat/a.jpg": good, "dog/b.jpg": image_bytes(color=(200, 0, 0))}
    big_png = image_bytes(600, "PNG")  # 360000 pixels > 250000, a few KB
    return {
        "truncated jpeg": (
            {"files": [("files", ("broken.jpg", truncated))], "data": {"labels": '["cat"]'}},
            422,
            "truncated",
            "broken.jpg",
        ),
        "truncated jpeg in zip": (
            {"files": {"file": ("t.zip", zip_bytes({**two, "cat/broken.jpg": truncated}))}},
            422,
            "truncated",
            "cat/broken.jpg",
        ),
        "path traversal": (
            {"files": {"file": ("t.zip", zip_bytes({**two, "../../evil/x.jpg": good}))}},
            422,
            "traversal",
            "../../evil/x.jpg",
        ),
        "absolute path": (
            {"files": {"file": ("t.tgz", tar_bytes({**two, "/etc/cron.d/x.jpg": good}))}},
            422,
            "absolute",
            "/etc/cron.d/x.jpg",
        ),
        "zip with a symlink": (
            {"files": {"file": ("t.zip", zip_bytes(two, symlink="cat/link.jpg"))}},
            422,
            "symbolic link",
            "cat/link.jpg",
        ),
        "empty archive": ({"files": {"file": ("t.zip", zip_bytes({}))}}, 422, "no images", None),
        "labels not json": (
            {"files": [("files", ("a.jpg", good))], "data": {"labels": '["cat",'}},
            422,
            "not valid JSON",
            None,
        ),
        "labels count": (
            {
                "files": [("files", ("a.jpg", good)), ("files", ("b.jpg", good))],
                "data": {"labels": '["cat"]'},
            },
            422,
            "2 file(s) uploaded",
            None,
        ),
        "labels missing": ({"files": [("files", ("a.jpg", good))]}, 422, "labels", None),
        "labels object mismatch": (
            {"files": [("files", ("a.jpg", good))], "data": {"labels": '{"b.jpg": "x"}'}},
            422,
            "no label for this file",
            "a.jpg",
        ),
        "bad class name": (
            {"files": [("files", ("a.jpg", good))], "data": {"labels": '["a/b"]'}},
            422,
            "slash",
            "a.jpg",
        ),
        "oversize request": (
            {"files": {"file": ("big.bin", os.urandom(1_200_000))}},
            413,
            "larger than",
            None,
        ),
        "too many pixels": (
            {"files": [("files", ("huge.png", big_png))], "data": {"labels": '["x"]'}},
            422,
            "exceeds the limit",
            "huge.png",
        ),
        "too many members": (
            {"files": {"file": ("m.zip", zip_bytes({f"c{i}/x.jpg": good for i in range(60)}))}},
            413,
            "members",
            None,
        ),
        "not an image": (
            {"files": [("files", ("a.jpg", b"hello"))], "data": {"labels": '["x"]'}},
            422,
            "not a decodable image",
            "a.jpg",
        ),
        "no file": ({"data": {"name": "x"}, "files": {"other": ("a.jpg", good)}}, 422, "no file", None),
        "not multipart": ({"json": {"file": "x"}}, 415, "multipart", None),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_malformed_upload_is_rejected_and_store_unchanged(api_server: Server, case: str) -> None:
    kwargs, status, text, member = _cases()[case]
    client = api_server.client()
    before = store_state(api_server, client)
    r = client.post("/v1/tasks", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert text in json.dumps(body), body
    if member is not None:
        assert member in [p["member"] for p in body["problems"]], body
    assert store_state(api_server, client) == before
    assert client.get("/healthz").status_code == 200


def test_uploads_classes_and_job_validation(api_server: Server, tmp_path: Path) -> None:
    client = api_server.client()
    folder = synthetic_task(tmp_path / "t", 2, 3, fmt="PNG")
    r = client.post(
        "/v1/tasks", files={"file": ("t.zip", archive(folder, "zip").read_bytes())}, data={"name": "pets"}
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert (task["name"], task["status"], task["classes"]) == (
        "pets",
        "pending",
        ["synthetic-000", "synthetic-001"],
    )
    assert task["counts"] == {"synthetic-000": 3, "synthetic-001": 3} and task["num_images"] == 6
    # the same class again: 409 naming it, nothing stored
    before = store_state(api_server, client)
    r = client.post(
        "/v1/tasks", files=[("files", ("x.jpg", image_bytes()))], data={"labels": '["synthetic-001"]'}
    )
    assert r.status_code == 409, r.text
    assert r.json()["problems"][0]["member"] == "synthetic-001"
    assert store_state(api_server, client) == before
    # loose images with labels, and a single image as `file`
    r = client.post(
        "/v1/tasks",
        files=[("files", ("a.jpg", image_bytes())), ("files", ("b.png", image_bytes(fmt="PNG")))],
        data={"labels": '{"a.jpg": "heron", "b.png": "stork"}'},
    )
    assert r.status_code == 201 and r.json()["classes"] == ["heron", "stork"], r.text
    r = client.post("/v1/tasks", files={"file": ("bee.jpg", image_bytes())}, data={"labels": '"bee"'})
    assert r.status_code == 201 and r.json()["classes"] == ["bee"] and r.json()["warnings"], r.text
    assert client.get(f"/v1/tasks/{task['id']}").json()["id"] == task["id"]
    assert client.get("/v1/tasks/999").status_code == 404
    # jobs that cannot be queued (nothing is trained here)
    assert client.post("/v1/jobs", json={"task_ids": [999]}).status_code == 404
    r = client.post("/v1/jobs", json={"method": "nope", "task_ids": [task["id"]]})
    assert r.status_code == 422 and "unknown method" in r.text
    r = client.post("/v1/jobs", json={"task_ids": [task["id"]], "nonsense_option": 1})
    assert r.status_code == 422 and "nonsense_option" in r.text
    assert client.post("/v1/jobs", json={"task_ids": [task["id"]], "epochs": 0}).status_code == 422
    assert client.get("/v1/jobs/999").status_code == 404
    assert client.delete("/v1/jobs/999").status_code == 404
    # no model yet
    r = client.post("/v1/predict", files={"file": ("q.jpg", image_bytes())})
    assert r.status_code == 409 and "no model" in r.text
    assert client.get("/v1/model").json()["version"] == 0
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'edgecl_tasks{status="pending"}' in metrics.text and "edgecl_uploads_total" in metrics.text


# ------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_full_flow_upload_train_predict(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory().start()
    client = server.client()
    t1 = archive(synthetic_task(tmp_path / "t1", 3, 12, fmt="JPEG"), "zip")
    t2 = archive(synthetic_task(tmp_path / "t2", 3, 12, offset=3, fmt="PNG"), "gztar")
    ids = []
    for path in (t1, t2):
        r = client.post("/v1/tasks", files={"file": (path.name, path.read_bytes())})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = client.post("/v1/jobs", json={"method": "cps_prompt", "task_ids": ids, "epochs": 2})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    query = sorted((tmp_path / "t1" / "synthetic-000").iterdir())[0].read_bytes()
    seen_versions, statuses = [], set()
    deadline = time.monotonic() + 300
    while True:  # predictions keep working (from the last committed model) while the job trains
        job = client.get(f"/v1/jobs/{job_id}").json()
        statuses.add(job["status"])
        if job["status"] == "running":
            # task_id is null while the job sets up (backbone, stream) before its first task starts
            assert job["task_id"] in [*ids, None] and job["epochs"] == 2 and 0 <= job["progress"] <= 100
        p = client.post("/v1/predict", files={"file": ("q.jpg", query)})
        assert p.status_code in (200, 409), p.text
        if p.status_code == 200:
            seen_versions.append(p.json()["model_version"])
        if job["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert job["status"] == "done", (job, server.log())
    assert seen_versions == sorted(seen_versions)
    assert job["progress"] == 100.0 and len(job["results"]) == 2
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert [t["status"] for t in tasks] == ["learned", "learned"]
    model = client.get("/v1/model").json()
    classes = [f"synthetic-{i:03d}" for i in range(6)]
    assert model["version"] == 2 and model["method"] == "cps_prompt"
    assert model["classes"] == classes
    assert [t["id"] for t in model["tasks"]] == ids
    assert len(model["metrics"]["accuracy_matrix"]) == 2
    # known images: correct far more often than chance (1/6)
    files = []
    for c in classes:
        folder = tmp_path / ("t1" if int(c[-3:]) < 3 else "t2") / c
        files += [("files", (f"{c}-{p.name}", p.read_bytes())) for p in sorted(folder.iterdir())[:4]]
    r = client.post("/v1/predict", files=files, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert r.json()["model_version"] == 2 and len(preds) == 24
    assert all(len(p["top_k"]) == 3 and p["label"] == p["top_k"][0]["label"] for p in preds)
    accuracy = sum(p["label"] == p["file"].rsplit("-", 1)[0] for p in preds) / len(preds)
    assert accuracy > 2 / 6, preds
    metrics = client.get("/metrics").text
    assert "edgecl_model_version 2" in metrics and 'edgecl_jobs{status="done"} 1' in metrics
    assert "edgecl_train_step_seconds" in metrics
    telemetry = client.get("/v1/telemetry").json()
    assert telemetry["jobs"][0]["job_id"] == job_id


def _stalled_upload(
    url: str, body: bytes, boundary: str, sent: threading.Event, release: threading.Event
) -> None:
    """POST ``body`` (multipart) but stop after its first 2 KB until ``release``: an upload in flight."""

    def chunks() -> Iterator[bytes]:
        yield body[:2048]
        sent.set()
        release.wait(120)
        yield body[2048:]

    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/v1/tasks", content=chunks(), headers=headers, timeout=120)


def _spooling(pid: int, staging: Path) -> bool:
    """Whether process ``pid`` holds an (unnamed) spool file in ``staging``."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(str(staging)):
                return True
    return False


@pytest.mark.slow
def test_kill9_mid_training_and_mid_upload(server_factory: Any, tmp_path: Path) -> None:
    """kill -9 while a job trains and an upload streams in: the store is intact, the upload leaves nothing,
    the job resumes from its last epoch and finishes. The daemon runs with umask 000 (files stay private)
    and talks sd_notify to a stand-in socket."""
    server = server_factory("--eval-fraction", "0.1", umask=0)
    server.listen_notify()
    server.start()
    client = server.client()
    t1 = archive(synthetic_task(tmp_path / "t1", 3, 12), "zip")
    t2 = archive(synthetic_task(tmp_path / "t2", 2, 6, offset=3), "zip")
    for path in (t1, t2):
        assert client.post("/v1/tasks", files={"file": (path.name, path.read_bytes())}).status_code == 201
    job1 = client.post("/v1/jobs", json={"task_ids": [1], "epochs": 6, "batch_size": 4}).json()["job_id"]
    job2 = client.post("/v1/jobs", json={"task_ids": [2], "epochs": 1}).json()["job_id"]
    deadline = time.monotonic() + 300
    while True:
        job = client.get(f"/v1/jobs/{job1}").json()
        if job["status"] == "running" and job["details"].get("epochs_done", 0) >= 1:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.05)
    epochs_done = job["details"]["epochs_done"]
    assert client.get(f"/v1/jobs/{job2}").json()["status"] == "queued"
    tasks_before = client.get("/v1/tasks").json()
    # an upload in flight: its file part is being spooled when the daemon dies
    t3 = archive(synthetic_task(tmp_path / "t3", 2, 6, offset=5), "zip")
    boundary = "edgecl-kill9-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t3.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + t3.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    sent, release = threading.Event(), threading.Event()
    uploader = threading.Thread(target=_stalled_upload, args=(server.url, body, boundary, sent, release))
    uploader.start()
    assert server.proc is not None
    deadline = time.monotonic() + 60
    while not (sent.is_set() and _spooling(server.proc.pid, server.data_dir / "staging")):
        assert time.monotonic() < deadline, "the upload never reached the spool"
        time.sleep(0.02)
    server.kill9()
    release.set()
    uploader.join(30)
    assert epochs_done < 6
    with sqlite3.connect(server.data_dir / "edgecl.db") as db:  # intact after kill -9, before any recovery
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    server.start()
    client = server.client()
    assert client.get("/v1/tasks").json() == tasks_before  # the upload in flight left nothing
    assert list((server.data_dir / "staging").iterdir()) == []
    job = wait_job(client, job1)
    assert job["status"] == "done", (job, server.log())
    resume = job["resumes"][-1]
    assert resume["task_id"] == 1 and epochs_done <= resume["epoch"] < 6, job["resumes"]
    assert job["results"][0]["resumed_after_epoch"] == resume["epoch"]
    assert f"task 1 resumes after epoch {resume['epoch']}" in server.log()
    second = wait_job(client, job2)
    assert second["status"] == "done"
    assert second["resumes"] == [] and second["started_at"] >= job["finished_at"]  # it stayed queued
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert [(t["id"], t["status"]) for t in tasks] == [(1, "learned"), (2, "learned")]
    assert client.get("/v1/model").json()["version"] == 2
    assert not (server.data_dir / "jobs" / str(job1)).exists()  # a finished job's checkpoint is dropped
    r = client.post("/v1/tasks", files={"file": (t3.name, t3.read_bytes())})  # the same classes: nothing left
    assert r.status_code == 201, r.text
    # umask 000, yet nothing under the data dir is group-writable or readable by other users
    loose = [
        (str(p.relative_to(server.data_dir)), oct(p.stat().st_mode & 0o777))
        for p in [server.data_dir, *server.data_dir.rglob("*")]
        if p.stat().st_mode & 0o027
    ]
    assert loose == [], loose
    server.stop()
    messages = list(server.notified)
    assert messages.count(f"READY=1\nSTATUS=serving on 127.0.0.1:{server.port}") == 2, messages
    assert "WATCHDOG=1" in messages and messages[-1].startswith("STOPPING=1"), messages


@pytest.mark.slow
def test_onnxruntime_engine_and_memory_budget(server_factory: Any, tmp_path: Path) -> None:
    pytest.importorskip("edgecl.export")
    pytest.importorskip("edgecl.budget")
    onnx_profile = PROFILE.replace("inference_engine: torch", "inference_engine: onnxruntime")
    server = server_factory("--memory-budget-mb", "50000", profile=onnx_profile)
    client = server.start().client()
    task = archive(synthetic_task(tmp_path / "t", 2, 6), "zip")
    assert client.post("/v1/tasks", files={"file": (task.name, task.read_bytes())}).status_code == 201
    job = wait_job(client, client.post("/v1/jobs", json={"epochs": 1}).json()["job_id"])
    assert job["status"] == "done", (job, server.log())
    plan = job["results"][0]["memory_plan"]  # the planner fitted the task into the budget
    assert plan["budget_mb"] == 50000 and plan["micro_batch_size"] >= 1, plan
    assert job["telemetry"]["memory_budget_mb"] == 50000
    query = sorted((tmp_path / "t" / "synthetic-001").iterdir())[0].read_bytes()
    r = client.post("/v1/predict", files={"file": ("q.jpg", query)})
    assert r.status_code == 200, r.text
    assert (r.json()["engine"], r.json()["model_version"]) == ("onnxruntime", 1)
    assert (server.data_dir / "onnx" / "model-v1.onnx").is_file()
    assert client.get("/v1/model").json()["engine"] == "onnxruntime"


# ------------------------------------------------------------------------------------------- docs
def api_section() -> str:
    """The README's "REST API" section (up to the next top-level section)."""
    text = README.read_text()
    start = text.index("## REST API")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def docs_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", api_section(), flags=re.DOTALL)


def test_docs_document_every_route(api_server: Server) -> None:
    text = re.sub(r"\{[^}]*\}", "{}", api_section())
    paths = api_server.client().get("/openapi.json").json()["paths"]
    for path, methods in paths.items():
        for method in methods:
            assert f"{method.upper()} {re.sub(r'{[^}]*}', '{}', path)}" in text, (method, path)
    routes = {path for block in docs_blocks() for path in re.findall(r"\$EDGECL_URL(/[\w/]*)", block)}
    for path in paths:
        assert re.sub(r"\{[^}]*\}", "1", path) in routes or path in routes, path


@pytest.mark.slow
def test_docs_curl_examples_run_as_written(server_factory: Any, tmp_path: Path) -> None:
    server = server_factory().start()
    work = tmp_path / "cwd"
    work.mkdir()
    names = {"task1": ["cat", "dog", "fox"], "task2": ["heron", "owl", "stork"], "task3": ["bee", "wasp"]}
    offset = 0
    for stem, classes in names.items():
        folder = tmp_path / stem
        synthetic_task(folder, len(classes), 8, offset=offset)
        for i, c in enumerate(classes):
            (folder / f"synthetic-{offset + i:03d}").rename(folder / c)
        offset += len(classes)
        shutil.make_archive(str(work / stem), "gztar" if stem == "task2" else "zip", root_dir=folder)
    samples = sorted((tmp_path / "task1" / "cat").iterdir())
    for name, src in zip(["lynx1", "lynx2", "wolf1", "wolf2", "query", "query2"], samples, strict=False):
        shutil.copy(src, work / f"{name}.jpg")
    env = {**os.environ, "EDGECL_URL": server.url, "TOKEN": TOKEN}
    outputs = []
    for block in docs_blocks():
        r = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, f"{block}\nstdout: {r.stdout}\nstderr: {r.stderr}\n{server.log()}"
        outputs.append(r.stdout)
    text = "\n".join(outputs)
    assert '"ready":true' in text and "\n401\n" in text
    client = server.client()
    assert client.get("/v1/jobs/1").json()["status"] == "done"
    assert wait_job(client, 2)["status"] == "cancelled"
    assert [t["classes"] for t in client.get("/v1/tasks").json()["tasks"]][:3] == [
        names["task1"],
        names["task2"],
        ["lynx", "wolf"],
    ]
    assert json.loads((work / "openapi.json").read_text())["info"]["title"] == "edgecl"
