"""Decoded image → tensor: ``to_rgb`` (orientation and bit depth, for every reader) and the torchvision v2
transforms (train = RandomResizedCrop + flip, eval = resize + center crop)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

__all__ = ["build_transforms", "eval_transform", "to_rgb"]

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
"""Integer modes PIL opens 16-bit files in (grey PNG/TIFF): 0-65535 → 0-255. ``I`` (32-bit) is assumed to
hold 16-bit data, as it does when PIL reads a 16-bit PNG; larger values clip at white."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as the camera saw it: EXIF orientation applied and high-bit-depth greys rescaled.

    ``Image.convert("RGB")`` alone keeps a phone photo on its side and clips a 16-bit grey PNG's values
    at 255 (mid-grey 32896 becomes white). ``F`` images are taken to hold 0-1 (the float TIFF convention).
    EXIF that cannot be parsed leaves the image as stored: orientation is metadata, not pixels. Training
    (``ImageListDataset``), upload checks and ``edgecl predict`` all read through this one function.
    """
    with contextlib.suppress(Exception):  # malformed EXIF on untrusted files: keep the pixels as stored
        img = ImageOps.exif_transpose(img) or img
    if img.mode in _SIXTEEN_BIT_MODES:
        img = img.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif img.mode == "F":
        img = img.point(lambda v: v * 255).convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic: resize the short side to ``img_size``, center crop, scale to [0, 1], normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(img_size, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def build_transforms(
    img_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms; normalisation comes from the backbone (the reference used mean 0 / std 1)."""
    train = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(img_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
    return train, eval_transform(img_size, mean, std)
