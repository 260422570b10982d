"""edgecl.kernels and the backbone's oneDNN path: the same math as torch's F.linear / timm's blocks.

Every comparison is against a float64 computation of the same formula, with a relative tolerance far
above fp32 round-off (~1e-6 here) and far below any real error (a wrong bias, GELU, residual or
transpose is O(1)); nothing depends on bit patterns, thread counts or instruction sets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgecl import kernels
from edgecl.backbone import FrozenViT, load_backbone

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")
TOL = 1e-4
"""Relative (norm) error allowed against float64: ~100x fp32 round-off at these sizes."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _layer(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 7, 24), (3, 24)])
def test_frozen_linear_matches_float64(shape: tuple[int, ...]) -> None:
    w, b = _layer(24, 40, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    r = torch.randn(*shape[:-1], 40, generator=g)
    exact = F.linear(x.double(), w.double(), b.double())
    with torch.inference_mode():
        assert rel(kernels.frozen_linear(x, w, b, True), exact) < TOL
        assert rel(kernels.frozen_linear(x, w, None, True), exact - b.double()) < TOL
        fused = kernels.frozen_linear(x, w, b, True, gelu="none")
        assert rel(fused, F.gelu(exact)) < TOL
        assert rel(kernels.frozen_linear(x, w, b, True, gelu="tanh"), F.gelu(exact, approximate="tanh")) < TOL
        assert rel(kernels.frozen_linear(x, w, b, True, residual=r), r.double() + exact) < TOL
        assert rel(kernels.frozen_linear(x, w, b, True, gelu="none", residual=r), r + F.gelu(exact)) < TOL
        # a strided view as input (the CLS token of a sequence) and a row slice of the weight (fused qkv)
        assert rel(kernels.frozen_linear(x[..., :1, :], w[8:], b[8:], True), exact[..., :1, 8:]) < TOL


@needs_onednn
def test_frozen_linear_backward_matches_float64() -> None:
    w, b = _layer(24, 40, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, 24, generator=g)
    upstream = torch.randn(6, 9, 40, generator=g)
    r = torch.randn(6, 9, 40, generator=g)
    x64 = x.double().requires_grad_()
    r64 = r.double().requires_grad_()
    (r64 + F.gelu(F.linear(x64, w.double(), b.double()))).backward(upstream.double())
    xf = x.clone().requires_grad_()
    rf = r.clone().requires_grad_()
    out = kernels.frozen_linear(xf, w, b, True, gelu="none", residual=rf)
    out.backward(upstream)
    assert xf.grad is not None and rf.grad is not None
    assert rel(xf.grad, x64.grad) < TOL and rel(rf.grad, r64.grad) < TOL
    # only the residual needs a gradient: the linear runs without a graph, the residual's is exact
    rf2 = r.clone().requires_grad_()
    kernels.frozen_linear(x, w, b, True, residual=rf2).sum().backward()
    assert rf2.grad is not None and torch.equal(rf2.grad, torch.ones_like(r))


def test_fast_applies_only_to_cpu_fp32_without_autocast() -> None:
    x = torch.ones(2, 3)
    assert kernels.fast_applies(x) is kernels.onednn_available()
    assert not kernels.fast_applies(x.double())
    assert not kernels.fast_applies(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # entering autocast runs no bf16 kernel
        assert not kernels.fast_applies(x)


def test_kernel_choice_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECL_KERNELS", "torch")
    assert kernels.default_kernels() == "torch"
    monkeypatch.setenv("EDGECL_KERNELS", "fastest")
    with pytest.raises(ValueError, match="EDGECL_KERNELS='fastest'.*auto"):
        kernels.default_kernels()
    monkeypatch.delenv("EDGECL_KERNELS")
    assert kernels.default_kernels() == "auto"
    with pytest.raises(ValueError, match="kernels='onednn'.*'auto', 'torch'"):
        load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, kernels="onednn")


@pytest.fixture(scope="module")
def vit_pair() -> tuple[FrozenViT, FrozenViT]:
    """The same random ViT-Tiny (32 px / patch 8) with the oneDNN path and in float64 (torch path)."""
    torch.manual_seed(77)
    fast = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, kernels="auto")
    torch.manual_seed(77)
    exact = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, kernels="torch").double()
    return fast, exact


def _passes(vit: FrozenViT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every entry point: query (CLS, scores), prompted + token-subset pass and its prefix gradients,
    the plain features and the full token output."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 32, 32, generator=g).to(dtype)
    pk = (0.1 * torch.randn(4, 4, 192, generator=g)).to(dtype).requires_grad_()
    pv = (0.1 * torch.randn(4, 4, 192, generator=g)).to(dtype).requires_grad_()
    u = torch.randn(4, 192, generator=g).to(dtype)
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15]]).expand(4, -1)
    q = vit.query(x, keep_tokens=True)
    out = vit(x, prefixes={0: (pk, pv), 3: (pk, pv), 11: (pk, pv)}, keep=keep, tokens=q.tokens)
    (out * u).sum().backward()  # a linear loss: the prefix gradients are well conditioned
    assert pk.grad is not None and pv.grad is not None
    return {
        "cls": q.cls,
        "scores": q.scores,
        "prompted": out.detach(),
        "grad_pk": pk.grad,
        "grad_pv": pv.grad,
        "features": vit.features(x),
        "tokens": vit(x, return_tokens=True),
    }


@needs_onednn
def test_backbone_onednn_path_matches_float64(vit_pair: tuple[FrozenViT, FrozenViT]) -> None:
    fast, exact = vit_pair
    got, want = _passes(fast, torch.float32), _passes(exact, torch.float64)
    errors = {k: rel(got[k], want[k]) for k in want}
    assert max(errors.values()) < TOL, errors
    # and the fp32 timm path is as close (both are fp32 round-off of the same formula)
    fast.kernels = "torch"
    try:
        old = _passes(fast, torch.float32)
    finally:
        fast.kernels = "auto"
    assert max(rel(old[k], want[k]) for k in want) < TOL
    assert max(rel(got[k], old[k]) for k in want) < 2 * TOL


@needs_onednn
def test_score_layer_inside_the_stack_matches(vit_pair: tuple[FrozenViT, FrozenViT]) -> None:
    fast, exact = vit_pair
    fast.score_layer = exact.score_layer = 5  # critical_scores of a full block (not the CLS-only one)
    try:
        x = torch.randn(2, 3, 32, 32)
        a, b = fast.query(x), exact.query(x.double())
        assert rel(a.scores, b.scores) < TOL and rel(a.cls, b.cls) < TOL
    finally:
        fast.score_layer = exact.score_layer = 11


def test_traced_graphs_see_plain_aten_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ONNX export (and TorchScript / torch.compile captures) must not meet the oneDNN op."""
    x = torch.ones(2, 3)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert not kernels.fast_applies(x)
    monkeypatch.undo()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert not kernels.fast_applies(x)
