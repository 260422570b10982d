"""Hash head: routing, HDR, HGM with Adam, activation history in checkpoints, TII, end-to-end, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import Phase, TaskInfo, create_method
from edgecl.methods.hash import Hash, route
from edgecl.methods.registry import build_config
from edgecl.methods.tii import ClassStatsTaskIdentifier
from edgecl.train import Callback, TrainConfig, Trainer
from edgecl.train.model_io import load_model
from edgecl.train.task_identification import TaskIdentificationCallback

LAYERS = 4  # default prompted blocks 0-3
TOP_K = 2


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """These models are tiny: one intra-op thread is as fast and immune to oversubscribed shared cores."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backbone() -> FrozenViT:
    """A tiny random ViT (4 blocks, width 48, 3 heads, 32 px / patch 8): fast, same code paths as ViT-Ti."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=48, num_heads=3, num_classes=0
    )
    return FrozenViT(model, name="vit_tiny_test")


def _method(backbone: FrozenViT, seed: int = 0, **overrides: Any) -> Hash:
    torch.manual_seed(seed)
    method = create_method("hash", backbone, overrides)
    assert isinstance(method, Hash)
    return method


def _task(index: int, per_task: int = 2) -> TaskInfo:
    classes = list(range(index * per_task, (index + 1) * per_task))
    return TaskInfo(index=index, classes=classes, n_past=index * per_task)


# ---- routing ---------------------------------------------------------------------------------------
def test_route_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(1)
    b, t, d, k = 3, 5, 16, 6
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, k, generator=g, dtype=torch.float64)
    r = route(x, w, top_k=2)
    for i in range(b):
        # per-token scores x_t W / sqrt(d), then the sequence mean
        s = [
            sum(sum(float(x[i, tok, j] * w[j, e]) for j in range(d)) / math.sqrt(d) for tok in range(t)) / t
            for e in range(k)
        ]
        top = sorted(range(k), key=lambda e: -s[e])[:2]
        z = sum(math.exp(s[e]) for e in top)
        assert r.indices[i].tolist() == top
        assert r.weights[i].tolist() == pytest.approx([math.exp(s[e]) / z for e in top], abs=1e-12)
        assert r.scores[i].tolist() == pytest.approx(s, abs=1e-12)
    # a router per image gives the same decision when all images share it
    per_image = route(x, w.expand(b, d, k), top_k=2)
    assert torch.equal(per_image.indices, r.indices)
    assert torch.allclose(per_image.weights, r.weights, atol=1e-12)


def test_hdr_lowers_exactly_the_active_scores() -> None:
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 7, 8, generator=g), torch.randn(8, 5, generator=g)
    mask = torch.tensor([True, False, False, True, False])
    plain, pen = route(x, w, 2), route(x, w, 2, penalty=mask, delta=0.5)
    diff = pen.scores - plain.scores
    assert torch.allclose(diff[:, mask], torch.full_like(diff[:, mask], -0.5), atol=1e-6)
    assert torch.equal(diff[:, ~mask], torch.zeros_like(diff[:, ~mask]))


def test_hdr_inside_the_method_same_in_training_and_inference(backbone: FrozenViT) -> None:
    m = _method(backbone, delta=0.5, delta_scale="absolute")
    m.begin_task(_task(0))
    assert not m.active_sets[0].any(), "A_1 is empty for the first task"
    m.activation_counts.copy_(torch.tensor([3, 0, 9, 1, 7, 0, 2, 0]))
    m.begin_task(_task(1))
    a1 = m.active_sets[1]
    assert a1.nonzero().flatten().tolist() == [2, 4], "A_t = the top-k experts by H, fixed at begin_task"
    x = torch.rand(5, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        m.train_features(x, Phase.JOINT)
        train_scores = {layer: r.scores.clone() for layer, r in m.last_routing.items()}
        m.task_features(x, torch.ones(5, dtype=torch.long))
        infer_scores = {layer: r.scores.clone() for layer, r in m.last_routing.items()}
        m.cfg.hdr = False
        m.train_features(x, Phase.JOINT)
        free_scores = {layer: r.scores.clone() for layer, r in m.last_routing.items()}
    assert sorted(train_scores) == [0, 1, 2, 3]
    for layer in train_scores:  # router 1 with its A_1 penalty: the same in training and inference
        assert torch.allclose(train_scores[layer], infer_scores[layer], atol=1e-6)
    # block 0 sees the same input with and without HDR (later blocks see different earlier prompts)
    diff = train_scores[0] - free_scores[0]
    assert torch.allclose(diff[:, a1], torch.full_like(diff[:, a1], -0.5), atol=1e-6)
    assert torch.allclose(diff[:, ~a1], torch.zeros_like(diff[:, ~a1]), atol=1e-6)


def test_each_image_uses_its_own_router(backbone: FrozenViT) -> None:
    m = _method(backbone).eval()
    m.begin_task(_task(0))
    m.activation_counts.copy_(torch.tensor([0, 4, 0, 0, 6, 0, 0, 0]))
    m.begin_task(_task(1))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        mixed = m.task_features(x, torch.tensor([0, 1, 1, 0]))
        all0 = m.task_features(x, torch.zeros(4, dtype=torch.long))
        all1 = m.task_features(x, torch.ones(4, dtype=torch.long))
    assert torch.allclose(mixed[[0, 3]], all0[[0, 3]], atol=1e-5)
    assert torch.allclose(mixed[[1, 2]], all1[[1, 2]], atol=1e-5)
    assert not torch.allclose(all0, all1, atol=1e-3)


# ---- HGM -------------------------------------------------------------------------------------------
def _one_adam_step(backbone: FrozenViT, hgm: bool) -> tuple[Hash, torch.Tensor, list[torch.Tensor]]:
    m = _method(backbone, hgm=hgm, hdr=False, beta=0.1, pool_size=4, top_k=4, active_set_size=2)
    m.begin_task(_task(0))
    m.activation_counts.copy_(torch.tensor([5, 1, 9, 0]))
    m.begin_task(_task(1))
    before = m.experts.detach().clone()
    old_router = m.routers[0].detach().clone()
    opt = torch.optim.Adam(m.optimizer_param_groups(), lr=1e-2)
    assert all(p is not m.routers[0] for g in opt.param_groups for p in g["params"]), "old router optimised"
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 3, 32, 32, generator=g), torch.tensor([2, 3, 2, 3, 2, 3])
    m.train()
    m.training_loss(x, y, Phase.JOINT).backward()
    opt.step()
    m.after_optimizer_step()
    assert torch.equal(m.routers[0], old_router)
    return m, m.experts.detach() - before, [m.routers[1].detach().clone(), m.head.weight.detach().clone()]


def test_hgm_scales_the_adam_update_of_protected_experts(backbone: FrozenViT) -> None:
    m_on, d_on, rest_on = _one_adam_step(backbone, hgm=True)
    _, d_off, rest_off = _one_adam_step(backbone, hgm=False)
    protected = m_on.protected_experts().tolist()
    assert protected == [0, 2]
    others = [e for e in range(4) if e not in protected]
    for e in protected:
        assert d_off[e].abs().max() > 1e-3, "protected expert must have moved without HGM"
        assert torch.allclose(d_on[e], 0.1 * d_off[e], atol=1e-6)
    for e in others:
        assert d_off[e].abs().max() > 1e-3
        assert torch.allclose(d_on[e], d_off[e], atol=1e-7)
    for a, b in zip(rest_on, rest_off, strict=True):
        assert torch.allclose(a, b, atol=1e-7), "routers and head step exactly as without HGM"


# ---- TII -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lda", "ncm"])
def test_tii_identifies_tasks_from_class_statistics(kind: str) -> None:
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(6, 10, generator=g) * 4
    tii = ClassStatsTaskIdentifier(10, kind=kind)
    for t in range(3):
        labels = torch.arange(2 * t, 2 * t + 2).repeat_interleave(30)
        tii.fit(centres[labels] + torch.randn(60, 10, generator=g), labels, t)
    labels = torch.arange(6).repeat_interleave(20)
    pred = tii.predict_task(centres[labels] + torch.randn(120, 10, generator=g))
    assert (pred == labels // 2).float().mean() > 0.95
    restored = ClassStatsTaskIdentifier(10, kind=kind)
    restored.grow(tii.num_classes)
    restored.load_state_dict(tii.state_dict())
    assert torch.equal(restored.predict_task(centres), tii.predict_task(centres))


def test_config_validation() -> None:
    assert build_config("hash", {"layers": [0, 1]}).layers == (0, 1)  # type: ignore[attr-defined]
    bads: list[dict[str, Any]] = [{"top_k": 9}, {"beta": 1.5}, {"delta": -1.0}, {"tii": "knn"}]
    bads += [{"delta_scale": "std"}, {"score_std_momentum": 1.0}]
    bads.append({"layers": []})
    for bad in bads:
        with pytest.raises(ValueError):
            build_config("hash", bad)


# ---- trainer: H counts, checkpoints, end-to-end, resume --------------------------------------------
class _Probe(Callback):
    """Records H after every step and checks A_t / frozen routers when a task starts."""

    def __init__(self) -> None:
        self.h_sums: list[int] = []
        self.batch_sizes: list[int] = []
        self.frozen_ok: list[bool] = []

    def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
        self.h_sums.append(int(trainer.method.activation_counts.sum()))  # type: ignore[union-attr]

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        m = trainer.method
        assert isinstance(m, Hash)
        assert torch.equal(m.active_sets[task], m.most_activated())
        opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}  # type: ignore[union-attr]
        old_frozen = all(id(r) not in opt_ids and not r.requires_grad for r in list(m.routers)[:task])
        self.frozen_ok.append(old_frozen and id(m.routers[task]) in opt_ids)


class _StopAt(Callback):
    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
        if task == 1 and epoch == 0:
            raise RuntimeError("simulated interruption")


def _run(
    backbone: FrozenViT, ckpt: Path, seed: int, callbacks: list[Callback], resume: bool = False
) -> dict[str, Any]:
    stream = synthetic_stream(2, classes_per_task=2, per_class=16)
    trainer = Trainer(
        _method(backbone, seed=seed),
        stream,
        TrainConfig(epochs=2, batch_size=8, checkpoint_dir=str(ckpt)),
        callbacks=[TaskIdentificationCallback(), *callbacks],
    )
    results = trainer.fit(resume_from=ckpt if resume else None)
    results["_method"] = trainer.method
    return results


def test_end_to_end_h_counts_checkpoint_and_resume(backbone: FrozenViT, tmp_path: Path) -> None:
    probe = _Probe()
    full = _run(backbone, tmp_path / "full", seed=0, callbacks=[probe])
    m: Hash = full["_method"]

    # end-to-end: two tasks trained and evaluated, TII measured on test and train images
    assert len(full["accuracy_matrix"]) == 2 and len(full["accuracy_matrix"][1]) == 2
    assert 0.0 <= full["final_average_accuracy"] <= 1.0
    for rec in full["tasks"]:
        assert 0.0 <= rec["task_identification_accuracy"] <= 1.0
        assert 0.0 <= rec["task_identification_accuracy_train"] <= 1.0
        assert len(rec["task_identification_accuracy_per_task"]) == rec["task"] + 1
    assert probe.frozen_ok == [True, True]
    assert m.active_sets[1].sum() == TOP_K and not m.active_sets[0].any()

    # H: every step adds samples x layers x k (32 images per task: 4 steps of 8 per epoch)
    steps = torch.tensor([0, *probe.h_sums]).diff()
    assert steps.tolist() == [8 * LAYERS * TOP_K] * 16
    assert int(m.activation_counts.sum()) == 32 * 2 * 2 * LAYERS * TOP_K

    # H, A_t, routers and TII statistics survive the checkpoint
    loaded = load_model(tmp_path / "full", backbone=backbone).method
    assert isinstance(loaded, Hash)
    assert torch.equal(loaded.activation_counts, m.activation_counts)
    assert torch.equal(loaded.active_sets, m.active_sets)
    x = torch.stack([synthetic_stream(2, 2, 16).tasks[1].test[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(loaded.predict_task(x), m.predict_task(x))
        assert torch.allclose(loaded(x), m.eval()(x), atol=1e-6)

    # resume: interrupted after task 1's first epoch, continued by a fresh method -> identical results
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(backbone, tmp_path / "cut", seed=0, callbacks=[_StopAt()])
    resumed = _run(backbone, tmp_path / "cut", seed=123, callbacks=[], resume=True)
    r: Hash = resumed["_method"]
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert [t["task_identification_accuracy"] for t in resumed["tasks"]] == [
        t["task_identification_accuracy"] for t in full["tasks"]
    ]
    assert torch.equal(r.activation_counts, m.activation_counts)
    assert torch.allclose(r.experts, m.experts, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r.routers, m.routers, strict=True))


def test_oom_retry_counts_each_selection_once(backbone: FrozenViT) -> None:
    """A step whose micro-batch OOMs mid-way is redone at half the micro-batch; H counts the batch once."""
    m = _method(backbone)
    stream = synthetic_stream(1, classes_per_task=2, per_class=4)
    trainer = Trainer(m, stream, TrainConfig(epochs=1, batch_size=8, micro_batch_size=4))
    m.begin_task(_task(0))
    trainer.optimizer = trainer._build_optimizer()
    real = m.training_loss
    calls = {"n": 0}

    def flaky(x: torch.Tensor, y: torch.Tensor, phase: Phase) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:  # the first attempt's second micro-batch, after the first one was counted
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(x, y, phase)

    m.training_loss = flaky  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.tensor([0, 1] * 4)
    m.train()
    trainer._step(x, y, Phase.JOINT, cached=False)
    assert trainer.state.micro_batch_size == 2 and calls["n"] == 1 + 1 + 4  # retried in 4 halves
    assert int(m.activation_counts.sum()) == 8 * LAYERS * TOP_K
    assert int(m._pending.sum()) == 0


def test_hdr_penalty_is_delta_running_score_stds(backbone: FrozenViT) -> None:
    """``delta_scale=score_std``: A_t's scores drop by delta x the router's running spread across experts;
    the spread is committed at each training step's end (momentum), and inference uses the same value."""
    m = _method(backbone, delta=2.0, score_std_momentum=0.5)
    m.begin_task(_task(0))
    m.activation_counts.copy_(torch.tensor([3, 0, 9, 1, 7, 0, 2, 0]))
    m.begin_task(_task(1))
    a1 = m.active_sets[1]
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(5, 3, 32, 32, generator=g), torch.tensor([2, 3, 2, 3, 2])
    opt = torch.optim.SGD(m.optimizer_param_groups(), lr=0.0)  # a step that changes no parameter
    for _ in range(2):
        m.train()
        m.training_loss(x, y, Phase.JOINT).backward()
        opt.step()
        m.after_optimizer_step()
    # block 0's input is prompt-free: its raw spread is the same at both steps
    s0 = m.last_routing[0]
    m.eval()
    with torch.no_grad():
        m.cfg.hdr = False
        m.train_features(x, Phase.JOINT)
        free = m.last_routing[0].scores.clone()
        m.cfg.hdr = True
        m.task_features(x, torch.ones(5, dtype=torch.long))
        infer = m.last_routing[0].scores.clone()
    step_std = free.std(dim=1).mean()
    assert bool(m.score_std_seen[1]) and float(m.score_std[1, 0]) == pytest.approx(float(step_std), rel=1e-5)
    diff = infer - free
    assert torch.allclose(diff[:, a1], torch.full_like(diff[:, a1], -2.0 * float(step_std)), atol=1e-6)
    assert torch.equal(diff[:, ~a1], torch.zeros_like(diff[:, ~a1]))
    assert torch.allclose(s0.scores, infer, atol=1e-6)  # training's last step used the same penalty
    # the penalty demotes, it does not ban: smaller than the spread of the scores it is applied to
    assert 2.0 * float(step_std) < float(free.max(1).values.mean() - free.min(1).values.mean())


def test_model_saved_before_score_std_loads_with_its_absolute_penalty(
    backbone: FrozenViT, tmp_path: Path
) -> None:
    """A checkpoint from before ``delta_scale`` (no running-spread buffers, no such config keys) loads, and
    keeps the absolute HDR penalty it was trained with instead of taking today's ``score_std`` default."""
    from edgecl.train.checkpoint import load_checkpoint, save_checkpoint

    stream = synthetic_stream(2, classes_per_task=2, per_class=8)
    trainer = Trainer(
        _method(backbone, delta=0.5, delta_scale="absolute"),
        stream,
        TrainConfig(epochs=1, batch_size=8, checkpoint_dir=str(tmp_path / "new")),
        callbacks=[TaskIdentificationCallback()],
    )
    trainer.fit()
    new = load_checkpoint(tmp_path / "new")
    meta = dict(new.meta)
    meta["method_config"] = {
        k: v for k, v in meta["method_config"].items() if k not in ("delta_scale", "score_std_momentum")
    }
    tensors = {k: v for k, v in new.tensors.items() if not k.startswith("method.score_std")}
    assert len(tensors) == len(new.tensors) - 2
    save_checkpoint(tmp_path / "old", meta, tensors)

    old = load_model(tmp_path / "old", backbone=backbone).method
    assert isinstance(old, Hash)
    assert old.cfg.delta_scale == "absolute" and old.cfg.delta == 0.5
    assert not old.score_std_seen.any() and old.score_std.shape == (2, LAYERS)
    ref = load_model(tmp_path / "new", backbone=backbone).method
    x = torch.stack([stream.tasks[1].test[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(old(x), ref(x))
    # a config someone writes today (no delta_scale) still gets the current default
    assert build_config("hash", {"delta": 0.5}).delta_scale == "score_std"  # type: ignore[attr-defined]
