"""The vocabulary of an upload check: its limits, the refusal it raises and the task it yields."""

from __future__ import annotations

import posixpath
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Duplicate",
    "IngestLimits",
    "IngestedTask",
    "Problem",
    "UploadRejected",
    "printable",
    "safe_display_name",
]

MAX_LISTED = 50
"""Problems (and duplicates) listed in an answer; the rest are counted."""


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on one upload (the daemon's flags set some of them); every bound is checked before the work
    it protects: sizes and counts before reading, pixels before decoding, labels before both."""

    max_images: int = 20_000
    """Images in one task."""
    max_members: int = 25_000
    """Entries in one archive (folders and ignored files included)."""
    max_image_pixels: int = 4096 * 4096
    """Width x height of one image, read from its header; larger ones are rejected before decoding."""
    max_total_pixels: int = 2**30
    """Sum of width x height over the upload (decoding cost), from the headers, before decoding any image."""
    max_image_bytes: int = 32 * 2**20
    """Size of one (uncompressed) member or file; a larger member rejects the upload at once (413)."""
    max_total_bytes: int = 2 * 2**30
    """Bytes decompressed from one archive, whatever they hold (headers, ignored and rejected members too);
    reading stops there (413)."""
    max_expansion: float = 100.0
    """Decompressed bytes per archive byte, enforced past ``expansion_grace_bytes`` (decompression bombs;
    real image archives expand less than 10x)."""
    expansion_grace_bytes: int = 64 * 2**20
    max_classes: int = 1000
    """Classes in one task."""
    max_label_length: int = 100
    """Characters of one class name (after NFC normalisation)."""
    max_labels_bytes: int = 2**20
    """Size of the ``labels`` JSON field."""
    max_name_bytes: int = 4096
    """Length of one member name in an archive."""
    listing_budget_bytes: int = 64 * 2**20
    """Once an upload is known to be rejected, read at most this much more to list further problems."""


def printable(text: str, limit: int = 300) -> str:
    """``text`` safe for a JSON answer and a log line: surrogates and control/format characters escaped
    (``\\x00``, ``\\u202e``), at most ``limit`` characters."""
    out = []
    for ch in text[: limit + 1]:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
        else:
            out.append(ch)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Problem:
    """One offending member (or field) of an upload and why it was refused."""

    member: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON form for error responses (names from the upload are escaped)."""
        return {"member": printable(self.member), "reason": printable(self.reason, 1000)}


class UploadRejected(ValueError):
    """The upload is refused as a whole; ``status`` is the HTTP status to answer with (422 invalid content,
    413 over a size limit, 409 classes already known)."""

    def __init__(
        self, reason: str, problems: Sequence[Problem] = (), status: int = 422, note: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.problems = list(problems)
        self.status = status
        self.note = note

    def to_dict(self) -> dict[str, Any]:
        """JSON body of the error response (at most 50 problems listed, plus how many more)."""
        body: dict[str, Any] = {"detail": printable(self.reason, 2000)}
        if self.problems:
            body["problems"] = [p.to_dict() for p in self.problems[:MAX_LISTED]]
            if len(self.problems) > MAX_LISTED:
                body["problems_not_listed"] = len(self.problems) - MAX_LISTED
        if self.note:
            body["note"] = self.note
        return body


@dataclass(frozen=True)
class Duplicate:
    """A member dropped because another member of the same class has the same bytes."""

    member: str
    same_as: str

    def to_dict(self) -> dict[str, str]:
        """JSON form for the upload's answer."""
        return {"member": printable(self.member), "same_as": printable(self.same_as)}


@dataclass
class IngestedTask:
    """What a validated upload holds: classes (sorted), counts, and the files written to staging."""

    classes: list[str]
    counts: dict[str, int]
    items: list[tuple[str, int, str]]
    """(path relative to the staging folder, class index into ``classes``, ``train`` or ``eval``)."""
    warnings: list[str] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    """Members not stored because they repeat an image of their class byte for byte."""

    @property
    def num_images(self) -> int:
        """Images accepted."""
        return len(self.items)

    @property
    def eval_counts(self) -> dict[str, int]:
        """Held-out evaluation images per class."""
        out = dict.fromkeys(self.classes, 0)
        for _, c, split in self.items:
            if split == "eval":
                out[self.classes[c]] += 1
        return out

    def report(self) -> dict[str, Any]:
        """Extra fields for the upload's answer: the dropped duplicates (at most 50 listed)."""
        body: dict[str, Any] = {"duplicates": [d.to_dict() for d in self.duplicates[:MAX_LISTED]]}
        if len(self.duplicates) > MAX_LISTED:
            body["duplicates_not_listed"] = len(self.duplicates) - MAX_LISTED
        return body


def safe_display_name(name: str | None) -> str:
    """A file name for messages: the basename, at most 200 characters, escaped."""
    return printable(posixpath.basename((name or "").replace("\\", "/")), 200) or "(unnamed)"
