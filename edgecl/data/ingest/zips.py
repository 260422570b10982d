"""Zip archives whose structure is checked before ``zipfile`` parses them: the end record must end the file,
the central directory is counted first (a hostile one could hold millions of entries), and the members must
tile the file with no overlap (a zip-bomb technique) and no hidden data. Members are CRC-checked as read."""

from __future__ import annotations

import contextlib
import io
import stat
import struct
import zipfile
from collections.abc import Callable
from typing import IO, cast

from edgecl.data.ingest.archives import ARCHIVE_ERRORS, CHUNK, Member, ReadBudget, describe, too_big
from edgecl.data.ingest.base import IngestLimits, UploadRejected, printable

__all__ = ["ZipReader"]

_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's name; names not flagged UTF-8 are tried as UTF-8 first (what most tools write)."""
    name = info.orig_filename
    if not info.flag_bits & 0x800:
        with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
            name = name.encode("cp437").decode("utf-8")
    return name


class ZipReader:
    """A zip whose structure was checked: end record at the very end, no data before the first member,
    between members or overlapping, and a member count, name lengths and declared sizes within the limits."""

    def __init__(self, fileobj: IO[bytes], limits: IngestLimits) -> None:
        self.fp = fileobj
        self.limits = limits
        self.size = fileobj.seek(0, io.SEEK_END)
        cd_offset, cd_size = self._end_record()
        self._scan_directory(cd_offset, cd_size)
        fileobj.seek(0)
        try:
            self.zf = zipfile.ZipFile(fileobj)
            infos = self.zf.infolist()
        except ARCHIVE_ERRORS as err:
            raise UploadRejected(f"not a readable zip archive: {describe(err)}") from None
        total = sum(max(0, i.file_size) for i in infos)
        for info in infos:
            if info.file_size > limits.max_image_bytes:
                raise too_big(_zip_name(info), info.file_size, limits)
        if total > limits.max_total_bytes:
            raise UploadRejected(
                f"the archive expands to {total} bytes; the limit is {limits.max_total_bytes}", status=413
            )
        if total > limits.expansion_grace_bytes and total > limits.max_expansion * max(1, self.size):
            raise UploadRejected(
                f"the archive expands {total / max(1, self.size):.0f}x ({total} bytes from {self.size}): a "
                "decompression bomb?",
                status=413,
            )
        self._check_layout(infos, cd_offset)
        self.infos = infos
        self.budget = ReadBudget(limits)

    def _malformed(self, why: str) -> UploadRejected:
        return UploadRejected(f"malformed zip archive: {why}")

    def _end_record(self) -> tuple[int, int]:
        """(central directory offset, size) from the end record, which must end the file."""
        tail_len = min(self.size, 22 + 65535)
        self.fp.seek(self.size - tail_len)
        tail = self.fp.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            raise UploadRejected("not a readable zip archive: no end-of-central-directory record")
        eocd = self.size - tail_len + at
        disk, cd_disk, _, entries, cd_size, cd_offset, comment = struct.unpack(
            "<4H2LH", tail[at + 4 : at + 22]
        )
        if disk or cd_disk:
            raise self._malformed("multi-volume (split) archives are not supported")
        if eocd + 22 + comment != self.size:
            raise self._malformed(f"{self.size - eocd - 22 - comment} bytes after the end of the archive")
        end_of_cd = eocd
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:  # zip64
            self.fp.seek(max(0, eocd - 20))
            loc = self.fp.read(20)
            if len(loc) < 20 or loc[:4] != b"PK\x06\x07":
                raise self._malformed("zip64 end record locator missing")
            (z64,) = struct.unpack("<Q", loc[8:16])
            self.fp.seek(z64)
            rec = self.fp.read(56)
            if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
                raise self._malformed("zip64 end record missing")
            _, entries, cd_size, cd_offset = struct.unpack("<4Q", rec[24:56])
            end_of_cd = z64
        if entries > self.limits.max_members:
            raise UploadRejected(
                f"archive has {entries} members; the limit is {self.limits.max_members} "
                "(--max-archive-members)",
                status=413,
            )
        if cd_offset + cd_size != end_of_cd:
            raise self._malformed("data before the archive or between its directory and its end record")
        return cd_offset, cd_size

    def _scan_directory(self, offset: int, size: int) -> None:
        """Count the directory's entries (zipfile would parse all of them, however many) and bound names."""
        self.fp.seek(offset)
        pos = count = 0
        while pos < size:
            head = self.fp.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                raise self._malformed(f"broken central directory at entry {count + 1}")
            n, e, c = struct.unpack("<3H", head[28:34])
            if n > self.limits.max_name_bytes:
                raise UploadRejected(
                    f"a member name is {n} bytes long; the limit is {self.limits.max_name_bytes}"
                )
            count += 1
            if count > self.limits.max_members:
                raise UploadRejected(
                    f"archive has more than {self.limits.max_members} members (--max-archive-members)",
                    status=413,
                )
            pos += 46 + n + e + c
            self.fp.seek(offset + pos)
        if pos != size:
            raise self._malformed("central directory size does not match its entries")

    def _check_layout(self, infos: list[zipfile.ZipInfo], cd_offset: int) -> None:
        """Members must tile the file from byte 0 to the directory: no overlap, no hidden data."""
        expected, descriptor = 0, False
        for info in sorted(infos, key=lambda i: i.header_offset):
            self._gap(info.header_offset - expected, descriptor, _zip_name(info))
            self.fp.seek(info.header_offset)
            head = self.fp.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise self._malformed(f"member {printable(_zip_name(info))!r} has no local header")
            n, e = struct.unpack("<2H", head[26:30])
            expected = info.header_offset + 30 + n + e + info.compress_size
            descriptor = bool(info.flag_bits & 0x08)
        self._gap(cd_offset - expected, descriptor, "(central directory)")

    def _gap(self, gap: int, descriptor: bool, name: str) -> None:
        if gap == 0 or (descriptor and gap in (12, 16, 20, 24)):
            return
        what = "overlaps the member before it" if gap < 0 else f"follows {gap} bytes of hidden data"
        raise self._malformed(f"{printable(name)!r} {what} (overlapping members are a zip-bomb technique)")

    def members(self) -> list[Member]:
        """Every entry, from the central directory (nothing is decompressed)."""
        out = []
        for info in self.infos:
            name = _zip_name(info)
            mode = info.external_attr >> 16
            problem = None
            if "\x00" in info.orig_filename:
                name = info.orig_filename
            if stat.S_ISLNK(mode):
                kind = "symlink"
            elif info.filename.endswith("/"):  # ZipInfo.is_dir() fails on an empty name
                kind = "dir"
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                kind = "special"
            else:
                kind = "file"
            if kind == "dir" and info.file_size:
                problem = "folder entry that holds data"
            elif kind == "file" and info.flag_bits & 0x1:
                problem = "encrypted member (password-protected archives are not supported)"
            elif kind == "file" and info.compress_type not in _ZIP_METHODS:
                method = getattr(zipfile, "compressor_names", {}).get(info.compress_type, "unknown")
                problem = (
                    f"compression method {info.compress_type} ({method}) is not supported: re-create the "
                    "archive with deflate (zip -Z deflate, or any standard zip tool)"
                )
            out.append(Member(name, kind, info.file_size, problem, self._opener(info)))
        return out

    def _opener(self, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
        return lambda: cast(IO[bytes], _Counted(self.zf.open(info), self.budget))

    def finish(self) -> None:
        """Nothing left to check: every member was read (CRC-checked) by the caller."""


class _Counted(io.RawIOBase):
    """A member's bytes, counted against the archive's budget."""

    def __init__(self, inner: IO[bytes], budget: ReadBudget) -> None:
        self.inner = inner
        self.budget = budget

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        data = self.inner.read(CHUNK if n is None or n < 0 else min(n, CHUNK))
        self.budget.add(len(data))
        return data

    def close(self) -> None:
        self.inner.close()
        super().close()
