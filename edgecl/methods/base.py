"""The contract between the one `Trainer` and every continual-learning method.

A method owns its trainable modules (prompts, routers, heads), its loss and its DPCT-like phase
schedule; the trainer owns data, optimisers, schedules, checkpoints and callbacks, and knows no
method names. Subclass :class:`Method`, give it a ``Config`` model (subclass of the pydantic
:class:`MethodConfig`) and register it with :func:`edgecl.methods.registry.register_method`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from edgecl.backbone import FrozenViT
from edgecl.config import ConfigModel, FieldProblem
from edgecl.methods.layers import ExpandableHead

__all__ = ["Method", "MethodConfig", "Phase", "TaskInfo", "masked_cross_entropy"]


class Phase(str, enum.Enum):
    """What one training epoch does."""

    JOINT = "joint"
    """All trainable parameters on full patches (CODA, L2P, DualPrompt, the heads)."""
    SPARSE = "sparse"
    """DPCT phase 1: prompt and head on a patch subset (CPS / PatchDropout)."""
    HEAD = "head"
    """DPCT phase 2: prompt frozen, head only, on full-patch prompted features (cacheable)."""


class MethodConfig(ConfigModel):
    """Settings every method has; subclasses add their own fields with sourced defaults.

    A pydantic model (:class:`edgecl.config.ConfigModel`): an unknown key, a wrong type or a broken
    constraint is a ``ValueError`` naming the key; assignments are validated; ``model_dump()`` is the dict.
    """

    lr: float = Field(1e-3, gt=0)
    """Adam learning rate [cps-prompt code: models/config/cps_prompt.yaml]."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """``adam`` or ``sgd`` (no momentum)."""
    weight_decay: float = Field(0.0, ge=0)
    """[cps-prompt code: optim_wd default 0]."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """``cosine`` = CODA's per-epoch CosineSchedule(K=epochs) [CODA/cps-prompt], or ``constant``."""
    clip_grad: float | None = Field(1.0, gt=0)
    """Gradient-norm clip over the trainable parameters [cps-prompt code]; None disables it."""
    expected_tasks: int = Field(10, ge=1)
    """How many tasks pools are split over (CODA pool 100 / 10 tasks); ``edgecl train``/``bench`` set it to
    the stream's task count. More tasks than this is an error for methods whose pool is split per task."""

    @classmethod
    def upgrade_saved(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """Options a checkpoint saved (a full ``model_dump()``), upgraded to this version's meaning.

        A key an older edgecl did not have gets the value that reproduces the old behaviour, not today's
        default; the base keeps ``saved`` as it is. Called wherever a saved config is rebuilt
        (:func:`edgecl.methods.registry.saved_options`)."""
        return saved

    @classmethod
    def _grow_with_tasks(cls, data: Any, key: str) -> Any:
        """Before validation: a per-task pool size ``key`` the caller did not set is raised to
        ``expected_tasks`` when the default is smaller (one component per task at least)."""
        if not isinstance(data, dict) or key in data:
            return data
        tasks = data.get("expected_tasks", cls.model_fields["expected_tasks"].default)
        default = cls.model_fields[key].default
        if isinstance(tasks, int) and not isinstance(tasks, bool) and tasks > default:
            return {**data, key: tasks}
        return data

    def _check_pool(self, key: str) -> None:
        """A pool split per task needs at least one component per task (``key`` >= ``expected_tasks``)."""
        size = getattr(self, key)
        if size < self.expected_tasks:
            raise FieldProblem(
                key,
                f"{size} gives fewer than one component per task for expected_tasks={self.expected_tasks}; "
                f"set {key} to at least {self.expected_tasks} (--set {key}={self.expected_tasks})",
            )


@dataclass(frozen=True)
class TaskInfo:
    """The task the trainer is about to train: its index and its (global, contiguous) class ids."""

    index: int
    classes: Sequence[int]
    n_past: int
    """Classes learned in earlier tasks (ids ``0 .. n_past-1``)."""

    @property
    def n_seen(self) -> int:
        """Classes known once this task is learned."""
        return self.n_past + len(self.classes)


def masked_cross_entropy(logits: Tensor, y: Tensor, n_past: int, n_seen: int) -> Tensor:
    """CE over the first ``n_seen`` logits with earlier tasks' logits masked to -inf (CODA-style)."""
    logits = logits[:, :n_seen]
    if n_past > 0:
        mask = torch.zeros(n_seen, dtype=torch.bool, device=logits.device)
        mask[:n_past] = True
        logits = logits.masked_fill(mask, float("-inf"))
    return nn.functional.cross_entropy(logits, y)


class Method(nn.Module):
    """Base class of a continual-learning method over a shared :class:`FrozenViT`.

    The default implementation is a linear head over the frozen CLS feature (the head-only baseline);
    subclasses override :meth:`features` (and :meth:`train_features` for sparse phases) and add
    parameters. All logits are over the global class ids; the head grows as tasks arrive.
    """

    name: ClassVar[str] = "linear"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    has_phases: ClassVar[bool] = False
    """True for DPCT-style methods whose epochs are split into SPARSE then HEAD."""

    @classmethod
    def export_problem(cls) -> str | None:
        """Why this method's inference path cannot be traced into one ONNX graph (``edgecl export``, the
        daemon's onnxruntime engines), or None when it can. Declared here, on the class, and nowhere else."""
        return None

    def __init__(self, backbone: FrozenViT, cfg: MethodConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = backbone
        self.head = ExpandableHead(backbone.embed_dim)
        self.task: TaskInfo | None = None
        self.num_tasks_seen = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def begin_task(self, task: TaskInfo) -> None:
        """Prepare parameters for ``task`` (grow the head, allocate prompt components, freeze old ones)."""
        if task.index >= self.cfg.expected_tasks and self.pool_bound_to_tasks():
            raise ValueError(
                f"task {task.index + 1} exceeds expected_tasks={self.cfg.expected_tasks} that the prompt "
                "pool was split over; set expected_tasks (CLI --expected-tasks) to the stream length."
            )
        self.task = task
        self.head.grow(task.n_seen)

    def end_task(self, task: TaskInfo, loader: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Finish ``task``; ``loader`` iterates its training data with the eval transform (for statistics)."""
        self.num_tasks_seen = task.index + 1

    def pool_bound_to_tasks(self) -> bool:
        """Whether parameters are pre-split over ``expected_tasks`` (then more tasks are an error)."""
        return False

    def phase(self, epoch: int, epochs: int) -> Phase:
        """The phase of 0-based ``epoch`` out of ``epochs``."""
        return Phase.JOINT

    def phase_transform(self, phase: Phase) -> str:
        """``train`` (random crop + flip) or ``eval`` (deterministic) data transform for ``phase``."""
        return "train"

    def phase2_cacheable(self) -> bool:
        """Whether HEAD-phase features may be computed once per task and cached by the trainer."""
        return False

    def closed_form_head(self) -> bool:
        """Whether the HEAD phase is solved from one pass of cached features (:meth:`fit_head`), no steps."""
        return False

    def fit_head(self, feats: Tensor, labels: Tensor) -> None:
        """Set the head in closed form from the current task's full-patch features (``N x D``) and labels.

        Called once per task and process at the first HEAD epoch; idempotent (a resumed task refits)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form head")

    # ---- parameters --------------------------------------------------------------------------
    def trainable_parameters(self, phase: Phase) -> list[nn.Parameter]:
        """Parameters the optimizer updates in ``phase`` (frozen ones never appear)."""
        if phase is Phase.HEAD:
            return [p for p in self.head.parameters() if p.requires_grad]
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone.")]

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the task's optimizer (all phases share one optimizer, as the reference)."""
        return [{"params": self.trainable_parameters(Phase.JOINT)}]

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (HGM-style update scaling); commit per-step state here."""

    def on_step_retry(self) -> None:
        """Called when the trainer abandons a step's forward/backward: an out-of-memory error (the step is
        redone with smaller micro-batches) or an fp16 step skipped for inf/NaN gradients.

        Per-step state a training forward accumulates (e.g. Hash's pending activation counts) must be
        discarded here, so a retried step counts once; commit such state in :meth:`after_optimizer_step`.
        """

    def frozen_masks(self) -> dict[str, Tensor]:
        """Elements of parameters that must not change while training the current task (True = frozen).

        Keys are names from ``named_parameters()``; each mask broadcasts to its parameter. The trainer
        restores these elements after every optimizer step, so they stay bit-identical whatever weight
        decay or Adam moments would do to them (a detach or a zero gradient does not stop either). The
        base freezes the head rows of earlier tasks' classes (their logits are masked in training).
        """
        if self.task is None or self.task.n_past == 0:
            return {}
        rows = torch.zeros(self.head.num_classes, dtype=torch.bool, device=self.head.weight.device)
        rows[: self.task.n_past] = True
        return {"head.weight": rows[:, None], "head.bias": rows}

    # ---- forward -----------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Inference-time features (full patches, all prompts learned so far): ``B x D``."""
        return self.backbone.features(x)

    def train_features(self, x: Tensor, phase: Phase) -> Tensor:
        """Features for a training step in ``phase`` (with grad to the trainable parameters)."""
        return self.features(x)

    def head_features(self, x: Tensor) -> Tensor:
        """Phase-2 features: the prompted full-patch pass with no autograd (cacheable when deterministic)."""
        with torch.no_grad():
            return self.features(x)

    def logits(self, feats: Tensor) -> Tensor:
        """Head logits over all classes seen so far."""
        return self.head(feats)

    def extra_loss(self) -> Tensor | None:
        """An auxiliary loss of the last forward (orthogonality, key matching); None when there is none."""
        return None

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Training loss for the current task: CE with earlier classes masked, plus any auxiliary loss."""
        assert self.task is not None, "begin_task was not called"
        ce = masked_cross_entropy(logits, y, self.task.n_past, self.task.n_seen)
        extra = self.extra_loss()
        return ce if extra is None else ce + extra

    def training_loss(self, x: Tensor, y: Tensor, phase: Phase) -> Tensor:
        """The loss of one (micro-)batch in ``phase``; the trainer averages and backpropagates it."""
        feats = self.head_features(x) if phase is Phase.HEAD else self.train_features(x, phase)
        return self.loss(self.logits(feats), y)

    def head_loss(self, feats: Tensor, y: Tensor) -> Tensor:
        """Phase-2 loss on cached features (no backbone work)."""
        assert self.task is not None, "begin_task was not called"
        return masked_cross_entropy(self.logits(feats), y, self.task.n_past, self.task.n_seen)

    def forward(self, x: Tensor) -> Tensor:
        """Inference logits over every class seen so far (class-incremental, no task id)."""
        return self.logits(self.features(x))

    # ---- reporting / checkpoints -------------------------------------------------------------
    def extra_metrics(self) -> dict[str, float]:
        """Method-specific figures for the results (e.g. task-identification accuracy)."""
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        """Non-tensor state saved in checkpoints (JSON-able)."""
        return {"num_tasks_seen": self.num_tasks_seen, "head_classes": self.head.num_classes}

    def load_checkpoint_meta(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_meta` saved (called before ``load_state_dict``)."""
        self.num_tasks_seen = int(state.get("num_tasks_seen", 0))
        self.head.grow(int(state.get("head_classes", 0)))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every tensor except the frozen backbone (what checkpoints store)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def num_trainable_parameters(self) -> int:
        """Parameters outside the backbone (trainable at some point), for reports."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("backbone."))


def describe_config(cfg: MethodConfig) -> dict[str, Any]:
    """The config as a plain dict (for results.json and checkpoints; ``build_config`` reads it back)."""
    return cfg.model_dump()
