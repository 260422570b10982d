"""Upload validation (edgecl.data.ingest): archives, loose images, labels, and every kind of bad input."""

from __future__ import annotations

import bz2
import io
import json
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from edgecl.data.ingest import (
    IngestLimits,
    Problem,
    UploadRejected,
    decode_image,
    detect_kind,
    ingest_archive,
    ingest_images,
    label_key,
    parse_labels,
    printable,
    probe_image,
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


# ------------------------------------------------------------------------------ hardening (issue 24)
class Counting(io.BytesIO):
    """An upload that records the furthest byte read from it."""

    furthest = 0

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().read(n)
        self.furthest = max(self.furthest, self.tell())
        return data


def gzip_of(parts: list[tuple[bytes, int]]) -> bytes:
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = b""
    for literal, zeros in parts:
        out += comp.compress(literal) + comp.compress(b"\x00" * zeros)
    return out + comp.flush()


def header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)


def test_a_member_over_the_size_limit_stops_reading_at_its_header(tmp_path: Path) -> None:
    # 20 members of 1 MiB zeros: the first header already says 1 MiB > 256 KiB; nothing after it is read
    limits = IngestLimits(max_image_bytes=256 * 1024)
    data = gzip_of([(header(f"a/{i}.png", 2**20), 2**20) for i in range(20)])
    upload = Counting(data)
    with pytest.raises(
        UploadRejected, match="'a/0.png' is 1048576 bytes; the per-image limit is 262144"
    ) as err:
        ingest_archive(upload, tmp_path, limits)
    assert err.value.status == 413
    assert upload.furthest < 70_000 < len(data)  # gzip reads ahead at most 64 KiB past the header


def test_decompressed_bytes_are_bounded_whatever_they_hold(tmp_path: Path) -> None:
    # ignored junk members count too; the expansion check fires at the first chunk past the grace size whose
    # total exceeds 100 x the compressed bytes consumed
    limits = IngestLimits(max_image_bytes=2**20, max_total_bytes=3 * 2**20, expansion_grace_bytes=2**40)
    junk = gzip_of([(header(f"a/.junk{i}", 2**20 - 512), 2**20 - 512) for i in range(5)])
    with pytest.raises(UploadRejected, match="expands to more than 3145728 bytes") as err:
        ingest_archive(io.BytesIO(junk), tmp_path, limits)
    assert err.value.status == 413
    ratio = IngestLimits(max_image_bytes=2**20, expansion_grace_bytes=2**20)
    with pytest.raises(UploadRejected, match="expands more than 100x") as err:
        ingest_archive(io.BytesIO(junk), tmp_path, ratio)
    assert err.value.status == 413


def test_a_broken_tar_header_rejects_the_whole_archive(tmp_path: Path) -> None:
    members = {f"{'cat' if i < 4 else 'dog'}/{i}.png": image_bytes((i * 30, 0, 0)) for i in range(8)}
    raw = make_tar(members, "w").getvalue()
    assert all(len(d) <= 512 for d in members.values())  # so member i's header is at i * 1024
    broken = raw[:2048] + b"X" + raw[2049:]  # third header, checksum not fixed
    with tarfile.open(fileobj=io.BytesIO(broken)) as tf:
        assert len(tf.getmembers()) == 2  # what tarfile alone makes of it: a quiet, partial archive
    with pytest.raises(
        UploadRejected, match=r"corrupt tar header at byte 2048, after 2 members \(bad checksum\)"
    ):
        ingest_archive(io.BytesIO(broken), tmp_path, LIMITS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda gz: gz[:-8] + bytes([gz[-8] ^ 1]) + gz[-7:], "CRC check failed"),
        (lambda gz: gz[:-1] + bytes([gz[-1] ^ 1]), "Incorrect length"),
        (lambda gz: gz + b"trailing", "Not a gzipped file"),
        (lambda gz: gz[:-4], "ended before the end-of-stream marker"),
    ],
)
def test_a_damaged_gzip_stream_is_rejected(tmp_path: Path, damage: Any, match: str) -> None:
    gz = make_tar(two_classes(), "w:gz").getvalue()
    bad = damage(gz)
    if "CRC" in match:
        with tarfile.open(fileobj=io.BytesIO(bad), mode="r:gz") as tf:
            assert len(tf.getmembers()) == 4  # tarfile never reads the CRC
    with pytest.raises(UploadRejected, match=match):
        ingest_archive(io.BytesIO(bad), tmp_path, LIMITS)


@pytest.mark.parametrize("how", ["bz2", "xz"])
def test_bzip2_and_xz_streams_must_end_cleanly(tmp_path: Path, how: str) -> None:
    tar = make_tar(two_classes(), "w").getvalue()
    comp = {"bz2": bz2.compress, "xz": lzma.compress}[how]
    half = len(tar) // 2
    two_streams = comp(tar[:half]) + comp(tar[half:]) + b"\x00" * 8  # concatenated streams, zero padding
    assert ingest_archive(io.BytesIO(two_streams), tmp_path / "ok", LIMITS).num_images == 4
    with (
        lzma.open(io.BytesIO(comp(tar) + b"garbage"))
        if how == "xz"
        else bz2.open(io.BytesIO(comp(tar) + b"garbage")) as fh
    ):
        assert len(fh.read()) == len(tar)  # the library readers ignore the garbage
    with pytest.raises(UploadRejected, match="data after the end of the compressed stream"):
        ingest_archive(io.BytesIO(comp(tar) + b"garbage"), tmp_path / "bad", LIMITS)


def test_unreadable_zip_members_are_named_not_500(tmp_path: Path) -> None:
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in two_classes().items():
            zf.writestr(name, data)
    buf = deflated.getvalue()
    with zipfile.ZipFile(io.BytesIO(buf)) as zf:
        info = zf.getinfo("cat/a.png")
    start = info.header_offset + 30 + len("cat/a.png")
    corrupt = buf[:start] + b"\xff\xff\xff" + buf[start + 3 :]  # invalid deflate block type
    with pytest.raises(UploadRejected) as err:
        ingest_archive(io.BytesIO(corrupt), tmp_path, LIMITS)
    assert "cannot be read from the archive: error: Error -3" in reasons(err)["cat/a.png"]
    for method in (9, 99):  # deflate64, AES: zipfile raises NotImplementedError when opened
        patched = bytearray(buf)
        for at in (info.header_offset + 8, buf.index(b"PK\x01\x02") + 10):
            patched[at : at + 2] = method.to_bytes(2, "little")
        with pytest.raises(UploadRejected) as err:
            ingest_archive(io.BytesIO(bytes(patched)), tmp_path, LIMITS)
        assert f"compression method {method}" in reasons(err)["cat/a.png"]


def test_labels_are_checked_against_known_classes_before_any_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgecl.data.ingest.pipeline as pipeline

    decoded: list[int] = []
    monkeypatch.setattr(pipeline, "decode_image", lambda *a, **k: decoded.append(1))
    archive = make_zip({**two_classes(), "Heron/x.png": image_bytes((1, 2, 3))})
    with pytest.raises(UploadRejected) as err:
        ingest_archive(archive, tmp_path, LIMITS, known_classes={"heron": 3, "dog": 2})
    assert err.value.status == 409
    looks = "class looks like 'heron' of task 3 (differs only in case, spacing or look-alike characters)"
    assert reasons(err) == {"Heron": looks, "dog": "class already in task 2"}
    files = [("a.png", io.BytesIO(image_bytes()))]
    with pytest.raises(UploadRejected) as err:
        ingest_images(files, ["dog"], tmp_path, LIMITS, known_classes={"dog": 2})
    assert err.value.status == 409 and files[0][1].tell() == 0  # not even read
    assert decoded == []


def test_total_pixels_are_bounded_from_headers_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgecl.data.ingest.pipeline as pipeline

    decoded: list[int] = []
    monkeypatch.setattr(pipeline, "decode_image", lambda *a, **k: decoded.append(1))
    limits = IngestLimits(max_total_pixels=4 * 1000 * 1000)  # four 1000x1000 images fit, a fifth does not
    members = {f"{'cat' if i % 2 else 'dog'}/{i}.png": image_bytes((i, 0, 0), size=1000) for i in range(5)}
    with pytest.raises(UploadRejected, match=r"more than 4000000 pixels in all \(at 'dog/4.png'\)") as err:
        ingest_archive(make_zip(members), tmp_path, limits)
    assert err.value.status == 413 and decoded == []


def test_duplicates_are_dropped_within_a_class_and_refused_across_classes(tmp_path: Path) -> None:
    same = image_bytes((9, 9, 9))
    members = {
        **two_classes(),
        "cat/copy.png": two_classes()["cat/a.png"],
        "dog/z.png": same,
        "dog/z2.png": same,
    }
    task = ingest_archive(make_zip(members), tmp_path / "a", LIMITS)
    assert task.counts == {"cat": 2, "dog": 3}
    assert sorted((d.member, d.same_as) for d in task.duplicates) == [
        ("cat/copy.png", "cat/a.png"),
        ("dog/z2.png", "dog/z.png"),
    ]
    assert task.report()["duplicates"][0] == {"member": "cat/copy.png", "same_as": "cat/a.png"}
    assert any("dropped 2 duplicate" in w for w in task.warnings)
    members["cat/stolen.png"] = same
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_zip(members), tmp_path / "b", LIMITS)
    assert "same bytes as 'dog/z.png' of class 'dog'" in reasons(err)["cat/stolen.png"]


def test_label_rules_and_lookalike_keys() -> None:
    assert validate_label("cre\u0300me") == "crème"  # NFD -> NFC
    assert validate_label("東京タワー") == "東京タワー"  # Han + Katakana is one writing system
    assert validate_label("кот") == "кот"
    for bad, why in [
        ("c\u200bat", "U+200B ZERO WIDTH SPACE"),
        ("\ufeffcat", "U+FEFF"),
        ("gnp.\u202eexe", "RIGHT-TO-LEFT OVERRIDE"),
        ("\u0441at", "CYRILLIC (U+0441 CYRILLIC SMALL LETTER ES), LATIN"),
        ("a\ud800", "unpaired surrogate"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            validate_label(bad)
    same = [
        ("Cat", "cat"),
        ("ｃａｔ", "cat"),
        ("\u0441\u043e\u0430\u0445", "coax"),
        ("a  b", "a b"),
        ("l1", "1l"),
    ]
    for a, b in same:
        assert label_key(a) == label_key(b), (a, b)
    assert label_key("cat") != label_key("cot") and label_key("кот") != label_key("kot")
    with pytest.raises(UploadRejected, match="nested too deep"):
        parse_labels("[" * 50_000 + "]" * 50_000, ["a.png"], max_bytes=10**6)
    with pytest.raises(UploadRejected, match="larger than 100 bytes"):
        parse_labels(json.dumps(["x" * 200]), ["a.png"], max_bytes=100)
    with pytest.raises(UploadRejected, match="look alike"):
        parse_labels('["Heron", "heron"]', ["a.png", "b.png"])


def test_images_with_data_after_their_end_are_refused() -> None:
    jpg = image_bytes(fmt="JPEG", size=32)
    png = image_bytes(size=32)
    assert probe_image(jpg + b"\x00" * 16, 10_000).format == "JPEG"  # zero padding is harmless
    for data in (jpg + b"PK\x03\x04payload", png + b"<script>", png[:-3]):
        with pytest.raises(ValueError, match="after the end|proper end"):
            probe_image(data, 10_000)
    assert decode_image(png + b"junk", 10_000)[0].format == "PNG"  # /v1/predict stays lenient


def test_error_bodies_escape_names_from_the_upload() -> None:
    err = UploadRejected("x", [Problem("q\udcff/\u202eevil\x00.png", "bad")])
    body = json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8")  # as Starlette renders it
    assert b"q\\\\udcff/\\\\u202eevil\\\\x00.png" in body
    assert printable("a" * 400, 10) == "a" * 10 + "..."


def test_listing_stops_after_the_budget_once_the_upload_is_rejected(tmp_path: Path) -> None:
    limits = IngestLimits(max_image_bytes=2**20, listing_budget_bytes=2**20, expansion_grace_bytes=2**40)
    members = {f"cat/{i}.png": b"\x01" * (2**19) for i in range(10)}  # 10 non-images of 512 KiB
    with pytest.raises(UploadRejected) as err:
        ingest_archive(make_tar(members), tmp_path, limits)
    # the first problem, then 1 MiB more: members 1 and 2 are listed, member 3 crosses the budget
    assert len(err.value.problems) == 4
    assert err.value.note and "stopped reading" in err.value.note
