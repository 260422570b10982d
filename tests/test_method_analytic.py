"""simplecil, linear_probe and the closed-form phase-2 heads (prototype / ridge) against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import Phase, TaskInfo, create_method, list_methods
from edgecl.methods.analytic import AnalyticStats, class_means
from edgecl.methods.base import masked_cross_entropy
from edgecl.train import Callback, TrainConfig, Trainer
from edgecl.train.checkpoint import load_checkpoint
from edgecl.train.model_io import load_model

CPS = {"expected_tasks": 2, "pool_size": 10}


def _stream(per_class: int = 8):  # type: ignore[no-untyped-def]
    return synthetic_stream(2, classes_per_task=2, per_class=per_class, test_per_class=4, img_size=32)


def _feats(fn, data) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Features of a dataset through ``fn`` (no grad), and its labels."""
    xs, ys = zip(*[data[i] for i in range(len(data))], strict=True)
    with torch.no_grad():
        return fn(torch.stack(xs)), torch.as_tensor(ys)


def test_registered() -> None:
    assert {"simplecil", "linear_probe"} <= set(list_methods())


def test_simplecil_prototypes_are_hand_means(tiny_vit: FrozenViT) -> None:
    stream = _stream()
    m = create_method("simplecil", tiny_vit, {"expected_tasks": 2})
    res = Trainer(m, stream, TrainConfig(epochs=2, batch_size=8)).fit()
    m.eval()
    for task in stream.tasks:
        feats, labels = _feats(tiny_vit.features, task.train_eval)
        for c in task.classes:
            hand = feats[labels == c].sum(0) / int((labels == c).sum())
            assert torch.allclose(m.head.weight[c], hand, atol=1e-5)
    # the cosine classifier, by hand, on one test batch
    x = torch.stack([stream.tasks[1].test[i][0] for i in range(4)])
    f = tiny_vit.features(x)
    hand = (f / f.norm(dim=1, keepdim=True)) @ (m.head.weight / m.head.weight.norm(dim=1, keepdim=True)).T
    assert torch.allclose(m(x), hand, atol=1e-5)
    assert len(res["accuracy_matrix"]) == 2


def test_simplecil_trains_nothing(tiny_vit: FrozenViT) -> None:
    """No optimiser step ever: the loop's step counter stays at zero."""
    m = create_method("simplecil", tiny_vit, {"expected_tasks": 2})
    tr = Trainer(m, _stream(), TrainConfig(epochs=3, batch_size=8))
    tr.fit()
    assert tr.state.global_step == 0


def test_linear_probe_masks_earlier_logits(tiny_vit: FrozenViT) -> None:
    """Task 2's loss is CE over the seen classes with task 1's logits at -inf: old rows get zero gradient."""
    m = create_method("linear_probe", tiny_vit, {"expected_tasks": 2})
    m.begin_task(TaskInfo(0, [0, 1], 0))
    m.begin_task(TaskInfo(1, [2, 3], 2))
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([2, 3, 2, 3, 2, 2])
    feats = tiny_vit.features(x)
    loss = m.training_loss(x, y, Phase.HEAD)
    hand = masked_cross_entropy(feats @ m.head.weight.T + m.head.bias, y, 2, 4)
    assert torch.allclose(loss, hand, atol=1e-6)
    loss.backward()
    assert torch.all(m.head.weight.grad[:2] == 0) and torch.all(m.head.bias.grad[:2] == 0)
    assert m.head.weight.grad[2:].abs().sum() > 0
    assert [p.shape for p in m.trainable_parameters(Phase.HEAD)] == [(4, tiny_vit.embed_dim), (4,)]


@pytest.mark.parametrize("name", ["simplecil", "linear_probe"])
def test_baselines_learn(tiny_vit: FrozenViT, name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Both beat chance (25 % over 4 classes) on the separable synthetic stream, and reload as saved."""
    opts = {"expected_tasks": 2} | ({"lr": 0.01} if name == "linear_probe" else {})
    m = create_method(name, tiny_vit, opts)
    res = Trainer(m, _stream(16), TrainConfig(epochs=4, batch_size=8, model_dir=str(tmp_path))).fit()
    assert res["final_average_accuracy"] >= 0.5, res["accuracy_matrix"]
    loaded = load_model(tmp_path, backbone=tiny_vit)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert torch.allclose(loaded.logits(x), m(x)[:, :4], atol=1e-5)


def test_ridge_equals_normal_equations() -> None:
    """Statistics over two tasks solve the joint ridge problem: torch.linalg.solve on all data at once."""
    gen = torch.Generator().manual_seed(0)
    d, lam = 6, 0.5
    x1, y1 = torch.randn(20, d, generator=gen), torch.tensor([0, 1] * 10)
    x2, y2 = torch.randn(14, d, generator=gen) + 1.0, torch.tensor([2, 3] * 7)
    stats = AnalyticStats(d)
    stats.grow(2)
    stats.accumulate(x1, y1, [0, 1])
    stats.accumulate(x1, y1, [0, 1])  # refitting a task (a resumed run) must not count it twice
    stats.commit_task()
    stats.grow(4)
    stats.accumulate(x2, y2, [2, 3])
    weight, bias = stats.ridge(4, lam)
    xa = torch.cat([torch.cat([x1, x2]), torch.ones(34, 1)], 1).double()
    ya = F.one_hot(torch.cat([y1, y2]), 4).double()
    hand = torch.linalg.solve(xa.T @ xa + lam * torch.eye(d + 1, dtype=torch.float64), xa.T @ ya)
    assert torch.allclose(weight.double(), hand[:-1].T, atol=1e-4)
    assert torch.allclose(bias.double(), hand[-1], atol=1e-4)
    assert torch.allclose(stats.means(4)[3], x2[y2 == 3].mean(0), atol=1e-5)


def test_class_means_by_hand() -> None:
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    assert class_means(feats, torch.tensor([5, 5, 7]), [7, 5]).tolist() == [[10.0, 0.0], [2.0, 3.0]]
    with pytest.raises(ValueError, match="class 9"):
        class_means(feats, torch.tensor([5, 5, 7]), [9])


class _HeadSnapshots(Callback):
    """Optimiser steps of every epoch."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict) -> None:  # type: ignore[type-arg]
        self.steps.append(trainer.state.step)


@pytest.mark.parametrize("kind", ["prototype", "ridge"])
def test_cps_closed_form_head_by_hand(tiny_vit: FrozenViT, kind: str) -> None:
    """After training, the head equals the hand computation on the cached full-patch prompted features.

    The prompt is frozen in phase 2, so features computed after a task equal the ones phase 2 cached."""
    stream = _stream()
    torch.manual_seed(0)
    m = create_method("cps_prompt", tiny_vit, {**CPS, "phase2_head": kind, "ridge_lambda": 2.0})
    snap = _HeadSnapshots()
    Trainer(m, stream, TrainConfig(epochs=3, batch_size=8), [snap]).fit()
    # epochs 0 is sparse (steps), 1-2 closed form (no steps), for both tasks
    assert snap.steps == [2, 0, 0, 2, 0, 0]
    m.eval()
    f1, l1 = _feats(m.features, stream.tasks[1].train_eval)
    # task 0 was fitted with the task-0 prompt (task 1 adds components): the same run stopped after task 0
    torch.manual_seed(0)
    m0 = create_method("cps_prompt", tiny_vit, {**CPS, "phase2_head": kind, "ridge_lambda": 2.0})
    Trainer(m0, stream, TrainConfig(epochs=3, batch_size=8, max_tasks=1)).fit()
    m0.eval()
    f0, l0 = _feats(m0.features, stream.tasks[0].train_eval)
    if kind == "prototype":
        for feats, labels, task in ((f0, l0, stream.tasks[0]), (f1, l1, stream.tasks[1])):
            for c in task.classes:
                mean = feats[labels == c].mean(0)
                assert torch.allclose(m.head.weight[c], mean / mean.norm(), atol=1e-5)
                assert float(m.head.bias[c].detach()) == 0.0
        assert torch.equal(m.head.weight[:2], m0.head.weight[:2])  # earlier prototypes are kept
    else:
        xa = torch.cat([torch.cat([f0, f1]), torch.ones(f0.shape[0] + f1.shape[0], 1)], 1).double()
        ya = F.one_hot(torch.cat([l0, l1]), 4).double()
        hand = torch.linalg.solve(xa.T @ xa + 2.0 * torch.eye(xa.shape[1], dtype=torch.float64), xa.T @ ya)
        assert torch.allclose(m.head.weight.double(), hand[:-1].T, atol=1e-4)
        assert torch.allclose(m.head.bias.double(), hand[-1], atol=1e-4)


class _Interrupt(Callback):
    def __init__(self, task: int, epoch: int) -> None:
        self.task, self.epoch = task, epoch

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict) -> None:  # type: ignore[type-arg]
        if (task, epoch) == (self.task, self.epoch):
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("epoch", [0, 1])
def test_closed_form_resume_equals_uninterrupted(tiny_vit: FrozenViT, tmp_path, epoch: int) -> None:  # type: ignore[no-untyped-def]
    """A ridge run interrupted in task 2 (before / after its solve) resumes to the same head and accuracy."""
    opts = {**CPS, "phase2_head": "ridge"}
    cfg = {"epochs": 3, "batch_size": 8, "seed": 5}
    torch.manual_seed(0)
    full_m = create_method("cps_prompt", tiny_vit, opts)
    full = Trainer(full_m, _stream(), TrainConfig(**cfg)).fit()
    d = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        torch.manual_seed(0)
        m = create_method("cps_prompt", tiny_vit, opts)
        Trainer(m, _stream(), TrainConfig(**cfg, checkpoint_dir=d), [_Interrupt(1, epoch)]).fit()
    assert load_checkpoint(d).meta["epochs_done"] == epoch + 1
    resumed_m = create_method("cps_prompt", tiny_vit, opts)
    resumed = Trainer(resumed_m, _stream(), TrainConfig(**cfg, checkpoint_dir=d)).fit(resume_from=d)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert torch.allclose(resumed_m.head.weight, full_m.head.weight, atol=1e-5)


def test_closed_form_head_options_validated(tiny_vit: FrozenViT) -> None:
    with pytest.raises(ValueError, match="phase2_head"):
        create_method("cps_prompt", tiny_vit, {**CPS, "phase2_head": "lstsq"})
    with pytest.raises(ValueError, match="phase2_transform=eval"):
        create_method("cps_prompt", tiny_vit, {**CPS, "phase2_head": "ridge", "phase2_transform": "train"})
    with pytest.raises(ValueError, match="ridge_lambda"):
        create_method("linear_probe", tiny_vit, {"phase2_head": "ridge", "ridge_lambda": 0})


@pytest.mark.parametrize("name", ["cps_prompt", "patchdropout"])
def test_dpct_default_head_is_ridge_and_augmented_phase2_falls_back_to_sgd(
    tiny_vit: FrozenViT, name: str
) -> None:
    """The DPCT methods solve their head by default; ``phase2_transform=train`` alone keeps the SGD head
    (an augmented phase 2 is no deterministic pass), and the dumped config reads back to the same head."""
    from edgecl.methods.base import describe_config

    m = create_method(name, tiny_vit, dict(CPS))
    assert m.cfg.phase2_head == "ridge" and m.closed_form_head()
    aug = create_method(name, tiny_vit, {**CPS, "phase2_transform": "train"})
    assert aug.cfg.phase2_head == "sgd" and not aug.closed_form_head()
    again = create_method(name, tiny_vit, describe_config(aug.cfg))
    assert again.cfg.phase2_head == "sgd" and again.cfg.phase2_transform == "train"


def test_baselines_in_every_bench() -> None:
    """``--methods all`` runs both floors right after the paper's methods; CPS-only flags are not passed."""
    import argparse

    from edgecl.commands.bench import _order, register
    from edgecl.commands.bench_specs import build_specs

    order = _order(["all"], list_methods())
    assert order[:7] == [
        "cps_prompt",
        "coda_prompt",
        "patchdropout",
        "l2p",
        "dualprompt",
        "linear_probe",
        "simplecil",
    ]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--reduction-rate", "0.25", "--tasks", "2"])
    request = {
        "args": {k: v for k, v in vars(args).items() if k not in {"func", "bench_parser", "command"}},
        "methods": ["all"],
    }
    out = build_specs(request)
    assert {"simplecil", "linear_probe"} <= set(out["specs"])
    assert out["specs"]["linear_probe"]["method_options"] == {}
    assert "reduction_rate" in out["dropped"]["simplecil"]


class _Steps(Callback):
    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict) -> None:  # type: ignore[type-arg]
        self.per_epoch.append(trainer.state.step)


@pytest.mark.parametrize(("min_steps", "passes"), [(0, 1), (4, 1), (5, 2), (10, 3)])
def test_min_steps_repeats_passes_per_epoch(tiny_vit: FrozenViT, min_steps: int, passes: int) -> None:
    """16 images per task, batch 8, 2 epochs = 4 steps; min_steps raises it in whole passes over the data."""
    m = create_method("linear_probe", tiny_vit, {"expected_tasks": 2, "transform": "train"})
    seen: list[int] = []
    loss = m.training_loss

    def counting(x, y, phase):  # type: ignore[no-untyped-def]
        seen.extend(y.tolist())
        return loss(x, y, phase)

    m.training_loss = counting  # type: ignore[method-assign]
    steps = _Steps()
    res = Trainer(m, _stream(8), TrainConfig(epochs=2, batch_size=8, min_steps=min_steps), [steps]).fit()
    assert steps.per_epoch == [2 * passes] * 4
    assert [t["passes_per_epoch"] for t in res["tasks"]] == [passes, passes]
    # every pass is a whole permutation: each image once per pass
    assert [seen.count(c) for c in range(4)] == [8 * passes * 2] * 4
    with pytest.raises(ValueError, match="min_steps"):
        TrainConfig(min_steps=-1).validate()


def test_checkpoint_from_before_phase2_head_loads_with_sgd(tiny_vit: FrozenViT, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model saved before the option existed (no phase2_head, no statistics) loads and keeps sgd."""
    import json

    torch.manual_seed(0)
    m = create_method("cps_prompt", tiny_vit, {**CPS, "phase2_head": "sgd"})
    Trainer(m, _stream(), TrainConfig(epochs=2, batch_size=8, model_dir=str(tmp_path))).fit()
    meta_path = tmp_path / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    for key in ("phase2_head", "ridge_lambda"):
        meta["method_config"].pop(key)
    meta["method_meta"].pop("phase2_head")
    meta_path.write_text(json.dumps(meta))
    loaded = load_model(tmp_path, backbone=tiny_vit)
    assert loaded.method.cfg.phase2_head == "sgd" and not loaded.method.closed_form_head()
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert torch.allclose(loaded.logits(x), m(x)[:, :4], atol=1e-5)
