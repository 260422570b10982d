"""Patch selection for sparse training: critical (CPS), uniform (PatchDropout) and top-k.

All functions return ``B x k`` patch indices (0-based over patches, CLS excluded), sorted ascending so
the spatial order is kept, as the reference (``token_shuffling=False``).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "SAMPLING_MODES",
    "SamplingMode",
    "critical_sampling",
    "num_kept",
    "select_patches",
    "topk_sampling",
    "uniform_sampling",
]

SamplingMode = Literal["critical", "uniform", "topk"]
"""How phase-1 patches are chosen (the type method configs declare)."""
SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)


def num_kept(num_patches: int, reduction_rate: float) -> int:
    """k = floor((1 − r) · N), at least 1 (a tiny epsilon absorbs float error such as (1−0.9)·10)."""
    if not 0.0 <= reduction_rate < 1.0:
        raise ValueError(f"reduction_rate must be in [0, 1), got {reduction_rate}")
    return max(1, math.floor((1.0 - reduction_rate) * num_patches + 1e-9))


def critical_sampling(
    scores: Tensor, k: int, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """Draw k patches per image without replacement from p = softmax(score / τ) (CPS).

    Uses the Gumbel-top-k trick: topk(score/τ + Gumbel noise) has exactly the distribution of
    ``torch.multinomial(p, k, replacement=False)`` (the reference's draw), but stays correct when p
    underflows to zero for small τ (multinomial then returns arbitrary zero-probability patches),
    so τ → 0 gives top-k.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use sampling='topk' for τ → 0")
    u = torch.rand(scores.shape, device=scores.device, generator=generator).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    idx = (scores.float() / temperature + gumbel).topk(k, dim=1).indices
    return torch.sort(idx, dim=1).values


def uniform_sampling(
    batch: int,
    num_patches: int,
    k: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """k patches per image uniformly at random without replacement (PatchDropout)."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return torch.sort(noise.argsort(dim=1)[:, :k], dim=1).values


def topk_sampling(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring patches per image (the τ → 0 limit of critical sampling)."""
    return torch.sort(scores.topk(k, dim=1).indices, dim=1).values


def select_patches(
    mode: str, scores: Tensor, k: int, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Dispatch on ``mode`` in :data:`SAMPLING_MODES`."""
    if mode == "critical":
        return critical_sampling(scores, k, temperature, generator)
    if mode == "uniform":
        return uniform_sampling(scores.shape[0], scores.shape[1], k, scores.device, generator)
    if mode == "topk":
        return topk_sampling(scores, k)
    raise ValueError(f"unknown sampling mode {mode!r}; choose one of {SAMPLING_MODES}")
