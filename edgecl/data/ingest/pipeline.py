"""One upload from bytes to a staged task, cheapest checks first.

1. Read the archive to its end (names, types, sizes; each image's bytes into ``staging/incoming/`` with its
   SHA-256 and its header: format, size, data after its end). Limits on members, bytes and pixels are checked
   as the reading goes (413 at once); after a first problem only ``listing_budget_bytes`` more are read.
2. Labels: normalised, validated, compared with each other and with the known classes (409).
3. Duplicates by content hash: dropped within a class (reported), refused across classes.
4. Decode every image in full.
5. Move the images to ``c<NNN>/<NNNNNN>.<ext>`` (class folders by index, never by a name from the upload)
   and split off the held-out images.

Any problem raises :class:`UploadRejected` naming every offending member found; the caller deletes the
staging folder. Nothing is written outside it.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgecl.data.ingest.archives import ARCHIVE_ERRORS, CHUNK, Member, describe, detect_kind
from edgecl.data.ingest.base import Duplicate, IngestedTask, IngestLimits, Problem, UploadRejected, printable
from edgecl.data.ingest.images import ImageHeader, decode_image, probe_image
from edgecl.data.ingest.labels import check_known, check_label_set, validate_label
from edgecl.data.ingest.tars import TarReader
from edgecl.data.ingest.zips import ZipReader

__all__ = ["ingest_archive", "ingest_images"]

_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_OUTSIDE = "image outside a class folder: archives hold one folder per class"
_KIND_PROBLEMS = {
    "symlink": "symbolic link",
    "hardlink": "hard link",
    "special": "not a regular file (device, fifo or other special member)",
    "sparse": "sparse file (not supported)",
}


def _member_path(name: str) -> tuple[list[str] | None, str | None]:
    """(path components, None) for a safe relative member name, or (None, why it is unsafe)."""
    if "\x00" in name:
        return None, "NUL byte in the name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return None, "absolute path"
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "path traversal ('..')"
    return parts, None


def _is_junk(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p in _JUNK_NAMES for p in parts)


@dataclass
class _Entry:
    member: str
    parts: list[str]
    digest: str
    header: ImageHeader
    path: Path | None


class _Stage:
    """The images of one upload on their way through staging, and its problems."""

    def __init__(self, staging: Path, limits: IngestLimits) -> None:
        self.staging = staging
        self.limits = limits
        self.incoming = staging / "incoming"
        self.problems: list[Problem] = []
        self.note: str | None = None
        self.entries: list[_Entry] = []
        self.ignored = 0
        self.pixels = 0
        self.names: dict[tuple[str, ...], str] = {}
        self.listed_bytes = 0
        """Bytes read since the upload was known to be rejected."""

    def problem(self, member: str, reason: str) -> None:
        self.problems.append(Problem(member, reason))

    @property
    def exhausted(self) -> bool:
        """True once listing more problems would cost more than ``listing_budget_bytes``."""
        if self.problems and self.listed_bytes > self.limits.listing_budget_bytes:
            self.note = (
                f"stopped reading {self.limits.listing_budget_bytes} bytes after the first problem: other "
                "members may be at fault too"
            )
            return True
        return False

    def check(self, m: Member) -> list[str] | None:
        """Path components of a member to read as an image, [] for one to read and ignore, None to skip."""
        if len(m.name.encode("utf-8", "surrogateescape")) > self.limits.max_name_bytes:
            self.problem(m.name, f"name longer than {self.limits.max_name_bytes} bytes")
            return None
        parts, why = _member_path(m.name)
        if why or parts is None:
            self.problem(m.name, why or "unsafe name")
            return None
        if m.problem:
            self.problem(m.name, m.problem)
            return None
        if m.kind == "dir":
            return None
        if m.kind in _KIND_PROBLEMS:
            self.problem(m.name, _KIND_PROBLEMS[m.kind])
            return None
        if not parts:
            self.problem(m.name, "empty name")
            return None
        key = tuple(unicodedata.normalize("NFC", p) for p in parts)
        if key in self.names:
            self.problem(m.name, "duplicate member name: the archive holds two files at this path")
            return None
        self.names[key] = m.name
        if _is_junk(parts):
            self.ignored += 1
            return []
        return parts

    def take(self, member: str, parts: list[str], fh: IO[bytes], declared: int | None = None) -> None:
        """Read one image's bytes (bounded), hash and probe them, and keep them in ``incoming/``;
        ``declared`` is the size the archive lists for the member."""
        if len(self.entries) >= self.limits.max_images:
            raise UploadRejected(
                f"more than {self.limits.max_images} images in one task (limit --max-images-per-task)",
                status=413,
            )
        data = _read_all(fh, self.limits.max_image_bytes)
        if data is None:
            raise UploadRejected(
                f"{printable(member)!r} is larger than the per-image limit of {self.limits.max_image_bytes} "
                "bytes",
                status=413,
            )
        if self.problems:
            self.listed_bytes += len(data)
        if declared is not None and len(data) != declared:
            self.problem(member, f"holds {len(data)} bytes but the archive lists {declared}: damaged archive")
            return
        try:
            header = probe_image(data, self.limits.max_image_pixels)
        except ValueError as err:
            self.problem(member, str(err))
            return
        self.pixels += header.pixels
        if self.pixels > self.limits.max_total_pixels:
            raise UploadRejected(
                f"the upload's images hold more than {self.limits.max_total_pixels} pixels in all (at "
                f"{printable(member)!r}); split it into several tasks or downscale the images",
                status=413,
            )
        path = None
        if not self.problems:  # the upload is rejected anyway: stop writing, keep validating
            self.incoming.mkdir(parents=True, exist_ok=True)
            path = self.incoming / f"{len(self.entries):06d}"
            path.write_bytes(data)
        self.entries.append(_Entry(member, parts, hashlib.sha256(data).hexdigest(), header, path))

    def cleanup(self) -> None:
        """Remove what this upload wrote (the staging folder itself is the caller's)."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        for sub in self.staging.glob("c[0-9][0-9][0-9]"):
            shutil.rmtree(sub, ignore_errors=True)

    def raise_problems(self, what: str) -> None:
        if self.problems:
            n = len(self.problems)
            raise UploadRejected(
                f"{n} member{'s' if n > 1 else ''} of the {what} rejected; nothing was stored",
                self.problems,
                note=self.note,
            )


def _read_all(fh: IO[bytes], limit: int) -> bytes | None:
    """All of ``fh`` in chunks, or None past ``limit`` bytes."""
    chunks, n = [], 0
    while chunk := fh.read(CHUNK):
        n += len(chunk)
        if n > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _drain(fh: IO[bytes]) -> int:
    n = 0
    while chunk := fh.read(CHUNK):
        n += len(chunk)
    return n


def _read_member(stage: _Stage, m: Member, parts: list[str]) -> None:
    """Read one listed member: into the stage when it is an image, else to its end (checksums)."""
    assert m.opener is not None
    try:
        with m.opener() as fh:
            if parts:
                stage.take(m.name, parts, fh, m.size)
            elif _drain(fh) != m.size:
                stage.problem(m.name, f"does not hold the {m.size} bytes the archive lists: damaged archive")
    except UploadRejected:
        raise
    except ARCHIVE_ERRORS as err:
        stage.problem(m.name, f"cannot be read from the archive: {describe(err)}")


def _outside_class_folders(paths: list[tuple[str, list[str]]]) -> tuple[bool, list[str]]:
    """(strip the wrapping folder?, members not inside a class folder) for image paths."""
    strip = bool(paths) and all(len(p) >= 3 for _, p in paths) and len({p[0] for _, p in paths}) == 1
    return strip, [m for m, p in paths if len(p) - strip < 2]


def _scan_zip(reader: ZipReader, stage: _Stage) -> None:
    listed = [(m, stage.check(m)) for m in reader.members()]
    for member in _outside_class_folders([(m.name, p) for m, p in listed if p])[1]:
        stage.problem(member, _OUTSIDE)
    stage.raise_problems("archive")  # names and types first: nothing was decompressed yet
    for m, parts in listed:
        if parts is None:
            continue
        if stage.exhausted:
            return
        _read_member(stage, m, parts)


def _scan_tar(reader: TarReader, stage: _Stage) -> None:
    for m in reader.members():
        parts = stage.check(m)
        if parts is not None:
            _read_member(stage, m, parts)
        if stage.exhausted:
            return
    reader.finish()


def _labels_from_paths(stage: _Stage) -> list[tuple[_Entry, str]]:
    """(entry, raw label) per image: the top-level folder, after stripping one wrapping folder."""
    strip, outside = _outside_class_folders([(e.member, e.parts) for e in stage.entries])
    for member in outside:
        stage.problem(member, _OUTSIDE)
    return [(e, e.parts[int(strip)]) for e in stage.entries if len(e.parts) - strip >= 2]


def _finish(
    stage: _Stage,
    labelled: list[tuple[_Entry, str]],
    eval_fraction: float,
    what: str,
    known_classes: Mapping[str, int] | None,
) -> IngestedTask:
    """Labels, known classes, duplicates, full decode, final layout and split."""
    limits = stage.limits
    normal: dict[str, str | None] = {}
    for e, raw in labelled:
        if raw not in normal:
            try:
                normal[raw] = validate_label(raw, limits.max_label_length)
            except ValueError as err:
                normal[raw] = None
                stage.problem(e.member, str(err))
    first: dict[str, str] = {}
    for e, raw in labelled:
        label = normal[raw]
        if label is not None:
            first.setdefault(label, e.member)
    stage.problems += check_label_set(first)
    stage.raise_problems(what)
    if not labelled:
        raise UploadRejected(
            f"the {what} holds no images"
            + (f" ({stage.ignored} hidden/system files ignored)" if stage.ignored else "")
        )
    check_known(first, known_classes)
    if len(first) > limits.max_classes:
        raise UploadRejected(
            f"{len(first)} classes in one task; the limit is {limits.max_classes}", status=413
        )
    kept: list[tuple[_Entry, str]] = []
    duplicates: list[Duplicate] = []
    by_digest: dict[str, tuple[_Entry, str]] = {}
    for e, raw in labelled:
        label = normal[raw]
        assert label is not None
        seen = by_digest.get(e.digest)
        if seen is None:
            by_digest[e.digest] = (e, label)
            kept.append((e, label))
        elif seen[1] == label:
            duplicates.append(Duplicate(e.member, seen[0].member))
        else:
            stage.problem(
                e.member,
                f"same bytes as {printable(seen[0].member)!r} of class {seen[1]!r}: one image cannot be in "
                "two classes",
            )
    stage.raise_problems(what)
    for e, _ in kept:
        assert e.path is not None
        try:
            decode_image(e.path.read_bytes(), limits.max_image_pixels)
        except ValueError as err:
            stage.problem(e.member, str(err))
    stage.raise_problems(what)
    return _layout(stage, kept, duplicates, eval_fraction)


def _layout(
    stage: _Stage, kept: list[tuple[_Entry, str]], duplicates: list[Duplicate], eval_fraction: float
) -> IngestedTask:
    classes = sorted({label for _, label in kept})
    index = {c: i for i, c in enumerate(classes)}
    by_class: dict[str, list[tuple[str, str]]] = {c: [] for c in classes}
    for i, (e, label) in enumerate(kept):
        rel = f"c{index[label]:03d}/{i:06d}.{e.header.ext}"
        dest = stage.staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        assert e.path is not None
        e.path.replace(dest)
        by_class[label].append((f"{e.member}\x00{e.digest}", rel))
    shutil.rmtree(stage.incoming, ignore_errors=True)
    items: list[tuple[str, int, str]] = []
    for c in classes:
        members = sorted(
            by_class[c], key=lambda m: hashlib.sha1(m[0].encode("utf-8", "surrogateescape")).digest()
        )
        n_eval = math.floor(len(members) * eval_fraction) if len(members) >= 2 else 0
        n_eval = min(n_eval, len(members) - 1)
        items += [(rel, index[c], "eval") for _, rel in members[:n_eval]]
        items += [(rel, index[c], "train") for _, rel in members[n_eval:]]
    items.sort(key=lambda it: it[0])
    counts = {c: len(by_class[c]) for c in classes}
    warnings: list[str] = []
    if stage.ignored:
        warnings.append(f"ignored {stage.ignored} hidden or system files (.*, __MACOSX, Thumbs.db)")
    if duplicates:
        warnings.append(
            f"dropped {len(duplicates)} duplicate image(s): same bytes as another image of the same class "
            "(listed in 'duplicates'); they would otherwise count twice or leak into the held-out split"
        )
    if len(classes) == 1:
        warnings.append(
            "a task with a single class teaches nothing under class-incremental training (earlier "
            "classes are masked in the loss); upload two or more classes per task"
        )
    if not any(split == "eval" for _, _, split in items):
        warnings.append(
            "too few images to hold any out: accuracy of this task is measured on training images"
        )
    return IngestedTask(classes, counts, items, warnings, duplicates)


def ingest_archive(
    fileobj: IO[bytes],
    staging: Path,
    limits: IngestLimits,
    eval_fraction: float = 0.1,
    kind: str | None = None,
    known_classes: Mapping[str, int] | None = None,
) -> IngestedTask:
    """Validate a zip / tar / tar.gz / tar.bz2 / tar.xz of class folders and write its images to ``staging``.

    Top-level folders are the class labels (one wrapping folder holding only class folders is stripped);
    images may sit in subfolders of a class folder. Hidden and system files are ignored, everything else
    must be a decodable image. ``known_classes`` ({class: task id}) are refused (409) before any decoding.
    """
    if kind is None:
        fileobj.seek(0)
        kind = detect_kind(fileobj.read(512))
    fileobj.seek(0)
    if kind == "ambiguous":
        raise UploadRejected(
            "the upload is both a tar archive and a zip or image (a polyglot file); send one"
        )
    if kind not in ("zip", "tar"):
        raise UploadRejected(
            f"not an archive (detected {kind!r}): send a .zip, .tar, .tar.gz, .tar.bz2 or .tar.xz"
        )
    stage = _Stage(staging, limits)
    try:
        if kind == "zip":
            _scan_zip(ZipReader(fileobj, limits), stage)
        else:
            _scan_tar(TarReader(fileobj, limits), stage)
        stage.raise_problems("archive")
        return _finish(stage, _labels_from_paths(stage), eval_fraction, "archive", known_classes)
    except BaseException:
        stage.cleanup()
        raise


def ingest_images(
    files: Iterable[tuple[str, IO[bytes]]],
    labels: Sequence[str],
    staging: Path,
    limits: IngestLimits,
    eval_fraction: float = 0.1,
    known_classes: Mapping[str, int] | None = None,
) -> IngestedTask:
    """Validate loose images (``(filename, file)`` in upload order, one label each, as :func:`parse_labels`
    returns them) into ``staging``; known classes are refused before any file is read."""
    files = list(files)
    if len(files) > limits.max_images:
        raise UploadRejected(f"{len(files)} images; the limit is {limits.max_images}", status=413)
    if len(labels) != len(files):
        raise UploadRejected(f"{len(files)} file(s) uploaded but {len(labels)} labels")
    first: dict[str, str] = {}
    for (name, _), label in zip(files, labels, strict=True):
        first.setdefault(label, name)
    check_known(first, known_classes)
    stage = _Stage(staging, limits)
    try:
        labelled_raw: list[tuple[int, str]] = []
        for i, ((name, fh), label) in enumerate(zip(files, labels, strict=True)):
            member = name or f"file #{i + 1}"
            before = len(stage.entries)
            stage.take(member, [label, member], fh)
            if len(stage.entries) > before:
                labelled_raw.append((before, label))
        stage.raise_problems("upload")
        labelled = [(stage.entries[i], label) for i, label in labelled_raw]
        return _finish(stage, labelled, eval_fraction, "upload", known_classes)
    except BaseException:
        stage.cleanup()
        raise
