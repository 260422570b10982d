"""CODA-Prompt: attention-weighted prompt components as prefixes in layers 0–4 (Smith et al., CVPR 2023)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from torch import Tensor

from edgecl.backbone import FrozenViT
from edgecl.config import BlockIndices, EvenLength
from edgecl.methods.base import Method, MethodConfig, Phase, TaskInfo
from edgecl.methods.layers import CodaPromptPool
from edgecl.methods.prompting import check_layers
from edgecl.methods.registry import register_method

__all__ = ["CodaPrompt", "CodaPromptConfig"]


class CodaPromptConfig(MethodConfig):
    """CODA-Prompt settings; defaults from the CPS-Prompt port of CODA (digest §3, §9)."""

    layers: BlockIndices = (0, 1, 2, 3, 4)
    """Prefix-tuned blocks [CODA zoo.py e_layers / cps-prompt e_prompt_layer_idx]."""
    pool_size: int = Field(100, ge=1)
    """Components, split over ``expected_tasks``: ``pool_size // expected_tasks`` per task, the remainder one
    more each for the first tasks (100 over 3 tasks -> 34, 33, 33); the reference floors and leaves the rest
    unused [--prompt_param 100 8 0.0]. Left unset it grows to ``expected_tasks`` for more than 100 tasks."""
    prompt_length: EvenLength = 8
    """Prefix length: first half keys, second half values [--prompt_param]."""
    ortho_mu: float = Field(0.0, ge=0)
    """Orthogonality penalty weight; 0 as CODA's README / issue #12 (Gram–Schmidt init suffices)."""

    @model_validator(mode="before")
    @classmethod
    def _pool_default(cls, data: Any) -> Any:
        return cls._grow_with_tasks(data, "pool_size")

    @model_validator(mode="after")
    def _pool_split(self) -> CodaPromptConfig:
        self._check_pool("pool_size")
        return self


@register_method("coda_prompt")
class CodaPrompt(Method):
    """Prefix prompts composed from the query CLS feature; earlier tasks' components frozen."""

    Config = CodaPromptConfig
    cfg: CodaPromptConfig

    def __init__(self, backbone: FrozenViT, cfg: CodaPromptConfig) -> None:
        super().__init__(backbone, cfg)
        self.prompt = CodaPromptPool(
            backbone.embed_dim,
            layers=check_layers(cfg.layers, backbone.depth),
            pool_size=cfg.pool_size,
            length=cfg.prompt_length,
            num_tasks=cfg.expected_tasks,
            ortho_mu=cfg.ortho_mu,
        )

    def pool_bound_to_tasks(self) -> bool:
        """The pool is pre-split over ``expected_tasks``."""
        return True

    def begin_task(self, task: TaskInfo) -> None:
        """Grow the head and Gram–Schmidt-initialise this task's components."""
        super().begin_task(task)
        self.prompt.set_task(task.index, reinit=True)

    def prompted(
        self,
        x: Tensor,
        train: bool,
        keep: Tensor | None = None,
        query: Tensor | None = None,
        tokens: Tensor | None = None,
    ) -> Tensor:
        """The prompted pass (optionally on a patch subset) with prompts from the query CLS feature.

        ``tokens`` are ``x`` already embedded (the query pass's, ``QueryOutput.tokens``); when ``query`` is
        not given the query pass runs here and its embedded tokens are reused.
        """
        if query is None:
            q = self.backbone.query(x, keep_tokens=tokens is None)
            query = q.cls
            if tokens is None:
                tokens = q.tokens
        return self.backbone(x, prefixes=self.prompt.prefixes(query, train=train), keep=keep, tokens=tokens)

    def features(self, x: Tensor) -> Tensor:
        """Inference: full patches, all components learned so far."""
        return self.prompted(x, train=False)

    def train_features(self, x: Tensor, phase: Phase) -> Tensor:
        """Training: earlier components detached, the current task's trainable."""
        return self.prompted(x, train=True)

    def frozen_masks(self) -> dict[str, Tensor]:
        """The head's earlier rows and every pool component outside the current task's range."""
        return {**super().frozen_masks(), **self.prompt.frozen_masks("prompt.")}

    def extra_loss(self) -> Tensor | None:
        """CODA's orthogonality penalty (off by default)."""
        return self.prompt.ortho_loss()

    def checkpoint_meta(self) -> dict[str, Any]:
        """Also remember which task's components are current."""
        return {**super().checkpoint_meta(), "prompt_task": self.prompt.task}

    def load_checkpoint_meta(self, state: dict[str, Any]) -> None:
        """Restore the current task of the pool without re-initialising it."""
        super().load_checkpoint_meta(state)
        self.prompt.set_task(int(state.get("prompt_task", 0)), reinit=False)
