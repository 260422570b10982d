"""L2P++ (CODA-Prompt's L2P with prefix tuning): a shared prompt pool selected by key matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgecl.backbone import FrozenViT, Prefix
from edgecl.config import BlockIndices, EvenLength, FieldProblem
from edgecl.methods.base import MethodConfig
from edgecl.methods.prompting import QueryPrefixMethod, check_layers
from edgecl.methods.registry import register_method

__all__ = ["L2P", "L2PConfig"]


class L2PConfig(MethodConfig):
    """L2P++ settings from CODA-Prompt's zoo.py (digest §9)."""

    layers: BlockIndices = (0,)
    """Prefix-tuned blocks: layer 0 is CODA's L2P++; (0, 1, 2, 3, 4) gives "Deep L2P++"."""
    pool_size: int = Field(30, ge=1)
    """Prompts in the shared pool [CODA --prompt_param 30 20 -1] (shared by all tasks, any task count)."""
    prompt_length: EvenLength = 20
    """Length of each prompt: first half prefix keys, second half values [CODA]."""
    top_k: int = Field(5, ge=1)
    """Prompts selected per image by key matching [CODA]; at most ``pool_size``."""
    pull_constraint: float = Field(1.0, ge=0)
    """Weight of the key-matching loss mean_b Σ_k (1 − cos(q, K_k)) [cps-prompt pull_constraint_coeff].
    CODA sums over the batch; edgecl averages over it (choice: batch-size independent)."""

    @model_validator(mode="after")
    def _top_k_in_pool(self) -> L2PConfig:
        if self.top_k > self.pool_size:
            raise FieldProblem("top_k", f"must be <= pool_size={self.pool_size} (got {self.top_k})")
        return self


@register_method("l2p")
class L2P(QueryPrefixMethod):
    """Top-k prompts from a shared pool chosen by cos(query, key); keys pulled toward their queries."""

    Config = L2PConfig
    cfg: L2PConfig

    def __init__(self, backbone: FrozenViT, cfg: L2PConfig) -> None:
        super().__init__(backbone, cfg)
        d = backbone.embed_dim
        self.prompts = nn.ParameterDict()
        self.keys = nn.ParameterDict()
        for layer in check_layers(cfg.layers, backbone.depth):
            # uniform init as CODA's tensor_prompt
            self.prompts[str(layer)] = nn.Parameter(torch.rand(cfg.pool_size, cfg.prompt_length, d))
            self.keys[str(layer)] = nn.Parameter(torch.rand(cfg.pool_size, d))

    def query_prefixes(self, query: Tensor, train: bool) -> tuple[dict[int, Prefix], Tensor | None]:
        """Per layer the ``top_k`` prompts of highest cos(query, key), concatenated; pull loss
        ``mean_b Σ_k (1 − cos)`` over the selected keys."""
        half = self.cfg.prompt_length // 2
        out: dict[int, Prefix] = {}
        loss = query.new_zeros(())
        for layer in self.cfg.layers:
            cos = query @ F.normalize(self.keys[str(layer)], dim=1).T  # B x M
            top = cos.topk(self.cfg.top_k, dim=1)
            p = self.prompts[str(layer)][top.indices]  # B x k x L x D
            b = p.shape[0]
            out[layer] = (
                p[:, :, :half].reshape(b, -1, p.shape[-1]),
                p[:, :, half:].reshape(b, -1, p.shape[-1]),
            )
            if train:
                loss = loss + (1.0 - top.values).sum(1).mean()
        return out, self.cfg.pull_constraint * loss if train else None
