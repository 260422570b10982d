"""``to_rgb``: EXIF orientation and high-bit-depth greys, checked by hand-set pixels through every reader."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from edgecl.data.ingest.images import decode_image
from edgecl.data.stream import ImageListDataset
from edgecl.data.transforms import to_rgb
from edgecl.export import load_image

ORIENTATION = 0x0112
"""The EXIF orientation tag."""


def _rotated_png_bytes() -> bytes:
    """A 4x2 (w x h) image stored with orientation 6 ("rotate 90° clockwise to view"): left half red."""
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    for y in range(2):
        for x in range(2):
            img.putpixel((x, y), (255, 0, 0))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    return buf.getvalue()


def _grey16_png_bytes() -> bytes:
    """A 2x1 16-bit grey PNG: white (65535) and mid-grey (32896 = 128 · 257)."""
    img = Image.new("I;16", (2, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 32896)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _check_rotated(img: Image.Image) -> None:
    # Rotating 90° clockwise puts the stored left (red) half on top: 2 wide, 4 tall.
    assert img.mode == "RGB" and img.size == (2, 4)
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((1, 1)) == (255, 0, 0)
    assert img.getpixel((0, 3)) == (0, 0, 255)


def _check_grey16(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (128, 128, 128)  # convert("RGB") alone gives (255, 255, 255)


def test_to_rgb_applies_exif_orientation() -> None:
    with Image.open(io.BytesIO(_rotated_png_bytes())) as img:
        assert img.size == (4, 2)
        _check_rotated(to_rgb(img))


def test_to_rgb_rescales_16_bit_grey() -> None:
    with Image.open(io.BytesIO(_grey16_png_bytes())) as img:
        assert img.mode.startswith("I")
        _check_grey16(to_rgb(img))


def test_to_rgb_float_image_is_taken_as_0_to_1() -> None:
    # 100.25 / 255 scales to 100.25: 100 whether PIL rounds or truncates
    assert to_rgb(Image.new("F", (1, 1), 100.25 / 255)).getpixel((0, 0)) == (100, 100, 100)


def test_to_rgb_leaves_plain_rgb_alone() -> None:
    img = Image.new("RGB", (3, 2), (10, 20, 30))
    out = to_rgb(img)
    assert out.size == (3, 2) and out.getpixel((2, 1)) == (10, 20, 30)


def test_to_rgb_ignores_unreadable_orientation() -> None:
    img = Image.new("RGB", (4, 2), (1, 2, 3))
    img.getexif()[ORIENTATION] = 99  # not one of the 8 orientations
    assert to_rgb(img).size == (4, 2)


@pytest.mark.parametrize(
    ("make", "check"), [(_rotated_png_bytes, _check_rotated), (_grey16_png_bytes, _check_grey16)]
)
def test_every_reader_goes_through_to_rgb(
    tmp_path: Path, make: Callable[[], bytes], check: Callable[[Image.Image], None]
) -> None:
    data = make()
    _, decoded = decode_image(data, max_pixels=1_000_000)
    check(decoded)  # upload checks and /predict
    path = tmp_path / "x.png"
    path.write_bytes(data)
    check(load_image(path))  # edgecl predict
    image, label = ImageListDataset([(str(path), 3)])[0]  # training
    assert label == 3
    check(image)  # type: ignore[arg-type]
