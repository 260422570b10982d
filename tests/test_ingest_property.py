"""Property test of the ingest functions (hypothesis): random archives, member names, contents, labels and
damage either yield exactly the images given or raise UploadRejected, never another exception, and never
write outside the staging folder (nor leave anything in it when they refuse)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
from pathlib import Path

import pytest
from corpus_builders import compress, image, palette
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from edgecl.data.ingest import (
    IngestedTask,
    IngestLimits,
    UploadRejected,
    ingest_archive,
    ingest_images,
    parse_labels,
    validate_label,
)

LIMITS = IngestLimits(max_image_bytes=64 * 1024, max_total_bytes=2**20, max_members=50, max_images=40)
_COLORS = palette(64)
GOOD = [image(_COLORS[i], 8 + i % 5, ("PNG", "JPEG", "BMP", "WEBP")[i % 4]) for i in range(12)]
BAD = [b"", b"not an image", GOOD[0][:30], GOOD[1][:-5] + b"\x00\x01", b"PK\x03\x04" + bytes(30)]
FOLDERS = [
    "cat",
    "dog",
    "Cat",
    "héron",
    "he\u0301ron",
    " sp ",
    "a\u200bb",
    "\u0441at",
    "x y",
    "猫",
    ".hid",
    "",
]
HOSTILE = ["../x.png", "/abs.png", "C:\\x.png", "loose.png", "__MACOSX/a/b.png", "a/./b.png", "a//b.png"]
HOSTILE += ["a\\b.png", "w/cat/1.png", "w/dog/2.png", "cat/", "cat/sub/deep.png", "a/../b.png"]
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

names = st.one_of(
    st.builds(
        lambda folder, stem, ext: f"{folder}/{stem}.{ext}",
        st.sampled_from(FOLDERS),
        st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=6),
        st.sampled_from(["png", "jpg", "PNG", "webp", "txt"]),
    ),
    st.sampled_from(HOSTILE),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
)
contents = st.one_of(st.sampled_from(GOOD), st.sampled_from(BAD))
safe_member = st.tuples(
    st.builds("{}/{}.png".format, st.sampled_from(["cat", "dog", "héron", "猫", "x y"]), st.integers(0, 50)),
    st.sampled_from(GOOD),
)
any_member = st.tuples(names, contents)
valid_members = st.lists(safe_member, min_size=1, max_size=6, unique_by=(lambda m: m[0], lambda m: m[1]))


def weighted(*choices: tuple[int, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    """One of the strategies, drawn with the given weights."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


members = weighted(
    (2, valid_members),  # valid archives (unique names and images): they must be stored exactly
    (1, st.lists(st.one_of(safe_member, any_member), max_size=8)),
    (1, st.lists(any_member, max_size=8)),
)
damage = weighted(
    (3, st.none()),
    (1, st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255))),
    (1, st.tuples(st.just("cut"), st.floats(0, 1))),
    (1, st.tuples(st.just("append"), st.binary(min_size=1, max_size=40))),
)


def build(kind: str, items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in items:
                zf.writestr(name, data)
        return buf.getvalue()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return compress(buf.getvalue(), kind.partition(".")[2])


def apply(data: bytes, how: tuple[object, ...] | None) -> bytes:
    if how is None or not data:
        return data
    if how[0] == "flip":
        at = min(len(data) - 1, int(float(how[1]) * len(data)))  # type: ignore[arg-type]
        return data[:at] + bytes([data[at] ^ int(how[2])]) + data[at + 1 :]  # type: ignore[call-overload]
    if how[0] == "cut":
        return data[: int(float(how[1]) * len(data))]  # type: ignore[arg-type]
    return data + bytes(how[1])  # type: ignore[arg-type]


def expected_images(items: list[tuple[str, bytes]], kind: str) -> set[tuple[str, str]] | None:
    """(label, sha256) the ingest must store, modelled independently; None when it must refuse. A zip name
    ending in "/" is a folder (refused when it holds data); in a tar it is a file named by its folder."""
    cands = []
    seen = set()
    for name, data in items:
        norm = name.replace("\\", "/")
        parts = [p for p in norm.split("/") if p not in ("", ".")]
        if ".." in parts or norm.startswith("/") or re.match("[A-Za-z]:", norm):
            return None  # unsafe names refuse the upload
        if name.endswith("/") and kind == "zip":
            if data:
                return None
            continue
        key = tuple(unicodedata.normalize("NFC", p) for p in parts)
        if not parts or key in seen:
            return None  # an empty name, or two members at one path
        seen.add(key)
        if any(p.startswith(".") or p in ("__MACOSX", "Thumbs.db", "desktop.ini") for p in parts):
            continue
        cands.append((parts, data))
    if not cands or any(data not in GOOD for _, data in cands):
        return None
    strip = all(len(p) >= 3 for p, _ in cands) and len({p[0] for p, _ in cands}) == 1
    out: dict[str, str] = {}
    for parts, data in cands:
        parts = parts[1:] if strip else parts
        if len(parts) < 2:
            return None
        try:
            validate_label(parts[0])
        except ValueError:
            return None
        label = unicodedata.normalize("NFC", parts[0]).strip()
        digest = hashlib.sha256(data).hexdigest()
        if out.setdefault(digest, label) != label:
            return None
    return {(label, digest) for digest, label in out.items()}


def stored(task: IngestedTask, staging: Path) -> set[tuple[str, str]]:
    return {
        (task.classes[c], hashlib.sha256((staging / rel).read_bytes()).hexdigest())
        for rel, c, _ in task.items
    }


def check_outcome(root: Path, staging: Path, run: object) -> IngestedTask | None:
    try:
        task = run()  # type: ignore[operator]
    except UploadRejected as err:
        assert 400 <= err.status < 500 and err.to_dict()["detail"]
        assert [p for p in root.rglob("*") if p.is_file()] == []
        event("rejected: " + (err.problems[0].reason if err.problems else err.reason)[:40])
        return None
    event("accepted")
    files = {p for p in root.rglob("*") if p.is_file()}
    assert files == {staging / rel for rel, _, _ in task.items}
    assert len(task.items) == len(files)
    return task


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"])
@SETTINGS
@given(items=members, how=damage)
def test_archives_yield_exactly_their_images_or_a_rejection(
    kind: str, items: list[tuple[str, bytes]], how: object
) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate names it is asked to write
            data = build(kind, items)
    except (UnicodeEncodeError, ValueError, IndexError, tarfile.TarError):  # names the writers refuse
        assume(False)
    damaged = apply(data, how)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        staging = root / "staging"
        task = check_outcome(root, staging, lambda: ingest_archive(io.BytesIO(damaged), staging, LIMITS))
        if damaged == data or (how is not None and kind != "tar" and task is not None):
            want = expected_images(items, kind)
            if task is None:
                assert want is None or damaged != data
            else:
                # a damaged archive that still reads (a flipped timestamp, padding) holds the same images
                assert want is not None and stored(task, staging) == want


@SETTINGS
@given(
    files=st.lists(
        st.tuples(st.text(max_size=10), st.one_of(st.sampled_from(GOOD), contents)), min_size=1, max_size=6
    ),
    labels=st.lists(st.one_of(st.sampled_from(FOLDERS), st.text(max_size=8)), min_size=1, max_size=6),
)
def test_loose_images_yield_exactly_their_images_or_a_rejection(
    files: list[tuple[str, bytes]], labels: list[str]
) -> None:
    import json

    names = [n for n, _ in files]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        staging = root / "staging"

        def run() -> IngestedTask:
            parsed = parse_labels(json.dumps(labels), names)
            return ingest_images([(n, io.BytesIO(d)) for n, d in files], parsed, staging, LIMITS)

        task = check_outcome(root, staging, run)
        if task is not None:
            assert len(labels) == len(files) and all(d in GOOD for _, d in files)
            want = {
                (unicodedata.normalize("NFC", lab).strip(), hashlib.sha256(d).hexdigest())
                for (_, d), lab in zip(files, labels, strict=True)
            }
            assert stored(task, staging) == want
