"""Helpers shared by prompt methods: the layer-range check, and the query-selected prefix pass.

``check_layers`` is the one validation of "these blocks exist in this backbone" (every method that
prompts or hooks blocks calls it). :class:`QueryPrefixMethod` is the pass L2P and DualPrompt share: a
frozen query pass gives the normalised CLS query, the method turns it into per-layer prefixes (and, in
training, a key-matching loss), and the prompted pass runs with those prefixes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor

from edgecl.backbone import FrozenViT, Prefix
from edgecl.methods.base import Method, MethodConfig, Phase

__all__ = ["QueryPrefixMethod", "check_layers"]


def check_layers(layers: Iterable[int], depth: int, key: str = "layers") -> tuple[int, ...]:
    """``layers`` as a tuple, or a ``ValueError`` naming ``key`` and the valid range ``0..depth-1``."""
    out = tuple(int(layer) for layer in layers)
    bad = [layer for layer in out if not 0 <= layer < depth]
    if bad:
        raise ValueError(
            f"{key}: blocks {bad} are outside the backbone's {depth} blocks; use indices 0..{depth - 1}"
        )
    return out


class QueryPrefixMethod(Method):
    """Prefix prompts chosen from the frozen query's normalised CLS feature (L2P, DualPrompt).

    Subclasses implement :meth:`query_prefixes`; the query pass, the prompted pass and the bookkeeping of
    the key-matching loss (returned once by :meth:`extra_loss` after a training forward) live here.
    """

    def __init__(self, backbone: FrozenViT, cfg: MethodConfig) -> None:
        super().__init__(backbone, cfg)
        self._match_loss: Tensor | None = None

    def query_prefixes(self, query: Tensor, train: bool) -> tuple[dict[int, Prefix], Tensor | None]:
        """Per-layer (key, value) prefixes from the L2-normalised query ``B x D``, and in training the
        weighted key-matching loss."""
        raise NotImplementedError

    def prompted(self, x: Tensor, train: bool) -> Tensor:
        """Query pass, prefixes from its CLS, prompted pass on full patches: ``B x D``."""
        query = F.normalize(self.backbone.query(x).cls, dim=1)
        prefixes, loss = self.query_prefixes(query, train)
        self._match_loss = loss if train else None
        return self.backbone(x, prefixes=prefixes)

    def features(self, x: Tensor) -> Tensor:
        """Inference: prefixes selected from the query."""
        return self.prompted(x, train=False)

    def train_features(self, x: Tensor, phase: Phase) -> Tensor:
        """Training: the same pass, recording the key-matching loss."""
        return self.prompted(x, train=True)

    def extra_loss(self) -> Tensor | None:
        """The key-matching (pull) loss of the last training forward, handed out once."""
        loss, self._match_loss = self._match_loss, None
        return loss
