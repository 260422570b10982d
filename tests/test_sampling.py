"""Patch selection: k = floor((1-r)N), τ → 0 limit, uniform rates."""

from __future__ import annotations

import pytest
import torch

from edgecl.sampling import critical_sampling, num_kept, select_patches, topk_sampling, uniform_sampling


@pytest.mark.parametrize(
    ("n", "r", "k"), [(196, 0.5, 98), (196, 0.4, 117), (64, 0.4, 38), (10, 0.9, 1), (16, 0.0, 16)]
)
def test_num_kept(n: int, r: float, k: int) -> None:
    assert num_kept(n, r) == k


def test_num_kept_rejects_bad_rate() -> None:
    with pytest.raises(ValueError):
        num_kept(10, 1.0)


def test_sorted_unique_indices() -> None:
    scores = torch.rand(4, 30)
    for mode in ("critical", "uniform", "topk"):
        idx = select_patches(mode, scores, 12, temperature=0.5)
        assert idx.shape == (4, 12)
        for row in idx:
            assert row.tolist() == sorted(set(row.tolist()))


def test_low_temperature_equals_topk() -> None:
    """Certain, not likely: float32 uniforms in [1e-20, 1) bound each Gumbel variate to [-3.83, 16.64], so a
    score gap / τ above 20.5 can never be overturned; here every gap is 0.01 / 1e-4 = 100."""
    g = torch.Generator().manual_seed(0)
    scores = torch.stack([torch.randperm(50, generator=g).float() * 0.01 for _ in range(8)])
    for _ in range(5):
        assert torch.equal(critical_sampling(scores, 10, temperature=1e-4), topk_sampling(scores, 10))
    # at τ = 1 the same scores are a real draw: the top-k set is not always picked
    draws = [critical_sampling(scores, 10, temperature=1.0) for _ in range(5)]
    assert any(not torch.equal(d, topk_sampling(scores, 10)) for d in draws)


def test_critical_sampling_prefers_high_scores() -> None:
    scores = torch.zeros(2000, 4)
    scores[:, 0] = 1.0  # p0 = e^10 / (e^10 + 3) at τ = 0.1
    idx = critical_sampling(scores, 1, temperature=0.1)
    assert (idx[:, 0] == 0).float().mean() > 0.99


def test_uniform_rate() -> None:
    torch.manual_seed(0)
    n, k, trials = 16, 6, 4000
    idx = uniform_sampling(trials, n, k)
    counts = torch.bincount(idx.flatten(), minlength=n).float() / trials
    assert torch.allclose(counts, torch.full((n,), k / n), atol=0.03)


def test_gumbel_topk_matches_multinomial_distribution() -> None:
    """Inclusion frequencies of the Gumbel-top-k draw equal those of torch.multinomial (no replacement)."""
    torch.manual_seed(1)
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    ours = critical_sampling(scores, 2, temperature=1.0)
    probs = torch.softmax(scores, dim=1)
    ref = torch.multinomial(probs, 2, replacement=False)
    f_ours = torch.bincount(ours.flatten(), minlength=6).float() / 20000
    f_ref = torch.bincount(ref.flatten(), minlength=6).float() / 20000
    assert torch.allclose(f_ours, f_ref, atol=0.015)
