"""A generated corpus of uploads for ``POST /v1/tasks``: malformed ones that must be refused (4xx with a
JSON reason, nothing stored) and good-but-unusual ones that must be accepted.

Every malformed upload gets class names of its own, so one that is wrongly accepted cannot turn a later
case into a 409. The corpus is sized for :class:`Limits` (small, so bombs are cheap to build); the app that
receives it must use the same limits. Independent of edgecl (the benchmark sends it to older versions).
"""

from __future__ import annotations

import io
import json
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass, field
from typing import Any

from corpus_builders import (
    ZipEntry,
    build_tar,
    build_zip,
    compress,
    end_offset,
    entries_of,
    flip,
    gzip_zeros_stream,
    header_offsets,
    image,
    jpeg_with_size,
    member_data_offset,
    palette,
    patch_header,
    png_with_header,
    tar_header,
    tar_info,
    zipfile_bytes,
)
from PIL import Image

KNOWN = ("cat", "dog", "crème", "coax")
"""Classes of the task the store holds before the corpus is sent."""


@dataclass(frozen=True)
class Limits:
    """The upload limits the corpus is built for (mirrored by the receiving app's IngestLimits)."""

    image_bytes: int = 256 * 1024
    total_bytes: int = 4 * 2**20
    image_pixels: int = 1024 * 1024
    total_pixels: int = 4 * 1024 * 1024
    members: int = 200
    images: int = 150
    labels_bytes: int = 64 * 1024
    expansion_grace: int = 2**20
    listing_budget: int = 2**20


@dataclass
class Upload:
    """One request: multipart ``files`` (httpx form) and ``data`` fields; what must come back."""

    case: str
    files: list[tuple[str, tuple[str, bytes, str]]]
    data: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    """Bad uploads: the exact status when it matters (409, 413); any 4xx otherwise."""
    classes: tuple[str, ...] = ()
    """Good uploads: the classes the answer must list."""
    images: int = 0
    duplicates: int = 0


def _archive(
    case: str, data: bytes, filename: str = "task.zip", status: int | None = None, **kw: Any
) -> Upload:
    return Upload(case, [("file", (filename, data, "application/octet-stream"))], status=status, **kw)


def _images(
    case: str, items: list[tuple[str, bytes]], labels: Any, status: int | None = None, **kw: Any
) -> Upload:
    raw = labels if isinstance(labels, str) else json.dumps(labels)
    files = [("files", (name, data, "application/octet-stream")) for name, data in items]
    return Upload(case, files, {"labels": raw}, status=status, **kw)


class _Bad:
    """Builds the malformed uploads, each with fresh class names."""

    def __init__(self, lim: Limits) -> None:
        self.lim = lim
        self.k = 0
        self.out: list[Upload] = []
        self.colors = iter(palette(4096))

    def fresh(self) -> tuple[str, str]:
        self.k += 1
        return f"x{self.k:03d}a", f"x{self.k:03d}b"

    def img(self, fmt: str = "PNG", size: int = 16) -> bytes:
        return image(next(self.colors), size, fmt)

    def base(self, prefix: str = "") -> dict[str, bytes]:
        a, b = self.fresh()
        return {
            f"{prefix}{a}/1.png": self.img(),
            f"{prefix}{a}/2.jpg": self.img("JPEG"),
            f"{prefix}{b}/3.png": self.img(),
            f"{prefix}{b}/4.png": self.img(),
        }

    def add(self, up: Upload) -> None:
        self.out.append(up)

    def zip_with(self, case: str, extra: dict[str, bytes], status: int | None = None) -> None:
        self.add(_archive(case, build_zip(entries_of({**self.base(), **extra})), status=status))

    def tar_with(
        self, case: str, extra: dict[str, bytes] | None = None, infos: Any = None, **kw: Any
    ) -> None:
        self.add(_archive(case, build_tar({**self.base(), **(extra or {})}, infos, **kw), "task.tar"))

    def loose(self, case: str, data: bytes, name: str = "x.png", status: int | None = None) -> None:
        a, b = self.fresh()
        self.add(_images(case, [(name, data), ("ok.png", self.img())], [a, b], status))


def _zip_cases(c: _Bad) -> None:
    lim = c.lim
    base = c.base()
    zipped = build_zip(entries_of(base))
    # damaged members: zlib.error, unsupported methods, corrupt bzip2/LZMA, bad CRC, encryption
    entries = entries_of(c.base())
    entries[0].compressed = b"\xff\xfe\xfd" + bytes(40)
    c.add(_archive("zip/deflate-corrupt (zlib.error)", build_zip(entries)))
    for method in (9, 99, 6, 98):
        entries = entries_of(c.base())
        entries[1].method = method
        entries[1].compressed = b"\x00" * 20
        c.add(_archive(f"zip/compression-method-{method}", build_zip(entries)))
    for method, label in ((zipfile.ZIP_LZMA, "lzma"), (zipfile.ZIP_BZIP2, "bzip2")):
        data = zipfile_bytes(c.base(), method)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            first = zf.namelist()[0]
        at = member_data_offset(data, first)
        for delta in (14, 30):
            c.add(_archive(f"zip/{label}-member-corrupt+{delta}", flip(data, at + delta)))
    entries = entries_of(c.base(), method=0)
    entries[2].crc = 0x12345678
    c.add(_archive("zip/bad-crc-stored", build_zip(entries)))
    entries = entries_of(c.base())
    entries[0].crc = 1
    c.add(_archive("zip/bad-crc-deflate", build_zip(entries)))
    entries = entries_of(c.base())
    entries[3].flags |= 0x1
    c.add(_archive("zip/encrypted-member", build_zip(entries)))
    entries = entries_of(c.base())
    entries[0].file_size = 3
    c.add(_archive("zip/declared-size-smaller", build_zip(entries)))
    entries = entries_of(c.base())
    entries[0].file_size = 100_000
    c.add(_archive("zip/declared-size-larger", build_zip(entries)))
    entries = entries_of(c.base())
    entries[1].local_name = b"zzz/other.jpg"
    c.add(_archive("zip/local-name-differs", build_zip(entries)))
    entries = entries_of(c.base())
    entries[0].name = b"\xff\xfe/bad-utf8.png"
    entries[0].flags |= 0x800
    c.add(_archive("zip/undecodable-utf8-name", build_zip(entries)))
    # structure: end record, directory, layout
    c.add(_archive("zip/no-end-record", zipped[: zipped.rindex(b"PK\x05\x06")]))
    c.add(_archive("zip/trailing-data", build_zip(entries_of(c.base()), suffix=b"EXTRA DATA" * 10)))
    c.add(_archive("zip/multi-volume", build_zip(entries_of(c.base()), disk=1)))
    c.add(
        _archive(
            "zip/too-many-entries-declared", build_zip(entries_of(c.base()), cd_entries=60000), status=413
        )
    )
    c.add(_archive("zip/overlapping-members", build_zip(entries_of(c.base()), duplicate_cd_of=0)))
    hidden = build_zip([ZipEntry(b"hidden.png", c.img())] + entries_of(c.base()))
    # drop the hidden member's directory entry: its bytes stay in the file, unlisted
    cd = hidden.index(b"PK\x01\x02")
    first_len = 46 + len(b"hidden.png")
    eocd = hidden.rindex(b"PK\x05\x06")
    tail = bytearray(hidden[eocd:])
    n = int.from_bytes(tail[8:10], "little") - 1
    tail[8:12] = n.to_bytes(2, "little") * 2
    tail[12:16] = (int.from_bytes(tail[12:16], "little") - first_len).to_bytes(4, "little")
    c.add(_archive("zip/hidden-unlisted-member", hidden[:cd] + hidden[cd + first_len : eocd] + bytes(tail)))
    c.add(_archive("zip/garbage-after-signature", b"PK\x03\x04" + bytes(range(256)) * 4))
    c.add(_archive("zip/empty", build_zip([])))
    a, _ = c.fresh()
    c.add(_archive("zip/only-folders", build_zip([ZipEntry(f"{a}/".encode(), b"", 0)])))
    c.add(_archive("zip/only-junk", build_zip(entries_of({".DS_Store": b"x", "__MACOSX/._a.png": b"y"}))))
    entries = entries_of(c.base())
    entries.append(ZipEntry(b"x/dir/", b"hidden data", 0))
    c.add(_archive("zip/folder-entry-with-data", build_zip(entries)))
    # names and member types
    for case, name in [
        ("traversal", "../evil.png"),
        ("traversal-inner", "q/../../evil.png"),
        ("traversal-backslash", "..\\..\\evil.png"),
        ("absolute", "/etc/evil.png"),
        ("drive-letter", "C:\\evil\\x.png"),
        ("drive-letter-slash", "C:/evil/x.png"),
        ("nul-in-name", "q/evil\x00.png"),
        ("outside-class-folder", "loose.png"),
        ("overlong-name", "q/" + "n" * 5000 + ".png"),
    ]:
        c.zip_with(f"zip/name-{case}", {name: c.img()})
    entries = entries_of(c.base())
    entries.append(ZipEntry(b"", c.img()))
    c.add(_archive("zip/name-empty", build_zip(entries)))
    for case, mode in [
        ("symlink", 0o120777),
        ("char-device", 0o020644),
        ("block-device", 0o060644),
        ("fifo", 0o010644),
        ("socket", 0o140644),
    ]:
        entries = entries_of(c.base())
        entries.append(ZipEntry(b"q/odd.png", b"/etc/passwd", 0, external_attr=mode << 16))
        c.add(_archive(f"zip/member-{case}", build_zip(entries)))
    entries = entries_of(c.base())
    entries.append(ZipEntry(entries[0].name, c.img()))
    c.add(_archive("zip/duplicate-name", build_zip(entries)))
    entries = entries_of(c.base())
    entries.append(ZipEntry(b"./" + entries[0].name, c.img()))
    c.add(_archive("zip/duplicate-name-dot-slash", build_zip(entries)))
    members = c.base()
    same = c.img()
    a, b = sorted({k.split("/")[0] for k in members})
    members.update({f"{a}/same.png": same, f"{b}/same-too.png": same})
    c.add(_archive("zip/same-bytes-two-classes", build_zip(entries_of(members))))
    # bombs and limits
    zeros = b"\x00" * (lim.image_bytes + 1)
    c.add(
        _archive(
            "zip/bomb-member-over-limit", build_zip(entries_of({**c.base(), "q/z.png": zeros})), status=413
        )
    )
    a, b = c.fresh()
    many = {
        f"{a if i % 2 else b}/{i}.png": b"\x00" * (lim.image_bytes - 10)
        for i in range(lim.total_bytes // lim.image_bytes + 2)
    }
    c.add(_archive("zip/bomb-total-over-limit", build_zip(entries_of(many)), status=413))
    a, b = c.fresh()
    ratio = {f"{a if i % 2 else b}/{i}.png": b"\x00" * (lim.image_bytes - 10) for i in range(6)}
    c.add(_archive("zip/bomb-expansion-ratio", build_zip(entries_of(ratio)), status=413))
    a, b = c.fresh()
    many = {f"{a if i % 2 else b}/{i}.png": c.img() for i in range(lim.members + 1)}
    c.add(
        _archive(
            "zip/too-many-members",
            build_zip(
                entries_of(many),
            ),
            status=413,
        )
    )
    nested = build_zip(entries_of(c.base()))
    c.zip_with("zip/nested-zip-member", {"q/inner.png": nested})
    # truncations of a good zip at many offsets
    for i in range(10):
        cut = max(1, (len(zipped) * (i + 1)) // 11)
        c.add(_archive(f"zip/truncated-at-{cut}", zipped[:cut]))
    for i in range(8):  # a slice cut out of the middle: the end record survives, offsets do not
        at = len(zipped) * (i + 1) // 10
        c.add(_archive(f"zip/truncated-slice-{at}-{at + 25}", zipped[:at] + zipped[at + 25 :]))


def _tar_cases(c: _Bad) -> None:
    lim = c.lim
    a, b = c.fresh()
    eight = {f"{a if i < 4 else b}/{i}.png": c.img() for i in range(8)}
    plain = build_tar(eight)
    third = header_offsets(plain)[2]
    c.add(
        _archive(
            "tar/third-header-checksum-broken",
            patch_header(plain, third, 0, b"X", fix_checksum=False),
            "t.tar",
        )
    )
    c.add(
        _archive(
            "tar/third-header-size-garbage",
            patch_header(plain, third, 124, b"zz\x00", fix_checksum=True),
            "t.tar",
        )
    )
    c.add(
        _archive(
            "tar/first-header-checksum-broken", patch_header(plain, 0, 0, b"X", fix_checksum=False), "t.tar"
        )
    )
    for how in ("gz", "bz2", "xz"):
        c.add(
            _archive(
                f"tar.{how}/third-header-broken",
                compress(patch_header(build_tar(c.base()), 1024, 0, b"X", False), how),
                f"t.tar.{how}",
            )
        )
    end = end_offset(plain)
    c.add(_archive("tar/no-end-marker", plain[:end], "t.tar"))
    hidden = build_tar({f"{a}/hidden.png": c.img()})
    body = build_tar(c.base())
    c.add(_archive("tar/member-after-end-marker", body[: end_offset(body) + 1024] + hidden, "t.tar"))
    c.add(_archive("tar/garbage-after-end-marker", body + b"garbage", "t.tar"))
    neg = patch_header(build_tar(c.base()), 0, 124, b"\xff" + b"\xff" * 10 + b"\xfe", True)
    c.add(_archive("tar/negative-size", neg, "t.tar"))
    c.add(_archive("tar/only-zeros", bytes(10240), "t.tar"))
    # member types and names
    c.tar_with("tar/symlink", infos=[tar_info("q/link.png", tarfile.SYMTYPE, link="/etc/passwd")])
    c.tar_with("tar/hardlink", infos=[tar_info("q/hard.png", tarfile.LNKTYPE, link="q/1.png")])
    c.tar_with("tar/char-device", infos=[tar_info("q/dev", tarfile.CHRTYPE)])
    c.tar_with("tar/block-device", infos=[tar_info("q/blk", tarfile.BLKTYPE)])
    c.tar_with("tar/fifo", infos=[tar_info("q/fifo", tarfile.FIFOTYPE)])
    c.tar_with("tar/volume-header", infos=[tar_info("q/vol", b"V")])
    sparse = build_tar(c.base())
    c.add(_archive("tar/gnu-sparse-member", patch_header(sparse, 0, 156, b"S"), "t.tar"))
    for case, name in [
        ("traversal", "../evil.png"),
        ("traversal-inner", "q/../../evil.png"),
        ("absolute", "/etc/evil.png"),
        ("drive-letter", "C:\\evil.png"),
        ("outside-class-folder", "loose.png"),
    ]:
        c.tar_with(f"tar/name-{case}", {name: c.img()})
    c.tar_with(
        "tar/pax-path-traversal",
        {"q/ok.png": c.img()},
        fmt=tarfile.PAX_FORMAT,
        pax={"q/ok.png": {"path": "../../evil.png"}},
    )
    c.tar_with(
        "tar/gnu-longname-traversal",
        {"q/" + "d" * 120 + "/../../../evil.png": c.img()},
        fmt=tarfile.GNU_FORMAT,
    )
    members = c.base()
    first = next(iter(members))
    dup = build_tar({**members, f"./{first}": c.img()})
    c.add(_archive("tar/duplicate-name", dup, "t.tar"))
    pax_big = patch_header(tar_header("././@PaxHeader", 40 * 2**20), 0, 156, b"x")
    c.add(_archive("tar/oversized-pax-header", compress(pax_big + bytes(1024), "gz"), "t.tar.gz"))
    a, b = c.fresh()
    c.add(
        _archive(
            "tar/invalid-utf8-folder",
            build_tar({f"{a}/1.png": c.img(), "q\udcff/2.png": c.img()}, fmt=tarfile.GNU_FORMAT),
            "t.tar",
        )
    )
    # compressed streams
    good = build_tar(c.base())
    gz = compress(good, "gz")
    c.add(_archive("tar.gz/crc-broken", flip(gz, -8), "t.tar.gz"))
    c.add(_archive("tar.gz/length-broken", flip(gz, -2), "t.tar.gz"))
    c.add(_archive("tar.gz/trailing-garbage", gz + b"garbage!", "t.tar.gz"))
    c.add(_archive("tar.gz/deflate-corrupt", flip(compress(build_tar(c.base()), "gz"), 40), "t.tar.gz"))
    bz = compress(build_tar(c.base()), "bz2")
    c.add(_archive("tar.bz2/stream-corrupt", flip(bz, len(bz) // 2), "t.tar.bz2"))
    c.add(_archive("tar.bz2/trailing-garbage", bz + b"garbage!", "t.tar.bz2"))
    xz = compress(build_tar(c.base()), "xz")
    c.add(_archive("tar.xz/stream-corrupt", flip(xz, len(xz) // 2), "t.tar.xz"))
    c.add(_archive("tar.xz/check-corrupt", flip(xz, -14), "t.tar.xz"))
    c.add(_archive("tar.xz/trailing-garbage", xz + b"garbage!", "t.tar.xz"))
    # bombs
    a, b = c.fresh()
    parts = [(tar_header(f"{a}/{i}.png", lim.image_bytes * 4), lim.image_bytes * 4) for i in range(100)]
    c.add(_archive("tar.gz/bomb-100-members-over-limit", gzip_zeros_stream(parts), "t.tar.gz", status=413))
    n = lim.image_bytes - 512
    parts = [(tar_header(f"{a if i % 2 else b}/{i}.png", n), n) for i in range(lim.total_bytes // n + 4)]
    c.add(_archive("tar.gz/bomb-total-over-limit", gzip_zeros_stream(parts), "t.tar.gz", status=413))
    for how in ("bz2", "xz"):
        raw = b"".join(h + bytes(n) for h, n in parts)
        c.add(_archive(f"tar.{how}/bomb-total-over-limit", compress(raw, how), f"t.tar.{how}", status=413))
    a, b = c.fresh()
    many = {f"{a if i % 2 else b}/{i}.png": c.img() for i in range(20)}
    many.update({f"{a}/.hidden-{i}": b"x" for i in range(lim.members)})
    c.add(_archive("tar/too-many-members", build_tar(many), "t.tar", status=413))
    # truncations
    for how, count in (("", 10), ("gz", 12), ("bz2", 5), ("xz", 5)):
        data = compress(good, how)
        stop = end_offset(good) if not how else len(data)
        for i in range(count):
            cut = max(1, stop * (i + 1) // (count + 1))
            ext = f"tar.{how}" if how else "tar"
            c.add(_archive(f"{ext}/truncated-at-{cut}", data[:cut], f"t.{ext}"))


def _image_cases(c: _Bad) -> None:
    lim = c.lim
    jpg = c.img("JPEG", 64)
    png = image((10, 200, 30), 64, "PNG")
    webp = c.img("WEBP", 32)
    for case, data in [
        ("zero-bytes", b""),
        ("text", b"just some text\n"),
        ("html", b"<!doctype html><html><script>alert(1)</script></html>"),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
        ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
        ("gif", image((1, 2, 3), 8, "GIF")),
        ("ico", image((1, 2, 3), 16, "ICO")),
        ("heic-like", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"),
        ("elf", b"\x7fELF\x02\x01\x01" + bytes(60)),
        ("random-bytes", bytes((i * 97 + 13) % 256 for i in range(3000))),
        ("png-bad-idat-crc", flip(png, -20)),
        ("png-huge-dimensions", png_with_header(100_000, 100_000)),
        ("png-invalid-depth", png_with_header(8, 8, depth=3)),
        ("png-invalid-colour-type", png_with_header(8, 8, color_type=7)),
        ("png-zero-width", png_with_header(0, 8)),
        ("jpeg-huge-dimensions", jpeg_with_size(jpg, 60_000, 60_000)),
        ("jpeg-wrong-size-small-data", jpeg_with_size(jpg, 2000, 2000)),
        ("bmp-huge-dimensions", c.img("BMP")[:18] + (50_000).to_bytes(4, "little") * 2 + c.img("BMP")[26:]),
        ("ppm-maxval-zero", b"P6\n4 4\n0\n" + bytes(48)),
        ("ppm-truncated", b"P6\n64 64\n255\n" + bytes(100)),
        ("tiff-truncated", c.img("TIFF", 64)[:300]),
        ("wrong-extension-jpg-is-pdf", b"%PDF-1.4\n%%EOF"),
        ("polyglot-png-plus-zip", png + build_zip(entries_of({"a/b.txt": b"payload"}))),
        ("polyglot-jpeg-plus-zip", jpg + build_zip(entries_of({"a/b.txt": b"payload"}))),
        ("polyglot-webp-plus-script", webp + b"<script>alert(1)</script>"),
        ("polyglot-png-plus-html", png + b"<html><script>alert(1)</script></html>"),
    ]:
        c.loose(f"image/{case}", data)
    for i, cut in enumerate((10, 40, 200, len(jpg) // 2, len(jpg) - 30)):
        c.loose(f"image/jpeg-truncated-{i}-at-{cut}", jpg[:cut], "t.jpg")
    for i, cut in enumerate((8, 20, 40, len(png) // 2, len(png) - 10)):
        c.loose(f"image/png-truncated-{i}-at-{cut}", png[:cut], "t.png")
    for i, cut in enumerate((12, 30, len(webp) - 8)):
        c.loose(f"image/webp-truncated-{i}-at-{cut}", webp[:cut], "t.webp")
    c.loose(
        "image/over-byte-limit", image((5, 5, 5), 1, "BMP") + bytes(lim.image_bytes), "big.bmp", status=413
    )
    flat = image((9, 9, 9), (1000, 1100), "PNG")  # 1.1 Mpx, over the per-image limit
    c.loose("image/over-pixel-limit", flat)
    a, b = c.fresh()
    side = int(lim.image_pixels**0.5) - 20  # each under the per-image limit, five over the upload's
    big = [(f"{i}.png", image(col, side, "PNG")) for i, col in enumerate(palette(5))]
    c.add(_images("image/upload-over-total-pixels", big, [a, a, b, b, b], status=413))
    # images inside archives
    c.zip_with("zip/member-not-an-image", {"q/readme.txt": b"hello"})
    c.zip_with("zip/member-zero-bytes", {"q/empty.png": b""})
    c.zip_with("zip/member-wrong-extension", {"q/photo.png": b"%PDF-1.4 not a png"})
    c.zip_with("zip/member-polyglot", {"q/poly.png": png + b"PK\x03\x04" + bytes(40)})
    c.zip_with("zip/member-truncated-jpeg", {"q/t.jpg": jpg[: len(jpg) // 2]})
    c.zip_with("zip/member-huge-dimensions", {"q/h.png": png_with_header(70_000, 70_000)})
    c.tar_with("tar/member-not-an-image", {"q/readme.txt": b"hello"})
    c.tar_with("tar/member-polyglot", {"q/poly.jpg": jpg + b"<?php system($_GET[1]); ?>"})
    # polyglot containers
    zip_tar = bytearray(build_zip(entries_of(c.base())))
    zip_tar[257:262] = b"ustar"
    c.add(_archive("polyglot/zip-and-tar", bytes(zip_tar)))
    png_tar = bytearray(png + bytes(600))
    png_tar[257:262] = b"ustar"
    c.add(_archive("polyglot/png-and-tar", bytes(png_tar), "x.png"))


def _label_cases(c: _Bad) -> None:
    lim = c.lim

    def pair(case: str, bad: Any, status: int | None = None) -> None:
        _, b = c.fresh()
        c.add(_images(f"labels/{case}", [("1.png", c.img()), ("2.png", c.img())], [bad, b], status))

    for case, bad in [
        ("zero-width-space", "ca\u200bt"),
        ("zero-width-joiner", "x\u200dy"),
        ("bom", "\ufeffheron"),
        ("bidi-override", "gnp.\u202eexe"),
        ("bidi-isolate", "a\u2066b"),
        ("nul", "a\x00b"),
        ("newline", "a\nb"),
        ("c1-control", "a\x85b"),
        ("private-use", "a\ue000b"),
        ("lone-surrogate", "a\ud800b"),
        ("unassigned", "a\u0378b"),
        ("line-separator", "a\u2028b"),
        ("mixed-latin-cyrillic", "h\u0435ron"),
        ("mixed-known-cyrillic-c", "\u0441at"),
        ("mixed-latin-greek", "he\u03c1on"),
        ("slash", "a/b"),
        ("backslash", "a\\b"),
        ("dotdot", ".."),
        ("empty", ""),
        ("spaces-only", "   "),
        ("too-long", "x" * 101),
        ("number", 42),
        ("null", None),
        ("list", ["a"]),
    ]:
        pair(case, bad)
    # known classes and their look-alikes (409)
    for case, bad in [
        ("known-exact", "cat"),
        ("known-nfd", unicodedata.normalize("NFD", "crème")),
        ("known-cyrillic-lookalike", "\u0441\u043e\u0430\u0445"),
        ("known-case-variant", "Cat"),
        ("known-fullwidth", "\uff43\uff41\uff54"),
        ("known-with-spaces", "  dog "),
    ]:
        pair(case, bad, 409)
    b1, b2 = c.fresh()
    c.add(
        _images("labels/lookalikes-in-one-upload", [("1.png", c.img()), ("2.png", c.img())], [b1, b1.upper()])
    )
    items = [("1.png", c.img()), ("2.png", c.img())]
    for case, raw in [
        ("nested-30000-deep", "[" * 30000 + "]" * 30000),
        ("oversized", json.dumps(["y" * 90] * (lim.labels_bytes // 90 + 10))),
        ("invalid-json", '["a", '),
        ("huge-integer", "1" * 5000),
        ("wrong-count", '["a"]'),
        ("object-missing-file", '{"1.png": "a"}'),
        ("object-extra-file", '{"1.png": "a", "2.png": "b", "3.png": "c"}'),
        ("not-a-list", '{"a": 1'),
        ("json-number", "3.5"),
        ("missing", ""),
    ]:
        c.add(_images(f"labels/{case}", items, raw))
    # bad class folder names inside archives
    for case, folder in [
        ("zip-folder-bidi", "evil\u202egnp"),
        ("zip-folder-zero-width", "c\u200bat"),
        ("zip-folder-mixed-script", "\u0441at-x"),
        ("zip-folder-bom", "\ufeffheron"),
    ]:
        a, _ = c.fresh()
        c.add(
            _archive(
                f"labels/{case}", build_zip(entries_of({f"{a}/1.png": c.img(), f"{folder}/2.png": c.img()}))
            )
        )
    a, _ = c.fresh()
    lookalike = "\u0441\u043e\u0430\u0445"  # all Cyrillic, looks like the known "coax"
    c.add(
        _archive(
            "labels/zip-folder-known-lookalike",
            build_zip(entries_of({f"{a}/1.png": c.img(), f"{lookalike}/2.png": c.img()})),
            status=409,
        )
    )
    a, _ = c.fresh()
    c.add(
        _archive(
            "labels/zip-folders-same-but-case",
            build_zip(entries_of({f"{a}/1.png": c.img(), f"{a.upper()}/2.png": c.img()})),
        )
    )
    a, _ = c.fresh()
    c.add(
        _archive(
            "labels/tar-folder-known-nfd",
            build_tar({f"{a}/1.png": c.img(), unicodedata.normalize("NFD", "crème") + "/2.png": c.img()}),
            "t.tar",
            status=409,
        )
    )


def bad_uploads(lim: Limits | None = None) -> list[Upload]:
    """Every malformed upload (>= 200)."""
    c = _Bad(lim or Limits())
    _zip_cases(c)
    _tar_cases(c)
    _image_cases(c)
    _label_cases(c)
    names = [u.case for u in c.out]
    assert len(names) == len(set(names)), "duplicate case names"
    return c.out


# --------------------------------------------------------------------------------------------- good ones
def _exif_rotated_jpeg(color: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (24, 12), color)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _mode_png(mode: str, color: tuple[int, int, int], **save: Any) -> bytes:
    img = Image.new("RGB", (16, 16), color)
    if mode == "I;16":
        img = img.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    elif mode == "P+transparency":
        img = img.convert("P")
        save.setdefault("transparency", 0)
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def good_uploads() -> list[Upload]:
    """Unusual but valid uploads that must be accepted (each with classes of its own)."""
    colors = iter(palette(400))
    out: list[Upload] = []

    def two(tag: str) -> dict[str, bytes]:
        return {
            f"{tag}-a/1.png": image(next(colors), 16),
            f"{tag}-a/2.jpg": image(next(colors), 16, "JPEG"),
            f"{tag}-b/3.png": image(next(colors), 16),
        }

    def add_zip(case: str, members: dict[str, bytes], classes: tuple[str, ...], **kw: Any) -> None:
        out.append(_archive(case, build_zip(entries_of(members)), classes=classes, images=len(members), **kw))

    cmyk = {f"g01-{k}/{i}.jpg": image(next(colors), 16, "JPEG", "CMYK") for i, k in enumerate("aab")}
    add_zip("cmyk-jpeg", cmyk, ("g01-a", "g01-b"))
    modes = {
        "g02-a/16bit.png": _mode_png("I;16", next(colors)),
        "g02-a/palette-alpha.png": _mode_png("P+transparency", next(colors)),
        "g02-b/gray.png": _mode_png("L", next(colors)),
        "g02-b/gray-alpha.png": _mode_png("LA", next(colors)),
        "g02-b/1bit.png": _mode_png("1", (255, 255, 255)),
        "g02-b/rgba.png": _mode_png("RGBA", next(colors)),
    }
    add_zip("odd-png-modes", modes, ("g02-a", "g02-b"))
    tiny = {"g03-a/1x1.png": image(next(colors), 1), "g03-b/1x1.jpg": image(next(colors), 1, "JPEG")}
    add_zip("one-pixel-images", tiny, ("g03-a", "g03-b"))
    webp = {
        "g04-a/lossy.webp": image(next(colors), 16, "WEBP"),
        "g04-b/lossless.webp": image(next(colors), 16, "WEBP", lossless=True),
    }
    add_zip("webp", webp, ("g04-a", "g04-b"))
    for i, how in enumerate(("bz2", "xz", "gz")):
        tag = f"g05{i}"
        members = two(tag)
        out.append(
            _archive(
                f"tar.{how}",
                compress(build_tar(members), how),
                f"t.tar.{how}",
                classes=(f"{tag}-a", f"{tag}-b"),
                images=3,
            )
        )
    add_zip("wrapping-folder", {f"mytask/{k}": v for k, v in two("g06").items()}, ("g06-a", "g06-b"))
    exif = {
        "g07-a/rot.jpg": _exif_rotated_jpeg(next(colors)),
        "g07-b/rot.jpg": _exif_rotated_jpeg(next(colors)),
    }
    add_zip("exif-rotated-jpeg", exif, ("g07-a", "g07-b"))
    upper = {
        "g08-a/A.JPG": image(next(colors), 16, "JPEG"),
        "g08-a/B.PNG": image(next(colors), 16),
        "g08-b/C.JPEG": image(next(colors), 16, "JPEG"),
    }
    add_zip("uppercase-extensions", upper, ("g08-a", "g08-b"))
    labels = ["café-g09", "猫-g09", "кот", "Ελλάδα", "東京タワー", "서울", "naïve g09"]
    items = [(f"{i}.png", image(next(colors), 12)) for i in range(len(labels))]
    out.append(
        _images("nfc-unicode-labels", items, labels, classes=tuple(sorted(labels)), images=len(labels))
    )
    nfd = {
        unicodedata.normalize("NFD", f"{name}/{i}.png"): image(next(colors), 12)
        for i, name in enumerate(["é-g10", "ü-g10"])
    }
    add_zip("nfd-folder-names-become-nfc", nfd, ("é-g10", "ü-g10"))
    buf = io.BytesIO()
    with zipfile.ZipFile(_Unseekable(buf), "w", zipfile.ZIP_DEFLATED) as zf:  # data descriptors
        for name, data in two("g11").items():
            zf.writestr(name, data)
    out.append(
        _archive("zip-streamed-data-descriptors", buf.getvalue(), classes=("g11-a", "g11-b"), images=3)
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in two("g12").items():
            with zf.open(name, "w", force_zip64=True) as fh:
                fh.write(data)
    out.append(_archive("zip64-members", buf.getvalue(), classes=("g12-a", "g12-b"), images=3))
    out.append(
        _archive(
            "zip-with-comment",
            zipfile_bytes(two("g13"), comment=b"made by a camera"),
            classes=("g13-a", "g13-b"),
            images=3,
        )
    )
    out.append(
        _archive(
            "zip-bzip2-members",
            zipfile_bytes(two("g14"), zipfile.ZIP_BZIP2),
            classes=("g14-a", "g14-b"),
            images=3,
        )
    )
    out.append(
        _archive(
            "zip-lzma-members",
            zipfile_bytes(two("g15"), zipfile.ZIP_LZMA),
            classes=("g15-a", "g15-b"),
            images=3,
        )
    )
    out.append(
        _archive(
            "zip-stored-members",
            zipfile_bytes(two("g16"), zipfile.ZIP_STORED),
            classes=("g16-a", "g16-b"),
            images=3,
        )
    )
    long_name = {f"g17-a/{'l' * 150}.png": image(next(colors), 8), "g17-b/ü.png": image(next(colors), 8)}
    for fmt, tag in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        members = {k.replace("g17", f"g17{tag}"): image(next(colors), 8) for k in long_name}
        out.append(
            _archive(
                f"tar-{tag}-long-names",
                build_tar(members, fmt=fmt),
                "t.tar",
                classes=(f"g17{tag}-a", f"g17{tag}-b"),
                images=2,
            )
        )
    dot = {f"./{k}": v for k, v in two("g18").items()}
    out.append(_archive("tar-dot-slash-names", build_tar(dot), "t.tar", classes=("g18-a", "g18-b"), images=3))
    formats = {
        "g19-a/p.jpg": image(next(colors), 16, "JPEG", progressive=True),
        "g19-a/i.png": image(next(colors), 16, "PNG", optimize=True),
        "g19-b/t.tif": image(next(colors), 16, "TIFF"),
        "g19-b/b.bmp": image(next(colors), 16, "BMP"),
        "g19-b/p.ppm": image(next(colors), 16, "PPM"),
    }
    add_zip("other-formats", formats, ("g19-a", "g19-b"))
    dup = image(next(colors), 16)
    dups = {
        "g20-a/1.png": dup,
        "g20-a/1-copy.png": dup,
        "g20-a/2.png": image(next(colors), 16),
        "g20-b/3.png": image(next(colors), 16),
    }
    out.append(
        _archive(
            "duplicates-within-a-class",
            build_zip(entries_of(dups)),
            classes=("g20-a", "g20-b"),
            images=3,
            duplicates=1,
        )
    )
    junk = {
        **two("g21"),
        "__MACOSX/g21-a/._1.png": b"\x00\x05\x16\x07",
        ".DS_Store": b"Bud1",
        "g21-b/Thumbs.db": b"x",
    }
    out.append(
        _archive("macos-and-windows-junk", build_zip(entries_of(junk)), classes=("g21-a", "g21-b"), images=3)
    )
    items = [("1.png", image(next(colors), 12)), ("2.png", image(next(colors), 12))]
    out.append(
        _images(
            "labels-with-surrounding-spaces",
            items,
            ["  g22-a ", "g22-b\u3000"],
            classes=("g22-a", "g22-b"),
            images=2,
        )
    )
    tar = build_tar(two("g23"))
    half = len(tar) // 2
    out.append(
        _archive(
            "tar.gz-two-gzip-members",
            compress(tar[:half], "gz") + compress(tar[half:], "gz"),
            "t.tar.gz",
            classes=("g23-a", "g23-b"),
            images=3,
        )
    )
    padded = {
        "g24-a/pad.jpg": image(next(colors), 16, "JPEG") + b"\x00" * 64,
        "g24-b/x.jpg": image(next(colors), 16, "JPEG"),
    }
    add_zip("jpeg-with-zero-padding", padded, ("g24-a", "g24-b"))
    items = [("single.png", image(next(colors), 12))]
    out.append(_images("single-image-single-label-string", items, '"g25-a"', classes=("g25-a",), images=1))
    return out


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek: zipfile then writes data descriptors."""

    def __init__(self, inner: io.BytesIO) -> None:
        self.inner = inner

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self.inner.write(b)

    def flush(self) -> None:
        pass
