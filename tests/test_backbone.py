"""FrozenViT: equivalence with timm, CPS scores by hand, token subsets, prefixes, loading."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edgecl.backbone import FrozenViT, LayerHooks, load_backbone


class AllLayers(LayerHooks):
    """Forces every block through edgecl's own attention path without changing anything."""

    def wants(self, layer: int) -> bool:
        return True


def test_matches_timm_forward(tiny_vit: FrozenViT) -> None:
    x = torch.randn(3, 3, 32, 32)
    ref = tiny_vit.vit.forward_head(tiny_vit.vit.forward_features(x), pre_logits=True)
    assert torch.allclose(tiny_vit(x), ref, atol=1e-5)
    # edgecl's own block math (used for prompted layers) equals timm's fused block
    assert torch.allclose(tiny_vit(x, hooks=AllLayers()), ref, atol=1e-5)
    assert torch.allclose(tiny_vit.query(x).cls, ref, atol=1e-5)
    assert torch.allclose(tiny_vit.features(x), ref, atol=1e-5)


def test_reference_weights_match_timm(ref_vit: FrozenViT) -> None:
    from tests.conftest import SHARED_WEIGHTS

    m = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=0)
    from safetensors.torch import load_file

    m.load_state_dict(load_file(str(SHARED_WEIGHTS)))
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ref_vit(x), m(x), atol=1e-5)
    assert ref_vit.info.num_patches == 64 and ref_vit.info.embed_dim == 192


def _hand_scores(vit: FrozenViT, x: torch.Tensor, layer: int) -> torch.Tensor:
    """CPS score of ``layer`` written out from the block's weights."""
    with torch.no_grad():
        t = vit.embed(x)
        for blk in vit.vit.blocks[:layer]:
            t = blk(t)
        blk = vit.vit.blocks[layer]
        xn = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = xn @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        d = t.shape[-1]
        h = blk.attn.num_heads
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        dh = d // h
        scores = torch.zeros(x.shape[0], t.shape[1])
        for head in range(h):
            qh, kh = q[..., head * dh : (head + 1) * dh], k[..., head * dh : (head + 1) * dh]
            attn = torch.softmax(qh @ kh.transpose(1, 2) / dh**0.5, dim=-1)
            scores += attn[:, 0, :]  # CLS row, summed over heads
        vnorm = torch.sqrt((v**2).sum(-1))
        return (scores * vnorm)[:, 1:]


@pytest.mark.parametrize("score_layer", [-1, 5])
def test_cps_scores_hand_computation(score_layer: int) -> None:
    torch.manual_seed(0)
    vit = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, score_layer=score_layer)
    x = torch.randn(2, 3, 32, 32)
    out = vit.query(x)
    assert out.scores.shape == (2, 16)
    expected = _hand_scores(vit, x, score_layer % vit.depth)
    assert torch.allclose(out.scores, expected, atol=1e-5)
    assert (out.scores > 0).all()


def test_keep_equals_hand_removed_tokens(tiny_vit: FrozenViT) -> None:
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[7, 0, 3, 15, 9], [1, 2, 12, 4, 8]])
    out = tiny_vit(x, keep=keep)
    with torch.no_grad():
        vit = tiny_vit.vit
        full = vit.patch_embed(x) + vit.pos_embed[:, 1:]  # patches with their own position embeddings
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
        rows = [torch.cat([cls[b], full[b, sorted(keep[b].tolist())]], 0) for b in range(2)]
        t = torch.stack(rows)
        for blk in vit.blocks:
            t = blk(t)
        expected = vit.norm(t)[:, 0]
    assert torch.allclose(out, expected, atol=1e-5)


def test_kept_patches_keep_position_embeddings(tiny_vit: FrozenViT) -> None:
    x = torch.randn(1, 3, 32, 32)
    keep = torch.tensor([[10, 2]])
    with torch.no_grad():
        gathered = tiny_vit.gather_tokens(tiny_vit.embed(x), keep)
        patches = tiny_vit.vit.patch_embed(x)
    pos = tiny_vit.vit.pos_embed[0]
    assert gathered.shape == (1, 3, 192)
    assert torch.allclose(gathered[0, 1], patches[0, 2] + pos[1 + 2], atol=1e-6)  # ascending order
    assert torch.allclose(gathered[0, 2], patches[0, 10] + pos[1 + 10], atol=1e-6)


def test_keep_rejects_bad_indices(tiny_vit: FrozenViT) -> None:
    with pytest.raises(ValueError, match="keep indices"):
        tiny_vit(torch.randn(1, 3, 32, 32), keep=torch.tensor([[16]]))


def test_empty_prefix_is_noop_and_grad_reaches_prefix(tiny_vit: FrozenViT) -> None:
    x = torch.randn(2, 3, 32, 32)
    empty = torch.zeros(0, 192)
    assert torch.allclose(tiny_vit(x, prefixes={0: (empty, empty)}), tiny_vit.features(x), atol=1e-5)
    pk = torch.randn(2, 4, 192, requires_grad=True)
    pv = torch.randn(4, 192, requires_grad=True)  # Lp x D broadcast over the batch
    out = tiny_vit(x, prefixes={0: (pk, pv), 3: (pk, pv)})
    # A fixed random projection of the output: its gradient is provably non-zero (out.sum() of a unit-weight
    # LayerNorm output is constant, so its true gradient is zero and only round-off would make it "pass").
    w = torch.randn(192, generator=torch.Generator().manual_seed(7))
    (out @ w).sum().backward()
    assert pk.grad is not None and pk.grad.abs().sum() > 1e-3
    assert pv.grad is not None and pv.grad.abs().sum() > 1e-3
    assert all(p.grad is None for p in tiny_vit.parameters())
    assert all(not p.requires_grad for p in tiny_vit.parameters())


def test_prefix_attention_by_hand(tiny_vit: FrozenViT) -> None:
    """Layer-0 output with a prefix equals attention over [prefix keys; keys] written out."""
    x = torch.randn(1, 3, 32, 32)
    pk, pv = torch.randn(1, 2, 192), torch.randn(1, 2, 192)
    with torch.no_grad():
        got = tiny_vit._block(0, tiny_vit.vit.blocks[0], tiny_vit.embed(x), (pk, pv), None)
        blk = tiny_vit.vit.blocks[0]
        t = tiny_vit.embed(x)
        xn = blk.norm1(t)
        q, k, v = (xn @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(192, dim=-1)
        k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        outs = []
        for h in range(3):
            sl = slice(64 * h, 64 * (h + 1))
            a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 8.0, -1)
            outs.append(a @ v[..., sl])
        o = blk.attn.proj(torch.cat(outs, -1))
        y = t + o
        y = y + blk.mlp(blk.norm2(y))
    assert torch.allclose(got, y, atol=1e-5)


def test_frozen_and_eval(tiny_vit: FrozenViT) -> None:
    tiny_vit.train()
    assert not tiny_vit.training and not tiny_vit.vit.training


# ---- loading --------------------------------------------------------------------------------------
def _small() -> torch.nn.Module:
    torch.manual_seed(7)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)


def _check_loaded(path, model: torch.nn.Module) -> None:  # type: ignore[no-untyped-def]
    vit = load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, weights=path)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(vit(x), model(x), atol=1e-5)


def test_load_safetensors_and_pth(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = _small()
    sd = m.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.pth", "w.pt", "w.bin"):
        _check_loaded(tmp_path / name, m)


def _to_big_vision_npz(m: torch.nn.Module, path) -> None:  # type: ignore[no-untyped-def]
    """Write ``m`` in the big_vision .npz layout that timm's ``load_pretrained`` reads."""
    w: dict[str, np.ndarray] = {}
    n = lambda t: t.detach().numpy()  # noqa: E731
    w["embedding/kernel"] = n(m.patch_embed.proj.weight).transpose(2, 3, 1, 0)
    w["embedding/bias"] = n(m.patch_embed.proj.bias)
    w["cls"] = n(m.cls_token)
    w["pos_embedding"] = n(m.pos_embed)
    w["Transformer/encoder_norm/scale"] = n(m.norm.weight)
    w["Transformer/encoder_norm/bias"] = n(m.norm.bias)
    for i, blk in enumerate(m.blocks):
        p = f"Transformer/encoderblock_{i}/"
        d, h = blk.attn.qkv.weight.shape[1], blk.attn.num_heads
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = n(blk.norm1.weight), n(blk.norm1.bias)
        w[p + "LayerNorm_1/scale"], w[p + "LayerNorm_1/bias"] = n(blk.norm2.weight), n(blk.norm2.bias)
        for j, name in enumerate(("query", "key", "value")):
            wt = n(blk.attn.qkv.weight)[j * d : (j + 1) * d]
            w[p + f"MultiHeadDotProductAttention_0/{name}/kernel"] = wt.T.reshape(d, h, d // h)
            w[p + f"MultiHeadDotProductAttention_0/{name}/bias"] = n(blk.attn.qkv.bias)[
                j * d : (j + 1) * d
            ].reshape(h, d // h)
        w[p + "MultiHeadDotProductAttention_0/out/kernel"] = (
            n(blk.attn.proj.weight).reshape(d, h, d // h).transpose(1, 2, 0)
        )
        w[p + "MultiHeadDotProductAttention_0/out/bias"] = n(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_0/Dense_{r}/kernel"] = n(fc.weight).T
            w[p + f"MlpBlock_0/Dense_{r}/bias"] = n(fc.bias)
    np.savez(path, **w)


def test_load_timm_npz(tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = _small()
    _to_big_vision_npz(m, tmp_path / "w.npz")
    _check_loaded(tmp_path / "w.npz", m)


def test_mismatched_keys_are_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sd = _small().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["blocks.0.norm1.weight"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, weights=tmp_path / "bad.safetensors")
    assert "blocks.0.norm1.weight" in str(err.value) and "extra.weight" in str(err.value)


def test_missing_file_and_unknown_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError):
        load_backbone("vit_tiny_patch16_224", weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown timm model"):
        load_backbone("not_a_vit_at_all")
    with pytest.raises(ValueError, match="unsupported weights format"):
        (tmp_path / "w.txt").write_text("x")
        load_backbone("vit_tiny_patch16_224", weights=tmp_path / "w.txt")


def test_offline_pretrained_gives_weights_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:  # huggingface_hub reads the variable once at import; set its constant too (no network wait)
        import huggingface_hub.constants as hf_constants

        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="weights=PATH"):
        load_backbone("vit_tiny_patch16_224", pretrained=True)
