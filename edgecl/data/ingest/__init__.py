"""Validate and unpack one uploaded task: an archive of class folders, or images plus their labels.

This package owns everything the daemon does with upload bytes before the store sees them. Nothing in an
upload is trusted: archives are read to their very end with every decompressed byte counted (``archives``),
names with ``..``, absolute paths, links and special files are refused, images are probed from their headers
before any pixel is decoded and then decoded in full (``images``), class names are normalised and compared
for look-alikes (``labels``), and duplicates are found by content hash (``pipeline``). Images are written
under a caller-provided staging folder as ``c<NNN>/<NNNNNN>.<ext>``; the caller moves that folder into the
store only when :func:`ingest_archive` / :func:`ingest_images` return. Every problem raises
:class:`UploadRejected` (a ``ValueError``) listing every offending member found, with the HTTP status to
answer (422, 413 for size limits, 409 for known classes); the caller deletes the staging folder.
"""

from edgecl.data.ingest.archives import ARCHIVE_ERRORS, detect_kind
from edgecl.data.ingest.base import (
    Duplicate,
    IngestedTask,
    IngestLimits,
    Problem,
    UploadRejected,
    printable,
    safe_display_name,
)
from edgecl.data.ingest.images import ALLOWED_FORMATS, DecodedImage, ImageHeader, decode_image, probe_image
from edgecl.data.ingest.labels import check_known, label_key, parse_labels, validate_label
from edgecl.data.ingest.pipeline import ingest_archive, ingest_images

__all__ = [
    "ALLOWED_FORMATS",
    "ARCHIVE_ERRORS",
    "DecodedImage",
    "Duplicate",
    "ImageHeader",
    "IngestLimits",
    "IngestedTask",
    "Problem",
    "UploadRejected",
    "check_known",
    "decode_image",
    "detect_kind",
    "ingest_archive",
    "ingest_images",
    "label_key",
    "parse_labels",
    "printable",
    "probe_image",
    "safe_display_name",
    "validate_label",
]
