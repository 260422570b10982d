"""Class-incremental task streams over ImageFolder trees, torchvision CIFAR-100 or synthetic images."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from edgecl.data.transforms import build_transforms, to_rgb

__all__ = [
    "ImageListDataset",
    "Task",
    "TaskStream",
    "TensorImageDataset",
    "IMAGE_EXTENSIONS",
    "scan_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

Transform = Callable[[Any], Tensor]


class ImageListDataset(Dataset[tuple[Tensor, int]]):
    """Images read from files on demand: ``items`` are (path, global label)."""

    def __init__(self, items: Sequence[tuple[str, int]], transform: Transform | None = None) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def with_transform(self, transform: Transform) -> ImageListDataset:
        """The same items with another transform."""
        return ImageListDataset(self.items, transform)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as img:
            rgb = to_rgb(img)
        return (self.transform(rgb) if self.transform else rgb), label  # type: ignore[return-value]

    @property
    def labels(self) -> list[int]:
        """Global labels of all items."""
        return [y for _, y in self.items]


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory as a ``N x 3 x H x W`` uint8 tensor (synthetic data, CIFAR)."""

    def __init__(self, images: Tensor, labels: Sequence[int], transform: Transform | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be an N x 3 x H x W uint8 tensor")
        self.images = images
        self._labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self._labels)

    def with_transform(self, transform: Transform) -> TensorImageDataset:
        """The same images with another transform."""
        return TensorImageDataset(self.images, self._labels, transform)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self._labels[i]

    @property
    def labels(self) -> list[int]:
        """Global labels of all items."""
        return list(self._labels)


@dataclass
class Task:
    """One task of the stream: its classes (global ids, contiguous) and its train/test data."""

    index: int
    classes: list[int]
    class_names: list[str]
    train: Dataset[tuple[Tensor, int]]
    """Training data with the train transform."""
    train_eval: Dataset[tuple[Tensor, int]]
    """The same training images with the eval transform (phase-2 caches, end-of-task statistics)."""
    test: Dataset[tuple[Tensor, int]]


@dataclass
class TaskStream:
    """Classes split into tasks of equal size, in sorted order or a seeded permutation."""

    tasks: list[Task]
    class_order: list[str]
    source: str
    synthetic: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.tasks)

    @property
    def num_classes(self) -> int:
        """Classes over the whole stream."""
        return len(self.class_order)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for results files."""
        return {
            "source": self.source,
            "synthetic": self.synthetic,
            "num_tasks": len(self.tasks),
            "class_order": self.class_order,
            "train_sizes": [len(t.train) for t in self.tasks],  # type: ignore[arg-type]
            "test_sizes": [len(t.test) for t in self.tasks],  # type: ignore[arg-type]
            **self.info,
        }


def order_classes(names: Sequence[str], order: str, seed: int) -> list[str]:
    """Sorted names, or a permutation seeded by ``seed`` (recorded in the results)."""
    names = sorted(names)
    if order == "sorted":
        return names
    if order in {"permuted", "random"}:
        rng = random.Random(seed)
        rng.shuffle(names)
        return names
    raise ValueError(f"class order must be 'sorted' or 'permuted', got {order!r}")


def split_tasks(num_classes: int, num_tasks: int) -> list[range]:
    """Contiguous splits of ``num_classes`` class ids into ``num_tasks`` tasks: ``num_classes // num_tasks``
    classes each, the remainder one more each for the first tasks (100 classes in 7 tasks: 15, 15, 14, ...,
    as prompt pools are split), so any ``--tasks`` up to the class count works."""
    if not 1 <= num_tasks <= num_classes:
        raise ValueError(
            f"{num_classes} classes cannot be split into {num_tasks} tasks; choose --tasks between 1 and "
            f"{num_classes} (or more classes with --num-classes)"
        )
    base, extra = divmod(num_classes, num_tasks)
    out: list[range] = []
    start = 0
    for t in range(num_tasks):
        size = base + (1 if t < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def scan_image_folder(root: Path, limit_per_class: int | None = None) -> dict[str, list[str]]:
    """``{class_name: [image paths sorted]}`` for an ImageFolder-style directory."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    out: dict[str, list[str]] = {}
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in cls_dir.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[cls_dir.name] = files[:limit_per_class] if limit_per_class else files
    if not out:
        raise ValueError(f"no class folders with images under {root}")
    return out


def _split_dir(root: Path, candidates: Sequence[str]) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(
        f"{root} has none of the folders {list(candidates)} (ImageFolder layout expected)"
    )


def from_image_folder(
    root: str | Path,
    num_tasks: int,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    order: str = "sorted",
    seed: int = 0,
    num_classes: int | None = None,
    limit_per_class: int | None = None,
    test_limit_per_class: int | None = None,
) -> TaskStream:
    """A stream over ``root/train`` and ``root/val`` (or ``root/test``) in ImageFolder layout."""
    root = Path(root)
    train_map = scan_image_folder(_split_dir(root, ("train",)), limit_per_class)
    test_map = scan_image_folder(_split_dir(root, ("val", "test")), test_limit_per_class)
    missing = sorted(set(train_map) - set(test_map))
    if missing:
        raise ValueError(f"classes without test images under {root}: {missing[:5]}")
    names = order_classes(list(train_map), order, seed)
    if num_classes is not None:
        names = names[:num_classes]
    train_tf, eval_tf = build_transforms(img_size, mean, std)
    tasks: list[Task] = []
    for t, ids in enumerate(split_tasks(len(names), num_tasks)):
        tr = [(p, i) for i in ids for p in train_map[names[i]]]
        te = [(p, i) for i in ids for p in test_map[names[i]]]
        train = ImageListDataset(tr, train_tf)
        tasks.append(
            Task(
                t,
                list(ids),
                [names[i] for i in ids],
                train,
                train.with_transform(eval_tf),
                ImageListDataset(te, eval_tf),
            )
        )
    return TaskStream(tasks, names, source=str(root), info={"order": order, "seed": seed})


def from_tensors(
    train: tuple[Tensor, Sequence[int]],
    test: tuple[Tensor, Sequence[int]],
    class_names: Sequence[str],
    num_tasks: int,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    order: str = "sorted",
    seed: int = 0,
    source: str,
    synthetic: bool = False,
    limit_per_class: int | None = None,
) -> TaskStream:
    """A stream over in-memory uint8 images labelled by index into ``class_names``."""
    names = order_classes(list(class_names), order, seed)
    remap = {class_names.index(n): i for i, n in enumerate(names)}
    train_tf, eval_tf = build_transforms(img_size, mean, std)

    def subset(images: Tensor, labels: Sequence[int], ids: range, limit: int | None) -> TensorImageDataset:
        counts: dict[int, int] = {}
        keep: list[int] = []
        for j, y in enumerate(labels):
            g = remap[int(y)]
            if g in ids and (limit is None or counts.get(g, 0) < limit):
                counts[g] = counts.get(g, 0) + 1
                keep.append(j)
        idx = torch.tensor(keep, dtype=torch.long)
        return TensorImageDataset(images[idx], [remap[int(labels[j])] for j in keep])

    tasks: list[Task] = []
    for t, ids in enumerate(split_tasks(len(names), num_tasks)):
        tr = subset(*train, ids, limit_per_class)
        te = subset(*test, ids, None)
        tasks.append(
            Task(
                t,
                list(ids),
                [names[i] for i in ids],
                tr.with_transform(train_tf),
                tr.with_transform(eval_tf),
                te.with_transform(eval_tf),
            )
        )
    return TaskStream(tasks, names, source=source, synthetic=synthetic, info={"order": order, "seed": seed})


def from_cifar100(
    root: str | Path,
    num_tasks: int,
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    download: bool = False,
    **kwargs: Any,
) -> TaskStream:
    """torchvision CIFAR-100 (downloaded only when ``download`` and online; otherwise files must exist)."""
    from torchvision.datasets import CIFAR100

    root = Path(root)
    try:
        tr = CIFAR100(str(root), train=True, download=download)
        te = CIFAR100(str(root), train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"CIFAR-100 not found under {root} ({err}). Copy the extracted 'cifar-100-python/' folder there, "
            "or pass --download on a machine with internet access."
        ) from err
    except OSError as err:  # URLError and socket errors when offline
        raise RuntimeError(
            f"could not download CIFAR-100 to {root}: {err}. This machine looks offline; copy "
            "'cifar-100-python/' there by hand."
        ) from err

    def to_tensor(ds: Any) -> tuple[Tensor, list[int]]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), list(ds.targets)

    return from_tensors(
        to_tensor(tr),
        to_tensor(te),
        list(tr.classes),
        num_tasks,
        img_size=img_size,
        mean=mean,
        std=std,
        source=f"cifar100:{root}",
        **kwargs,
    )
