"""DualPrompt (CODA-Prompt's prefix-tuning version): shared G-prompts plus task-keyed E-prompts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgecl.backbone import FrozenViT, Prefix
from edgecl.config import BlockIndices, EvenLength
from edgecl.methods.base import MethodConfig, TaskInfo
from edgecl.methods.prompting import QueryPrefixMethod, check_layers
from edgecl.methods.registry import register_method

__all__ = ["DualPrompt", "DualPromptConfig"]


class DualPromptConfig(MethodConfig):
    """DualPrompt settings from CODA-Prompt's zoo.py (digest §9)."""

    g_layers: BlockIndices = (0, 1)
    """Blocks with the task-shared G-prompt [CODA g_layers]."""
    g_length: EvenLength = 6
    """G-prompt length, half keys half values [CODA g_p_length]."""
    e_layers: BlockIndices = (2, 3, 4)
    """Blocks with task-specific E-prompts [CODA e_layers]."""
    e_pool_size: int = Field(10, ge=1)
    """E-prompts, one per task [CODA --prompt_param 10 20 6]; must be >= expected_tasks. Left unset it
    grows to ``expected_tasks`` (the stream's task count under ``edgecl train``) when that is larger."""
    e_length: EvenLength = 20
    """E-prompt length, half keys half values [CODA]."""
    pull_constraint: float = Field(1.0, ge=0)
    """Weight of 1 − cos(q, K_task) pulling the task's key to its queries [CODA]."""

    @model_validator(mode="before")
    @classmethod
    def _pool_default(cls, data: Any) -> Any:
        return cls._grow_with_tasks(data, "e_pool_size")

    @model_validator(mode="after")
    def _one_prompt_per_task(self) -> DualPromptConfig:
        self._check_pool("e_pool_size")
        return self


@register_method("dualprompt")
class DualPrompt(QueryPrefixMethod):
    """G-prompts in early blocks for all tasks; one E-prompt per task, chosen by key matching at test time.

    Training uses the current task's E-prompt (task-id bootstrap, as CODA) and pulls its key toward the
    queries; at inference the E-prompt with the most similar key is used (top-1).
    """

    Config = DualPromptConfig
    cfg: DualPromptConfig

    def __init__(self, backbone: FrozenViT, cfg: DualPromptConfig) -> None:
        super().__init__(backbone, cfg)
        d = backbone.embed_dim
        check_layers(cfg.g_layers, backbone.depth, "g_layers")
        check_layers(cfg.e_layers, backbone.depth, "e_layers")
        self.g_prompts = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(cfg.g_length, d)) for layer in cfg.g_layers}
        )
        self.e_prompts = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(cfg.e_pool_size, cfg.e_length, d)) for layer in cfg.e_layers}
        )
        self.e_keys = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(cfg.e_pool_size, d)) for layer in cfg.e_layers}
        )

    def pool_bound_to_tasks(self) -> bool:
        """One E-prompt per task."""
        return True

    def begin_task(self, task: TaskInfo) -> None:
        """Grow the head; the task's E-prompt slot is ``task.index``."""
        if task.index >= self.cfg.e_pool_size:
            raise ValueError(f"task {task.index + 1} exceeds e_pool_size={self.cfg.e_pool_size}")
        super().begin_task(task)

    def frozen_masks(self) -> dict[str, Tensor]:
        """The head's earlier rows and every E-prompt / E-key slot except the current task's."""
        out = super().frozen_masks()
        if self.task is None:
            return out
        for group, params in (("e_prompts", self.e_prompts), ("e_keys", self.e_keys)):
            for layer, p in params.items():
                rows = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
                rows[self.task.index] = False
                out[f"{group}.{layer}"] = rows.view(-1, *([1] * (p.dim() - 1)))
        return out

    def query_prefixes(self, query: Tensor, train: bool) -> tuple[dict[int, Prefix], Tensor | None]:
        """G-prompts, plus per E-layer the current task's E-prompt (training: task-id bootstrap, with the
        pull loss ``mean_b (1 − cos(q, K_task))``) or the best-matching finished task's (inference)."""
        b = query.shape[0]
        out: dict[int, Prefix] = {}
        for layer, g in self.g_prompts.items():
            half = g.shape[0] // 2
            out[int(layer)] = (g[:half], g[half:])
        loss = query.new_zeros(())
        n_slots = max(self.num_tasks_seen, 1) if not train else (self.task.index + 1 if self.task else 1)
        half = self.cfg.e_length // 2
        for layer, pool in self.e_prompts.items():
            keys = F.normalize(self.e_keys[layer][:n_slots], dim=1)
            cos = query @ keys.T  # B x tasks
            if train:
                assert self.task is not None
                idx = torch.full((b,), self.task.index, dtype=torch.long, device=query.device)
                loss = loss + (1.0 - cos[:, self.task.index]).mean()
            else:
                idx = cos.argmax(dim=1)
            p = pool[idx]  # B x L x D
            out[int(layer)] = (p[:, :half], p[:, half:])
        return out, self.cfg.pull_constraint * loss if train else None
