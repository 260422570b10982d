"""torchvision v2 transforms: train = RandomResizedCrop + flip, eval = resize + center crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["build_transforms", "eval_transform"]


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
