"""Tar archives, plain or gzip/bzip2/xz, decompressed here and read to their very end: a damaged header, a
missing end-of-archive marker, data after it, a bad gzip CRC or a compressed stream followed by other data
rejects the upload instead of ending it early (``tarfile`` alone stops quietly at a bad header)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

from edgecl.data.ingest.archives import ARCHIVE_ERRORS, CHUNK, Member, ReadBudget, describe, too_big
from edgecl.data.ingest.base import IngestLimits, UploadRejected

__all__ = ["TarReader"]


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
            raw = cast(IO[bytes], gzip.GzipFile(fileobj=fileobj, mode="rb"))
        elif head.startswith(b"BZh"):
            raw = cast(IO[bytes], _Strict(fileobj, bz2.BZ2Decompressor, b"BZh"))
        elif head.startswith(b"\xfd7zXZ\x00"):
            raw = cast(IO[bytes], _Strict(fileobj, lzma.LZMADecompressor, b"\xfd7zXZ\x00"))
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
                raise too_big(info.name, info.size, self.limits)
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
