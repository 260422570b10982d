"""Image checks: the format and size from the header (cheap, before any pixel is decoded), data hidden after
the image's end (polyglots), and the full decode.

Only the accepted formats' PIL plugins are ever asked to open a file, so no other parser (EPS, which runs
Ghostscript, or any of PIL's rarer plugins) sees an upload.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from edgecl.data.transforms import to_rgb

__all__ = ["ALLOWED_FORMATS", "DecodedImage", "ImageHeader", "decode_image", "probe_image"]

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
_OPEN_FORMATS = ["JPEG", "PNG", "BMP", "WEBP", "PPM", "TIFF"]  # MPO is found by the JPEG plugin

_REFUSED_MAGIC = [
    (b"GIF8", "GIF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
]


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its PIL format, the extension to store it with, and its size."""

    format: str
    ext: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Width x height."""
        return self.width * self.height


DecodedImage = ImageHeader
"""The facts of a decoded image (same fields as its header)."""


_ACCEPTED_MAGIC = [
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
]


def _refused_format(data: bytes, err: BaseException) -> str:
    """Why PIL could not open ``data``: a damaged file of an accepted format, or another format."""
    accepted = next((fmt for magic, fmt in _ACCEPTED_MAGIC if data.startswith(magic)), None)
    if accepted is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        accepted = "WebP"
    if accepted is None and len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456":
        accepted = "PPM"
    if accepted:
        if isinstance(err, UnidentifiedImageError):
            return f"corrupt {accepted} image: its header cannot be read"
        return f"corrupt or truncated {accepted} image: {type(err).__name__}: {err}"
    if data[4:8] == b"ftyp":
        return "unsupported image format HEIF/AVIF (use JPEG, PNG, BMP, WebP, PPM or TIFF)"
    for magic, what in _REFUSED_MAGIC:
        if data.startswith(magic):
            return f"unsupported image format {what} (use JPEG, PNG, BMP, WebP, PPM or TIFF)"
    if not data:
        return "empty file (0 bytes), not an image"
    return "not a decodable image (unknown format)"


def _png_end(data: bytes) -> int | None:
    """Offset just after the IEND chunk, or None when the chunk chain is broken."""
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos if pos <= len(data) else None
    return None


def _jpeg_end(data: bytes) -> int | None:
    """Offset just after the EOI marker that ends the first image, or None when the markers are broken."""
    pos = 2
    n = len(data)
    while pos + 2 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if pos + 4 > n:
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
        if marker == 0xDA:  # entropy-coded scan: runs to the next marker that is not stuffing or RSTn
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return None
                nxt = data[pos + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    pos += 1 if nxt == 0xFF else 2
                    continue
                break
    return None


def _trailing_data(fmt: str, data: bytes) -> str | None:
    """Why ``data`` holds more than its image (a polyglot: an archive or script after the picture)."""
    if fmt == "PNG":
        end = _png_end(data)
    elif fmt == "JPEG":
        end = _jpeg_end(data)
    elif fmt == "WEBP":
        end = 8 + struct.unpack("<I", data[4:8])[0] if len(data) >= 8 else None
        end = None if end is None else end + (end & 1)
    else:
        return None  # TIFF, BMP, PPM and MPO have no end marker worth trusting
    if end is None:
        return "corrupt or truncated image: its structure does not reach a proper end"
    rest = data[end:]
    if rest.strip(b"\x00\xff"):
        return (
            f"{len(rest)} bytes of other data after the end of the {fmt} image (a polyglot or a file with "
            "something appended): save the image again"
        )
    return None


def probe_image(data: bytes, max_pixels: int, strict_end: bool = True) -> ImageHeader:
    """Format and size from the header (no pixel decoded); ``ValueError`` for a non-image, a refused format,
    too many pixels or, with ``strict_end``, data after the image's end."""
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as probe:
            fmt = probe.format or "?"
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise ValueError(f"decompression bomb refused: {err}") from err
    except Exception as err:  # any parser failure on untrusted bytes means "not an image"
        if isinstance(err, MemoryError):
            raise
        raise ValueError(_refused_format(data, err)) from None
    if fmt not in ALLOWED_FORMATS:
        raise ValueError(f"unsupported image format {fmt} (use JPEG, PNG, BMP, WebP, PPM or TIFF)")
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    if strict_end:
        why = _trailing_data(fmt, data)
        if why:
            raise ValueError(why)
    return ImageHeader(fmt, ALLOWED_FORMATS[fmt], width, height)


def decode_image(data: bytes, max_pixels: int, strict_end: bool = False) -> tuple[DecodedImage, Image.Image]:
    """Decode ``data`` in full and check format and pixel count; ``ValueError`` says what is wrong.

    Returns the facts and the decoded RGB image.
    """
    info = probe_image(data, max_pixels, strict_end)
    try:
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as img:
            img.load()
            rgb = to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ValueError(f"decompression bomb refused: {err}") from err
    except Exception as err:  # PIL's plugins raise many kinds on corrupt data
        if isinstance(err, MemoryError):
            raise
        raise ValueError(f"corrupt or truncated image: {type(err).__name__}: {err}") from err
    return info, rgb
