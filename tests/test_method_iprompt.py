"""I-Prompt: matching by hand, one backbone pass per step, masking, pool freezing, end-to-end, resume."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import Phase, TaskInfo, build_config, create_method, list_methods
from edgecl.methods.iprompt import READOUTS, IPrompt, _IPromptHooks, match_tokens
from edgecl.train.callbacks import Callback
from edgecl.train.model_io import load_model
from edgecl.train.trainer import TrainConfig, Trainer

FAST = {"expected_tasks": 2, "pool_size": 8, "match_stats": True}


@pytest.fixture(autouse=True)
def _one_thread(_threads_and_seed: None) -> Iterator[None]:
    """One thread (after conftest's 2): tiny models lose ~8x CPU to thread hand-offs on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def backbone(tiny_vit: FrozenViT) -> FrozenViT:
    """conftest's random ViT-Tiny, 32 px / patch 8 (16 patches + CLS)."""
    return tiny_vit


def make(backbone: FrozenViT, **overrides: Any) -> IPrompt:
    torch.manual_seed(1)
    method = create_method("iprompt", backbone, {**FAST, **overrides})
    assert isinstance(method, IPrompt)
    return method


def test_registered_and_config_checks() -> None:
    assert "iprompt" in list_methods()
    cfg = build_config("iprompt")
    assert cfg.layers == (2, 3, 4, 5) and cfg.prompt_target == "image_tokens"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="prompt_target"):
        build_config("iprompt", {"prompt_target": "patches"})
    assert build_config("iprompt", {"pool_size": 7, "expected_tasks": 2}).pool_size == 7  # split 4 + 3
    with pytest.raises(ValueError, match=r"pool_size: 2 gives fewer than one component .* at least 3"):
        build_config("iprompt", {"pool_size": 2, "expected_tasks": 3})
    shared = {"pool_size": 2, "expected_tasks": 3, "allocation": "shared"}
    assert build_config("iprompt", shared).pool_size == 2
    with pytest.raises(ValueError, match="match_sim"):
        build_config("iprompt", {"readout": "match_sim", "prompt_target": "cls_token"})


def test_matching_picks_highest_cosine_by_hand() -> None:
    token_keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [3.0, 2.9]]])  # 1 x 4 x 2
    pool_keys = torch.tensor([[1.0, 0.1], [0.0, 5.0], [-2.0, -1.0], [1.0, 1.0]])
    expected_idx, expected_cos = [], []
    for tk in token_keys[0].tolist():
        row = [
            (tk[0] * pk[0] + tk[1] * pk[1]) / (math.hypot(*tk) * math.hypot(*pk)) for pk in pool_keys.tolist()
        ]
        best = max(range(len(row)), key=row.__getitem__)
        expected_idx.append(best)
        expected_cos.append(row[best])
    assert expected_idx == [0, 1, 2, 3]  # the hand example covers every entry
    idx, cos = match_tokens(token_keys, pool_keys)
    assert idx.tolist() == [expected_idx]
    assert torch.allclose(cos, torch.tensor([expected_cos]), atol=1e-6)


def test_block_out_adds_matched_prompt_to_image_tokens_only(backbone: FrozenViT) -> None:
    method = make(backbone)
    method.begin_task(TaskInfo(0, [0, 1], 0))
    layer, d = 2, backbone.embed_dim
    x = torch.randn(2, 1 + backbone.num_patches, d)
    keys = torch.randn_like(x)
    pool_k, pool_p, _ = method.prompt.entries(layer, train=False)
    sims = F.normalize(keys[:, 1:], dim=-1) @ F.normalize(pool_k, dim=-1).T
    expected = x.clone()
    expected[:, 1:] += pool_p[sims.argmax(-1)]
    out = _IPromptHooks(method, train=False).block_out(layer, x, keys)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])

    cls_method = make(backbone, prompt_target="cls_token")
    cls_method.begin_task(TaskInfo(0, [0, 1], 0))
    pool_k, pool_p, _ = cls_method.prompt.entries(layer, train=False)
    best = int((F.normalize(keys[1, 0], dim=0) @ F.normalize(pool_k, dim=-1).T).argmax())
    out = _IPromptHooks(cls_method, train=False).block_out(layer, x, keys)
    assert torch.equal(out[:, 1:], x[:, 1:])
    assert torch.allclose(out[1, 0], x[1, 0] + pool_p[best], atol=1e-6)


def test_cls_attention_readout_matches_explicit_attention(backbone: FrozenViT) -> None:
    method = make(backbone)
    method.begin_task(TaskInfo(0, [0, 1], 0))
    x = torch.randn(2, 3, 32, 32)
    feats, hooks = method._forward(x, train=False)
    # recompute the last block's input with the same prompted pass, then its attention explicitly
    captured: dict[str, Tensor] = {}
    last: Any = list(cast(nn.ModuleList, backbone.vit.blocks))[-1]
    handle = last.norm1.register_forward_hook(lambda _m, _i, out: captured.setdefault("xn", out))
    tokens = method._forward(x, train=False)[0]
    handle.remove()
    assert torch.allclose(tokens, feats)
    xn, attn = captured["xn"], last.attn
    b, t, d = xn.shape
    qkv = attn.qkv(xn).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    probs = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]
    probs = probs / probs.sum(-1, keepdim=True)
    assert hooks.cls_attn is not None
    assert torch.allclose(hooks.cls_attn, probs, atol=1e-5)


@pytest.mark.parametrize("readout", READOUTS)
def test_readouts_weight_image_tokens(backbone: FrozenViT, readout: str) -> None:
    method = make(backbone, readout=readout)
    method.begin_task(TaskInfo(0, [0, 1], 0))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, hooks = method._forward(x, train=False)
        tokens = backbone(x, hooks=_IPromptHooks(method, train=False), return_tokens=True)
    img = tokens[:, 1:]
    if readout == "cls":
        expected = tokens[:, 0]
    elif readout == "mean":
        expected = img.mean(1)
    else:
        w = hooks.cls_attn if readout == "cls_attn" else torch.stack(hooks.cos).mean(0).clamp_min(0) + 1e-6
        assert w is not None
        expected = (w / w.sum(-1, keepdim=True)).unsqueeze(-1).mul(img).sum(1)
    assert feats.shape == (2, backbone.embed_dim)
    assert torch.allclose(feats, expected, atol=1e-5)


def _count_block_runs(backbone: FrozenViT) -> tuple[list[int], list[Any]]:
    """``norm1`` runs exactly once per block execution on every backbone path (timm's block, the in-place
    frozen block, the hooked/prefix block, the CLS-only last block), so its calls count block runs."""
    calls = [0]
    blocks: list[Any] = list(cast(nn.ModuleList, backbone.vit.blocks))
    handles = [
        blk.norm1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for blk in blocks
    ]
    return calls, handles


def test_exactly_one_backbone_pass_per_training_step(
    backbone: FrozenViT, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = make(backbone)
    method.begin_task(TaskInfo(0, [0, 1], 0))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    calls, handles = _count_block_runs(backbone)
    try:
        coda = create_method("coda_prompt", backbone, {"expected_tasks": 2, "pool_size": 4})
        coda.begin_task(TaskInfo(0, [0, 1], 0))
        coda.training_loss(x, y, Phase.JOINT).backward()
        assert calls[0] == 2 * backbone.depth  # the counter sees CODA's query pass + prompted pass

        calls[0] = 0

        def no_query(*_: Any) -> None:
            raise AssertionError("I-Prompt must not run a query pass")

        monkeypatch.setattr(backbone, "query", no_query)
        method.train()
        loss = method.training_loss(x, y, Phase.JOINT)
        loss.backward()
        assert calls[0] == backbone.depth
        calls[0] = 0
        with torch.no_grad():
            method.eval()
            method(x)
        assert calls[0] == backbone.depth
    finally:
        for h in handles:
            h.remove()


def test_logit_masking_and_matching_loss_gradients(backbone: FrozenViT) -> None:
    method = make(backbone)
    method.begin_task(TaskInfo(0, [0, 1], 0))
    method.end_task(TaskInfo(0, [0, 1], 0), [])
    method.begin_task(TaskInfo(1, [2, 3], 2))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([2, 3, 3, 2])
    feats = method.train_features(x, Phase.JOINT)
    logits = method.logits(feats)
    assert logits.shape == (4, 4)
    match = method._match_loss
    assert match is not None and match.requires_grad
    loss = method.loss(logits, y)
    expected = F.cross_entropy(logits[:, 2:4], y - 2) + match
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert method.head.weight.grad is not None
    assert torch.all(method.head.weight.grad[:2] == 0) and method.head.weight.grad[2:].abs().sum() > 0

    # matching loss alone: gradient reaches the current task's keys only, never prompts or the head
    method.zero_grad(set_to_none=True)
    method.train_features(x, Phase.JOINT)
    extra = method.extra_loss()
    assert extra is not None
    extra.backward()
    s, f = method.prompt.trainable_range()
    for layer in method.prompt.layers:
        k_grad = method.prompt.keys(layer).grad
        assert k_grad is not None and k_grad[s:f].abs().sum() > 0 and torch.all(k_grad[:s] == 0)
        assert method.prompt.prompts(layer).grad is None
    assert method.head.weight.grad is None


def test_per_task_allocation_freezes_earlier_entries(backbone: FrozenViT) -> None:
    stream = synthetic_stream(2, classes_per_task=2, per_class=8)
    method = make(backbone, train_match="all")
    trainer = Trainer(method, stream, TrainConfig(epochs=1, batch_size=8, eval_batch_size=16))
    trainer.fit()  # warm both tasks through the real loop
    before = {n: p.detach().clone() for n, p in method.prompt.named_parameters()}
    # one more step of task 1 with train_match="all" (earlier entries take part in matching, detached)
    opt = torch.optim.Adam(method.optimizer_param_groups(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(2, 4, (8,))
    method.train()
    method.training_loss(x, y, Phase.JOINT).backward()
    opt.step()
    s, f = method.prompt.trainable_range()
    assert (s, f) == (4, 8)
    for n, p in method.prompt.named_parameters():
        assert torch.equal(p[:s], before[n][:s]), n
        assert not torch.equal(p[s:f], before[n][s:f]), n


def test_end_to_end_two_tasks(backbone: FrozenViT, tmp_path: Path) -> None:
    stream = synthetic_stream(2, classes_per_task=2, per_class=16)
    method = make(backbone)
    cfg = TrainConfig(epochs=2, batch_size=16, eval_batch_size=32, model_dir=str(tmp_path / "model"))
    results = Trainer(method, stream, cfg).fit()
    acc = results["accuracy_matrix"]
    assert [len(r) for r in acc] == [1, 2]
    assert all(0.0 <= a <= 1.0 for row in acc for a in row)
    assert results["method"] == "iprompt" and results["trainable_parameters"] > 0
    assert results["tasks"][0]["iprompt_own_entry_rate"] == pytest.approx(1.0)
    assert 0.0 <= results["tasks"][1]["iprompt_own_entry_rate"] <= 1.0
    assert math.isfinite(results["forgetting"])
    # the finished model reloads (config, pool task, tensors) and predicts exactly as trained
    loaded = load_model(tmp_path / "model", backbone=backbone)
    x = torch.randn(3, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), method(x))


class _Interrupt(Callback):
    def on_epoch_end(self, trainer: Trainer, task: int, epoch: int, logs: dict[str, Any]) -> None:
        if task == 1 and epoch == 0:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.parametrize("overrides", [{}, {"allocation": "shared", "readout": "match_sim"}])
def test_resume_matches_uninterrupted(backbone: FrozenViT, tmp_path: Path, overrides: dict[str, Any]) -> None:
    stream = synthetic_stream(2, classes_per_task=2, per_class=16)

    def cfg(name: str) -> TrainConfig:
        return TrainConfig(epochs=2, batch_size=16, eval_batch_size=32, checkpoint_dir=str(tmp_path / name))

    full = Trainer(make(backbone, **overrides), stream, cfg("full")).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(make(backbone, **overrides), stream, cfg("cut"), callbacks=[_Interrupt()]).fit()
    resumed = Trainer(make(backbone, **overrides), stream, cfg("cut")).fit(resume_from=tmp_path / "cut")
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)
    for row_a, row_b in zip(resumed["accuracy_matrix"], full["accuracy_matrix"], strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-6)
    for rec_a, rec_b in zip(resumed["tasks"], full["tasks"], strict=True):
        assert rec_a.get("iprompt_match_cos") == pytest.approx(rec_b.get("iprompt_match_cos"), abs=1e-6)
