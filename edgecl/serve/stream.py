"""A class-incremental :class:`~edgecl.data.stream.TaskStream` over tasks held in the daemon's store.

This is the data source the daemon hands to :mod:`edgecl.runner` (``run_training(spec, stream=...)``): the
tasks already learned, in learning order, then the new one; global class ids follow that order, so a run
that resumes from the committed model starts right after the classes it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgecl.data.stream import TaskStream
    from edgecl.store import Store, TaskRecord

__all__ = ["build_stream"]


def build_stream(
    store: Store, tasks: Sequence[TaskRecord], img_size: int, mean: Sequence[float], std: Sequence[float]
) -> TaskStream:
    """A class-incremental stream over stored tasks: global class ids follow task order; each task's held-out
    images are its test set (its training images when it has none)."""
    from edgecl.data.stream import ImageListDataset, Task, TaskStream
    from edgecl.data.transforms import build_transforms

    train_tf, eval_tf = build_transforms(img_size, mean, std)
    out: list[Task] = []
    order: list[str] = []
    for i, task in enumerate(tasks):
        root = store.task_path(task)
        offset = len(order)
        train = [(str(root / rel), offset + c) for rel, c, split in task.manifest if split == "train"]
        test = [(str(root / rel), offset + c) for rel, c, split in task.manifest if split == "eval"]
        train = train or list(test)
        train_ds = ImageListDataset(train, train_tf)
        out.append(
            Task(
                i,
                list(range(offset, offset + len(task.classes))),
                list(task.classes),
                train_ds,
                train_ds.with_transform(eval_tf),
                ImageListDataset(test or train, eval_tf),
            )
        )
        order += task.classes
    return TaskStream(
        out, order, source=f"edgecl-store:{store.root}", info={"task_ids": [t.id for t in tasks]}
    )
