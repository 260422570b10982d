"""The class-statistics task identifier: classifier solved once at fit, kept as buffers (issue 18 item 9)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from edgecl.methods import TaskInfo, create_method
from edgecl.methods.hash import Hash
from edgecl.methods.tii import ClassStatsTaskIdentifier


def _fitted(
    kind: str, dim: int = 10, tasks: int = 3, seed: int = 4
) -> tuple[ClassStatsTaskIdentifier, Tensor]:
    """An identifier fitted on ``tasks`` tasks of 2 Gaussian classes each, and the class centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2 * tasks, dim, generator=g) * 4
    tii = ClassStatsTaskIdentifier(dim, kind=kind)
    for t in range(tasks):
        labels = torch.arange(2 * t, 2 * t + 2).repeat_interleave(30)
        tii.fit(centres[labels] + torch.randn(60, dim, generator=g), labels, t)
    return tii, centres


def _scores_by_hand(tii: ClassStatsTaskIdentifier, feats: Tensor) -> Tensor:
    """The scores from the statistics alone, solving Σ⁻¹ μ afresh (the pre-buffer computation)."""
    f = feats.double()
    means = tii.class_sum / tii.class_count.clamp_min(1.0).unsqueeze(1)
    if tii.kind == "ncm":
        scores = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
    else:
        n, c, d = float(tii.class_count.sum()), int((tii.class_count > 0).sum()), tii.dim
        cov = tii.scatter / (n - c)
        iso = torch.trace(cov) / d
        cov = (1 - tii.shrinkage) * cov + tii.shrinkage * iso * torch.eye(d, dtype=torch.float64)
        cov = cov + 1e-6 * iso * torch.eye(d, dtype=torch.float64)
        pm = torch.linalg.inv(cov) @ means.T  # an independent route to Σ⁻¹ μ
        scores = f @ pm - 0.5 * (means * pm.T).sum(1)
    return scores.masked_fill(tii.class_count <= 0, float("-inf"))


def _no_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every linear-algebra solve raise: predicting must not need one."""

    def boom(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("a solve ran at predict time")

    for name in ("solve", "solve_triangular", "inv", "cholesky", "lstsq"):
        monkeypatch.setattr(torch.linalg, name, boom)
    monkeypatch.setattr(torch, "inverse", boom)


@pytest.mark.parametrize("kind", ["lda", "ncm"])
def test_scores_equal_the_statistics_and_need_no_solve(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tii, centres = _fitted(kind)
    x = centres.repeat_interleave(5, 0) + torch.randn(30, 10, generator=torch.Generator().manual_seed(9))
    expected = _scores_by_hand(tii, x)
    _no_solve(monkeypatch)
    got = tii.class_scores(x)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-8)
    assert torch.equal(tii.predict_task(x), tii.class_task[expected.argmax(1)])
    assert (tii.predict_task(x) == torch.arange(6).repeat_interleave(5) // 2).float().mean() > 0.9


@pytest.mark.parametrize("kind", ["lda", "ncm"])
def test_classifier_buffers_are_saved_and_loaded(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tii, centres = _fitted(kind)
    state = tii.state_dict()
    assert state["class_weight"].shape == (6, 10) and state["class_bias"].shape == (6,)
    restored = ClassStatsTaskIdentifier(10, kind=kind)
    restored.grow(tii.num_classes)
    _no_solve(monkeypatch)  # loading a current checkpoint solves nothing either
    restored.load_state_dict(state)
    assert torch.equal(restored.class_weight, tii.class_weight)
    assert torch.equal(restored.class_scores(centres), tii.class_scores(centres))


def test_checkpoint_without_buffers_gets_them_solved_on_load() -> None:
    tii, centres = _fitted("lda")
    old = {k: v for k, v in tii.state_dict().items() if k not in ("class_weight", "class_bias")}
    restored = ClassStatsTaskIdentifier(10)
    restored.grow(tii.num_classes)
    restored.load_state_dict(old)
    assert torch.allclose(restored.class_weight, tii.class_weight, rtol=1e-10, atol=1e-12)
    assert torch.equal(restored.predict_task(centres), tii.predict_task(centres))


def test_refit_updates_every_class_weight() -> None:
    """A later task changes the pooled covariance, so earlier classes' Σ⁻¹ μ must be re-solved at that fit."""
    tii, _ = _fitted("lda", tasks=1)
    first = tii.class_weight.clone()
    g = torch.Generator().manual_seed(5)
    tii.fit(torch.randn(40, 10, generator=g) * 7, torch.arange(2, 4).repeat_interleave(20), 1)
    assert tii.class_weight.shape == (4, 10)
    assert (tii.class_weight[:2] - first).abs().max() > 1e-3


def test_hash_model_keeps_the_buffers_and_predicts_without_solve(
    tiny_vit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = create_method("hash", tiny_vit, {})
    assert isinstance(method, Hash)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(16, 3, 32, 32, generator=g)
    for t in range(2):
        task = TaskInfo(t, [2 * t, 2 * t + 1], 2 * t)
        method.begin_task(task)
        labels = torch.tensor([2 * t, 2 * t + 1]).repeat(4)
        method.end_task(task, [(images[8 * t : 8 * t + 8], labels)])
    assert {"tii.class_weight", "tii.class_bias"} <= set(method.state_dict())
    method.eval()
    expected = method.tii.class_task[_scores_by_hand(method.tii, tiny_vit.features(images)).argmax(1)]
    _no_solve(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(method.predict_task(images), expected.clamp(0, 1))
        assert method(images).shape == (16, 4)
