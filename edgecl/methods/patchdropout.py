"""PatchDropout baseline: CPS-Prompt's DPCT with uniformly random patches (the seed's "PD" ablation)."""

from __future__ import annotations

from dataclasses import dataclass

from edgecl.methods.cps_prompt import CpsPrompt, CpsPromptConfig
from edgecl.methods.registry import register_method

__all__ = ["PatchDropout", "PatchDropoutConfig"]


@dataclass
class PatchDropoutConfig(CpsPromptConfig):
    """CPS-Prompt settings with ``sampling='uniform'`` [cps-prompt --sampling uniform]."""

    sampling: str = "uniform"


@register_method("patchdropout")
class PatchDropout(CpsPrompt):
    """CODA-Prompt + uniform patch dropout + DPCT."""

    Config = PatchDropoutConfig  # type: ignore[assignment]
