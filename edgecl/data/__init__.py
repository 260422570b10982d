"""Task streams, transforms, synthetic data and (in ``ingest``) validation of uploaded archives.

Owns what images and labels a task has; knows no model: must not import ``backbone``, ``methods``,
``train``, ``serve`` or ``store``.
"""

from edgecl.data.stream import (
    ImageListDataset,
    Task,
    TaskStream,
    TensorImageDataset,
    from_cifar100,
    from_image_folder,
    from_tensors,
)
from edgecl.data.synthetic import make_synthetic, synthetic_stream, write_synthetic_folder
from edgecl.data.transforms import build_transforms, eval_transform

__all__ = [
    "ImageListDataset",
    "Task",
    "TaskStream",
    "TensorImageDataset",
    "build_transforms",
    "eval_transform",
    "from_cifar100",
    "from_image_folder",
    "from_tensors",
    "make_synthetic",
    "synthetic_stream",
    "write_synthetic_folder",
]
