"""Building blocks shared by methods: a growing linear head and the CODA-Prompt component pool."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CodaPromptPool", "ExpandableHead", "gram_schmidt_", "pool_bounds", "split_pool"]


class ExpandableHead(nn.Module):
    """A linear classifier whose output rows grow as classes arrive (class-incremental).

    Rows already learned keep their values when the head grows; new rows use nn.Linear's init.
    """

    def __init__(self, in_features: int, num_classes: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))
        self.grow(num_classes)

    @property
    def num_classes(self) -> int:
        """Output rows currently allocated."""
        return int(self.weight.shape[0])

    def grow(self, num_classes: int) -> None:
        """Allocate rows up to ``num_classes`` (never shrinks)."""
        old = self.num_classes
        if num_classes <= old:
            return
        fresh = nn.Linear(self.in_features, num_classes - old)
        fresh.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = torch.cat([self.weight.detach(), fresh.weight.detach()], 0)
            b = torch.cat([self.bias.detach(), fresh.bias.detach()], 0)
        self.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(b, requires_grad=self.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        """Logits over all allocated classes."""
        return F.linear(x, self.weight, self.bias)


def split_pool(pool_size: int, num_tasks: int) -> list[int]:
    """Components per task when ``pool_size`` is split over ``num_tasks``: ``pool_size // num_tasks`` each,
    the remainder one more each for the first tasks (100 over 3 -> 34, 33, 33), so every component is used.

    The reference (CODA-Prompt ``zoo.py``) floors instead and leaves the last ``pool_size % num_tasks``
    components unused; with a divisible pool (100 over 10) both give the same split.
    """
    if num_tasks < 1:
        raise ValueError(f"the pool must be split over at least one task, got {num_tasks}")
    if pool_size < num_tasks:
        raise ValueError(
            f"pool_size={pool_size} gives fewer than one component per task for {num_tasks} tasks; "
            f"use a pool of at least {num_tasks}"
        )
    base, extra = divmod(pool_size, num_tasks)
    return [base + (1 if t < extra else 0) for t in range(num_tasks)]


def pool_bounds(pool_size: int, num_tasks: int) -> list[int]:
    """Start offsets of every task's components plus the end: task t owns ``[b[t], b[t+1])``."""
    bounds = [0]
    for size in split_pool(pool_size, num_tasks):
        bounds.append(bounds[-1] + size)
    return bounds


def gram_schmidt_(vectors: Tensor, start: int, end: int) -> None:
    """Re-initialise rows ``start:end`` of ``vectors`` (``M x ...``) orthonormal to rows ``0:end``.

    As CODA-Prompt's ``gram_schmidt``: new rows start random and are orthogonalised against all
    earlier rows (which are left untouched), then normalised.
    """
    flat = vectors.data.view(vectors.shape[0], -1)
    with torch.no_grad():
        for k in range(start, end):
            v = torch.randn(flat.shape[1], device=flat.device, dtype=flat.dtype)
            for j in range(k):
                u = flat[j]
                denom = torch.dot(u, u)
                if denom > 0:
                    v = v - torch.dot(v, u) / denom * u
            flat[k] = v / v.norm().clamp_min(1e-12)


class CodaPromptPool(nn.Module):
    """CODA-Prompt prefix prompts: per layer K, A (M x D) and P (M x L x D); α = cos(q ⊙ A, K).

    The pool of M components is split over ``num_tasks`` by :func:`split_pool` (M // T each, the remainder
    spread over the first tasks); task t trains its own components ``[b_t, b_{t+1})`` and uses
    ``[0, b_{t+1})``, the earlier ones detached [CODA-Prompt models/zoo.py; cps-prompt
    models/prompt_utils/prompt.py, which floor M / T].
    """

    def __init__(
        self,
        embed_dim: int,
        layers: tuple[int, ...] = (0, 1, 2, 3, 4),
        pool_size: int = 100,
        length: int = 8,
        num_tasks: int = 10,
        ortho_mu: float = 0.0,
    ) -> None:
        super().__init__()
        self.bounds = pool_bounds(pool_size, num_tasks)
        if length % 2:
            raise ValueError(f"prompt length must be even (half keys, half values), got {length}.")
        self.layers = tuple(layers)
        self.pool_size = pool_size
        self.length = length
        self.num_tasks = num_tasks
        self.ortho_mu = ortho_mu
        self.task = 0
        for layer in self.layers:
            # uniform init then Gram-Schmidt per task, as CODA's tensor_prompt(..., ortho=True)
            self.register_parameter(f"p_{layer}", nn.Parameter(torch.empty(pool_size, length, embed_dim)))
            self.register_parameter(f"k_{layer}", nn.Parameter(torch.empty(pool_size, embed_dim)))
            self.register_parameter(f"a_{layer}", nn.Parameter(torch.empty(pool_size, embed_dim)))
            for name in ("p", "k", "a"):
                nn.init.uniform_(getattr(self, f"{name}_{layer}"))
        self.set_task(0)

    def component_range(self, task: int) -> tuple[int, int]:
        """(first trainable, end) components while training ``task``."""
        return self.bounds[task], self.bounds[task + 1]

    def set_task(self, task: int, reinit: bool = True) -> None:
        """Switch to ``task``: Gram–Schmidt-initialise its components (when ``reinit``)."""
        if task >= self.num_tasks:
            raise ValueError(f"task {task} exceeds the {self.num_tasks} tasks the pool was split over.")
        self.task = task
        if reinit:
            s, f = self.component_range(task)
            for layer in self.layers:
                for name in ("p", "k", "a"):
                    gram_schmidt_(getattr(self, f"{name}_{layer}"), s, f)

    def frozen_masks(self, prefix: str) -> dict[str, Tensor]:
        """Components outside the current task's ``[s, f)`` are frozen (earlier: learned; later: unused)."""
        s, f = self.component_range(self.task)
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            for name in ("p", "k", "a"):
                t = getattr(self, f"{name}_{layer}")
                rows = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
                rows[s:f] = False
                out[f"{prefix}{name}_{layer}"] = rows.view(-1, *([1] * (t.dim() - 1)))
        return out

    def _take(self, t: Tensor, train: bool) -> Tensor:
        s, f = self.component_range(self.task)
        if train and s > 0:
            return torch.cat([t[:s].detach(), t[s:f]], dim=0)
        return t[:f]

    def prefixes(self, query: Tensor, train: bool) -> dict[int, tuple[Tensor, Tensor]]:
        """Per-layer (key, value) prefixes ``B x L/2 x D`` from the query CLS feature ``B x D``."""
        out: dict[int, tuple[Tensor, Tensor]] = {}
        self._ortho = query.new_zeros(())
        for layer in self.layers:
            k = self._take(getattr(self, f"k_{layer}"), train)
            a = self._take(getattr(self, f"a_{layer}"), train)
            p = self._take(getattr(self, f"p_{layer}"), train)
            alpha = torch.einsum("bd,kd->bkd", query, a)  # q ⊙ A
            alpha = torch.einsum("bkd,kd->bk", F.normalize(alpha, dim=2), F.normalize(k, dim=1))
            prompt = torch.einsum("bk,kld->bld", alpha, p)
            half = self.length // 2
            out[layer] = (prompt[:, :half], prompt[:, half:])
            if train and self.ortho_mu > 0:
                self._ortho = (
                    self._ortho + _ortho_penalty(k) + _ortho_penalty(a) + _ortho_penalty(p.flatten(1))
                )
        return out

    def ortho_loss(self) -> Tensor | None:
        """CODA's orthogonality penalty of the last training call, weighted by ``ortho_mu``."""
        if self.ortho_mu <= 0:
            return None
        return self.ortho_mu * self._ortho


def _ortho_penalty(t: Tensor) -> Tensor:
    """((t tᵀ − I)²).mean(), CODA's ortho_penalty."""
    eye = torch.eye(t.shape[0], device=t.device, dtype=t.dtype)
    return ((t @ t.T - eye) ** 2).mean()


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """CODA's CosineSchedule(K=epochs): ``lr·cos(99π·e / (200·(K−1)))`` (1e-3 → ~1.6e-5 over K epochs)."""
    if epochs <= 1:
        return base_lr
    return base_lr * math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
