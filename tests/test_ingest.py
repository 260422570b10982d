"""Upload validation (edgecl.data.ingest): archives, loose images, labels, and every kind of bad input."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from edgecl.data.ingest import (
    IngestLimits,
    UploadRejected,
    decode_image,
    detect_kind,
    ingest_archive,
    ingest_images,
    parse_labels,
    validate_label,
)

LIMITS = IngestLimits()


def image_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 16, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    buf.seek(0)
    return buf


def make_tar(
    members: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] | None = None
) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    buf.seek(0)
    return buf


def two_classes(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}cat/a.png": image_bytes((250, 0, 0)),
        f"{prefix}cat/b.jpg": image_bytes((240, 10, 0), fmt="JPEG"),
        f"{prefix}dog/sub/c.png": image_bytes((0, 0, 250)),
        f"{prefix}dog/d.bmp": image_bytes((0, 10, 240), fmt="BMP"),
    }


def reasons(err: pytest.ExceptionInfo[UploadRejected]) -> dict[str, str]:
    return {p.member: p.reason for p in err.value.problems}


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_archive_of_class_folders_is_ingested(tmp_path: Path, kind: str) -> None:
    members = {**two_classes(), ".DS_Store": b"junk", "__MACOSX/cat/._a.png": b"junk"}
    if kind == "zip":
        fh = make_zip(members)
    else:
        fh = make_tar(members, "w:gz" if kind == "tar.gz" else "w")
    assert detect_kind(fh.read(512)) == ("zip" if kind == "zip" else "tar")
    fh.seek(0)
    task = ingest_archive(fh, tmp_path, LIMITS, eval_fraction=0.0)
    assert task.classes == ["cat", "dog"]
    assert task.counts == {"cat": 2, "dog": 2}
    assert task.num_images == 4
    assert any("ignored 2" in w for w in task.warnings)
    for rel, cls, split in task.items:
        assert split == "train"
        assert (tmp_path / rel).is_file()
        assert rel.split("/")[0] == f"c{['cat', 'dog'].index(task.classes[cls]):03d}"
    # stored files keep their bytes and get an extension from their real format
    assert sorted(Path(rel).suffix for rel, _, _ in task.items) == [".bmp", ".jpg", ".png", ".png"]


def test_one_wrapping_folder_is_stripped(tmp_path: Path) -> None:
    task = ingest_archive(make_zip(two_classes("mytask/")), tmp_path, LIMITS)
    assert task.classes == ["cat", "dog"]


def test_eval_split_is_deterministic_and_keeps_training_images(tmp_path: Path) -> None:
    members = {f"cat/{i}.png": image_bytes((i * 20, 0, 0)) for i in range(10)}
    members.update({f"dog/{i}.png": image_bytes((0, 0, 100 + i * 20)) for i in range(3)})
    a = ingest_archive(make_zip(members), tmp_path / "a", LIMITS, eval_fraction=0.2)
    b = ingest_archive(make_zip(members), tmp_path / "b", LIMITS, eval_fraction=0.2)
    assert a.items == b.items
    assert a.eval_counts == {"cat": 2, "dog": 0}


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../evil/x.png", "traversal"), ("cat/../../x.png", "traversal"), ("/etc/x.png", "absolute")],
)
def test_unsafe_names_are_rejected_and_nothing_written(tmp_path: Path, name: str, reason: str) -> None:
    for fh in (
        make_zip({**two_classes(), name: image_bytes()}),
        make_tar({**two_classes(), name: image_bytes()}),
    ):
        with pytest.raises(UploadRejected) as err:
            ingest_archive(fh, tmp_path, LIMITS)
        assert reason in reasons(err)[name]
        assert err.value.status == 422
    assert list(tmp_path.iterdir()) == []


def test_links_and_special_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_zip(two_classes(), symlinks={"cat/link.png": "/etc/passwd"}), tmp_path, LIMITS)
    assert reasons(err) == {"cat/link.png": "symbolic link"}
    sym = tarfile.TarInfo("cat/sym.png")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("dog/hard.png")
    hard.type, hard.linkname = tarfile.LNKTYPE, "cat/a.png"
    fifo = tarfile.TarInfo("dog/fifo")
    fifo.type = tarfile.FIFOTYPE
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_tar(two_classes(), extra=[sym, hard, fifo]), tmp_path, LIMITS)
    got = reasons(err)
    assert got["cat/sym.png"] == "symbolic link"
    assert got["dog/hard.png"] == "hard link"
    assert "special" in got["dog/fifo"]
    assert list(tmp_path.iterdir()) == []


def test_empty_archives_are_rejected(tmp_path: Path) -> None:
    for fh in (make_zip({}), make_tar({}), make_zip({"cat/": b""})):
        with pytest.raises(UploadRejected, match="holds no images"):
            ingest_archive(fh, tmp_path, LIMITS)


def test_bad_images_are_listed_by_member(tmp_path: Path) -> None:
    good = image_bytes(fmt="JPEG", size=64)
    members = {
        **two_classes(),
        "cat/truncated.jpg": good[: len(good) // 2],
        "dog/notes.txt": b"not an image",
        "loose.png": image_bytes(),
    }
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_zip(members), tmp_path, LIMITS)
    got = reasons(err)
    assert "loose.png" in got and "class folder" in got["loose.png"]
    # names are checked first: fix the layout, then the image contents are checked
    del members["loose.png"]
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_zip(members), tmp_path / "2", LIMITS)
    got = reasons(err)
    assert set(got) == {"cat/truncated.jpg", "dog/notes.txt"}
    assert "truncated" in got["cat/truncated.jpg"]
    assert "not a decodable image" in got["dog/notes.txt"]


def test_decompression_bombs_and_size_limits(tmp_path: Path) -> None:
    limits = IngestLimits(max_image_pixels=100 * 100, max_members=5, max_images=3, max_image_bytes=10_000)
    big = image_bytes(size=200)  # tiny file, 40000 pixels
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_zip({"cat/big.png": big, "dog/x.png": image_bytes()}), tmp_path, limits)
    assert "exceeds the limit" in reasons(err)["cat/big.png"]
    many = {f"c{i}/x.png": image_bytes() for i in range(6)}
    with pytest.raises(UploadRejected, match="members") as err:
        ingest_archive(make_zip(many), tmp_path, limits)
    assert err.value.status == 413
    with pytest.raises(UploadRejected, match="more than 3 images") as err:
        ingest_archive(make_tar({f"c{i}/x.png": image_bytes() for i in range(4)}), tmp_path, limits)
    assert err.value.status == 413
    noisy = Image.effect_noise((90, 90), 100).convert("RGB")
    buf = io.BytesIO()
    noisy.save(buf, format="BMP")
    with pytest.raises(UploadRejected, match="'cat/noisy.bmp' is 24[0-9]+ bytes; the per-image limit") as err:
        ingest_archive(
            make_zip({"cat/noisy.bmp": buf.getvalue(), "dog/x.png": image_bytes()}), tmp_path, limits
        )
    assert err.value.status == 413


def test_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(UploadRejected, match="not a readable zip"):
        ingest_archive(io.BytesIO(b"PK\x03\x04garbage"), tmp_path, LIMITS)
    with pytest.raises(UploadRejected, match="not a readable tar"):
        ingest_archive(io.BytesIO(b"\x1f\x8bgarbage"), tmp_path, LIMITS, kind="tar")


def test_loose_images_with_labels(tmp_path: Path) -> None:
    files = [("a.png", io.BytesIO(image_bytes((255, 0, 0)))), ("b.jpg", io.BytesIO(image_bytes(fmt="JPEG")))]
    labels = parse_labels('["heron", "stork"]', ["a.png", "b.jpg"])
    task = ingest_images(files, labels, tmp_path, LIMITS)
    assert task.classes == ["heron", "stork"]
    assert task.counts == {"heron": 1, "stork": 1}
    one = ingest_images(
        [("x.png", io.BytesIO(image_bytes()))], parse_labels('"bee"', ["x.png"]), tmp_path / "1", LIMITS
    )
    assert one.classes == ["bee"]
    assert any("single class" in w for w in one.warnings)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (None, "need a 'labels' field"),
        ('["a",', "not valid JSON"),
        ('["a"]', "2 file"),
        ("42", "must be a JSON list"),
        ('{"a.png": "x"}', "does not match"),
        ('["ok", "bad/name"]', "invalid class names"),
        ('["ok", ""]', "invalid class names"),
    ],
)
def test_wrong_labels_are_rejected(raw: str | None, match: str) -> None:
    with pytest.raises(UploadRejected, match=match) as err:
        parse_labels(raw, ["a.png", "b.png"])
    assert err.value.status == 422


def test_labels_as_object() -> None:
    assert parse_labels('{"b.png": "y", "a.png": "x"}', ["a.png", "b.png"]) == ["x", "y"]


def test_truncated_loose_image_is_rejected(tmp_path: Path) -> None:
    data = image_bytes(fmt="JPEG", size=64)
    with pytest.raises(UploadRejected) as err:
        ingest_images([("t.jpg", io.BytesIO(data[:200]))], ["x"], tmp_path, LIMITS)
    assert "t.jpg" in reasons(err)
    assert list(tmp_path.iterdir()) == []


def test_decode_image_and_labels() -> None:
    info, rgb = decode_image(image_bytes(fmt="WEBP"), 10_000)
    assert (info.format, info.ext, rgb.mode) == ("WEBP", "webp", "RGB")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    with pytest.raises(ValueError, match="unsupported image format GIF"):
        decode_image(buf.getvalue(), 10_000)
    assert validate_label("Great Blue Heron") == "Great Blue Heron"
    assert validate_label(" x ") == "x"  # stripped
    for bad in ["", "  ", "a/b", "a\\b", "..", "x\n", 3]:
        with pytest.raises(ValueError):
            validate_label(bad)
