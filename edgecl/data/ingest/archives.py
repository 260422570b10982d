"""Reading zip and tar archives to their end, with every decompressed byte counted.

Each reader lists the archive's members (:class:`Member`) and reads their bytes. Nothing is trusted: a zip's
end record, central directory and member layout are checked before ``zipfile`` parses them (a hostile
directory could otherwise hold millions of entries, overlapping members or data hidden between them), and a
tar is decompressed by this module (gzip, bzip2, xz) and then read to its very end, so a damaged header, a
missing end-of-archive marker, data after it or a bad gzip CRC rejects the upload instead of ending it early.
Every failure of the archive libraries becomes :class:`UploadRejected` (422), sizes over the limits 413.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from edgecl.data.ingest.base import IngestLimits, UploadRejected, printable

__all__ = ["ARCHIVE_ERRORS", "Member", "ReadBudget", "TarReader", "ZipReader", "detect_kind"]

ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes gzip.BadGzipFile and bz2's "Invalid data stream"
    EOFError,
    ValueError,  # includes UnicodeDecodeError of member names
    RuntimeError,  # includes NotImplementedError (zip methods 9/99) and encrypted zip members
    struct.error,
    zlib.error,
    lzma.LZMAError,
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    KeyError,
    IndexError,
    OverflowError,
)
"""What the standard archive modules raise on damaged input; all of it means "this archive is unreadable"."""

CHUNK = 2**20
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def describe(err: BaseException) -> str:
    """``Type: message`` of a library error, escaped for an answer."""
    return printable(f"{type(err).__name__}: {err}", 300)


def detect_kind(head: bytes) -> str:
    """``zip``, ``tar`` (plain or compressed), ``image``, or ``ambiguous`` (both a zip or image and a tar:
    a polyglot) from the first 512 bytes of an upload."""
    ustar = len(head) >= 262 and head[257:262] == b"ustar"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "ambiguous" if ustar else "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    if ustar:
        return (
            "ambiguous" if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"BM", b"GIF8")) else "tar"
        )
    return "image"


@dataclass
class Member:
    """One archive entry as listed: ``kind`` is file, dir, symlink, hardlink, special or sparse; ``problem``
    a reason the reader already knows it cannot be used (encrypted, unsupported compression)."""

    name: str
    kind: str
    size: int
    problem: str | None = None
    opener: Callable[[], IO[bytes]] | None = None


class ReadBudget:
    """Counts the bytes decompressed from one archive: 413 past ``max_total_bytes`` or past
    ``max_expansion`` times the compressed bytes read (once over the grace size)."""

    def __init__(self, limits: IngestLimits, compressed: IO[bytes] | None = None) -> None:
        self.limits = limits
        self.compressed = compressed
        self.total = 0

    def add(self, n: int) -> None:
        """Count ``n`` more decompressed bytes."""
        self.total += n
        lim = self.limits
        if self.total > lim.max_total_bytes:
            raise UploadRejected(
                f"the archive expands to more than {lim.max_total_bytes} bytes; reading stopped there "
                "(split the task into several uploads)",
                status=413,
            )
        if self.compressed is not None and self.total > lim.expansion_grace_bytes:
            packed = max(1, self.compressed.tell())
            if self.total > lim.max_expansion * packed:
                raise UploadRejected(
                    f"the archive expands more than {lim.max_expansion:g}x ({self.total} bytes from "
                    f"{packed}): a decompression bomb? reading stopped",
                    status=413,
                )


def _too_big(name: str, size: int, limits: IngestLimits) -> UploadRejected:
    return UploadRejected(
        f"member {printable(name)!r} is {size} bytes; the per-image limit is {limits.max_image_bytes} bytes",
        status=413,
    )


# --------------------------------------------------------------------------------------------------- zip
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
                raise _too_big(_zip_name(info), info.file_size, limits)
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
                method = zipfile.compressor_names.get(info.compress_type, "unknown")
                problem = (
                    f"compression method {info.compress_type} ({method}) is not supported: re-create the "
                    "archive with deflate (zip -Z deflate, or any standard zip tool)"
                )
            out.append(Member(name, kind, info.file_size, problem, self._opener(info)))
        return out

    def _opener(self, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
        return lambda: _Counted(self.zf.open(info), self.budget)

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


# --------------------------------------------------------------------------------------------------- tar
class _Forward(io.RawIOBase):
    """A forward-only, seekable view of a decompressed stream (tarfile's random-access reader needs
    ``seek``/``tell``; it only seeks forward, or back by one byte). Every byte pulled is counted."""

    def __init__(self, raw: IO[bytes], budget: ReadBudget, max_read: int) -> None:
        self.raw = raw
        self.budget = budget
        self.max_read = max_read
        self.pos = 0
        self.hist = b""  # the last bytes pulled, ending at self.end
        self.end = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _pull(self, n: int) -> bytes:
        data = self.raw.read(n)
        self.budget.add(len(data))
        self.end += len(data)
        self.hist = (self.hist + data)[-4096:]
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence != io.SEEK_SET:
            raise OSError("tar stream: only absolute seeks")
        if offset < self.end - len(self.hist):
            raise OSError(f"tar stream: cannot seek back to {offset}")
        while self.end < offset:
            if not self._pull(min(CHUNK, offset - self.end)):
                break
        self.pos = min(offset, self.end)
        return self.pos

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        if n is None or n < 0:
            n = CHUNK
        if n > self.max_read:
            raise UploadRejected(
                f"the tar archive asks to read a {n}-byte block (an oversized extended header?)", status=413
            )
        out = b""
        if self.pos < self.end:  # after a seek back: serve from the history
            start = len(self.hist) - (self.end - self.pos)
            out = self.hist[start : start + n]
        if len(out) < n:
            out += self._pull(n - len(out))
        self.pos += len(out)
        return out


class _Strict(io.RawIOBase):
    """A bzip2 or xz stream (several concatenated streams too) that must end cleanly: ``BZ2File`` and
    ``LZMAFile`` silently ignore anything after the last stream; here non-zero trailing bytes are an error."""

    def __init__(self, fp: IO[bytes], factory: Callable[[], Any], magic: bytes) -> None:
        self.fp = fp
        self.factory = factory
        self.magic = magic
        self.dec = factory()
        self.pending = b""  # compressed bytes read but not yet fed

    def readable(self) -> bool:
        return True

    def _next_stream(self) -> bool:
        """After a stream's end: start the next one, or return False at a clean end of input."""
        rest = self.dec.unused_data + self.pending
        self.pending = b""
        while True:
            if len(rest) < len(self.magic):
                more = self.fp.read(CHUNK)
                if more:
                    rest += more
                    continue
            if rest.startswith(self.magic):
                self.dec = self.factory()
                self.pending = rest
                return True
            if rest.strip(b"\x00"):
                raise OSError("data after the end of the compressed stream")
            rest = self.fp.read(CHUNK)
            if not rest:
                return False

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        n = CHUNK if n is None or n < 0 else n
        while True:
            if self.dec.eof and not self._next_stream():
                return b""
            if self.dec.needs_input:
                data = self.pending or self.fp.read(CHUNK)
                self.pending = b""
                if not data:
                    raise EOFError("the compressed stream ended before its end-of-stream marker")
                out = self.dec.decompress(data, n)
            else:
                out = self.dec.decompress(b"", n)
            if out:
                return bytes(out)


class TarReader:
    """A plain, gzip, bzip2 or xz tar, decompressed here and read to its end (see :meth:`finish`)."""

    def __init__(self, fileobj: IO[bytes], limits: IngestLimits) -> None:
        self.limits = limits
        head = fileobj.read(6)
        fileobj.seek(0)
        raw: IO[bytes]
        if head.startswith(b"\x1f\x8b"):
            raw = gzip.GzipFile(fileobj=fileobj, mode="rb")
        elif head.startswith(b"BZh"):
            raw = _Strict(fileobj, bz2.BZ2Decompressor, b"BZh")
        elif head.startswith(b"\xfd7zXZ\x00"):
            raw = _Strict(fileobj, lzma.LZMADecompressor, b"\xfd7zXZ\x00")
        else:
            raw = fileobj
        self.budget = ReadBudget(limits, fileobj if raw is not fileobj else None)
        self.stream = _Forward(raw, self.budget, max(limits.max_image_bytes, CHUNK) + 4096)
        self.count = 0
        try:
            self.tf = tarfile.open(fileobj=self.stream, mode="r:")  # noqa: SIM115 - closed with the upload
        except UploadRejected:
            raise
        except ARCHIVE_ERRORS as err:
            raise UploadRejected(f"not a readable tar archive: {describe(err)}") from None

    def members(self) -> Iterator[Member]:
        """Members in archive order; a member's ``opener`` is valid until the next one is listed."""
        while True:
            try:
                info = self.tf.next()
            except UploadRejected:
                raise
            except ARCHIVE_ERRORS as err:
                raise UploadRejected(
                    f"corrupt tar archive after {self.count} members: {describe(err)}"
                ) from None
            if info is None:
                return
            self.count += 1
            if self.count > self.limits.max_members:
                raise UploadRejected(
                    f"archive has more than {self.limits.max_members} members (--max-archive-members)",
                    status=413,
                )
            if info.size > self.limits.max_image_bytes:
                raise _too_big(info.name, info.size, self.limits)
            problem = "negative size" if info.size < 0 else None
            if info.issparse():
                kind = "sparse"
            elif info.isfile():
                kind = "file"
            elif info.isdir():
                kind = "dir"
            elif info.issym():
                kind = "symlink"
            elif info.islnk():
                kind = "hardlink"
            else:
                kind = "special"
            yield Member(info.name, kind, info.size, problem, self._opener(info))

    def _opener(self, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
        def open_member() -> IO[bytes]:
            fh = self.tf.extractfile(info)
            if fh is None:
                raise tarfile.ReadError("member has no data")
            return fh

        return open_member

    def finish(self) -> None:
        """The archive must end with a zero block, only zeros after it, and a clean end of the compressed
        stream (which checks the gzip CRC and length, the bzip2 and xz checksums)."""
        offset = self.tf.offset
        try:
            self.stream.seek(offset)
            block = self.stream.read(512)
            if len(block) < 512:
                raise UploadRejected(
                    f"the tar archive is truncated: it ends after {self.count} members without its "
                    "end-of-archive marker"
                )
            if block.strip(b"\x00"):
                try:
                    tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                    why = "an entry tarfile cannot read"
                except tarfile.HeaderError as err:
                    why = str(err)
                raise UploadRejected(
                    f"corrupt tar header at byte {offset}, after {self.count} members ({why}): the archive "
                    "is damaged; nothing was stored"
                )
            while chunk := self.stream.read(CHUNK):
                if chunk.strip(b"\x00"):
                    raise UploadRejected(
                        "data after the end-of-archive marker of the tar archive (hidden members?)"
                    )
        except UploadRejected:
            raise
        except ARCHIVE_ERRORS as err:
            raise UploadRejected(
                f"the compressed tar stream is damaged after {self.count} members: {describe(err)}"
            ) from None
