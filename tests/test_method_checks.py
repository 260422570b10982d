"""Hand-computed checks of the prompt methods' mechanisms (#18.8) and the shared layer check (#19.6)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import Phase, TaskInfo, create_method, list_methods
from edgecl.methods.coda_prompt import CodaPrompt
from edgecl.methods.cps_prompt import CpsPrompt
from edgecl.methods.dualprompt import DualPrompt
from edgecl.methods.l2p import L2P
from edgecl.methods.layers import CodaPromptPool, cosine_lr
from edgecl.methods.prompting import check_layers
from edgecl.train import Callback, TrainConfig, Trainer


def test_coda_prompt_is_the_attention_weighted_sum_of_components() -> None:
    """α_k = cos(q ⊙ A_k, K_k); prompt = Σ_k α_k P_k, first half keys, second half values (by loops)."""
    torch.manual_seed(0)
    d, m, length = 6, 4, 4
    pool = CodaPromptPool(d, layers=(0,), pool_size=m, length=length, num_tasks=2)
    pool.set_task(1)  # components 0..3 in use, 0..1 detached
    q = torch.randn(3, d, dtype=torch.float64)
    pool.double()
    k, a, p = pool.k_0.detach(), pool.a_0.detach(), pool.p_0.detach()
    pk, pv = pool.prefixes(q, train=False)[0]
    for b in range(3):
        alpha = []
        for c in range(m):
            qa = [float(q[b, j] * a[c, j]) for j in range(d)]
            dot = sum(qa[j] * float(k[c, j]) for j in range(d))
            alpha.append(dot / (math.sqrt(sum(v * v for v in qa)) * math.sqrt(float((k[c] ** 2).sum()))))
        for pos in range(length):
            want = [sum(alpha[c] * float(p[c, pos, j]) for c in range(m)) for j in range(d)]
            got = (pk if pos < length // 2 else pv)[b, pos % (length // 2)]
            assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_coda_uses_only_components_up_to_the_current_task() -> None:
    torch.manual_seed(0)
    pool = CodaPromptPool(4, layers=(0,), pool_size=4, length=2, num_tasks=2)
    q = torch.randn(2, 4)
    before = pool.prefixes(q, train=False)[0][0]
    with torch.no_grad():
        pool.p_0[2:] += 100.0  # task 1's components: unused while the pool is at task 0
    assert torch.equal(pool.prefixes(q, train=False)[0][0], before)


def _l2p(vit: FrozenViT, **cfg: Any) -> L2P:
    torch.manual_seed(0)
    m = create_method(
        "l2p", vit, {"expected_tasks": 2, "pool_size": 5, "top_k": 2, "prompt_length": 2, **cfg}
    )
    assert isinstance(m, L2P)
    return m


def test_l2p_top_k_selection_and_pull_loss_by_hand(tiny_vit: FrozenViT) -> None:
    m = _l2p(tiny_vit, pull_constraint=0.5)
    d = tiny_vit.embed_dim
    q = F.normalize(torch.randn(3, d), dim=1)
    prefixes, loss = m.query_prefixes(q, train=True)
    keys, prompts = m.keys["0"].detach(), m.prompts["0"].detach()
    total = 0.0
    for b in range(3):
        cos = [float(q[b] @ keys[i] / keys[i].norm()) for i in range(5)]
        top = sorted(range(5), key=lambda i: -cos[i])[:2]
        total += sum(1.0 - cos[i] for i in top)
        want_k = torch.stack([prompts[i, 0] for i in top])  # first half of each selected prompt: keys
        want_v = torch.stack([prompts[i, 1] for i in top])
        assert torch.allclose(prefixes[0][0][b], want_k, atol=1e-6)
        assert torch.allclose(prefixes[0][1][b], want_v, atol=1e-6)
    assert loss is not None and float(loss.detach()) == pytest.approx(0.5 * total / 3, abs=1e-5)
    _, no_loss = m.query_prefixes(q, train=False)
    assert no_loss is None


def test_l2p_pull_loss_reaches_selected_keys_only(tiny_vit: FrozenViT) -> None:
    m = _l2p(tiny_vit)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    x = torch.randn(2, 3, 32, 32)
    m.train_features(x, Phase.JOINT)
    loss = m.extra_loss()
    assert loss is not None and m.extra_loss() is None  # handed out once
    loss.backward()
    q = F.normalize(tiny_vit.query(x).cls, dim=1)
    chosen = (q @ F.normalize(m.keys["0"].detach(), dim=1).T).topk(2, dim=1).indices.unique()
    grad = m.keys["0"].grad
    assert grad is not None
    rows = grad.abs().sum(1) > 0
    assert rows.nonzero().flatten().tolist() == sorted(chosen.tolist())


def test_dualprompt_bootstraps_task_id_in_training_and_argmaxes_at_inference(tiny_vit: FrozenViT) -> None:
    torch.manual_seed(0)
    m = create_method("dualprompt", tiny_vit, {"expected_tasks": 2})
    assert isinstance(m, DualPrompt)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    m.num_tasks_seen = 1
    m.begin_task(TaskInfo(1, [2, 3], 2))
    m.num_tasks_seen = 2
    q = F.normalize(torch.randn(4, tiny_vit.embed_dim), dim=1)
    with torch.no_grad():
        for layer in m.e_keys:
            m.e_keys[layer][0] = q[0] * 10  # image 0 matches task 0's key best; the others task 1's
            m.e_keys[layer][1] = q[1:].mean(0)
    train, loss = m.query_prefixes(q, train=True)
    infer, _ = m.query_prefixes(q, train=False)
    for layer, pool in m.e_prompts.items():
        half = m.cfg.e_length // 2
        pool = pool.detach()
        assert torch.equal(train[int(layer)][0], pool[1, :half].expand(4, -1, -1))  # the task's own, always
        idx = (q @ F.normalize(m.e_keys[layer].detach()[:2], dim=1).T).argmax(1)
        assert idx.tolist()[0] == 0 and 1 in idx.tolist()
        assert torch.equal(infer[int(layer)][0], pool[idx, :half])
        assert torch.equal(infer[int(layer)][1], pool[idx, half:])
    cos1 = q @ F.normalize(m.e_keys["2"].detach()[1], dim=0)
    assert loss is not None and float(loss.detach()) == pytest.approx(3 * float((1 - cos1).mean()), abs=1e-5)


def _cps(vit: FrozenViT, **cfg: Any) -> CpsPrompt:
    torch.manual_seed(0)
    m = create_method("cps_prompt", vit, {"expected_tasks": 2, "pool_size": 10, **cfg})
    assert isinstance(m, CpsPrompt)
    return m


@pytest.mark.parametrize("sampling", ["critical", "uniform"])
def test_patches_are_redrawn_every_step(tiny_vit: FrozenViT, sampling: str) -> None:
    m = _cps(tiny_vit, sampling=sampling, temperature=1.0)
    m.begin_task(TaskInfo(0, [0, 1], 0))
    drawn: list[torch.Tensor] = []
    real = m.select

    def spy(scores: torch.Tensor) -> torch.Tensor:
        drawn.append(real(scores))
        return drawn[-1]

    m.select = spy  # type: ignore[method-assign]
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        m.train_features(x, Phase.SPARSE)
    assert len(drawn) == 3 and all(d.shape == (4, m.keep_count) for d in drawn)
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


class _Lrs(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.phases: list[str] = []
        self.optimizers: list[int] = []

    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
        if task == 0:
            assert trainer.optimizer is not None
            self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
            self.phases.append(logs["phase"])
            self.optimizers.append(id(trainer.optimizer))


def test_cosine_schedule_runs_through_the_dpct_switch(tiny_vit: FrozenViT) -> None:
    """One schedule and one Adam state across both phases (digest: no restart at the switch)."""
    probe = _Lrs()
    m = _cps(tiny_vit, phase_ratio=0.5)
    stream = synthetic_stream(1, classes_per_task=2, per_class=4, test_per_class=2, img_size=32)
    Trainer(m, stream, TrainConfig(epochs=4, batch_size=8), [probe]).fit()
    assert probe.phases == ["sparse", "sparse", "head", "head"]
    assert probe.lrs == pytest.approx([cosine_lr(1e-3, e, 4) for e in range(4)], rel=1e-12)
    assert probe.lrs[2] < probe.lrs[1]  # the switch continues the decay, it does not restart at 1e-3
    assert len(set(probe.optimizers)) == 1


def test_phase2_transform_train_recomputes_with_augmentation(tiny_vit: FrozenViT) -> None:
    """``phase2_transform=train``: no cache; every phase-2 step runs the prompted pass on train-transform
    images. The default (eval) builds the cache once per task and steps on cached features (SGD head)."""
    stream = synthetic_stream(1, classes_per_task=2, per_class=8, test_per_class=2, img_size=32)
    counts = {}
    for transform in ("train", "eval"):
        m = _cps(tiny_vit, phase_ratio=0.5, phase2_transform=transform, phase2_head="sgd")
        seen: list[Any] = []
        calls = {"head_features": 0, "head_loss": 0}
        real_hf, real_hl = m.head_features, m.head_loss

        def hf(x: torch.Tensor, _real: Any = real_hf, _c: dict[str, int] = calls) -> torch.Tensor:
            _c["head_features"] += 1
            return _real(x)

        def hl(f: torch.Tensor, y: torch.Tensor, _real: Any = real_hl, _c: dict[str, int] = calls) -> Any:
            _c["head_loss"] += 1
            return _real(f, y)

        m.head_features, m.head_loss = hf, hl  # type: ignore[method-assign]
        trainer = Trainer(m, stream, TrainConfig(epochs=4, batch_size=4, eval_batch_size=16))
        real_loader = trainer._loader

        def loader(
            dataset: Any,
            shuffle: bool,
            batch_size: int,
            seed: int,
            _real: Any = real_loader,
            _seen: Any = seen,
        ) -> Any:
            _seen.append((dataset, shuffle))
            return _real(dataset, shuffle, batch_size, seed)

        trainer._loader = loader  # type: ignore[method-assign]
        trainer.fit()
        task = stream.tasks[0]
        counts[transform] = dict(calls)
        shuffled = [ds for ds, shuffle in seen if shuffle]
        if transform == "train":
            assert m.phase2_cacheable() is False
            assert shuffled == [task.train] * 4  # 2 sparse + 2 head epochs, all on the train transform
            assert calls == {"head_features": 2 * 4, "head_loss": 0}  # 2 head epochs x 4 steps
        else:
            assert m.phase2_cacheable() is True
            assert shuffled == [task.train] * 2  # sparse epochs; the head epochs step on the cache
            assert calls == {"head_features": 1, "head_loss": 2 * 4}  # one cache batch of 16 images
    assert counts["train"] != counts["eval"]


@pytest.mark.parametrize("name", list_methods())
def test_layer_range_error_names_the_key(tiny_vit: FrozenViT, name: str) -> None:
    from edgecl.methods import get_method_class

    names = set(get_method_class(name).Config.model_fields)
    keys = [k for k in ("layers", "g_layers", "e_layers") if k in names]
    if not keys:
        pytest.skip(f"{name} prompts no configurable blocks")
    for key in keys:
        with pytest.raises(ValueError, match=rf"{key}: blocks \[12\] are outside .* 0\.\.11"):
            create_method(name, tiny_vit, {"expected_tasks": 2, key: (0, 12)})


def test_check_layers() -> None:
    assert check_layers([3, 0], 4) == (3, 0)
    with pytest.raises(ValueError, match=r"e_layers: blocks \[-1, 4\]"):
        check_layers((-1, 4), 4, "e_layers")


def test_coda_and_cps_share_the_prompted_pass(tiny_vit: FrozenViT) -> None:
    """CPS with r = 0 in phase 1 equals CODA's training pass on the same pool (the same code path)."""
    torch.manual_seed(0)
    coda = create_method("coda_prompt", tiny_vit, {"expected_tasks": 2, "pool_size": 10})
    cps = _cps(tiny_vit, reduction_rate=0.0)
    assert isinstance(coda, CodaPrompt)
    missing, unexpected = cps.load_state_dict(coda.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("analytic.") for k in missing), (missing, unexpected)
    for m in (coda, cps):
        m.begin_task(TaskInfo(0, [0, 1], 0))
    cps.prompt.load_state_dict(coda.prompt.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(coda.train_features(x, Phase.JOINT), cps.train_features(x, Phase.SPARSE))
