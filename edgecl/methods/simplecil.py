"""SimpleCIL: class-mean prototypes of frozen CLS features with a cosine classifier, no training.

Zhou et al., "Revisiting class-incremental learning with pre-trained models" (IJCV 2024), as in the PILOT
toolbox: each class's prototype is the mean frozen feature of its training images (the eval transform),
and an image goes to the class of highest cosine similarity. Earlier prototypes never change, so there is
no forgetting beyond the competition of new classes. The training-free floor of the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgecl.methods.analytic import class_means
from edgecl.methods.base import Method, MethodConfig, Phase
from edgecl.methods.registry import register_method

__all__ = ["SimpleCIL", "SimpleCILConfig"]


class SimpleCILConfig(MethodConfig):
    """SimpleCIL has no settings of its own (the optimiser fields are unused: nothing is trained)."""


@register_method("simplecil")
class SimpleCIL(Method):
    """Cosine classifier over class-mean prototypes of the frozen backbone's CLS feature."""

    Config = SimpleCILConfig

    def phase(self, epoch: int, epochs: int) -> Phase:
        """Every epoch is a head epoch; the first fits the prototypes, the rest do nothing."""
        return Phase.HEAD

    def phase_transform(self, phase: Phase) -> str:
        """Prototypes are means of deterministic (eval-transform) features."""
        return "eval"

    def phase2_cacheable(self) -> bool:
        """The frozen features of a task are computed once."""
        return True

    def closed_form_head(self) -> bool:
        """Prototypes are set from one feature pass, no optimiser steps."""
        return True

    def fit_head(self, feats: Tensor, labels: Tensor) -> None:
        """Head rows of the task's classes = their mean feature (unnormalised; the logits normalise)."""
        assert self.task is not None, "begin_task was not called"
        classes = list(self.task.classes)
        with torch.no_grad():
            self.head.weight[classes] = class_means(feats, labels, classes).to(self.head.weight.dtype)
            self.head.bias[classes] = 0.0

    def logits(self, feats: Tensor) -> Tensor:
        """Cosine similarity of the feature to every prototype seen so far."""
        return F.normalize(feats, dim=-1) @ F.normalize(self.head.weight, dim=-1).T
