"""The upload corpus through the HTTP API (``create_app`` under a TestClient, no worker): every malformed
upload is answered 4xx with a JSON reason and leaves the store as it was (rows and files); every unusual but
valid upload is accepted with the classes and images it holds."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient
from upload_corpus import KNOWN, Limits, Upload, bad_uploads, good_uploads

from edgecl.data.ingest import IngestLimits
from edgecl.profiles import load_profile
from edgecl.serve import ServeSettings, create_app

TOKEN = "corpus-token-0123456789abcdef"
CORPUS_LIMITS = Limits()
LIMITS = IngestLimits(
    max_images=CORPUS_LIMITS.images,
    max_members=CORPUS_LIMITS.members,
    max_image_pixels=CORPUS_LIMITS.image_pixels,
    max_total_pixels=CORPUS_LIMITS.total_pixels,
    max_image_bytes=CORPUS_LIMITS.image_bytes,
    max_total_bytes=CORPUS_LIMITS.total_bytes,
    expansion_grace_bytes=CORPUS_LIMITS.expansion_grace,
    max_labels_bytes=CORPUS_LIMITS.labels_bytes,
    listing_budget_bytes=CORPUS_LIMITS.listing_budget,
    max_classes=50,
)
PROFILE = "device: cpu\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\nweights: null\n"
BAD = bad_uploads(CORPUS_LIMITS)
GOOD = good_uploads()


class Api:
    """The app under test and a view of its store."""

    def __init__(self, client: TestClient, data_dir: Path) -> None:
        self.client = client
        self.data_dir = data_dir

    def post(self, up: Upload) -> httpx.Response:
        return self.client.post(
            "/v1/tasks", files=up.files, data=up.data, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def snapshot(self) -> tuple[Any, ...]:
        """Rows of the store's tables and every file under tasks/ and staging/ (path, size)."""
        with sqlite3.connect(self.data_dir / "edgecl.db") as conn:
            rows = tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("tasks", "jobs"))
            classes = tuple(conn.execute("SELECT name, task_id FROM task_classes ORDER BY name"))
        files = tuple(
            sorted(
                (str(p.relative_to(self.data_dir)), p.stat().st_size)
                for sub in ("tasks", "staging")
                for p in (self.data_dir / sub).rglob("*")
            )
        )
        return rows, classes, files


@pytest.fixture(scope="session")
def api(tmp_path_factory: pytest.TempPathFactory) -> Api:
    root = tmp_path_factory.mktemp("ingest-corpus")
    (root / "p.yaml").write_text(PROFILE)
    settings = ServeSettings(
        profile=load_profile(str(root / "p.yaml")),
        data_dir=root / "data",
        token=TOKEN,
        token_source="test",
        allow_random_backbone=True,
        limits=LIMITS,
    )
    (root / "data").mkdir()
    api = Api(TestClient(create_app(settings), raise_server_exceptions=False), root / "data")
    from corpus_builders import build_zip, entries_of, image, palette

    colors = iter(palette(4096)[-40:])
    seed = {f"{c}/{i}.png": image(next(colors), 12) for c in KNOWN for i in range(2)}
    r = api.post(Upload("seed", [("file", ("seed.zip", build_zip(entries_of(seed)), "application/zip"))]))
    assert r.status_code == 201, r.text
    assert r.json()["classes"] == sorted(KNOWN)
    return api


def test_the_corpus_covers_every_kind_of_malformed_upload() -> None:
    assert len(BAD) >= 200
    kinds = Counter(u.case.split("/")[0] for u in BAD)
    assert {"zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "image", "labels", "polyglot"} <= set(kinds)
    words = " ".join(u.case for u in BAD)
    kinds_of_case = [
        "truncated",
        "bomb",
        "traversal",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "polyglot",
    ]
    kinds_of_case += ["zero-bytes", "wrong-extension", "huge-dimensions", "known", "nested", "duplicate"]
    for word in kinds_of_case:
        assert word in words, word


@pytest.mark.parametrize("up", BAD, ids=lambda u: u.case)
def test_malformed_upload_is_refused_with_a_json_reason(api: Api, up: Upload) -> None:
    before = api.snapshot()
    r = api.post(up)
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    if up.status is not None:
        assert r.status_code == up.status, body
    assert api.snapshot() == before


@pytest.mark.parametrize("up", GOOD, ids=lambda u: u.case)
def test_unusual_but_valid_upload_is_accepted(api: Api, up: Upload) -> None:
    r = api.post(up)
    assert r.status_code == 201, r.text[:1000]
    body = r.json()
    assert body["classes"] == sorted(up.classes)
    assert body["num_images"] == up.images
    assert len(body["duplicates"]) == up.duplicates
    task_dirs = list((api.data_dir / "tasks").iterdir())
    stored = [p for d in task_dirs for p in d.rglob("*.*") if p.name != "manifest.json"]
    assert sum(1 for p in stored if p.parent.parent.name in {d.name for d in task_dirs}) >= up.images
