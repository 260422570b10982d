"""Procedural synthetic image classes for tests and the offline demo. Always labelled SYNTHETIC.

Each class is an oriented colour grating with its own orientation, frequency and palette; samples vary
in phase, small orientation jitter, brightness and pixel noise, so classes are separable but not trivial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from edgecl.data.stream import TaskStream, from_tensors

__all__ = ["make_synthetic", "synthetic_stream", "write_synthetic_folder"]


def _class_params(c: int, seed: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, c, 7919])
    theta = math.pi * ((c * 0.618034) % 1.0)
    freq = 1.5 + 4.0 * rng.random()
    col_a = rng.random(3)
    col_b = rng.random(3)
    return theta, freq, col_a, col_b


def make_synthetic(
    num_classes: int, per_class: int, img_size: int = 32, seed: int = 0, split: str = "train"
) -> tuple[Tensor, list[int]]:
    """``num_classes * per_class`` uint8 images ``N x 3 x S x S`` and their labels (deterministic)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    yy, xx = np.meshgrid(np.linspace(0, 1, img_size), np.linspace(0, 1, img_size), indexing="ij")
    images = np.empty((num_classes * per_class, 3, img_size, img_size), dtype=np.uint8)
    labels: list[int] = []
    for c in range(num_classes):
        theta, freq, col_a, col_b = _class_params(c, seed)
        for j in range(per_class):
            th = theta + rng.normal(0, 0.08)
            phase = rng.random() * 2 * math.pi
            wave = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(th) + yy * math.sin(th)) + phase)
            img = col_a[:, None, None] * wave + col_b[:, None, None] * (1 - wave)
            img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.06, img.shape)
            images[c * per_class + j] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            labels.append(c)
    return torch.from_numpy(images), labels


def synthetic_stream(
    num_tasks: int,
    classes_per_task: int = 2,
    per_class: int = 16,
    test_per_class: int = 8,
    img_size: int = 32,
    seed: int = 0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    num_classes: int | None = None,
) -> TaskStream:
    """A class-incremental stream of SYNTHETIC procedural classes (for tests and the offline demo).

    ``num_classes`` (instead of ``num_tasks * classes_per_task``) may leave a remainder: the first tasks
    then get one class more (:func:`~edgecl.data.stream.split_tasks`)."""
    n = num_classes if num_classes is not None else num_tasks * classes_per_task
    names = [f"synthetic-{c:03d}" for c in range(n)]
    return from_tensors(
        make_synthetic(n, per_class, img_size, seed, "train"),
        make_synthetic(n, test_per_class, img_size, seed, "test"),
        names,
        num_tasks,
        img_size=img_size,
        mean=mean,
        std=std,
        source=f"SYNTHETIC(procedural gratings, seed={seed})",
        synthetic=True,
    )


def write_synthetic_folder(
    root: str | Path,
    num_classes: int,
    per_class: int,
    img_size: int = 32,
    seed: int = 0,
    split: str = "train",
    fmt: str = "PNG",
    class_offset: int = 0,
) -> dict[str, list[Path]]:
    """Write SYNTHETIC images in ImageFolder layout under ``root`` (for upload/daemon tests)."""
    images, labels = make_synthetic(num_classes + class_offset, per_class, img_size, seed, split)
    out: dict[str, list[Path]] = {}
    root = Path(root)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        if y < class_offset:
            continue
        name = f"synthetic-{y:03d}"
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{i:05d}.{'jpg' if fmt.upper() == 'JPEG' else fmt.lower()}"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format=fmt)
        out.setdefault(name, []).append(path)
    return out
