"""The API's error contract in-process (no server, no training): JSON errors for every failure, ids beyond
SQLite's range, ``Allow`` on 405, 401 before anything else, the catch-all 500, the upload limit (429), the
size limit of job bodies, the failed-auth log, and multipart parts spooled to unnamed files on disk."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.testclient import TestClient

from edgecl.profiles import load_profile

TOKEN = "api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BIG = 2**63  # one past SQLite's largest integer


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from edgecl.serve import ServeSettings, create_app

    work = tmp_path_factory.mktemp("api")
    (work / "p.yaml").write_text("device: cpu\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\n")
    settings = ServeSettings(
        profile=load_profile(str(work / "p.yaml")),
        data_dir=work / "data",
        token=TOKEN,
        token_source="test",
        allow_random_backbone=True,
        max_concurrent_uploads=1,
        upload_retry_after_s=7,
    )
    return create_app(settings)  # no lifespan here: the worker never starts


@pytest.fixture
def client(app: Any) -> TestClient:
    return TestClient(app, headers=AUTH, raise_server_exceptions=False)


def test_ids_beyond_sqlite_range_answer_json_422(client: TestClient) -> None:
    for method, path, body in [
        ("GET", f"/v1/tasks/{BIG}", None),
        ("GET", f"/v1/jobs/{BIG}", None),
        ("DELETE", f"/v1/jobs/{BIG}", None),
        ("POST", "/v1/jobs", {"task_ids": [1, BIG]}),
    ]:
        r = client.request(method, path, json=body)
        assert r.status_code == 422 and r.headers["content-type"] == "application/json", (path, r.text)
        problem = r.json()["problems"][0]
        assert "less than or equal to 9223372036854775807" in problem["reason"], r.json()
    assert client.get(f"/v1/tasks/{BIG - 1}").status_code == 404  # the largest id is a valid (absent) id
    assert client.get("/v1/tasks/0").status_code == 422


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    for method, path, allow in [
        ("PUT", "/v1/tasks", "GET, POST"),
        ("PATCH", "/v1/jobs/3", "DELETE, GET"),
        ("POST", "/v1/model", "GET"),
        ("DELETE", "/healthz", "GET"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
        assert allow in r.json()["detail"]


def test_without_the_token_everything_but_healthz_is_401(app: Any) -> None:
    anon = TestClient(app, raise_server_exceptions=False)
    assert anon.get("/healthz").json() == {"status": "ok"}
    for method, path, kwargs in [
        ("GET", "/no/such/route", {}),  # not 404: routes are not revealed
        ("PUT", "/v1/tasks", {}),  # not 405
        ("GET", f"/v1/tasks/{BIG}", {}),  # not 422
        ("POST", "/v1/jobs", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/jobs", {"content": b"[" * 50_000, "headers": {"content-type": "application/json"}}),
        ("GET", "/openapi.json", {}),
    ]:
        r = anon.request(method, path, **kwargs)
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="edgecl"', (
            path,
            r.text,
        )
        assert r.headers["content-type"] == "application/json"


def test_failed_authentication_is_logged_without_the_token(
    app: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgecl.serve.auth import AuthFailureLog

    times = iter([1e6, 2e6])  # two failures 1e6 s apart: both logged
    monkeypatch.setattr(app.state.auth, "failures", AuthFailureLog(clock=lambda: next(times)))
    caplog.set_level(logging.WARNING, logger="edgecl.serve")
    wrong = TestClient(app, headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert wrong.get("/v1/tasks").status_code == 401
    assert TestClient(app).post("/v1/jobs", json={}).status_code == 401
    text = caplog.text
    assert "authentication failed: testclient GET /v1/tasks" in text
    assert "authentication failed: testclient POST /v1/jobs" in text
    assert "wrong-token" not in text and TOKEN not in text


def test_unhandled_errors_answer_json_500_with_a_logged_id(
    app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[Any]:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(app.state.ctx.store, "list_tasks", broken)
    caplog.set_level(logging.ERROR, logger="edgecl.serve")
    r = client.get("/v1/tasks")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert len(body["error_id"]) == 12 and body["error_id"] in body["detail"]
    record = next(rec for rec in caplog.records if body["error_id"] in rec.getMessage())
    assert record.exc_info is not None and record.exc_info[0] is OverflowError  # the traceback is logged


def test_job_bodies_are_capped_and_uploads_limited(app: Any, client: TestClient) -> None:
    r = client.post("/v1/jobs", json={"method_options": {"note": "x" * 70_000}})
    assert r.status_code == 413 and r.json()["detail"] == "request body larger than 65536 bytes"
    slots = app.state.ctx.upload_slots
    assert slots.try_acquire()  # the one upload slot is taken
    try:
        r = client.post("/v1/tasks", files={"file": ("a.zip", b"PK")})
        assert r.status_code == 429 and r.headers["retry-after"] == "7", r.text
        assert "--max-concurrent-uploads" in r.json()["detail"]
    finally:
        slots.release()
    r = client.post("/v1/tasks", files={"file": ("a.zip", b"PK")})
    assert r.status_code == 422, r.text  # the slot is free again; the archive is refused on its merits
    metrics = client.get("/metrics").text
    assert 'edgecl_uploads_total{result="throttled"} 1.0' in metrics
    assert 'edgecl_uploads_total{result="rejected"} 1.0' in metrics


def test_multipart_file_parts_are_spooled_to_unnamed_files(tmp_path: Path) -> None:
    from edgecl.serve.multipart import read_form

    payload = os.urandom(3 * 2**20)
    request = httpx.Request(
        "POST",
        "http://x/",
        files=[("files", ("a.bin", payload)), ("files", ("b.bin", b"b"))],
        data={"k": "v"},
    )
    body = request.read()
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": bool(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "query_string": b"",
        "headers": [(b"content-type", request.headers["content-type"].encode())],
    }

    async def parse() -> None:
        form = await read_form(Request(scope, receive), tmp_path, max_files=2)
        try:
            first, second = form.getlist("files")
            assert form["k"] == "v" and first.filename == "a.bin" and first.size == len(payload)  # type: ignore[union-attr]
            info = os.fstat(first.file.fileno())  # type: ignore[union-attr]
            assert stat.S_ISREG(info.st_mode) and info.st_nlink == 0  # a real file on disk, with no name
            assert info.st_dev == os.stat(tmp_path).st_dev and info.st_size == len(payload)
            assert first.file.read() == payload and second.file.read() == b"b"  # type: ignore[union-attr]
            assert list(tmp_path.iterdir()) == []  # nothing to clean up after a crash
        finally:
            await form.close()
        with pytest.raises(Exception, match="more than 1 files"):
            chunks[:] = [body]
            await read_form(Request(scope, receive), tmp_path, max_files=1)

    asyncio.run(parse())
