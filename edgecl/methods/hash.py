"""Hash: a shared prompt pool with task routers, HDR and HGM (Li et al., CVPR 2026, arXiv 2601.20894).

A global pool of K prompt experts (a key part and a value part of length Lp per prompted layer) is shared
by all tasks. One router per (task, layer) scores the layer's normed input tokens, ``x W_r / sqrt(D)``,
averaged over the sequence; the Top-k experts are mixed with softmax weights over the selected scores and
prepended to the frozen attention's keys/values (prefix tuning through :class:`LayerHooks`).

History (digest §3.2-6): ``H`` counts every (sample, layer) selection of each expert in training steps.
At the start of task t the set ``A_t`` = the ``active_set_size`` experts with the largest ``H`` is fixed
(empty for the first task) and stored with router t.

* **HDR** subtracts ``delta`` from the scores of ``A_t`` whenever router t is used (training and inference);
  by default ``delta`` counts standard deviations of the router's scores across experts (a running estimate
  per router and layer), so the penalty demotes A_t's experts without banning them (digest §3.2-7: δ ≈ 1
  std; on the reference ViT the 1/sqrt(D)-scaled scores spread only ~0.02-0.03, so a raw 0.5 removed A_t).
* **HGM** makes the experts of ``A_t`` move ``beta`` times as far per optimizer step. Adam normalises a
  scaled gradient away, so the *update* is scaled: θ ← θ_old + β (θ_new − θ_old) in
  :meth:`Hash.after_optimizer_step`, with θ_old snapshotted in the step's training forward.

Old routers are frozen (``requires_grad=False``: never in the task's optimizer). At inference the task
(and so the router) of each image comes from :class:`~edgecl.methods.tii.ClassStatsTaskIdentifier` over
the frozen CLS feature (digest §3.2-1, a closed-form HiDe-style TII).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from edgecl.backbone import FrozenViT, LayerHooks, Prefix
from edgecl.config import BlockIndices, FieldProblem
from edgecl.methods.base import Method, MethodConfig, Phase, TaskInfo
from edgecl.methods.prompting import check_layers
from edgecl.methods.registry import register_method
from edgecl.methods.tii import ClassStatsTaskIdentifier, collect_features

__all__ = ["Hash", "HashConfig", "Routing", "route", "router_scores"]


class HashConfig(MethodConfig):
    """Hash settings; every default tagged with its source (digest §3.2 and §3.4)."""

    lr: float = Field(5e-4, gt=0)
    """Adam learning rate [GUESS, digest §3.2-10: HiDe-Prompt script lr 0.0005]."""
    schedule: Literal["cosine", "constant"] = "constant"
    """[GUESS, HiDe-Prompt train_cifar100_vit.sh: --sched constant with lr 0.0005]."""
    pool_size: int = Field(8, ge=1)
    """K experts in the shared pool [GUESS, digest §3.2-5: parameter bound vs HiDe-Prompt]."""
    top_k: int = Field(2, ge=1)
    """Experts mixed per (image, layer) [GUESS, digest §3.2-5]."""
    prompt_length: int = Field(5, ge=1)
    """Lp of each expert's key part and value part [GUESS, digest §3.2-3/5: HiDe length 5]."""
    layers: BlockIndices = (0, 1, 2, 3)
    """Prompted blocks, 0-based [paper-sum "layers 1–4" best; 0-based reading GUESS, digest §3.2-4]."""
    hdr: bool = True
    """History-aware dynamic routing on/off [paper-sum; off for the ablation rows pool / +HGM]."""
    hgm: bool = True
    """History-aware gradient (update) modulation on/off [paper-sum; off for pool / +HDR]."""
    delta: float = Field(1.0, ge=0)
    """HDR penalty on the scores of A_t, in units of ``delta_scale`` [digest §3.2-7: "δ ≈ 1 std"]."""
    delta_scale: Literal["score_std", "absolute"] = "score_std"
    """``score_std``: the penalty is ``delta`` x the router's score spread (std across the K experts,
    averaged over images; a running mean per router and prompted layer, updated at every training step and
    kept in checkpoints; before a router's first step the image's own spread); ``absolute``: ``delta`` on
    the 1/sqrt(D)-scaled scores as given (the previous default 0.5 banned A_t outright) [GUESS, edgecl]."""
    score_std_momentum: float = Field(0.9, ge=0, lt=1)
    """Running mean of the score spread: ``std <- m std + (1 - m) step_std`` [GUESS; 0 = the last step's]."""

    beta: float = Field(0.1, ge=0, le=1)
    """HGM update factor of the experts in A_t [GUESS, digest §3.2-7]."""
    active_set_size: int | None = Field(None, ge=0)
    """|A_t|; None = ``top_k`` [GUESS, digest §3.2-6: "Top-K" read as the routing top-k]."""
    prompt_init: Literal["uniform", "zero"] = "uniform"
    """``uniform`` U(-1, 1) [HiDe-Prompt code peft/prompt/hide_prompt.py, prompt_init='uniform'] or
    ``zero``."""
    tii: Literal["lda", "ncm"] = "lda"
    """Task-identity inference: ``lda`` (shared-covariance Gaussian classifier on frozen CLS features,
    closed-form stand-in for HiDe's Gaussian-replay head) or ``ncm`` (cosine nearest class mean)
    [GUESS, digest §3.2-1]."""
    tii_shrinkage: float = Field(0.1, ge=0, le=1)
    """Shrinkage of the pooled covariance towards tr/D·I for ``lda`` [GUESS]."""

    @model_validator(mode="after")
    def _sizes_fit(self) -> HashConfig:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise FieldProblem("layers", f"must be distinct block indices, at least one (got {self.layers})")
        if self.top_k > self.pool_size:
            raise FieldProblem("top_k", f"must be <= pool_size={self.pool_size} (got {self.top_k})")
        if self.active_set_size is not None and self.active_set_size > self.pool_size:
            raise FieldProblem(
                "active_set_size",
                f"must be <= pool_size={self.pool_size} or null (got {self.active_set_size})",
            )
        return self

    @classmethod
    def upgrade_saved(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A model saved before ``delta_scale`` existed penalised A_t by ``delta`` as given: keep that."""
        if "delta" in saved and "delta_scale" not in saved:
            saved = {**saved, "delta_scale": "absolute"}
        return saved


class Routing(NamedTuple):
    """One routing decision: scores ``B x K`` (after HDR), Top-k ``indices`` and softmax ``weights``."""

    scores: Tensor
    indices: Tensor
    weights: Tensor


def router_scores(x_norm: Tensor, weight: Tensor) -> Tensor:
    """``mean_tokens(x W) / sqrt(D)``: ``B x K`` scores before HDR.

    ``x_norm`` is ``B x T x D``; ``weight`` is ``D x K`` (one router) or ``B x D x K`` (a router per image).
    The token mean is taken before the linear router, which equals the mean of the per-token scores.
    """
    d = x_norm.shape[-1]
    mean = x_norm.mean(1)
    if weight.dim() == 2:
        scores = mean @ weight
    else:
        scores = torch.einsum("bd,bdk->bk", mean, weight)
    return scores / math.sqrt(d)


def route(
    x_norm: Tensor,
    weight: Tensor,
    top_k: int,
    penalty: Tensor | None = None,
    delta: float | Tensor = 0.0,
    scores: Tensor | None = None,
) -> Routing:
    """Score experts (:func:`router_scores`, or the given ``scores``), subtract ``delta`` on ``penalty``,
    Top-k + softmax.

    ``penalty`` is a bool mask ``K`` or ``B x K`` (HDR's A_t); ``delta`` a float or a per-image ``B x 1``.
    """
    if scores is None:
        scores = router_scores(x_norm, weight)
    if penalty is not None and (isinstance(delta, Tensor) or delta):
        scores = scores - delta * penalty.to(scores.dtype)
    top, indices = scores.topk(top_k, dim=-1)
    return Routing(scores, indices, top.softmax(dim=-1))


class _HashHooks(LayerHooks):
    """Routes each prompted layer of one prompted pass (one router per image, or the training router)."""

    def __init__(self, method: Hash, tasks: Tensor | None, train_task: int | None) -> None:
        self.method = method
        self.tasks = tasks
        self.train_task = train_task

    def wants(self, layer: int) -> bool:
        """Only the prompted blocks."""
        return layer in self.method.layer_position

    def prefix(self, layer: int, x_norm: Tensor) -> Prefix | None:
        """The routed, weighted expert prompt as the layer's (key, value) prefix."""
        return self.method.layer_prefix(layer, x_norm, self.tasks, self.train_task)


@register_method("hash")
class Hash(Method):
    """Shared prompt experts, per-task per-layer routers, HDR/HGM from activation history, TII at test."""

    Config = HashConfig
    cfg: HashConfig

    def __init__(self, backbone: FrozenViT, cfg: HashConfig) -> None:
        super().__init__(backbone, cfg)
        check_layers(cfg.layers, backbone.depth)
        d, k = backbone.embed_dim, cfg.pool_size
        self.layer_position = {layer: i for i, layer in enumerate(cfg.layers)}
        self.experts = nn.Parameter(torch.zeros(k, len(cfg.layers), 2, cfg.prompt_length, d))
        """The pool: expert × prompted layer × (key, value) × Lp × D, one tensor (HGM scales its rows)."""
        if cfg.prompt_init == "uniform":
            nn.init.uniform_(self.experts, -1.0, 1.0)
        self.routers = nn.ParameterList()
        """Router t: prompted layer × D × K (one D×K router per task and layer, digest §3.2-2)."""
        self.register_buffer("activation_counts", torch.zeros(k, dtype=torch.long))
        self.register_buffer("active_sets", torch.zeros(0, k, dtype=torch.bool))
        self.tii = ClassStatsTaskIdentifier(d, cfg.tii, cfg.tii_shrinkage)
        self.register_buffer("score_std", torch.zeros(0, len(cfg.layers)))
        self.register_buffer("score_std_seen", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("_pending", torch.zeros(k, dtype=torch.long), persistent=False)
        self.register_buffer("_pending_std", torch.zeros(2, len(cfg.layers)), persistent=False)
        self._snapshot: Tensor | None = None
        self._metrics: dict[str, float] = {}
        self.last_routing: dict[int, Routing] = {}
        """The last pass's routing per prompted block (detached), for diagnostics and tests."""

    activation_counts: Tensor
    """H: (sample, layer) Top-k selections per expert in training steps, cumulative over tasks."""
    active_sets: Tensor
    """A_t per router (bool ``num_routers x K``), fixed when router t is created."""
    _pending: Tensor
    """Selections of the optimizer step in progress, committed to H in :meth:`after_optimizer_step`."""
    score_std: Tensor
    """Running score spread per router and prompted layer (``num_routers x layers``), HDR's unit."""
    score_std_seen: Tensor
    """Whether router t's spread has been measured in a training step yet (bool ``num_routers``)."""
    _pending_std: Tensor
    """The step in progress: per layer, the sum of per-image score spreads and the image count."""

    # ---- pool state ----------------------------------------------------------------------------
    @property
    def num_routers(self) -> int:
        """Routers allocated (one per task begun)."""
        return len(self.routers)

    @property
    def active_set_size(self) -> int:
        """|A_t|."""
        return self.cfg.top_k if self.cfg.active_set_size is None else self.cfg.active_set_size

    def _grow_routers(self, n: int) -> None:
        """Allocate routers (``nn.Linear``-style U(±1/sqrt(D)) init [GUESS]) and A_t rows up to ``n``."""
        d, k = self.backbone.embed_dim, self.cfg.pool_size
        dev, dtype = self.experts.device, self.experts.dtype
        while self.num_routers < n:
            bound = 1.0 / math.sqrt(d)
            w = torch.empty(len(self.cfg.layers), d, k, device=dev, dtype=dtype).uniform_(-bound, bound)
            self.routers.append(nn.Parameter(w))
        extra = n - int(self.active_sets.shape[0])
        if extra > 0:
            pad = torch.zeros(extra, k, dtype=torch.bool, device=self.active_sets.device)
            self.active_sets = torch.cat([self.active_sets, pad])
        extra = n - int(self.score_std.shape[0])
        if extra > 0:
            std = self.score_std
            self.score_std = torch.cat([std, std.new_zeros(extra, std.shape[1])])
            self.score_std_seen = torch.cat([self.score_std_seen, self.score_std_seen.new_zeros(extra)])

    def most_activated(self) -> Tensor:
        """Bool mask of the ``active_set_size`` experts with the largest H (H > 0 only; ties: lower index)."""
        h = self.activation_counts
        order = torch.sort(h, descending=True, stable=True).indices[: self.active_set_size]
        mask = torch.zeros_like(h, dtype=torch.bool)
        mask[order] = True
        return mask & (h > 0)

    def protected_experts(self) -> Tensor:
        """Indices of A_t of the current task (the experts HGM slows down)."""
        if self.task is None or self.task.index >= self.num_routers:
            return torch.zeros(0, dtype=torch.long, device=self.experts.device)
        return self.active_sets[self.task.index].nonzero().flatten()

    # ---- lifecycle -----------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        """Create router t (old ones frozen) and fix A_t from H."""
        super().begin_task(task)
        self._grow_routers(task.index + 1)
        for i, router in enumerate(self.routers):
            router.requires_grad_(i == task.index)
        self.active_sets[task.index] = self.most_activated()
        self._pending.zero_()
        self._pending_std.zero_()
        self._snapshot = None

    def end_task(self, task: TaskInfo, loader: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Freeze router t and fit the TII class statistics on the task's frozen features."""
        super().end_task(task, loader)
        self.routers[task.index].requires_grad_(False)
        feats, labels = collect_features(self.backbone.features, loader, self.experts.device)
        self.tii.fit(feats, labels, task.index)
        pred = self.tii.predict_task(feats)
        self._metrics = {"task_identification_accuracy_train": float((pred == task.index).float().mean())}

    # ---- routing and forward -------------------------------------------------------------------
    def layer_prefix(
        self, layer: int, x_norm: Tensor, tasks: Tensor | None, train_task: int | None
    ) -> Prefix:
        """Route block ``layer`` with router ``train_task`` (training) or each image's router ``tasks``."""
        li = self.layer_position[layer]
        cfg = self.cfg
        if train_task is not None:
            weight = self.routers[train_task][li]
            router = torch.full((x_norm.shape[0],), train_task, dtype=torch.long, device=x_norm.device)
        else:
            assert tasks is not None
            weight = torch.stack([r[li] for r in self.routers])[tasks]
            router = tasks
        scores = router_scores(x_norm, weight)
        spread = scores.detach().float().std(dim=-1)  # B: each image's spread across the K experts
        penalty = self.active_sets[router] if cfg.hdr else None
        delta = self.hdr_delta(router, li, spread).to(scores.dtype)
        r = route(x_norm, weight, cfg.top_k, penalty, delta, scores=scores)
        experts = self.experts[:, li][r.indices]  # B x k x 2 x Lp x D
        prompt = torch.einsum("bk,bkcld->bcld", r.weights.to(experts.dtype), experts)
        if train_task is not None and torch.is_grad_enabled():  # a training step: commit at its end
            self._pending += torch.bincount(r.indices.flatten(), minlength=cfg.pool_size)
            self._pending_std[0, li] += spread.sum()
            self._pending_std[1, li] += spread.numel()
        self.last_routing[layer] = Routing(r.scores.detach(), r.indices.detach(), r.weights.detach())
        return prompt[:, 0], prompt[:, 1]

    def hdr_delta(self, router: Tensor, layer_pos: int, spread: Tensor) -> Tensor:
        """HDR's penalty per image (``B x 1``): ``delta`` x the router's running spread (``score_std``; the
        image's own ``spread`` while the router has none yet), or ``delta`` itself (``absolute``)."""
        if self.cfg.delta_scale == "absolute":
            return torch.full_like(spread, self.cfg.delta)[:, None]
        running = self.score_std[router, layer_pos].to(spread.dtype)
        return (self.cfg.delta * torch.where(self.score_std_seen[router], running, spread))[:, None]

    def predict_task(self, x: Tensor) -> Tensor:
        """TII: each image's task from the frozen CLS feature (router 0 while only one exists)."""
        if self.num_routers <= 1 or not self.tii.fitted:
            current = self.task.index if self.task is not None and self.num_routers > 1 else 0
            return torch.full((x.shape[0],), current, dtype=torch.long, device=x.device)
        tasks = self.tii.predict_task(self.backbone.features(x))
        return tasks.clamp(0, self.num_routers - 1)

    def task_features(self, x: Tensor, tasks: Tensor) -> Tensor:
        """Prompted CLS feature with router ``tasks[i]`` for image i (oracle or inferred task ids)."""
        return self.backbone(x, hooks=_HashHooks(self, tasks.to(x.device).long(), None))

    def features(self, x: Tensor) -> Tensor:
        """Inference without task id: TII picks each image's router."""
        return self.task_features(x, self.predict_task(x))

    def train_features(self, x: Tensor, phase: Phase) -> Tensor:
        """Training pass with the current router; snapshots A_t's experts for HGM first."""
        assert self.task is not None, "begin_task was not called"
        if self.cfg.hgm:
            protected = self.protected_experts()
            self._snapshot = self.experts.detach()[protected].clone() if protected.numel() else None
        return self.backbone(x, hooks=_HashHooks(self, None, self.task.index))

    def on_step_retry(self) -> None:
        """Drop the abandoned attempt's pending H counts and spreads (the retried forward counts again)."""
        self._pending.zero_()
        self._pending_std.zero_()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Commit the step's H counts; HGM: pull A_t's experts back to θ_old + β (θ_new − θ_old)."""
        self.activation_counts += self._pending
        self._pending.zero_()
        if self.task is not None and bool((self._pending_std[1] > 0).all()):
            t = self.task.index
            step = self._pending_std[0] / self._pending_std[1]
            m = self.cfg.score_std_momentum if bool(self.score_std_seen[t]) else 0.0
            self.score_std[t] = m * self.score_std[t] + (1.0 - m) * step
            self.score_std_seen[t] = True
        self._pending_std.zero_()
        if self.cfg.hgm and self._snapshot is not None:
            protected = self.protected_experts()
            old = self._snapshot
            self.experts[protected] = old + self.cfg.beta * (self.experts[protected] - old)
        self._snapshot = None

    # ---- reporting / checkpoints ---------------------------------------------------------------
    def extra_metrics(self) -> dict[str, float]:
        """TII accuracy on the finished task's *training* images (eval transform), over all seen tasks.

        Test-set TII accuracy needs labels the evaluation API does not pass to methods; the trainer
        callback :class:`~edgecl.train.task_identification.TaskIdentificationCallback` adds it to the record.
        """
        return dict(self._metrics)

    def checkpoint_meta(self) -> dict[str, Any]:
        """Also the number of routers and of TII class slots (tensor shapes to allocate on load)."""
        return {**super().checkpoint_meta(), "routers": self.num_routers, "tii_classes": self.tii.num_classes}

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """A checkpoint saved before the running score spread was kept has none: its routers start
        unmeasured (as allocated by :meth:`load_checkpoint_meta`), which its ``delta_scale=absolute`` (see
        :meth:`HashConfig.upgrade_saved`) never reads."""
        for name in ("score_std", "score_std_seen"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_checkpoint_meta(self, state: dict[str, Any]) -> None:
        """Allocate routers and TII slots so the saved tensors fit; finished tasks' routers frozen."""
        super().load_checkpoint_meta(state)
        self._grow_routers(int(state.get("routers", 0)))
        for i, router in enumerate(self.routers):
            router.requires_grad_(i >= self.num_tasks_seen)
        self.tii.grow(int(state.get("tii_classes", 0)))
