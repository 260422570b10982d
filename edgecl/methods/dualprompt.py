"""DualPrompt (CODA-Prompt's prefix-tuning version): shared G-prompts plus task-keyed E-prompts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgecl.backbone import FrozenViT
from edgecl.config import BlockIndices, EvenLength
from edgecl.methods.base import Method, MethodConfig, Phase, TaskInfo
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
class DualPrompt(Method):
    """G-prompts in early blocks for all tasks; one E-prompt per task, chosen by key matching at test time.

    Training uses the current task's E-prompt (task-id bootstrap, as CODA) and pulls its key toward the
    queries; at inference the E-prompt with the most similar key is used (top-1).
    """

    Config = DualPromptConfig
    cfg: DualPromptConfig

    def __init__(self, backbone: FrozenViT, cfg: DualPromptConfig) -> None:
        super().__init__(backbone, cfg)
        d = backbone.embed_dim
        for layer in (*cfg.g_layers, *cfg.e_layers):
            if not 0 <= layer < backbone.depth:
                raise ValueError(f"prompt layer {layer} is outside the backbone's {backbone.depth} blocks")
        self.g_prompts = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(cfg.g_length, d)) for layer in cfg.g_layers}
        )
        self.e_prompts = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(cfg.e_pool_size, cfg.e_length, d)) for layer in cfg.e_layers}
        )
        self.e_keys = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(cfg.e_pool_size, d)) for layer in cfg.e_layers}
        )
        self._match_loss: Tensor | None = None

    def pool_bound_to_tasks(self) -> bool:
        """One E-prompt per task."""
        return True

    def begin_task(self, task: TaskInfo) -> None:
        """Grow the head; the task's E-prompt slot is ``task.index``."""
        if task.index >= self.cfg.e_pool_size:
            raise ValueError(f"task {task.index + 1} exceeds e_pool_size={self.cfg.e_pool_size}")
        super().begin_task(task)

    def _prefixes(self, x: Tensor, train: bool) -> dict[int, tuple[Tensor, Tensor]]:
        q = F.normalize(self.backbone.query(x).cls, dim=1)
        b = q.shape[0]
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for layer, g in self.g_prompts.items():
            half = g.shape[0] // 2
            out[int(layer)] = (g[:half], g[half:])
        loss = q.new_zeros(())
        n_slots = max(self.num_tasks_seen, 1) if not train else (self.task.index + 1 if self.task else 1)
        half = self.cfg.e_length // 2
        for layer, pool in self.e_prompts.items():
            keys = F.normalize(self.e_keys[layer][:n_slots], dim=1)
            cos = q @ keys.T  # B x tasks
            if train:
                assert self.task is not None
                idx = torch.full((b,), self.task.index, dtype=torch.long, device=q.device)
                loss = loss + (1.0 - cos[:, self.task.index]).mean()
            else:
                idx = cos.argmax(dim=1)
            p = pool[idx]  # B x L x D
            out[int(layer)] = (p[:, :half], p[:, half:])
        self._match_loss = self.cfg.pull_constraint * loss if train else None
        return out

    def features(self, x: Tensor) -> Tensor:
        """Inference: G-prompts plus the E-prompt whose key best matches the query."""
        return self.backbone(x, prefixes=self._prefixes(x, train=False))

    def train_features(self, x: Tensor, phase: Phase) -> Tensor:
        """Training: G-prompts plus the current task's E-prompt."""
        return self.backbone(x, prefixes=self._prefixes(x, train=True))

    def extra_loss(self) -> Tensor | None:
        """Key pull loss of the last training forward."""
        loss, self._match_loss = self._match_loss, None
        return loss
