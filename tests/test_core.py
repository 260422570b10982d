"""Methods + trainer: CPS token counts, DPCT, phase-2 cache, CODA freezing, masking, resume, metrics."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import Phase, TaskInfo, create_method, get_method_class, list_methods
from edgecl.methods.base import masked_cross_entropy
from edgecl.methods.layers import cosine_lr
from edgecl.train import Callback, TrainConfig, Trainer, summarize
from edgecl.train.checkpoint import load_checkpoint
from edgecl.train.model_io import load_model

SMALL = {"expected_tasks": 2, "pool_size": 10}


def _stream(per_class: int = 8):  # type: ignore[no-untyped-def]
    return synthetic_stream(2, classes_per_task=2, per_class=per_class, test_per_class=4, img_size=32)


def _method(name: str, vit: FrozenViT, **extra):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    fields = set(get_method_class(name).Config.model_fields)
    opts: dict[str, Any] = {"expected_tasks": 2}
    if "pool_size" in fields and name != "hash":  # small pools (CODA family, L2P, I-Prompt)
        opts["pool_size"] = SMALL["pool_size"]
    opts.update(extra)
    return create_method(name, vit, opts)


def test_metrics_hand_computation() -> None:
    acc = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]]
    m = summarize(acc)
    assert m["final_average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["average_incremental_accuracy"] == pytest.approx((0.9 + 0.7 + 0.7) / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


def test_cosine_schedule_matches_coda() -> None:
    assert cosine_lr(1e-3, 0, 20) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 19, 20) == pytest.approx(1e-3 * math.cos(99 * math.pi / 200), rel=1e-9)
    assert cosine_lr(1e-3, 8, 20) == pytest.approx(1e-3 * math.cos(99 * math.pi * 8 / (200 * 19)))


def test_masked_cross_entropy() -> None:
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0]])
    loss = masked_cross_entropy(logits, torch.tensor([2]), n_past=2, n_seen=4)
    expected = -torch.log_softmax(torch.tensor([1.0, 2.0]), 0)[0]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def _count_tokens(vit: FrozenViT) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = vit.vit.blocks[-2].norm1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("r", [0.4, 0.5])
def test_cps_token_counts_per_phase(tiny_vit: FrozenViT, r: float) -> None:
    m = _method("cps_prompt", tiny_vit, reduction_rate=r)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 0])
    k = math.floor((1 - r) * 16)
    seen, h = _count_tokens(tiny_vit)
    m.training_loss(x, y, Phase.SPARSE)
    assert seen == [17, 1 + k]  # query pass (full), prompted pass (CLS + k patches)
    seen.clear()
    m.training_loss(x, y, Phase.HEAD)
    assert seen == [17, 17]
    seen.clear()
    m(x)
    assert seen == [17, 17]
    h.remove()


def test_dpct_phase_schedule(tiny_vit: FrozenViT) -> None:
    m = _method("cps_prompt", tiny_vit, phase_ratio=0.4)
    assert [m.phase(e, 20) for e in range(20)].count(Phase.SPARSE) == 8
    assert m.phase(7, 20) is Phase.SPARSE and m.phase(8, 20) is Phase.HEAD
    m0 = _method("cps_prompt", tiny_vit, phase_ratio=0.4, min_prompt_epochs=0)
    assert m0.phase(0, 2) is Phase.HEAD  # the reference's exact floor(λE) = 0
    assert _method("cps_prompt", tiny_vit, phase_ratio=0.4).phase(0, 2) is Phase.SPARSE


class Snapshot(Callback):
    """Records prompt/head tensors at phase boundaries."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, torch.Tensor]] = {}

    def _snap(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.method.trainable_state_dict().items()}

    def on_phase_start(self, trainer: Trainer, task: int, phase: Phase) -> None:
        self.at[f"{task}-{phase.value}-start"] = self._snap(trainer)

    def on_phase_end(self, trainer: Trainer, task: int, phase: Phase) -> None:
        self.at[f"{task}-{phase.value}-end"] = self._snap(trainer)


def test_dpct_prompt_frozen_in_phase2_head_trains(tiny_vit: FrozenViT) -> None:
    snap = Snapshot()
    m = _method("cps_prompt", tiny_vit, phase_ratio=0.5)
    Trainer(m, _stream(), TrainConfig(epochs=4, batch_size=8), [snap]).fit()
    start, end = snap.at["1-head-start"], snap.at["1-head-end"]
    prompt_keys = [k for k in start if k.startswith("prompt.")]
    assert prompt_keys and all(torch.equal(start[k], end[k]) for k in prompt_keys)
    assert not torch.equal(start["head.weight"], end["head.weight"])
    sp0, sp1 = snap.at["1-sparse-start"], snap.at["1-sparse-end"]
    assert not torch.equal(sp0["prompt.p_0"], sp1["prompt.p_0"])  # phase 1 trains the prompt


def test_phase2_cache_equals_recompute(tiny_vit: FrozenViT) -> None:
    heads = []
    for cache in ("on", "off"):
        m = _method("cps_prompt", tiny_vit, phase_ratio=0.5, phase2_cache=cache, phase2_head="sgd")
        Trainer(m, _stream(), TrainConfig(epochs=3, batch_size=8, seed=3)).fit()
        heads.append(m.head.weight.detach().clone())
    # identical up to float noise: the cache is built in eval batches of 64, recomputation in batches of 8
    assert torch.allclose(heads[0], heads[1], atol=1e-3)
    assert (heads[0] - heads[1]).abs().max() < 0.01 * heads[0].abs().max()


def test_coda_earlier_components_frozen(tiny_vit: FrozenViT) -> None:
    snap = Snapshot()
    m = _method("coda_prompt", tiny_vit)
    Trainer(m, _stream(), TrainConfig(epochs=2, batch_size=8), [snap]).fit()
    before, after = snap.at["1-joint-start"], snap.at["1-joint-end"]
    per, end = m.prompt.component_range(1)
    for name in ("p_0", "k_0", "a_0", "p_4"):
        assert torch.equal(before[f"prompt.{name}"][:per], after[f"prompt.{name}"][:per])  # task 0's, frozen
        assert not torch.equal(before[f"prompt.{name}"][per:end], after[f"prompt.{name}"][per:end])


def test_new_components_gram_schmidt(tiny_vit: FrozenViT) -> None:
    m = _method("coda_prompt", tiny_vit)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    m.begin_task(TaskInfo(1, [2, 3], 2))
    k = m.prompt.k_0.detach()[:10]
    gram = k @ k.T
    assert torch.allclose(gram, torch.eye(10), atol=1e-5)


def test_class_masking_in_training(tiny_vit: FrozenViT) -> None:
    m = _method("coda_prompt", tiny_vit)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    m.begin_task(TaskInfo(1, [2, 3], 2))
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([2, 3])
    loss = m.training_loss(x, y, Phase.JOINT)
    loss.backward()
    assert m.head.weight.grad is not None
    assert torch.all(m.head.weight.grad[:2] == 0)  # old classes' rows get no gradient
    assert m.head.weight.grad[2:].abs().sum() > 0


@pytest.mark.parametrize("name", list_methods())
def test_end_to_end_each_method_learns(tiny_vit: FrozenViT, name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every method beats chance by a margin on the separable synthetic stream (2 tasks x 2 classes):
    task 0 after task 0 (chance 0.5) and the final average over 4 classes (chance 0.25). lr 1e-2 and 3
    epochs so that the slowest learners get there in 6 steps; at seed 0 the lowest final average
    measured was 0.66 (l2p; seeds 0 and 2 ranged 0.66-1.0 over the methods)."""
    extra: dict[str, Any] = {"lr": 1e-2}
    if "dpw_lr_scale" in get_method_class(name).Config.model_fields:
        extra["dpw_lr_scale"] = 1.0  # lr 1e-2 is already DPW's default slot rate order (3e-2)
    m = _method(name, tiny_vit, **extra)
    stream = synthetic_stream(2, classes_per_task=2, per_class=8, test_per_class=8, img_size=32)
    res = Trainer(m, stream, TrainConfig(epochs=3, batch_size=8, model_dir=str(tmp_path))).fit()
    acc = res["accuracy_matrix"]
    assert [len(row) for row in acc] == [1, 2]
    assert acc[0][0] >= 0.9, acc
    assert res["final_average_accuracy"] >= 0.5, acc
    loaded = load_model(tmp_path, backbone=tiny_vit)
    assert loaded.class_names == res["class_order"]
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.logits(x), m(x)[:, :4], atol=1e-5)


def test_registry_lists_core_methods() -> None:
    assert {"coda_prompt", "cps_prompt", "patchdropout", "l2p", "dualprompt"} <= set(list_methods())
    with pytest.raises(ValueError, match="unknown method"):
        create_method("nope", None)  # type: ignore[arg-type]


def test_unknown_option_named(tiny_vit: FrozenViT) -> None:
    with pytest.raises(ValueError, match="reduction_ratee"):
        create_method("cps_prompt", tiny_vit, {"reduction_ratee": 0.3})
    with pytest.raises(ValueError, match="reduction_rate"):
        create_method("cps_prompt", tiny_vit, {"reduction_rate": 1.5})


class Interrupt(Callback):
    """Simulates a crash after a given epoch's checkpoint."""

    def __init__(self, task: int, epoch: int) -> None:
        self.task, self.epoch = task, epoch

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict) -> None:  # type: ignore[type-arg]
        if (task, epoch) == (self.task, self.epoch):
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize(("task", "epoch"), [(0, 1), (1, 0), (1, 2)])
def test_resume_equals_uninterrupted(tiny_vit: FrozenViT, tmp_path, task: int, epoch: int) -> None:  # type: ignore[no-untyped-def]
    cfg = {"epochs": 3, "batch_size": 8, "seed": 5}
    full = Trainer(_method("cps_prompt", tiny_vit), _stream(), TrainConfig(**cfg)).fit()
    d = str(tmp_path / f"ckpt-{task}-{epoch}")
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            _method("cps_prompt", tiny_vit),
            _stream(),
            TrainConfig(**cfg, checkpoint_dir=d),
            [Interrupt(task, epoch)],
        ).fit()
    assert load_checkpoint(d).meta["epochs_done"] == epoch + 1
    torch.manual_seed(999)  # a different RNG state must not matter
    resumed = Trainer(_method("cps_prompt", tiny_vit), _stream(), TrainConfig(**cfg, checkpoint_dir=d)).fit(
        resume_from=d
    )
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_checkpoint_is_atomic_and_corruption_is_clear(tiny_vit: FrozenViT, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "c"
    Trainer(
        _method("cps_prompt", tiny_vit), _stream(), TrainConfig(epochs=1, batch_size=8, checkpoint_dir=str(d))
    ).fit()
    files = sorted(p.name for p in d.iterdir())
    assert files[0] == "checkpoint.json" and len([f for f in files if f.startswith("tensors-")]) == 1
    meta = json.loads((d / "checkpoint.json").read_text())
    assert meta["task_complete"] and meta["task"] == 1
    (d / "checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(d)


def test_resume_rejects_other_stream(tiny_vit: FrozenViT, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path / "c")
    Trainer(
        _method("cps_prompt", tiny_vit), _stream(), TrainConfig(epochs=1, batch_size=8, checkpoint_dir=d)
    ).fit()
    other = synthetic_stream(2, classes_per_task=2, per_class=8, img_size=32, seed=1)
    other.class_order = [f"x{i}" for i in range(4)]
    with pytest.raises(ValueError, match="class order"):
        Trainer(_method("cps_prompt", tiny_vit), other, TrainConfig(epochs=1, batch_size=8)).fit(
            resume_from=d
        )


def test_micro_batches_equal_full_batch_gradient(tiny_vit: FrozenViT) -> None:
    m = _method("coda_prompt", tiny_vit)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 1, 0])
    tr = Trainer(m, _stream(), TrainConfig(epochs=1, batch_size=6))
    grads = []
    for micro in (None, 4, 1):
        tr.optimizer = torch.optim.SGD(m.trainable_parameters(Phase.JOINT), lr=0.0)
        tr.state.micro_batch_size = micro
        tr._step(x, y, Phase.JOINT, cached=False)
        grads.append(torch.cat([p.grad.flatten() for p in m.trainable_parameters(Phase.JOINT)]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and torch.allclose(grads[0], grads[2], atol=1e-5)


def test_cancel_at_step_boundary(tiny_vit: FrozenViT) -> None:
    from edgecl.train import TrainingCancelled

    class Stop(Callback):
        def on_step_end(self, trainer: Trainer, task: int, epoch: int, step: int, loss: float) -> None:
            trainer.request_stop()

    with pytest.raises(TrainingCancelled):
        Trainer(
            _method("cps_prompt", tiny_vit), _stream(), TrainConfig(epochs=1, batch_size=8), [Stop()]
        ).fit()
