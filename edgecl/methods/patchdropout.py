"""PatchDropout baseline: CPS-Prompt's DPCT with uniformly random patches (the seed's "PD" ablation)."""

from __future__ import annotations

from edgecl.methods.cps_prompt import CpsPrompt, CpsPromptConfig
from edgecl.methods.registry import register_method
from edgecl.sampling import SamplingMode

__all__ = ["PatchDropout", "PatchDropoutConfig"]


class PatchDropoutConfig(CpsPromptConfig):
    """CPS-Prompt settings with ``sampling='uniform'`` [cps-prompt --sampling uniform]."""

    sampling: SamplingMode = "uniform"
    """``uniform`` patches (PatchDropout); ``critical``/``topk`` turn it back into CPS."""


@register_method("patchdropout")
class PatchDropout(CpsPrompt):
    """CODA-Prompt + uniform patch dropout + DPCT."""

    Config = PatchDropoutConfig  # type: ignore[assignment]
