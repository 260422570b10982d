"""The OpenAPI schema is true: a bounded schemathesis run against the app (in-process, over ASGI) finds no
server error, no undocumented status, no response that breaks its schema, no wrong ``Allow`` header, and no
route that ignores the token. The store holds a learned task and a finished job first, so the success
answers of every route are checked too (random ViT, SYNTHETIC images)."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from PIL import Image
from starlette.testclient import TestClient

from edgecl.profiles import load_profile
from edgecl.serve.app import api_schema

TOKEN = "schema-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROFILE = (
    "device: cpu\nmethod: cps_prompt\nmethod_options: {expected_tasks: 2, pool_size: 4}\nbatch_size: 4\n"
    "epochs: 1\nthreads: 1\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\nweights: null\n"
    "sampler_period_s: 0.5\ninference_engine: torch\n"
)

MAX_EXAMPLES = 12
"""Examples per operation and phase: the run takes ~20-30 s on one core."""

CONFIG = {
    "seed": 20240601,
    "headers": AUTH,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    "checks": {
        "enabled": True,
        # a schema cannot promise that random bytes decode as an image, that a random id exists or that
        # a random job fits the state (no pending task): 404/409/422 answer valid-looking requests here
        "positive_data_acceptance": {"expected-statuses": ["2XX", "404", "409", "413", "422"]},
        # 413 is how the daemon refuses bodies over their size limit (64 KB for job requests)
        "negative_data_rejection": {
            "expected-statuses": ["400", "401", "404", "405", "409", "413", "415", "422", "429"]
        },
    },
}


def _zip(classes: dict[str, list[bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label, images in classes.items():
            for i, data in enumerate(images):
                zf.writestr(f"{label}/{i:03d}.png", data)
    return buf.getvalue()


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


class _AppSlot:
    """The ASGI app schemathesis calls: the module's app once ``served`` has built it. Lifespan events are
    only acknowledged (the fixture owns the worker thread)."""

    app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        assert self.app is not None, "the served fixture builds the app"
        await self.app(scope, receive, send)


SLOT = _AppSlot()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from edgecl.serve import ServeSettings, create_app

    work = tmp_path_factory.mktemp("schema")
    (work / "p.yaml").write_text(PROFILE)
    settings = ServeSettings(
        profile=load_profile(str(work / "p.yaml")),
        data_dir=work / "data",
        token=TOKEN,
        token_source="test",
        allow_random_backbone=True,
        max_request_bytes=4 * 2**20,
    )
    app = create_app(settings)
    ctx = app.state.ctx
    ctx.worker.start()
    try:
        client = TestClient(app, headers=AUTH)
        colors = {"red": (220, 20, 20), "blue": (20, 20, 220)}
        archive = _zip(
            {k: [_png(tuple(min(255, c + 3 * i) for c in v)) for i in range(4)] for k, v in colors.items()}
        )
        assert client.post("/v1/tasks", files={"file": ("t.zip", archive)}).status_code == 201
        job = client.post("/v1/jobs", json={"epochs": 1}).json()["job_id"]
        deadline = time.monotonic() + 240
        while client.get(f"/v1/jobs/{job}").json()["status"] != "done":
            assert time.monotonic() < deadline, client.get(f"/v1/jobs/{job}").json()
            time.sleep(0.2)
        assert client.get("/readyz").status_code == 200
        ctx.store.next_job = lambda: None  # hold the queue: no generated job may train during the run
        SLOT.app = app
        yield app
    finally:
        SLOT.app = None
        ctx.worker.stop()


schema = schemathesis.openapi.from_dict(
    api_schema(), config=schemathesis.config.SchemathesisConfig.from_dict(CONFIG)
)
schema.app = SLOT  # loaded at import: ``parametrize`` makes one test per operation


@schema.parametrize()
def test_api_matches_its_schema(served: Any, case: Any) -> None:
    case.call_and_validate(headers=AUTH)


def test_schema_declares_the_errors_it_sends(served: Any) -> None:
    """Hand check of what the generated run relies on: every operation documents 401 and 500 with the error
    model, and uploads document 400/413/415/422/429."""
    raw = schema.raw_schema
    for path, methods in raw["paths"].items():
        for method, op in methods.items():
            codes = set(op["responses"])
            assert "500" in codes, (method, path)
            if path != "/healthz":
                assert "401" in codes and op.get("security") == [{"bearer": []}], (method, path)
    upload = raw["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"400", "413", "415", "422", "429"} <= set(upload)
    assert "Retry-After" in upload["429"]["headers"]
    error = upload["422"]["content"]["application/json"]["schema"]["$ref"]
    assert error == "#/components/schemas/ErrorBody"
