"""I-Prompt: semantic prompt matching on image tokens, token-level prompting, one forward pass.

Han, Na, Hwang, "Semantic Prompting with Image-Token for Continual Learning" (WACV 2025, arXiv
2403.11537). No official code exists (``pilsHan/I-Prompt`` holds only a README), so everything below the
abstract level is a choice made in ``../shared/research/heads_digest.md`` §2.2 or here; each one is a
config field tagged [paper-sum], [abstract], [inferred] or [GUESS].

In every prompted block ``l`` (single pass, no query pass, no task id):

* ``k`` = the block's own self-attention keys of its input tokens (heads concatenated, ``B x T x D``);
* each target token ``j`` (the image tokens, CLS excluded; or only CLS with ``prompt_target=cls_token``)
  picks the pool entry ``i* = argmax_i cos(k_j, K_l[i])`` (hard top-1);
* the block output becomes ``x_j + P_l[i*]`` (element-wise sum), which layer ``l+1`` then reads.

The prediction is a weighted combination ``z = sum_j a_j x^L_j`` of the final-normed image tokens into the
linear head (``a_j`` from the last block's CLS->patch attention by default). The loss is CE with earlier
classes masked plus ``match_lambda * mean(1 - cos(k_j, K[i*]))`` whose gradient reaches the keys only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgecl.backbone import FrozenViT, LayerHooks
from edgecl.config import BlockIndices, FieldProblem
from edgecl.methods.base import Method, MethodConfig, Phase, TaskInfo
from edgecl.methods.layers import pool_bounds
from edgecl.methods.prompting import check_layers
from edgecl.methods.registry import register_method

__all__ = ["IPrompt", "IPromptConfig", "IPromptPool", "match_tokens"]

PromptTarget = Literal["image_tokens", "cls_token"]
Readout = Literal["cls_attn", "match_sim", "mean", "cls"]
Allocation = Literal["per_task", "shared"]
TrainMatch = Literal["current", "all"]
PROMPT_TARGETS: tuple[str, ...] = get_args(PromptTarget)
READOUTS: tuple[str, ...] = get_args(Readout)
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
TRAIN_MATCH: tuple[str, ...] = get_args(TrainMatch)


class IPromptConfig(MethodConfig):
    """I-Prompt settings. Sources: [paper-sum] seed 003, [abstract], digest §2.2 choices marked [GUESS]."""

    lr: float = Field(5e-3, gt=0)
    """Adam learning rate [GUESS, digest §2.2: DualPrompt/L2P protocol Adam 0.005]."""
    schedule: Literal["cosine", "constant"] = "constant"
    """Constant learning rate [GUESS, digest §2.2: DualPrompt/L2P protocol]."""
    layers: BlockIndices = (2, 3, 4, 5)
    """Prompted blocks, 0-based; "intermediate layers" [paper-sum], blocks 2-5 [GUESS, digest §2.3]."""
    pool_size: int = Field(100, ge=1)
    """Pool entries (key + prompt, one D-vector each) per prompted layer [GUESS, digest §2.3: 10 per task
    for 10 tasks]. With ``allocation=per_task`` it is split over ``expected_tasks``: ``pool_size //
    expected_tasks`` per task, the remainder one more each for the first tasks (100 over 3 -> 34, 33, 33);
    left unset it grows to ``expected_tasks`` for more than 100 tasks."""
    allocation: Allocation = "per_task"
    """``per_task``: task t owns its split of the entries (see ``pool_size``), earlier entries are frozen
    (detached) and later ones unused until their task; ``shared``: all M entries are used and trained in
    every task [GUESS, digest §2.2 "train only entries allocated to the current task"]."""
    train_match: TrainMatch = "current"
    """With ``per_task``: during training match tokens against ``current`` = the current task's entries
    only, or ``all`` allocated entries (earlier ones frozen). Inference always matches against all
    allocated entries. ``current`` keeps fresh keys from never being selected (and so never trained)
    when older keys already sit on the token distribution [edgecl choice, measured]: on a small 2-task
    TinyImageNet run (RESULTS.md, "Method review") both gave the same accuracy (21.75 vs 22.00 %), but the
    new task's tokens picked its own entries 52 % of the time after ``current`` and 5.5 % after ``all``."""
    prompt_target: PromptTarget = "image_tokens"
    """``image_tokens``: match and prompt every image token, CLS excluded [paper-sum]; ``cls_token``: match
    the CLS token's key and prompt the CLS token only (the ablation the seed's claim is about)."""
    readout: Readout = "cls_attn"
    """Head input. ``cls_attn``: image tokens weighted by the last block's CLS->patch attention, averaged
    over heads and renormalised over image tokens [GUESS, digest §2.2]; ``match_sim``: weights ∝ the
    matched cosine averaged over prompted layers (detached, clamped >= 0) [GUESS, digest alternative];
    ``mean``: uniform average of image tokens; ``cls``: the CLS token (no image-token readout)."""
    match_lambda: float = Field(0.1, ge=0)
    """λ of the matching loss λ·mean(1 − cos(token key, selected key)), gradient to keys only [GUESS,
    digest §2.3, L2P-style pull constraint]."""
    prompt_init_std: float = Field(0.02, ge=0)
    """Prompts ~ N(0, std²) so training starts near the pretrained function; 0 = zeros [GUESS, digest
    §2.2 lists N(0, 0.02) or U(-1, 1)]."""
    key_init: Literal["uniform", "normal"] = "uniform"
    """Pool keys ~ U(-1, 1) (``uniform``, L2P default) or N(0, 1) (``normal``) [GUESS, digest §2.2]."""
    match_stats: bool = True
    """After each task, one no-grad pass over its training images (eval transform) measures how often
    their tokens pick the task's own entries among all allocated ones (``per_task`` only); reported as
    ``iprompt_own_entry_rate`` / ``iprompt_match_cos``. Not part of any training step [edgecl choice]."""

    @model_validator(mode="before")
    @classmethod
    def _pool_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("allocation", "per_task") == "per_task":
            return cls._grow_with_tasks(data, "pool_size")
        return data

    @model_validator(mode="after")
    def _choices_fit(self) -> IPromptConfig:
        if not self.layers:
            raise FieldProblem("layers", "must name at least one prompted block")
        if len(set(self.layers)) != len(self.layers):
            raise FieldProblem("layers", f"must be distinct block indices (got {self.layers})")
        if self.allocation == "per_task":
            self._check_pool("pool_size")
        if self.readout == "match_sim" and self.prompt_target != "image_tokens":
            raise FieldProblem(
                "readout", "'match_sim' needs prompt_target='image_tokens' (one cosine per image token)"
            )
        return self


def match_tokens(token_keys: Tensor, pool_keys: Tensor) -> tuple[Tensor, Tensor]:
    """Semantic prompt matching: for each token the pool entry of highest cosine.

    ``token_keys`` ``B x N x D``, ``pool_keys`` ``M x D`` -> (indices ``B x N`` into the pool, the chosen
    cosine ``B x N``). Token keys are detached, so the cosine carries gradient to the chosen keys only.
    """
    sim = F.normalize(token_keys.detach(), dim=-1) @ F.normalize(pool_keys, dim=-1).transpose(0, 1)
    cos, idx = sim.max(dim=-1)
    return idx, cos


class IPromptPool(nn.Module):
    """Per prompted layer: keys ``K_l`` (``M x D``) and prompts ``P_l`` (``M x D``), optionally per task.

    With ``per_task`` allocation task t trains its own entries (:func:`~edgecl.methods.layers.split_pool`:
    M // T each, the remainder spread over the first tasks); entries of earlier tasks are detached
    (frozen) and inference uses every entry up to the current task's end. With ``shared`` every entry is
    used and trained in every task.
    """

    def __init__(
        self,
        embed_dim: int,
        layers: tuple[int, ...],
        pool_size: int,
        num_tasks: int,
        allocation: str = "per_task",
        prompt_init_std: float = 0.02,
        key_init: str = "uniform",
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.pool_size = pool_size
        self.num_tasks = num_tasks
        self.allocation = allocation
        self.bounds = pool_bounds(pool_size, num_tasks) if allocation == "per_task" else [0, pool_size]
        self.prompt_init_std = prompt_init_std
        self.key_init = key_init
        self.task = 0
        for layer in self.layers:
            self.register_parameter(f"k_{layer}", nn.Parameter(torch.empty(pool_size, embed_dim)))
            self.register_parameter(f"p_{layer}", nn.Parameter(torch.empty(pool_size, embed_dim)))
        self._init_entries(0, pool_size)

    def keys(self, layer: int) -> Tensor:
        """All keys of ``layer`` (``M x D``)."""
        return getattr(self, f"k_{layer}")  # type: ignore[no-any-return]

    def prompts(self, layer: int) -> Tensor:
        """All prompts of ``layer`` (``M x D``)."""
        return getattr(self, f"p_{layer}")  # type: ignore[no-any-return]

    def _init_entries(self, start: int, end: int) -> None:
        with torch.no_grad():
            for layer in self.layers:
                k, p = self.keys(layer)[start:end], self.prompts(layer)[start:end]
                if self.key_init == "uniform":
                    k.uniform_(-1.0, 1.0)
                else:
                    k.normal_()
                if self.prompt_init_std > 0:
                    p.normal_(0.0, self.prompt_init_std)
                else:
                    p.zero_()

    def trainable_range(self) -> tuple[int, int]:
        """(first, end) entries trained in the current task."""
        if self.allocation == "shared":
            return 0, self.pool_size
        return self.bounds[self.task], self.bounds[self.task + 1]

    def set_task(self, task: int, reinit: bool = True) -> None:
        """Switch to ``task``; with ``per_task`` allocation (re-)initialise its entries when ``reinit``."""
        if self.allocation == "per_task" and task >= self.num_tasks:
            raise ValueError(f"task {task} exceeds the {self.num_tasks} tasks the pool was split over.")
        self.task = task
        if reinit and self.allocation == "per_task":
            self._init_entries(*self.trainable_range())

    def frozen_masks(self, prefix: str) -> dict[str, Tensor]:
        """With ``per_task``: every entry outside the current task's range is frozen (``shared``: none)."""
        if self.allocation == "shared":
            return {}
        s, f = self.trainable_range()
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            for name in ("k", "p"):
                rows = torch.ones(self.pool_size, dtype=torch.bool, device=self.keys(layer).device)
                rows[s:f] = False
                out[f"{prefix}{name}_{layer}"] = rows[:, None]
        return out

    def entries(self, layer: int, train: bool, train_match: str = "current") -> tuple[Tensor, Tensor, int]:
        """(keys, prompts, index offset) that tokens of ``layer`` are matched against."""
        k, p = self.keys(layer), self.prompts(layer)
        if self.allocation == "shared":
            return k, p, 0
        s, f = self.trainable_range()
        if not train:
            return k[:f], p[:f], 0
        if train_match == "current" or s == 0:
            return k[s:f], p[s:f], s
        return torch.cat([k[:s].detach(), k[s:f]]), torch.cat([p[:s].detach(), p[s:f]]), 0


class _IPromptHooks(LayerHooks):
    """Per-forward hook state: matching + prompt addition in prompted blocks, CLS attention in the last."""

    def __init__(self, method: IPrompt, train: bool, record_from: int | None = None) -> None:
        self.m = method
        self.train = train
        self.last = method.backbone.depth - 1
        blocks = cast(nn.ModuleList, method.backbone.vit.blocks)
        self.last_attn: Any = blocks[self.last].attn
        self.need_attn = method.cfg.readout == "cls_attn"
        self.n_pre = method.backbone.info.num_prefix_tokens
        self.cos: list[Tensor] = []
        self.cls_attn: Tensor | None = None
        self._q_cls: Tensor | None = None
        self.record_from = record_from
        self.own: list[Tensor] = []

    def wants(self, layer: int) -> bool:
        """Prompted blocks, plus the last block when the readout needs its CLS attention."""
        return layer in self.m.prompt.layers or (self.need_attn and layer == self.last)

    def attn_out(self, layer: int, x_norm: Tensor, out: Tensor) -> Tensor:
        """Keep the last block's CLS query (one D x D product per image, no second pass)."""
        if self.need_attn and layer == self.last:
            attn = self.last_attn
            d = x_norm.shape[-1]
            bias = attn.qkv.bias[:d] if attn.qkv.bias is not None else None
            q = F.linear(x_norm[:, :1], attn.qkv.weight[:d], bias)  # B x 1 x D
            b, h = q.shape[0], attn.num_heads
            self._q_cls = attn.q_norm(q.reshape(b, 1, h, d // h).transpose(1, 2))  # B x H x 1 x dh
        return out

    def block_out(self, layer: int, x: Tensor, keys: Tensor) -> Tensor:
        """Record the CLS attention (last block) and add the matched prompts to the target tokens."""
        if self.need_attn and layer == self.last:
            self.cls_attn = self._cls_attention(keys)
        if layer not in self.m.prompt.layers:
            return x
        sl = slice(self.n_pre, None) if self.m.cfg.prompt_target == "image_tokens" else slice(0, 1)
        pool_k, pool_p, offset = self.m.prompt.entries(layer, self.train, self.m.cfg.train_match)
        idx, cos = match_tokens(keys[:, sl], pool_k)
        self.cos.append(cos)
        if self.record_from is not None:
            self.own.append((idx + offset >= self.record_from).float())
        prompt = pool_p[idx].to(x.dtype)  # B x n x D
        if self.m.cfg.prompt_target == "image_tokens":
            return torch.cat([x[:, : self.n_pre], x[:, self.n_pre :] + prompt], dim=1)
        return torch.cat([x[:, :1] + prompt, x[:, 1:]], dim=1)

    def _cls_attention(self, keys: Tensor) -> Tensor:
        """Head-averaged CLS->image-token attention of the last block, renormalised: ``B x N``."""
        assert self._q_cls is not None, "attn_out must run before block_out"
        attn = self.last_attn
        b, t, d = keys.shape
        k = keys.reshape(b, t, attn.num_heads, d // attn.num_heads).transpose(1, 2)  # B x H x T x dh
        logits = (self._q_cls.to(k.dtype) * attn.scale) @ k.transpose(-2, -1)  # B x H x 1 x T
        probs = logits.softmax(dim=-1).mean(dim=1)[:, 0, self.n_pre :]  # B x N
        return probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    def match_loss(self) -> Tensor | None:
        """mean over prompted layers and target tokens of (1 − cos(token key, selected key))."""
        if not self.cos:
            return None
        return torch.stack([(1.0 - c).mean() for c in self.cos]).mean()


@register_method("iprompt")
class IPrompt(Method):
    """I-Prompt: per-token prompt matching and addition inside one forward pass; weighted token readout."""

    Config = IPromptConfig
    cfg: IPromptConfig

    def __init__(self, backbone: FrozenViT, cfg: IPromptConfig) -> None:
        super().__init__(backbone, cfg)
        self.prompt = IPromptPool(
            backbone.embed_dim,
            layers=tuple(sorted(check_layers(cfg.layers, backbone.depth))),
            pool_size=cfg.pool_size,
            num_tasks=cfg.expected_tasks,
            allocation=cfg.allocation,
            prompt_init_std=cfg.prompt_init_std,
            key_init=cfg.key_init,
        )
        self._match_loss: Tensor | None = None
        self._stats: dict[str, float] = {}

    def pool_bound_to_tasks(self) -> bool:
        """With ``per_task`` allocation the pool is pre-split over ``expected_tasks``."""
        return self.cfg.allocation == "per_task"

    def begin_task(self, task: TaskInfo) -> None:
        """Grow the head and initialise this task's pool entries (``per_task``)."""
        super().begin_task(task)
        self.prompt.set_task(task.index, reinit=True)
        self._stats = {}

    def frozen_masks(self) -> dict[str, Tensor]:
        """The head's earlier rows and (``per_task``) the pool entries of other tasks."""
        return {**super().frozen_masks(), **self.prompt.frozen_masks("prompt.")}

    # ---- forward -----------------------------------------------------------------------------
    def _forward(
        self, x: Tensor, train: bool, record_from: int | None = None
    ) -> tuple[Tensor, _IPromptHooks]:
        """The single prompted pass and the readout; returns (features ``B x D``, the hook state)."""
        hooks = _IPromptHooks(self, train, record_from)
        if self.cfg.readout == "cls":  # the backbone may then run its last block for CLS only
            return self.backbone(x, hooks=hooks), hooks
        tokens = self.backbone(x, hooks=hooks, return_tokens=True)
        return self.readout(tokens, hooks), hooks

    def readout(self, tokens: Tensor, hooks: _IPromptHooks) -> Tensor:
        """Weighted combination of the final-normed image tokens (or CLS), ``B x D``."""
        n_pre = self.backbone.info.num_prefix_tokens
        mode = self.cfg.readout
        if mode == "cls":
            return tokens[:, 0]
        img = tokens[:, n_pre:]
        if mode == "mean":
            return img.mean(dim=1)
        if mode == "cls_attn":
            assert hooks.cls_attn is not None
            w = hooks.cls_attn
        else:  # match_sim
            w = torch.stack(hooks.cos).mean(dim=0).detach().clamp_min(0.0) + 1e-6
            w = w / w.sum(dim=-1, keepdim=True)
        return torch.einsum("bn,bnd->bd", w.to(img.dtype), img)

    def features(self, x: Tensor) -> Tensor:
        """Inference: one prompted pass, tokens matched against every allocated entry."""
        return self._forward(x, train=False)[0]

    def train_features(self, x: Tensor, phase: Phase) -> Tensor:
        """Training: one prompted pass; remembers the matching loss for :meth:`extra_loss`."""
        feats, hooks = self._forward(x, train=True)
        loss = hooks.match_loss()
        self._match_loss = (
            None if loss is None or self.cfg.match_lambda == 0 else self.cfg.match_lambda * loss
        )
        return feats

    def extra_loss(self) -> Tensor | None:
        """λ·(1 − cos) matching loss of the last training forward (gradient to the pool keys only)."""
        loss, self._match_loss = self._match_loss, None
        return loss

    # ---- end of task / reporting -------------------------------------------------------------
    def end_task(self, task: TaskInfo, loader: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Optionally measure how often the task's tokens pick its own entries among all allocated."""
        super().end_task(task, loader)
        if not self.cfg.match_stats or self.cfg.allocation != "per_task":
            return
        start = self.prompt.trainable_range()[0]
        device = next(self.prompt.parameters()).device
        own_sum = cos_sum = 0.0
        count = 0
        with torch.no_grad():
            for x, _ in loader:
                _, hooks = self._forward(x.to(device), train=False, record_from=start)
                own_sum += float(torch.stack(hooks.own).mean(dim=0).sum())
                cos_sum += float(torch.stack(hooks.cos).mean(dim=0).sum())
                count += hooks.own[0].numel()
        if count:
            self._stats = {"iprompt_own_entry_rate": own_sum / count, "iprompt_match_cos": cos_sum / count}

    def extra_metrics(self) -> dict[str, float]:
        """Own-entry match rate and mean matched cosine of the task just learned (``match_stats``)."""
        return dict(self._stats)

    def checkpoint_meta(self) -> dict[str, Any]:
        """Also remember which task's pool entries are current."""
        return {**super().checkpoint_meta(), "prompt_task": self.prompt.task}

    def load_checkpoint_meta(self, state: dict[str, Any]) -> None:
        """Restore the pool's current task without re-initialising entries."""
        super().load_checkpoint_meta(state)
        self.prompt.set_task(int(state.get("prompt_task", 0)), reinit=False)
