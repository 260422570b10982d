"""Linear probe: the frozen backbone with only a growing linear head, trained class-incrementally.

Each task trains the new classes' rows with the same masked cross-entropy as the prompt methods (earlier
tasks' logits masked to -inf), the same optimiser, learning rate and schedule, on frozen CLS features that
are computed once per task (``transform=eval``). The head-only floor every prompt method must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecl.methods.analytic import AnalyticHeadMixin, check_phase2_head
from edgecl.methods.base import Method, MethodConfig, Phase
from edgecl.methods.registry import register_method

__all__ = ["LinearProbe", "LinearProbeConfig"]


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear-probe settings (the optimiser fields are shared with every method)."""

    transform: str = "eval"
    """``eval``: deterministic features, cached once per task (an edgecl choice: the probe costs one pass);
    ``train``: random crop + flip, recomputed every step."""
    phase2_head: str = "sgd"
    """``sgd`` (optimiser epochs), ``prototype`` or ``ridge`` (closed form from one pass; see cps_prompt)."""
    ridge_lambda: float = 1.0
    """λ of the ``ridge`` head (as cps_prompt's)."""

    def validate(self) -> None:
        """Check the transform and the head."""
        super().validate()
        if self.transform not in {"eval", "train"}:
            raise ValueError(f"transform must be eval|train, got {self.transform!r}")
        check_phase2_head(self.phase2_head, self.ridge_lambda)
        if self.phase2_head != "sgd" and self.transform != "eval":
            raise ValueError(f"phase2_head={self.phase2_head} needs transform=eval (got {self.transform!r})")


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
