"""Validate and unpack one uploaded task: an archive of class folders, or images plus their labels.

Nothing here trusts the upload: member names with ``..``, absolute paths or links are rejected, sizes and
counts are bounded before anything is read, and every image is decoded in full (truncated files, decompression
bombs and non-images fail). Images are written under a caller-provided staging folder as
``c<NNN>/<NNNNNN>.<ext>`` (class folders by index, never by a name from the upload); the caller moves that
folder into the store only when :func:`ingest_archive` / :func:`ingest_images` return. Any problem raises
:class:`UploadRejected` listing every offending member, and the caller deletes the staging folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import re
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DecodedImage",
    "IngestLimits",
    "IngestedTask",
    "Problem",
    "UploadRejected",
    "decode_image",
    "detect_kind",
    "ingest_archive",
    "ingest_images",
    "parse_labels",
    "validate_label",
]

ALLOWED_FORMATS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "BMP": "bmp",
    "WEBP": "webp",
    "PPM": "ppm",
    "TIFF": "tif",
}
"""PIL formats accepted for training images, and the extension each is stored with."""

_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_MAX_LISTED = 50
_LABEL_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on one upload (all configurable through ``edgecl serve`` flags)."""

    max_images: int = 20_000
    """Images in one task."""
    max_members: int = 25_000
    """Entries in one archive (folders and ignored files included)."""
    max_image_pixels: int = 4096 * 4096
    """Width x height of one image; larger ones are rejected before decoding (decompression bombs)."""
    max_image_bytes: int = 32 * 2**20
    """Size of one (uncompressed) image file."""
    max_total_bytes: int = 2 * 2**30
    """Uncompressed size of all members of one archive (zip/gzip bombs)."""
    max_classes: int = 1000
    """Classes in one task."""
    max_label_length: int = 100


@dataclass(frozen=True)
class Problem:
    """One offending member of an upload and why it was refused."""

    member: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON form for error responses."""
        return {"member": self.member, "reason": self.reason}


class UploadRejected(ValueError):
    """The upload is refused as a whole; ``status`` is the HTTP status to answer with."""

    def __init__(self, reason: str, problems: Sequence[Problem] = (), status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.problems = list(problems)
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        """JSON body of the error response (at most 50 problems listed, plus how many more)."""
        body: dict[str, Any] = {"detail": self.reason}
        if self.problems:
            body["problems"] = [p.to_dict() for p in self.problems[:_MAX_LISTED]]
            if len(self.problems) > _MAX_LISTED:
                body["problems_not_listed"] = len(self.problems) - _MAX_LISTED
        return body


@dataclass
class IngestedTask:
    """What a validated upload holds: classes (sorted), counts, and the files written to staging."""

    classes: list[str]
    counts: dict[str, int]
    items: list[tuple[str, int, str]]
    """(path relative to the staging folder, class index into ``classes``, ``train`` or ``eval``)."""
    warnings: list[str] = field(default_factory=list)

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


@dataclass(frozen=True)
class DecodedImage:
    """A verified image: its PIL format, the extension to store it with, and its size."""

    format: str
    ext: str
    width: int
    height: int


def decode_image(data: bytes, max_pixels: int) -> tuple[DecodedImage, Image.Image]:
    """Decode ``data`` in full and check format and pixel count; ``ValueError`` says what is wrong.

    Returns the facts and the decoded RGB image.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or "?"
            width, height = probe.size
            if fmt not in ALLOWED_FORMATS:
                raise ValueError(f"unsupported image format {fmt} (use JPEG, PNG, BMP, WebP, PPM or TIFF)")
            if width * height > max_pixels:
                raise ValueError(
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ValueError(f"decompression bomb refused: {err}") from err
    except UnidentifiedImageError:
        raise ValueError("not a decodable image (unknown format)") from None
    except (OSError, SyntaxError, EOFError, struct.error) as err:
        raise ValueError(f"corrupt or truncated image: {err}") from err
    return DecodedImage(fmt, ALLOWED_FORMATS[fmt], width, height), rgb


def validate_label(label: Any, max_length: int = 100) -> str:
    """A class name as given, or ``ValueError``: 1..max_length printable characters, no slashes."""
    if not isinstance(label, str):
        raise ValueError(f"class name must be a string, got {type(label).__name__}")
    if not label or label != label.strip():
        raise ValueError(f"class name {label!r} is empty or has leading/trailing spaces")
    if len(label) > max_length:
        raise ValueError(f"class name is longer than {max_length} characters")
    if label in {".", ".."} or _LABEL_BAD_CHARS.search(label):
        raise ValueError(f"class name {label!r} contains a slash, a control character or is '.'/'..'")
    return label


def detect_kind(head: bytes) -> str:
    """``zip``, ``tar`` (plain or compressed) or ``image`` from the first bytes of an upload."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return "image"


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


class _Collector:
    """Accumulates verified images in staging and the problems of an upload."""

    def __init__(self, staging: Path, limits: IngestLimits) -> None:
        self.staging = staging
        self.limits = limits
        self.problems: list[Problem] = []
        self.ignored = 0
        self.images: list[tuple[str, str, str]] = []
        """(member name, label, file path relative to staging) before class indices exist."""
        self._label_dirs: dict[str, str] = {}
        self._label_ok: dict[str, bool] = {}

    def problem(self, member: str, reason: str) -> None:
        self.problems.append(Problem(member, reason))

    def check_label(self, member: str, label: str) -> bool:
        if label not in self._label_ok:
            try:
                validate_label(label, self.limits.max_label_length)
                self._label_ok[label] = True
            except ValueError as err:
                self._label_ok[label] = False
                self.problem(member, str(err))
                return False
        return self._label_ok[label]

    def add(self, member: str, label: str, data: bytes) -> None:
        """Verify one image and write it to staging under its label's folder."""
        if len(self.images) >= self.limits.max_images:
            raise UploadRejected(
                f"more than {self.limits.max_images} images in one task (limit --max-images-per-task)",
                status=413,
            )
        if not self.check_label(member, label):
            return
        try:
            info, _ = decode_image(data, self.limits.max_image_pixels)
        except ValueError as err:
            self.problem(member, str(err))
            return
        if self.problems:  # the upload is rejected anyway: stop writing, keep validating
            self.images.append((member, label, ""))
            return
        sub = self._label_dirs.setdefault(label, f"c{len(self._label_dirs):03d}")
        if len(self._label_dirs) > self.limits.max_classes:
            raise UploadRejected(f"more than {self.limits.max_classes} classes in one task", status=413)
        rel = f"{sub}/{len(self.images):06d}.{info.ext}"
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.images.append((member, label, rel))

    def finish(self, eval_fraction: float, what: str) -> IngestedTask:
        """Raise for problems or emptiness; otherwise assign class indices and the eval split."""
        if self.problems:
            n = len(self.problems)
            raise UploadRejected(
                f"{n} member{'s' if n > 1 else ''} of the {what} rejected; nothing was stored", self.problems
            )
        if not self.images:
            raise UploadRejected(
                f"the {what} holds no images"
                + (f" ({self.ignored} hidden/system files ignored)" if self.ignored else "")
            )
        classes = sorted({label for _, label, _ in self.images})
        index = {c: i for i, c in enumerate(classes)}
        by_class: dict[str, list[tuple[str, str]]] = {c: [] for c in classes}
        for member, label, rel in self.images:
            by_class[label].append((member, rel))
        items: list[tuple[str, int, str]] = []
        for c in classes:
            members = sorted(
                by_class[c], key=lambda m: hashlib.sha1(f"{m[0]}\x00{m[1]}".encode()).hexdigest()
            )
            n_eval = math.floor(len(members) * eval_fraction) if len(members) >= 2 else 0
            n_eval = min(n_eval, len(members) - 1)
            items += [(rel, index[c], "eval") for _, rel in members[:n_eval]]
            items += [(rel, index[c], "train") for _, rel in members[n_eval:]]
        items.sort(key=lambda it: it[0])
        counts = {c: len(by_class[c]) for c in classes}
        warnings: list[str] = []
        if self.ignored:
            warnings.append(f"ignored {self.ignored} hidden or system files (.*, __MACOSX, Thumbs.db)")
        if len(classes) == 1:
            warnings.append(
                "a task with a single class teaches nothing under class-incremental training (earlier "
                "classes are masked in the loss); upload two or more classes per task"
            )
        if not any(split == "eval" for _, _, split in items):
            warnings.append(
                "too few images to hold any out: accuracy of this task is measured on training images"
            )
        return IngestedTask(classes, counts, items, warnings)


def _labels_from_paths(entries: list[tuple[str, list[str]]], collector: _Collector) -> list[tuple[str, str]]:
    """(member, label) per image entry: the top-level folder, after stripping one wrapping folder."""
    if entries and all(len(p) >= 3 for _, p in entries) and len({p[0] for _, p in entries}) == 1:
        entries = [(m, p[1:]) for m, p in entries]
    out = []
    for member, parts in entries:
        if len(parts) < 2:
            collector.problem(member, "image outside a class folder: archives hold one folder per class")
            continue
        out.append((member, parts[0]))
    return out


def _read_bounded(fh: IO[bytes], limit: int) -> bytes | None:
    data = fh.read(limit + 1)
    return None if len(data) > limit else data


def _zip_entries(
    fileobj: IO[bytes], limits: IngestLimits, collector: _Collector
) -> Iterator[tuple[str, Any]]:
    try:
        zf = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UploadRejected(f"not a readable zip archive: {err}") from err
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise UploadRejected(
            f"archive has {len(infos)} members; the limit is {limits.max_members} (--max-archive-members)",
            status=413,
        )
    total = 0
    for info in infos:
        mode = info.external_attr >> 16
        parts, why = _member_path(info.filename)
        if why:
            collector.problem(info.filename, why)
            continue
        assert parts is not None
        if not parts and not info.is_dir():
            collector.problem(info.filename, "empty name")
            continue
        if stat.S_ISLNK(mode):
            collector.problem(info.filename, "symbolic link")
            continue
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            collector.problem(info.filename, "not a regular file")
            continue
        if info.flag_bits & 0x1:
            collector.problem(info.filename, "encrypted member")
            continue
        if info.file_size > limits.max_image_bytes:
            collector.problem(info.filename, f"{info.file_size} bytes exceeds the per-image limit")
            continue
        total += info.file_size
        if total > limits.max_total_bytes:
            raise UploadRejected(f"archive expands to more than {limits.max_total_bytes} bytes", status=413)
        yield info.filename, (zf, info)


def _tar_entries(
    fileobj: IO[bytes], limits: IngestLimits, collector: _Collector
) -> Iterator[tuple[str, Any]]:
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:*")  # noqa: SIM115 - the generator keeps it open
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UploadRejected(f"not a readable tar archive: {err}") from err
    count = total = 0
    while True:
        try:
            member = tf.next()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UploadRejected(f"corrupt tar archive after {count} members: {err}") from err
        if member is None:
            break
        count += 1
        if count > limits.max_members:
            raise UploadRejected(
                f"archive has more than {limits.max_members} members (--max-archive-members)", status=413
            )
        parts, why = _member_path(member.name)
        if why:
            collector.problem(member.name, why)
            continue
        if not parts and not member.isdir():
            collector.problem(member.name, "empty name")
            continue
        if member.issym() or member.islnk():
            collector.problem(member.name, f"{'symbolic' if member.issym() else 'hard'} link")
            continue
        if member.isdir():
            continue
        if not member.isfile():
            collector.problem(member.name, "not a regular file (device, fifo or other special member)")
            continue
        if member.size > limits.max_image_bytes:
            collector.problem(member.name, f"{member.size} bytes exceeds the per-image limit")
            continue
        total += member.size
        if total > limits.max_total_bytes:
            raise UploadRejected(f"archive expands to more than {limits.max_total_bytes} bytes", status=413)
        yield member.name, (tf, member)


def _read_member(handle: Any, limit: int) -> bytes | None:
    src, info = handle
    if isinstance(src, zipfile.ZipFile):
        with src.open(info) as fh:
            return _read_bounded(fh, limit)
    fh = src.extractfile(info)
    if fh is None:
        return None
    with fh:
        return _read_bounded(fh, limit)


def ingest_archive(
    fileobj: IO[bytes],
    staging: Path,
    limits: IngestLimits,
    eval_fraction: float = 0.1,
    kind: str | None = None,
) -> IngestedTask:
    """Validate a zip / tar / tar.gz of class folders and write its images to ``staging``.

    Top-level folders are the class labels (one wrapping folder holding only class folders is stripped);
    images may sit in subfolders of a class folder. Hidden and system files are ignored, everything else
    must be a decodable image.
    """
    if kind is None:
        head = fileobj.read(512)
        fileobj.seek(0)
        kind = detect_kind(head)
    collector = _Collector(staging, limits)
    reader = _zip_entries if kind == "zip" else _tar_entries
    # Pass 1 validates names and types; pass 2 reads the images (zip: random access; tar: stream again).
    entries: list[tuple[str, list[str]]] = []
    for name, _ in reader(fileobj, limits, collector):
        parts, _why = _member_path(name)
        assert parts is not None
        if _is_junk(parts):
            collector.ignored += 1
            continue
        entries.append((name, parts))
    labels = dict(_labels_from_paths(entries, collector))
    if len(labels) > limits.max_images:
        raise UploadRejected(
            f"archive holds {len(labels)} images; the limit is {limits.max_images} (--max-images-per-task)",
            status=413,
        )
    if collector.problems:
        raise UploadRejected(
            f"{len(collector.problems)} archive member(s) rejected; nothing was stored", collector.problems
        )
    fileobj.seek(0)
    quiet = _Collector(staging, limits)  # names were checked above; this pass reads the bytes
    for name, handle in reader(fileobj, limits, quiet):
        label = labels.get(name)
        if label is None:
            continue
        try:
            data = _read_member(handle, limits.max_image_bytes)
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError) as err:
            collector.problem(name, f"cannot be read from the archive: {err}")
            continue
        if data is None:
            collector.problem(name, "exceeds the per-image size limit")
            continue
        collector.add(name, label, data)
    return collector.finish(eval_fraction, "archive")


def parse_labels(raw: str | None, filenames: Sequence[str], max_length: int = 100) -> list[str]:
    """One label per file from the ``labels`` form field; ``UploadRejected`` explains what is wrong.

    Accepted JSON: a list with one label per file (in upload order), an object ``{filename: label}``
    covering every file, or for a single file a plain string.
    """
    if raw is None or not raw.strip():
        raise UploadRejected("images need a 'labels' field: a JSON list with one class name per file")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UploadRejected(f"'labels' is not valid JSON: {err}") from None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        if len(set(filenames)) != len(filenames):
            raise UploadRejected("'labels' is an object but file names repeat; send a JSON list instead")
        missing = [f for f in filenames if f not in value]
        extra = sorted(set(value) - set(filenames))
        if missing or extra:
            problems = [Problem(f, "no label for this file") for f in missing]
            problems += [Problem(f, "label given for a file that was not uploaded") for f in extra]
            raise UploadRejected("'labels' does not match the uploaded files", problems)
        value = [value[f] for f in filenames]
    if not isinstance(value, list):
        raise UploadRejected(f"'labels' must be a JSON list of class names, got {type(value).__name__}")
    if len(value) != len(filenames):
        raise UploadRejected(f"{len(filenames)} file(s) uploaded but 'labels' has {len(value)} entries")
    problems = []
    for name, label in zip(filenames, value, strict=True):
        try:
            validate_label(label, max_length)
        except ValueError as err:
            problems.append(Problem(name, str(err)))
    if problems:
        raise UploadRejected("invalid class names in 'labels'", problems)
    return list(value)


def ingest_images(
    files: Iterable[tuple[str, IO[bytes]]],
    labels: Sequence[str],
    staging: Path,
    limits: IngestLimits,
    eval_fraction: float = 0.1,
) -> IngestedTask:
    """Validate loose images (``(filename, file)`` in upload order, one label each) into ``staging``."""
    collector = _Collector(staging, limits)
    files = list(files)
    if len(files) > limits.max_images:
        raise UploadRejected(f"{len(files)} images; the limit is {limits.max_images}", status=413)
    for i, ((name, fh), label) in enumerate(zip(files, labels, strict=True)):
        member = name or f"file #{i + 1}"
        data = _read_bounded(fh, limits.max_image_bytes)
        if data is None:
            collector.problem(member, f"larger than the per-image limit of {limits.max_image_bytes} bytes")
            continue
        collector.add(member, label, data)
    return collector.finish(eval_fraction, "upload")


def safe_display_name(name: str | None) -> str:
    """A file name for messages: the basename, at most 200 characters."""
    return posixpath.basename((name or "").replace("\\", "/"))[:200] or "(unnamed)"
