"""Linear probe: the frozen backbone with only a growing linear head, trained class-incrementally.

Each task trains the new classes' rows with the same masked cross-entropy as the prompt methods (earlier
tasks' logits masked to -inf), the same optimiser, learning rate and schedule, on frozen CLS features that
are computed once per task (``transform=eval``). The head-only floor every prompt method must beat.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgecl.methods.analytic import AnalyticHeadMixin, Phase2Head, check_head_transform
from edgecl.methods.base import Method, MethodConfig, Phase
from edgecl.methods.registry import register_method

__all__ = ["LinearProbe", "LinearProbeConfig"]


class LinearProbeConfig(MethodConfig):
    """Linear-probe settings (the optimiser fields are shared with every method)."""

    transform: Literal["eval", "train"] = "eval"
    """``eval``: deterministic features, cached once per task (an edgecl choice: the probe costs one pass);
    ``train``: random crop + flip, recomputed every step."""
    phase2_head: Phase2Head = "sgd"
    """``sgd`` (optimiser epochs), ``prototype`` or ``ridge`` (closed form from one pass; see cps_prompt)."""
    ridge_lambda: float = Field(1.0, gt=0)
    """λ of the ``ridge`` head (as cps_prompt's)."""

    @model_validator(mode="after")
    def _closed_form_head_needs_eval(self) -> LinearProbeConfig:
        check_head_transform(self.phase2_head, self.transform, "transform")
        return self


@register_method("linear_probe")
class LinearProbe(AnalyticHeadMixin, Method):
    """Head-only training over the frozen CLS feature (every epoch a HEAD epoch)."""

    Config = LinearProbeConfig
    cfg: LinearProbeConfig

    def phase(self, epoch: int, epochs: int) -> Phase:
        """Only the head trains."""
        return Phase.HEAD

    def phase_transform(self, phase: Phase) -> str:
        """``transform`` of the config."""
        return self.cfg.transform

    def phase2_cacheable(self) -> bool:
        """Frozen features are cached when the transform is deterministic."""
        return self.cfg.transform == "eval"
