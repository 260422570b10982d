"""The traced function (a method's inference path sliced to the learned classes) and its example inputs.

Whether a method can be traced at all is the method class's own declaration,
:meth:`edgecl.methods.base.Method.export_problem`; this module only asks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from edgecl.export.info import ModelInfo

if TYPE_CHECKING:
    from edgecl.methods.base import Method

__all__ = ["InferenceGraph", "example_batch", "exportable_reason"]


class InferenceGraph(nn.Module):
    """The exported function: ``method(images)`` sliced to the learned classes."""

    def __init__(self, method: Method, num_classes: int) -> None:
        super().__init__()
        self.method = method
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``B x C`` over the learned classes."""
        return self.method(images)[:, : self.num_classes]


def exportable_reason(method: Method | type[Method] | str) -> str | None:
    """Why ``method`` (an instance, a class or a registered name) cannot be exported, or None when it can."""
    if isinstance(method, str):
        from edgecl.methods.registry import get_method_class

        return get_method_class(method).export_problem()
    return method.export_problem()


def example_batch(n: int, info: ModelInfo, seed: int) -> Tensor:
    """Eval-transformed random images: uniform pixels in [0, 1], normalised."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, info.img_size, info.img_size, generator=gen)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (x - mean) / std
