"""Pieces of the daemon in-process: settings resolution, token file, middleware, metrics, predictors, stream
building and the job-option rules (no server, no training)."""

from __future__ import annotations

import os
import socket
import stat
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from edgecl.cli import main as cli_main
from edgecl.profiles import load_profile
from edgecl.serve.auth import BodySizeLimitMiddleware
from edgecl.serve.config import read_env_file, resolve_settings
from edgecl.serve.options import JobConflict, resolve_method_options
from edgecl.serve.predictor import ModelHolder, OnnxRuntimePredictor, check_engine
from edgecl.serve.progress import JobProgress
from edgecl.serve.stream import build_stream
from edgecl.store import JobRecord, Store

PROFILE = (
    "device: cpu\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\nweights: null\nepochs: 3\n"
)


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE)
    return path


# ------------------------------------------------------------------------------------------- settings
def test_settings_precedence_flag_env_envfile_profile(tmp_path: Path, profile: Path) -> None:
    env_file = tmp_path / "edgecl.env"
    env_file.write_text(
        f"# comment\nEDGECL_PORT=9001\nEDGECL_HOST='0.0.0.0'\nEDGECL_DATA_DIR={tmp_path / 'f'}\n"
        "EDGECL_MEMORY_BUDGET_MB=\n"
    )
    assert read_env_file(env_file)["EDGECL_HOST"] == "0.0.0.0"
    environ = {
        "EDGECL_PROFILE": str(profile),
        "EDGECL_PORT": "9002",
        "EDGECL_TOKEN": "t" * 20,
        "EDGECL_MEMORY_BUDGET_MB": "1500",
    }
    s = resolve_settings(
        port="",
        data_dir=str(tmp_path / "flag"),
        env_file=str(env_file),
        environ=environ,
        allow_random_backbone=True,
    )
    assert s.port == 9002  # an empty flag counts as unset; the environment wins over the env file
    assert s.host == "0.0.0.0" and s.data_dir == (tmp_path / "flag").resolve()
    assert s.profile.memory_budget_mb == 1500 and s.profile.epochs == 3
    assert s.token == "t" * 20 and s.token_source == "EDGECL_TOKEN"
    assert s.sources["host"].endswith("edgecl.env EDGECL_HOST") and s.sources["data_dir"] == "--data-dir"
    assert "t" * 20 not in str(s.describe())


def test_token_file_is_created_0600_and_reused(tmp_path: Path, profile: Path) -> None:
    token_file = tmp_path / "etc" / "token"
    kwargs: dict[str, Any] = {
        "profile": str(profile),
        "data_dir": str(tmp_path / "d"),
        "env_file": "",
        "environ": {"EDGECL_TOKEN_FILE": str(token_file)},
        "allow_random_backbone": True,
    }
    first = resolve_settings(**kwargs)
    assert first.token_source == str(token_file) and len(first.token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert resolve_settings(**kwargs).token == first.token
    kwargs["environ"] = {}
    default = resolve_settings(**kwargs)  # no token configured: DATA_DIR/token
    assert default.token_source == str((tmp_path / "d" / "token").resolve())
    with pytest.raises(ValueError, match="shorter than 16"):
        resolve_settings(**{**kwargs, "environ": {"EDGECL_TOKEN": "short"}})


def test_weak_or_readable_token_files_are_refused(tmp_path: Path, profile: Path) -> None:
    token_file = tmp_path / "token"
    kwargs: dict[str, Any] = {
        "profile": str(profile),
        "data_dir": str(tmp_path / "d"),
        "env_file": "",
        "environ": {"EDGECL_TOKEN_FILE": str(token_file)},
        "allow_random_backbone": True,
    }
    token_file.write_text("fifteen-chars-x\n")  # 15 characters
    token_file.chmod(0o600)
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        resolve_settings(**kwargs)
    token_file.write_text("sixteen-chars-xx\n")
    assert resolve_settings(**kwargs).token == "sixteen-chars-xx"
    for mode in (0o644, 0o640, 0o604):
        token_file.chmod(mode)
        with pytest.raises(ValueError, match=f"mode {mode:04o}.*chmod 0600 {token_file}"):
            resolve_settings(**kwargs)


def test_weights_are_required_unless_random_is_allowed(tmp_path: Path, profile: Path) -> None:
    kwargs: dict[str, Any] = {
        "profile": str(profile),
        "data_dir": str(tmp_path),
        "env_file": "",
        "environ": {"EDGECL_TOKEN": "x" * 16},
    }
    with pytest.raises(ValueError, match="--weights FILE"):
        resolve_settings(**kwargs)
    with pytest.raises(ValueError, match="not found"):
        resolve_settings(weights=str(tmp_path / "missing.safetensors"), **kwargs)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    s = resolve_settings(**{**kwargs, "environ": {**kwargs["environ"], "EDGECL_WEIGHTS": str(weights)}})
    assert s.profile.weights == str(weights) and s.sources["weights"] == "environment EDGECL_WEIGHTS"


def test_serve_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--profile",
        "--data-dir",
        "--host",
        "--port",
        "--memory-budget-mb",
        "--weights",
        "--allow-random-backbone",
        "--max-request-mb",
        "--max-images-per-task",
        "--max-image-pixels",
        "--max-archive-members",
    ):
        assert flag in out


# ------------------------------------------------------------------------------------------- middleware
def test_body_limit_per_path() -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"n": len(await request.body())})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/small", echo, methods=["POST"])])
    client = TestClient(BodySizeLimitMiddleware(app, 100, limits={"/small": 10}, hint=" (flag)"))  # type: ignore[arg-type]
    assert client.post("/echo", content=b"x" * 100).json() == {"n": 100}
    r = client.post("/echo", content=b"x" * 101)
    assert r.status_code == 413 and r.json()["detail"] == "request body larger than 100 bytes (flag)"
    assert client.post("/small", content=b"x" * 10).json() == {"n": 10}
    r = client.post("/small", content=b"x" * 11)
    assert r.status_code == 413 and r.json()["detail"] == "request body larger than 10 bytes"

    def chunks() -> Any:  # no Content-Length: counted while streaming
        for _ in range(5):
            yield b"y" * 40

    r = client.post("/echo", content=chunks())
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"


# ------------------------------------------------------------------------------------------- predictors
def test_onnxruntime_engine_needs_the_export_module(monkeypatch: pytest.MonkeyPatch) -> None:
    check_engine("torch")
    monkeypatch.setitem(sys.modules, "edgecl.export", None)
    with pytest.raises(RuntimeError, match="inference_engine: onnxruntime"):
        check_engine("onnxruntime")
    with pytest.raises(ValueError):
        check_engine("tensorrt")


def test_onnxruntime_predictor_runs_the_exported_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def export_onnx(model: Any, path: Path, precision: str = "fp32") -> Path:
        """Stand-in export: logits = mean over pixels @ W (3 channels -> 4 head columns)."""
        weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0])
        graph = helper.make_graph(
            [
                helper.make_node("ReduceMean", ["images"], ["m"], axes=[2, 3], keepdims=0),
                helper.make_node("MatMul", ["m", "w"], ["logits"]),
            ],
            "fake",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 8, 8])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
            [weight],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        proto.ir_version = 8
        onnx.save(proto, str(path))
        return path

    def session(path: str, threads: int | None, providers: Any) -> Any:
        import onnxruntime

        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    fake = types.SimpleNamespace(export_onnx=export_onnx, session=session)
    monkeypatch.setitem(sys.modules, "edgecl.export", fake)
    check_engine("onnxruntime")
    model = types.SimpleNamespace(meta={"task": 1}, class_names=["red", "green", "blue"])
    predictor = OnnxRuntimePredictor(model, tmp_path / "onnx" / "m.onnx")  # type: ignore[arg-type]
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 5.0
    images[1, 2] = 5.0
    probs = predictor.predict(images)
    assert predictor.version == 2 and probs.shape == (2, 3)  # the unused 4th head column is dropped
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert probs.argmax(1).tolist() == [0, 2]
    holder = ModelHolder()
    assert holder.get() is None and holder.swap(predictor) is None and holder.get() is predictor


# ------------------------------------------------------------------------------------------- worker helpers
def test_method_options_are_fixed_by_the_first_task(tmp_path: Path, profile: Path) -> None:
    prof = load_profile(str(profile))
    prof.method_options = {"reduction_rate": 0.4}
    assert resolve_method_options("cps_prompt", prof, {"lr": 0.01}, None) == {
        "reduction_rate": 0.4,
        "lr": 0.01,
    }
    assert resolve_method_options("coda_prompt", prof, {}, None) == {}  # profile options are for its method
    with pytest.raises(ValueError, match="unknown option"):
        resolve_method_options("cps_prompt", prof, {"bogus": 1}, None)
    meta = {"method": "cps_prompt", "method_config": {"reduction_rate": 0.4, "lr": 0.001, "layers": [0, 1]}}
    got = resolve_method_options("cps_prompt", prof, {"lr": 0.01, "layers": [0, 1]}, meta)
    assert got["lr"] == 0.01 and got["reduction_rate"] == 0.4
    with pytest.raises(JobConflict, match="same method"):
        resolve_method_options("coda_prompt", prof, {}, meta)
    with pytest.raises(JobConflict, match="reduction_rate"):
        resolve_method_options("cps_prompt", prof, {"reduction_rate": 0.6}, meta)


def test_stream_from_stored_tasks(tmp_path: Path) -> None:
    from edgecl.data.synthetic import write_synthetic_folder

    store = Store(tmp_path)
    tasks = []
    for classes, offset in ((["b", "a"], 0), (["c", "d", "e"], 2)):
        staging = store.new_staging_dir()
        manifest = []
        written = write_synthetic_folder(staging, len(classes), 3, img_size=16, class_offset=offset)
        for c, (_, paths) in enumerate(sorted(written.items())):
            manifest += [
                (str(p.relative_to(staging)), c, "eval" if i == 0 else "train") for i, p in enumerate(paths)
            ]
        task, _ = store.add_task(
            staging, name="t", classes=sorted(classes), counts={}, eval_counts={}, manifest=manifest
        )
        tasks.append(task)
    stream = build_stream(store, tasks, 16, (0.5,) * 3, (0.5,) * 3)
    assert stream.class_order == ["a", "b", "c", "d", "e"]
    assert [t.classes for t in stream.tasks] == [[0, 1], [2, 3, 4]]
    assert [len(t.train) for t in stream.tasks] == [4, 6] and [len(t.test) for t in stream.tasks] == [2, 3]
    x, y = stream.tasks[1].test[0]
    assert x.shape == (3, 16, 16) and y in (2, 3, 4)


def test_job_progress_and_eta(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record = JobRecord(id=1, status="running", method="m", task_ids=[1, 2], options={}, created_at=0.0)
    progress = JobProgress(store, record, {1: 4, 2: 6}, epochs=2)
    assert progress.total_steps == 20
    progress.task_skipped(1)  # learned before a restart
    progress.begin_task(2, 1, epochs_done=1)
    progress.on_epoch_start(None, 1, 1)  # type: ignore[arg-type]
    for step in range(1, 4):
        progress.on_step_end(None, 1, 1, step, 0.5)  # type: ignore[arg-type]
    snap = progress.snapshot()
    assert (snap["steps_done"], snap["progress"], snap["epoch"], snap["loss"]) == (8 + 6 + 3, 85.0, 2, 0.5)
    assert snap["eta_s"] is not None and snap["eta_s"] >= 0
    progress.end_task()
    assert progress.snapshot()["progress"] == 100.0


def test_app_without_worker_answers_413_and_503(tmp_path: Path, profile: Path) -> None:
    from edgecl.serve import ServeSettings, create_app

    settings = ServeSettings(
        profile=load_profile(str(profile)),
        data_dir=tmp_path,
        token="k" * 20,
        token_source="test",
        max_request_bytes=1000,
        allow_random_backbone=True,
    )
    client = TestClient(create_app(settings))  # no lifespan: the worker never starts
    auth = {"Authorization": "Bearer " + "k" * 20}
    ready = client.get("/readyz", headers=auth)
    assert ready.status_code == 503 and "loading" in ready.json()["reason"]
    assert client.post("/v1/predict", headers=auth, files={"file": ("a.jpg", b"x")}).status_code == 503

    def chunks() -> Any:
        for _ in range(10):
            yield b"z" * 200

    headers = {**auth, "content-type": "multipart/form-data; boundary=abc"}
    r = client.post("/v1/tasks", content=chunks(), headers=headers)
    assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["detail"]
    assert list((tmp_path / "staging").iterdir()) == [] and list((tmp_path / "tasks").iterdir()) == []


def test_reconcile_marks_a_task_committed_before_a_crash(tmp_path: Path, profile: Path) -> None:
    from edgecl.serve import ServeSettings
    from edgecl.serve.worker import Worker

    store = Store(tmp_path)
    ids = []
    for classes in (["a", "b"], ["c", "d"], ["e", "f"]):
        staging = store.new_staging_dir()
        task, _ = store.add_task(staging, name="t", classes=classes, counts={}, eval_counts={}, manifest=[])
        ids.append(task.id)
    job = store.create_job("cps_prompt", [ids[1], ids[0]], {})
    store.start_job(job.id)
    store.mark_learned(ids[1], job.id, None)
    settings = ServeSettings(
        profile=load_profile(str(profile)), data_dir=tmp_path, token="k" * 20, token_source="t"
    )
    worker = Worker(settings, store, ModelHolder())
    # the trainer committed task 2 of the job (classes a, b) and the daemon died before the row update
    meta = {"task": 1, "classes_learned": ["c", "d", "a", "b"], "records": [{"task": 0}, {"task": 1, "x": 1}]}
    worker._reconcile(meta)
    assert [t.id for t in store.learned_tasks()] == [ids[1], ids[0]]
    got = store.get_task(ids[0])
    assert got is not None and got.record == {"task": 1, "x": 1} and got.learned_by_job == job.id
    worker._reconcile(meta)  # idempotent
    with pytest.raises(RuntimeError, match="do not match"):
        worker._reconcile({"task": 1, "classes_learned": ["x", "y"], "records": []})


def test_a_job_that_keeps_killing_the_daemon_is_failed(tmp_path: Path, profile: Path) -> None:
    from edgecl.serve import ServeSettings
    from edgecl.serve.worker import STALLED_RESTARTS, Worker

    store = Store(tmp_path)
    staging = store.new_staging_dir()
    task, _ = store.add_task(staging, name="t", classes=["a", "b"], counts={}, eval_counts={}, manifest=[])
    job = store.create_job("cps_prompt", [task.id], {"epochs": 2, "batch_size": 4})
    store.start_job(job.id)
    store.update_progress(job.id, {"task_id": task.id, "epochs_done": 1})
    at = {"learned": 0, "task_id": task.id, "epochs_done": 1}
    for _ in range(STALLED_RESTARTS):
        store.start_job(job.id, resume={"restarted_at": 0.0, "at": at})
    settings = ServeSettings(
        profile=load_profile(str(profile)), data_dir=tmp_path, token="k" * 20, token_source="t"
    )
    Worker(settings, store, ModelHolder())._run_job(store.get_job(job.id))  # type: ignore[arg-type]
    got = store.get_job(job.id)
    assert got is not None and got.status == "failed" and "without progress" in (got.error or "")


# ------------------------------------------------------------------------------------------- permissions
def test_store_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        (tmp_path / "d").mkdir(mode=0o777)
        store = Store(tmp_path / "d")
        staging = store.new_staging_dir()
        store.add_task(staging, name="t", classes=["a"], counts={}, eval_counts={}, manifest=[])
        with store.connect() as conn:  # -wal and -shm exist while a connection is open
            conn.execute("UPDATE tasks SET name = 'u'")
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [store.root, *store.root.iterdir()]}
    finally:
        os.umask(old)
    assert {modes[n] for n in ("d", "staging", "tasks", "jobs")} == {0o750}, modes
    assert {modes[n] for n in ("edgecl.db", "edgecl.db-wal", "edgecl.db-shm")} == {0o640}, modes


# ------------------------------------------------------------------------------------------- auth log
def test_failed_authentication_is_logged_once_per_client_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from edgecl.serve.auth import AuthFailureLog

    now = [100.0]
    failures = AuthFailureLog(interval_s=10.0, clock=lambda: now[0])
    caplog.set_level("WARNING", logger="edgecl.serve")
    assert failures.record("10.0.0.5", "GET /v1/tasks")  # the first one: logged at once
    for t in (101.0, 105.0, 109.9):
        now[0] = t
        assert not failures.record("10.0.0.5", "GET /v1/tasks")  # counted, not logged
    assert failures.record("10.0.0.9", "POST /v1/jobs")  # another client has its own window
    now[0] = 110.0
    assert failures.record("10.0.0.5", "GET /metrics")  # 10 s later: one line with the count
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "authentication failed: 10.0.0.5 GET /v1/tasks (missing or wrong bearer token)",
        "authentication failed: 10.0.0.9 POST /v1/jobs (missing or wrong bearer token)",
        "authentication failed: 10.0.0.5, 4 times in the last 10 s (latest GET /metrics)",
    ]
    assert failures.total == 6


# ------------------------------------------------------------------------------------------- systemd
def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.settimeout(10)
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_sends_datagrams(tmp_path: Path, abstract: bool) -> None:
    from edgecl.serve.notify import SystemdNotifier

    address = f"@edgecl-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    sock = _listener(address)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
        assert notifier.enabled and notifier.notify("READY=1", "STATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        notifier.close()
    finally:
        sock.close()
    silent = SystemdNotifier({})
    assert not silent.enabled and not silent.notify("READY=1")


def test_sd_notify_never_blocks_on_a_full_receiver(tmp_path: Path) -> None:
    from edgecl.serve.notify import SystemdNotifier

    address = str(tmp_path / "notify")
    sock = _listener(address)  # never read: its queue fills up
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
        sent = [notifier.notify("WATCHDOG=1") for _ in range(2000)]
        assert sent[0] and not sent[-1]  # the queue filled and later messages were dropped, not waited on
        notifier.close()
    finally:
        sock.close()


def test_watchdog_interval_follows_systemd_rules() -> None:
    from edgecl.serve.notify import watchdog_interval

    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_pings_only_while_healthy(tmp_path: Path) -> None:
    from edgecl.serve.notify import SystemdNotifier, Watchdog

    address = str(tmp_path / "notify")
    sock = _listener(address)
    state = {"problem": None}
    dog = Watchdog(SystemdNotifier({"NOTIFY_SOCKET": address}), 0.05, lambda: state["problem"])
    dog.start()
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"
        state["problem"] = "the training worker thread stopped"
        message = sock.recv(4096)
        while message == b"WATCHDOG=1":  # pings sent before the check saw the problem
            message = sock.recv(4096)
        assert message == b"STATUS=unhealthy: the training worker thread stopped"
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no ping while unhealthy
            sock.recv(4096)
        sock.settimeout(10)
        state["problem"] = None
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        dog.stop()
        sock.close()


# ------------------------------------------------------------------------------------------- metrics
def test_prometheus_counters_histograms_and_state(tmp_path: Path, profile: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from edgecl.serve import ServeSettings
    from edgecl.serve.context import ServeContext

    prof = load_profile(str(profile))
    prof.memory_budget_mb = 1000
    settings = ServeSettings(profile=prof, data_dir=tmp_path, token="k" * 20, token_source="t")
    ctx = ServeContext(settings, Store(tmp_path))
    staging = ctx.store.new_staging_dir()
    ctx.store.add_task(
        staging, name="t", classes=["a", "b"], counts={}, eval_counts={}, manifest=[("x", 0, "train")] * 3
    )
    ctx.metrics.predict(2, 0.02)
    ctx.metrics.predict(1, 3.0)
    ctx.metrics.upload("accepted", 10, 0.5)
    ctx.metrics.upload("rejected", seconds=0.25)
    ctx.metrics.upload("throttled")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(ctx.metrics.render().decode())
        for s in family.samples
    }
    assert samples[("edgecl_predict_latency_seconds_bucket", (("le", "0.025"),))] == 1
    assert samples[("edgecl_predict_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("edgecl_predict_latency_seconds_sum", ())] == 0.02 + 3.0
    assert samples[("edgecl_predict_images_total", ())] == 3
    assert samples[("edgecl_uploads_total", (("result", "accepted"),))] == 1
    assert samples[("edgecl_uploads_total", (("result", "throttled"),))] == 1
    assert samples[("edgecl_images_ingested_total", ())] == 10
    assert samples[("edgecl_upload_seconds_total", ())] == 0.75
    assert samples[("edgecl_tasks", (("status", "pending"),))] == 1
    assert samples[("edgecl_jobs", (("status", "queued"),))] == 0
    assert samples[("edgecl_images_stored", ())] == 3
    assert samples[("edgecl_memory_budget_bytes", ())] == 1000 * 2**20
    assert samples[("edgecl_model_version", ())] == 0 and samples[("edgecl_ready", ())] == 0
    assert samples[("edgecl_process_resident_memory_bytes", ())] > 0
    assert ("edgecl_train_step_seconds", ()) not in samples  # no job ran: left out, not 0
