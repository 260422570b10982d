"""Byte-level builders for the upload corpus: images, zips written field by field (so any field can lie),
tars with patched headers, and compressed streams. Independent of edgecl, so the benchmark can run the same
corpus against any version of the daemon."""

from __future__ import annotations

import binascii
import bz2
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field

from PIL import Image


# --------------------------------------------------------------------------------------------- images
def image(
    color: tuple[int, int, int] = (200, 30, 30),
    size: int | tuple[int, int] = 16,
    fmt: str = "PNG",
    mode: str = "RGB",
    **save: object,
) -> bytes:
    """A small image of ``mode`` saved as ``fmt``: flat ``color`` with the colour's 12-bit index drawn as
    black/white pixels in its corner (so distinct colours give distinct bytes even after JPEG quantisation;
    images wider than 64 pixels stay flat)."""
    wh = (size, size) if isinstance(size, int) else size
    img = Image.new("RGB", wh, color)
    if 4 <= wh[0] <= 64 and wh[1] >= 4:
        key = color[0] // 16 + 16 * (color[1] // 16) + 256 * (color[2] // 16)
        for k in range(12):
            img.putpixel((k % 4, k // 4), (255, 255, 255) if key >> k & 1 else (0, 0, 0))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` (at most 4096) distinct colours, 16 levels apart per channel."""
    assert n <= 4096
    return [((i % 16) * 16 + 8, (i // 16 % 16) * 16 + 8, (i // 256) * 16 + 8) for i in range(n)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", binascii.crc32(kind + data))


def png_with_header(width: int, height: int, depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR says anything (huge sizes, invalid depth/colour type) over a small IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    body = idat or zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a baseline JPEG) with its SOF0 frame size replaced."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    """``data`` with the byte at ``offset`` (negative: from the end) XOR ``mask``."""
    at = offset % len(data)
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]


# --------------------------------------------------------------------------------------------------- zip
@dataclass
class ZipEntry:
    """One member of a hand-written zip; every field can be set to lie."""

    name: bytes
    data: bytes
    method: int = 8
    flags: int = 0
    crc: int | None = None
    file_size: int | None = None
    external_attr: int = (stat.S_IFREG | 0o644) << 16
    local_name: bytes | None = None
    compressed: bytes | None = None
    extra: dict[str, int] = field(default_factory=dict)


def _compress(method: int, data: bytes) -> bytes:
    if method == 8:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    return data  # stored, or a method whose bytes the entry gives in ``compressed``


def build_zip(
    entries: list[ZipEntry],
    prefix: bytes = b"",
    suffix: bytes = b"",
    comment: bytes = b"",
    cd_entries: int | None = None,
    duplicate_cd_of: int | None = None,
    disk: int = 0,
) -> bytes:
    """A zip written field by field: local headers and data, central directory, end record."""
    out = bytearray(prefix)
    central = bytearray()
    count = 0
    offsets = []
    for e in entries:
        comp = e.compressed if e.compressed is not None else _compress(e.method, e.data)
        crc = binascii.crc32(e.data) if e.crc is None else e.crc
        size = len(e.data) if e.file_size is None else e.file_size
        offset = len(out)
        offsets.append(offset)
        lname = e.name if e.local_name is None else e.local_name
        out += struct.pack(
            "<4s5H3L2H", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21, crc, len(comp), size, len(lname), 0
        )
        out += lname + comp
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 0x0314, 20, e.flags, e.method, 0, 0x21, crc, len(comp), size,
            len(e.name), 0, 0, 0, 0, e.external_attr, offset,
        )  # fmt: skip
        central += e.name
        count += 1
    if duplicate_cd_of is not None:  # a second directory entry for an existing member (overlap)
        e = entries[duplicate_cd_of]
        comp = _compress(e.method, e.data)
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 0x0314, 20, 0, e.method, 0, 0x21, binascii.crc32(e.data),
            len(comp), len(e.data), len(e.name) + 1, 0, 0, 0, 0, e.external_attr, offsets[duplicate_cd_of],
        )  # fmt: skip
        central += e.name[:-4] + b"2" + e.name[-4:]
        count += 1
    cd_offset = len(out)
    out += central
    n = count if cd_entries is None else cd_entries
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", disk, disk, n, n, len(central), cd_offset, len(comment))
    out += comment + suffix
    return bytes(out)


def zipfile_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED, **kw: object) -> bytes:
    """A zip written by ``zipfile`` (bzip2 and lzma members, comments, zip64)."""
    buf = io.BytesIO()
    comment = kw.pop("comment", b"")
    with zipfile.ZipFile(buf, "w", compression=method, **kw) as zf:  # type: ignore[arg-type]
        zf.comment = comment  # type: ignore[assignment]
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def member_data_offset(archive: bytes, name: str) -> int:
    """Where the (compressed) data of member ``name`` starts in a zip."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = zf.getinfo(name)
    n, e = struct.unpack("<2H", archive[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + n + e


def entries_of(members: dict[str, bytes], method: int = 8) -> list[ZipEntry]:
    """ZipEntry per ``{name: bytes}``."""
    return [ZipEntry(name.encode(), data, method) for name, data in members.items()]


# --------------------------------------------------------------------------------------------------- tar
def tar_info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    """A TarInfo of any type."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def build_tar(
    members: dict[str, bytes],
    extra: list[tarfile.TarInfo] | None = None,
    fmt: int = tarfile.USTAR_FORMAT,
    pax: dict[str, dict[str, str]] | None = None,
) -> bytes:
    """An uncompressed tar of ``{name: bytes}`` plus data-less ``extra`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax and name in pax:
                info.pax_headers = pax[name]
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


def header_offsets(tar: bytes) -> list[int]:
    """Offsets of the member headers of a tar (as tarfile reads them)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        return [m.offset for m in tf.getmembers()]


def end_offset(tar: bytes) -> int:
    """Offset of the end-of-archive marker: where the data of the last member ends."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        last = tf.getmembers()[-1]
        return last.offset_data + -(-last.size // 512) * 512


def patch_header(tar: bytes, offset: int, field_at: int, value: bytes, fix_checksum: bool = True) -> bytes:
    """Overwrite bytes of the header at ``offset`` (then recompute its checksum, unless told not to)."""
    block = bytearray(tar[offset : offset + 512])
    block[field_at : field_at + len(value)] = value
    if fix_checksum:
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\x00 " % sum(block)
    return tar[:offset] + bytes(block) + tar[offset + 512 :]


def compress(data: bytes, how: str) -> bytes:
    """``data`` compressed as ``gz``, ``bz2`` or ``xz``."""
    if how == "gz":
        return gzip.compress(data, mtime=0)
    if how == "bz2":
        return bz2.compress(data)
    if how == "xz":
        return lzma.compress(data)
    return data


def gzip_zeros_stream(parts: list[tuple[bytes, int]]) -> bytes:
    """gzip of a stream of (literal bytes, then that many zeros) pieces, without building it in memory."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [b""]
    zeros = b"\x00" * 2**20
    for literal, n in parts:
        out.append(comp.compress(literal))
        while n > 0:
            k = min(n, len(zeros))
            out.append(comp.compress(zeros[:k]))
            n -= k
    out.append(comp.flush())
    return b"".join(out)


def tar_header(name: str, size: int) -> bytes:
    """One ustar header block for a regular file of ``size`` bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)
