"""What the archive readers (``zips``, ``tars``) share: the errors they turn into refusals, the member
record they list, the budget that counts every decompressed byte, and the kind of an upload.

Each reader lists the archive's members (:class:`Member`) and reads their bytes; every failure of the
archive libraries becomes :class:`UploadRejected` (422), sizes over the limits 413.
"""

from __future__ import annotations

import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from edgecl.data.ingest.base import IngestLimits, UploadRejected, printable

__all__ = ["ARCHIVE_ERRORS", "CHUNK", "Member", "ReadBudget", "describe", "detect_kind", "too_big"]

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


def too_big(name: str, size: int, limits: IngestLimits) -> UploadRejected:
    return UploadRejected(
        f"member {printable(name)!r} is {size} bytes; the per-image limit is {limits.max_image_bytes} bytes",
        status=413,
    )
