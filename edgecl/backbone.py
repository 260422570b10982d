"""The frozen timm ViT every method shares, with its three entry points.

* :meth:`FrozenViT.query` -- the no-prompt pass: final-norm CLS feature plus the CPS critical scores.
* :meth:`FrozenViT.forward` with ``prefixes`` -- the prompted pass (prefix key/value per layer).
* :meth:`FrozenViT.forward` with ``keep`` -- the token-subset pass (CLS plus the kept patches).

Methods never copy the ViT forward; they pass prefixes, patch subsets or a :class:`LayerHooks` object.
Every block runs timm's Block math. On a CPU in fp32 (``kernels='auto'``) all blocks run it here with the
frozen linears in oneDNN (bias, GELU and residual fused where no gradient is needed; ``edgecl.kernels``);
with ``kernels='torch'``, or on CUDA / under autocast, blocks that receive no prefix and no hook run timm's
own module, so an unprompted layer costs exactly what timm costs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgecl.kernels import KERNEL_CHOICES, default_kernels, fast_applies, frozen_linear

__all__ = [
    "BackboneInfo",
    "FrozenViT",
    "LayerHooks",
    "Prefix",
    "QueryOutput",
    "load_backbone",
    "load_state_dict_file",
]

Prefix = tuple[Tensor, Tensor]
"""A (key, value) prefix for one layer, each ``B x Lp x D`` or ``Lp x D`` (broadcast over the batch)."""


@dataclass(frozen=True)
class QueryOutput:
    """Result of the no-prompt query pass."""

    cls: Tensor
    """Final-norm CLS feature, ``B x D``."""
    scores: Tensor
    """CPS critical score per patch (CLS excluded), ``B x N``."""
    tokens: Tensor | None = None
    """The embedded tokens ``B x (1 + N) x D`` (``embed(x)``) when asked for with ``keep_tokens``, so the
    prompted pass of the same images can skip the patch embedding (``forward(..., tokens=...)``)."""


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a loaded backbone that methods, exports and profiles need."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    num_patches: int
    num_prefix_tokens: int
    img_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def seq_len(self) -> int:
        """Tokens in a full sequence (prefix tokens such as CLS plus all patches)."""
        return self.num_prefix_tokens + self.num_patches


class LayerHooks:
    """Per-layer extension points of the prompted pass; override what a method needs.

    The backbone runs its own attention for a layer only when ``wants(layer)`` is true (or a static
    prefix is given for it); all other layers run timm's block untouched.
    """

    def wants(self, layer: int) -> bool:
        """Whether this hook object acts on ``layer`` at all."""
        return False

    def prefix(self, layer: int, x_norm: Tensor) -> Prefix | None:
        """A dynamic (key, value) prefix computed from the layer's normed input (``B x T x D``)."""
        return None

    def attn_out(self, layer: int, x_norm: Tensor, out: Tensor) -> Tensor:
        """Edit the concatenated per-head attention output (``B x T x D``) before the output projection."""
        return out

    def block_out(self, layer: int, x: Tensor, keys: Tensor) -> Tensor:
        """Edit the block output (``B x T x D``); ``keys`` are the layer's keys, heads concatenated."""
        return x


def _check_timm_vit(model: nn.Module) -> None:
    """Refuse models whose structure the prompted pass does not reproduce exactly."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"edgecl needs a timm VisionTransformer, got {type(model).__name__}; "
            "pass a timm ViT name such as 'vit_tiny_patch16_224'."
        )
    if getattr(model, "global_pool", "token") != "token" or not getattr(model, "cls_token", None) is not None:
        raise ValueError("edgecl needs a ViT with a CLS token and global_pool='token'.")
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        if not hasattr(attn, "qkv"):
            raise ValueError(
                f"block {i} has no fused qkv projection; this timm ViT variant is not supported."
            )
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"block {i} uses scale_norm in attention; not supported by the prompted pass.")


class FrozenViT(nn.Module):
    """A frozen timm ViT with a query pass, a prompted pass and a token-subset pass.

    All parameters are frozen and the module stays in eval mode (``train()`` is a no-op), so dropout,
    drop-path and any batch statistics never change.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str = "vit",
        score_layer: int = -1,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        kernels: str | None = None,
    ) -> None:
        super().__init__()
        _check_timm_vit(model)
        kernels = default_kernels() if kernels is None else kernels
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r} is not a kernel choice; use one of {KERNEL_CHOICES}")
        self.kernels = kernels
        """``auto``: oneDNN linears for CPU fp32 passes without autocast (``edgecl.kernels``), timm's modules
        elsewhere; ``torch``: timm's modules always (the env default ``EDGECL_KERNELS`` sets it)."""
        model.reset_classifier(0)
        model.requires_grad_(False)
        model.eval()
        self.vit = model
        depth = len(model.blocks)
        if not -depth <= score_layer < depth:
            raise ValueError(f"score_layer={score_layer} is outside the {depth} blocks of {name}.")
        self.score_layer = score_layer % depth
        pe = model.patch_embed
        img = pe.img_size[0] if isinstance(pe.img_size, tuple) else int(pe.img_size)
        patch = pe.patch_size[0] if isinstance(pe.patch_size, tuple) else int(pe.patch_size)
        self.info = BackboneInfo(
            name=name,
            embed_dim=model.embed_dim,
            depth=depth,
            num_heads=model.blocks[0].attn.num_heads,
            num_patches=pe.num_patches,
            num_prefix_tokens=model.num_prefix_tokens,
            img_size=img,
            patch_size=patch,
            mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in std),  # type: ignore[arg-type]
        )
        from timm.layers import Mlp

        self._inplace_mlp = tuple(isinstance(b.mlp, Mlp) and type(b.mlp.act) is nn.GELU for b in model.blocks)
        """Blocks whose MLP may run in place when gradients are off (timm's Mlp with GELU)."""
        self.spec: dict[str, Any] = {"name": name}
        """How to rebuild this backbone (``load_backbone`` keyword arguments), stored in checkpoints."""
        super().train(False)

    # ----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenViT:
        """The backbone is frozen: it always stays in eval mode."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        """Width D of the tokens."""
        return self.info.embed_dim

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return self.info.depth

    @property
    def num_patches(self) -> int:
        """Number of patch tokens N (prefix tokens such as CLS excluded)."""
        return self.info.num_patches

    # ----------------------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        """Patch-embed ``x`` and add CLS and position embeddings: ``B x (1 + N) x D``."""
        vit = self.vit
        tokens = vit.patch_embed(x)
        tokens = vit._pos_embed(tokens)
        tokens = vit.patch_drop(tokens)
        return vit.norm_pre(tokens)

    def gather_tokens(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Keep the prefix tokens plus the patches in ``keep`` (``B x k``, 0-based), in ascending order."""
        n_pre = self.info.num_prefix_tokens
        if keep.dim() != 2 or keep.shape[0] != tokens.shape[0]:
            raise ValueError(f"keep must be B x k patch indices, got shape {tuple(keep.shape)}.")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= self.num_patches):
            raise ValueError(f"keep indices must lie in [0, {self.num_patches}).")
        idx = torch.sort(keep.long(), dim=1).values + n_pre
        pre = torch.arange(n_pre, device=tokens.device).expand(tokens.shape[0], n_pre)
        idx = torch.cat([pre, idx], dim=1)
        return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    def _fast(self, x: Tensor) -> bool:
        """Whether this pass runs the oneDNN linears (``kernels='auto'`` and CPU fp32 without autocast)."""
        return self.kernels == "auto" and fast_applies(x)

    def _qkv(self, blk: nn.Module, x_norm: Tensor, fast: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of one block, each ``B x H x T x dh`` (q/k norms applied as timm does)."""
        attn = blk.attn
        b, t, d = x_norm.shape
        qkv = frozen_linear(x_norm, attn.qkv.weight, attn.qkv.bias, fast)
        qkv = qkv.reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _split_heads(self, p: Tensor, batch: int, heads: int) -> Tensor:
        """``(B x) Lp x D`` prefix -> ``B x H x Lp x dh``."""
        if p.dim() == 2:
            p = p.unsqueeze(0).expand(batch, -1, -1)
        b, lp, d = p.shape
        return p.reshape(b, lp, heads, d // heads).transpose(1, 2)

    def _attn_residual(self, blk: nn.Module, x: Tensor, out: Tensor, fast: bool) -> Tensor:
        """``x + ls1(proj(out))``: the attention half's output projection and residual (fused when fast)."""
        proj = blk.attn.proj
        if isinstance(blk.ls1, nn.Identity):
            return frozen_linear(out, proj.weight, proj.bias, fast, residual=x)
        return x + blk.ls1(frozen_linear(out, proj.weight, proj.bias, fast))

    def _mlp_residual(self, i: int, blk: nn.Module, x: Tensor, fast: bool) -> Tensor:
        """``x + ls2(mlp(norm2(x)))``, the MLP half; timm's Mlp with GELU runs fc1+GELU and fc2+residual
        as fused oneDNN ops when fast (without autograd), other MLP types run timm's module."""
        if not self._inplace_mlp[i]:
            return x + blk.ls2(blk.mlp(blk.norm2(x)))
        mlp = blk.mlp
        h = frozen_linear(blk.norm2(x), mlp.fc1.weight, mlp.fc1.bias, fast, gelu=mlp.act.approximate)
        h = mlp.norm(h)
        if isinstance(blk.ls2, nn.Identity):
            return frozen_linear(h, mlp.fc2.weight, mlp.fc2.bias, fast, residual=x)
        return x + blk.ls2(frozen_linear(h, mlp.fc2.weight, mlp.fc2.bias, fast))

    def _frozen_block(self, i: int, blk: nn.Module, x: Tensor) -> Tensor:
        """A block with no prefix and no hook: the fused oneDNN path when it applies, else timm's block.

        timm's path: without autograd its MLP half runs in place (the GELU and the second residual add
        write into their inputs, which no one else holds when gradients are off; same math, two fewer
        large buffers). Other MLP types run timm's block unchanged.
        """
        if self._fast(x):
            return self._block(i, blk, x, None, None)
        if torch.is_grad_enabled() or not self._inplace_mlp[i]:
            return blk(x)
        mlp = blk.mlp
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        h = mlp.fc1(blk.norm2(x))
        h = torch.ops.aten.gelu_(h, approximate=mlp.act.approximate)
        h = blk.drop_path2(blk.ls2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))))
        if h.dtype != x.dtype:
            return x + h
        return x.add_(h)

    def _cls_qkv(self, blk: nn.Module, x_norm: Tensor, fast: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The qkv projection split for a CLS-only block: q of the CLS token (``B x H x 1 x dh``), k and v of
        all tokens (``B x H x T x dh``), and v with heads concatenated (``B x T x D``, a view)."""
        attn = blk.attn
        b, t, d = x_norm.shape
        h = attn.num_heads
        w, bias = attn.qkv.weight, attn.qkv.bias
        kv = frozen_linear(x_norm, w[d:], None if bias is None else bias[d:], fast)  # B x T x 2D
        q = frozen_linear(x_norm[:, :1], w[:d], None if bias is None else bias[:d], fast)  # B x 1 x D
        q = q.reshape(b, 1, h, d // h).transpose(1, 2)
        k, v = kv.reshape(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v, kv[..., d:]

    def _cls_tail(self, i: int, blk: nn.Module, x: Tensor, out: Tensor, fast: bool) -> Tensor:
        """Residual, output projection and MLP of a block for the CLS token only (``out``: ``B x 1 x D``)."""
        x = self._attn_residual(blk, x[:, :1], out, fast)
        return self._mlp_residual(i, blk, x, fast)

    def _cls_block(self, i: int, blk: nn.Module, x: Tensor, prefix: Prefix | None) -> Tensor:
        """The last block for the CLS token only (``B x 1 x D``), with an optional prefix.

        The pre-logits feature reads nothing else of the last block: every token still gives its key and
        value, but the other tokens' queries, attention rows, output projection and MLP are skipped.
        """
        b, _, d = x.shape
        h = blk.attn.num_heads
        fast = self._fast(x)
        q, k, v, _ = self._cls_qkv(blk, blk.norm1(x), fast)
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat([self._split_heads(pk.to(k.dtype), b, h), k], dim=2)
            v = torch.cat([self._split_heads(pv.to(v.dtype), b, h), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        return self._cls_tail(i, blk, x, out, fast)

    def _block(
        self,
        i: int,
        blk: nn.Module,
        x: Tensor,
        prefix: Prefix | None,
        hooks: LayerHooks | None,
    ) -> Tensor:
        """One block with prefix key/values and hooks; the math of timm's Block otherwise."""
        attn = blk.attn
        b, t, d = x.shape
        h = attn.num_heads
        fast = self._fast(x)
        x_norm = blk.norm1(x)
        if hooks is not None and prefix is None:
            prefix = hooks.prefix(i, x_norm)
        q, k, v = self._qkv(blk, x_norm, fast)
        keys_concat = k.transpose(1, 2).reshape(b, t, d) if hooks is not None else None
        if prefix is not None:
            pk, pv = prefix
            k = torch.cat([self._split_heads(pk.to(k.dtype), b, h), k], dim=2)
            v = torch.cat([self._split_heads(pv.to(v.dtype), b, h), v], dim=2)
            if torch.is_grad_enabled():
                # k and v are fresh copies now; a contiguous q lets the fused qkv buffer (3x the size) go,
                # so autograd keeps q, [pk; k], [pv; v] for attention's backward instead of all three
                q = q.contiguous()
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, t, d)
        if hooks is not None:
            out = hooks.attn_out(i, x_norm, out)
        x = self._attn_residual(blk, x, out, fast)
        x = self._mlp_residual(i, blk, x, fast)
        if hooks is not None:
            assert keys_concat is not None
            x = hooks.block_out(i, x, keys_concat)
        return x

    def forward(
        self,
        x: Tensor,
        prefixes: Mapping[int, Prefix] | None = None,
        keep: Tensor | None = None,
        hooks: LayerHooks | None = None,
        return_tokens: bool = False,
        tokens: Tensor | None = None,
    ) -> Tensor:
        """Prompted / token-subset pass; returns the pre-logits CLS feature ``B x D``.

        ``prefixes`` maps layer index to a (key, value) prefix prepended after the qkv projection;
        ``keep`` selects patches (position embeddings are added before the gather); ``hooks`` lets a
        method act inside chosen layers.  With ``return_tokens`` the final-normed tokens
        (``B x T x D``) are returned instead of the CLS feature.  ``tokens`` may pass ``embed(x)``
        already computed (``query(x, keep_tokens=True).tokens``) to skip the patch embedding.
        Unless tokens are returned or hooked there, the last block runs for the CLS token only.
        """
        prefixes = prefixes or {}
        bad = [i for i in prefixes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"prefix layers {bad} are outside the {self.depth} blocks.")
        if tokens is None:
            tokens = self.embed(x)
        elif tokens.shape[:2] != (x.shape[0], self.info.seq_len):
            raise ValueError(
                f"tokens must be embed(x), {x.shape[0]} x {self.info.seq_len} x D; got {tuple(tokens.shape)}."
            )
        if keep is not None:
            tokens = self.gather_tokens(tokens, keep)
        last = self.depth - 1
        for i, blk in enumerate(self.vit.blocks):
            prefix = prefixes.get(i)
            wants = hooks is not None and hooks.wants(i)
            if i == last and not return_tokens and not wants:
                tokens = self._cls_block(i, blk, tokens, prefix)
            elif prefix is None and not wants:
                tokens = self._frozen_block(i, blk, tokens)
            else:
                tokens = self._block(i, blk, tokens, prefix, hooks if wants else None)
        tokens = self.vit.norm(tokens)
        if return_tokens:
            return tokens
        return tokens[:, 0]

    # ----------------------------------------------------------------------------------------------
    def critical_scores(self, blk: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Run one block and return (its output, CPS scores over all tokens ``B x T``).

        score_j = (sum over heads of the CLS row of the attention probabilities)_j * ||v_j||_2, with v the
        qkv output (heads concatenated) before the output projection -- the reference's ATS-style score.
        """
        b, t, d = tokens.shape
        i = self.score_layer
        fast = self._fast(tokens)
        x_norm = blk.norm1(tokens)
        q, k, v = self._qkv(blk, x_norm, fast)
        attn = blk.attn
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # B x H x 1 x T: only the CLS row
        cls_row = logits.softmax(dim=-1).sum(dim=1)[:, 0]  # B x T, summed over heads
        v_norm = v.transpose(1, 2).reshape(b, t, d).norm(dim=-1)  # B x T
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = self._attn_residual(blk, tokens, out, fast)
        return self._mlp_residual(i, blk, x, fast), cls_row * v_norm

    def _cls_critical_scores(self, blk: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`critical_scores` of the last block, computing its output for the CLS token only."""
        b, _, d = tokens.shape
        fast = self._fast(tokens)
        q, k, v, v_cat = self._cls_qkv(blk, blk.norm1(tokens), fast)
        probs = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # B x H x 1 x T: the CLS row
        scores = probs.sum(dim=1)[:, 0] * v_cat.norm(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, 1, d)  # the CLS row of the attention output
        return self._cls_tail(self.score_layer, blk, tokens, out, fast), scores

    def query(self, x: Tensor, keep_tokens: bool = False) -> QueryOutput:
        """The no-prompt query pass (no autograd): CLS feature and CPS scores of ``score_layer``.

        With ``keep_tokens`` the embedded tokens are returned too, for the prompted pass of the same ``x``.
        The last block runs for the CLS token only (its scores still cover every token).
        """
        with torch.no_grad():  # outside inference mode, so the prompted pass may reuse the tokens
            embedded = self.embed(x)
        with torch.inference_mode():
            tokens = embedded
            scores = tokens.new_zeros(0)
            last = self.depth - 1
            for i, blk in enumerate(self.vit.blocks):
                if i == self.score_layer == last:
                    tokens, scores = self._cls_critical_scores(blk, tokens)
                elif i == self.score_layer:
                    tokens, scores = self.critical_scores(blk, tokens)
                elif i == last:
                    tokens = self._cls_block(i, blk, tokens, None)
                else:
                    tokens = self._frozen_block(i, blk, tokens)
            cls = self.vit.norm(tokens)[:, 0]
        # clone outside inference mode so the results may feed autograd graphs (prompt queries)
        return QueryOutput(
            cls=cls.clone(),
            scores=scores[:, self.info.num_prefix_tokens :].clone(),
            tokens=embedded if keep_tokens else None,
        )

    def features(self, x: Tensor) -> Tensor:
        """The plain frozen forward, no autograd: pre-logits CLS ``B x D`` (timm's own forward with
        ``kernels='torch'`` or where the oneDNN path does not apply)."""
        with torch.inference_mode():
            if self._fast(x):
                out = self.forward(x)
            else:
                out = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return out.clone()


# --------------------------------------------------------------------------------------------------
# loading


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a plain state dict from .safetensors, .pth/.pt/.bin (plain or ``{"model": ...}``) or .npz."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    if suffix in {".pth", ".pt", ".bin", ".ckpt"}:
        obj: Any = torch.load(str(p), map_location="cpu", weights_only=True)
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"{p} does not hold a state dict of tensors.")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise ValueError(
        f"unsupported weights format '{suffix}' for {p}; use .safetensors, .pth/.pt/.bin or a timm .npz."
    )


def _load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local weights file into ``model``; missing/unexpected keys are an error naming them."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        if not p.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {p}")
        model.load_pretrained(str(p))  # timm's big_vision/.npz loader
        return
    state = load_state_dict_file(p)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights {p} do not match the model: missing keys {missing}, unexpected keys "
            f"{list(result.unexpected_keys)}. Check the backbone name, --img-size and --patch-size."
        )


def load_backbone(
    name: str = "vit_tiny_patch16_224",
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    patch_size: int | None = None,
    score_layer: int = -1,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    kernels: str | None = None,
) -> FrozenViT:
    """Build a frozen timm ViT by name, from a local weights file, timm's hub, or random init.

    ``weights`` wins over ``pretrained``.  Without weights and without ``pretrained`` the backbone is
    randomly initialised (useful for tests and step benchmarks only).  Normalisation defaults to the
    model's pretrained config (0.5/0.5 for the reference weights). ``kernels`` as :class:`FrozenViT`
    (``auto`` unless ``EDGECL_KERNELS`` says ``torch``); a run-time choice, not part of ``spec``.
    """
    import timm

    if weights is not None and pretrained:
        raise ValueError("pass either weights=PATH or pretrained=True, not both.")
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_rate": 0.0, "drop_path_rate": 0.0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model '{name}'; list candidates with timm.list_models('vit_*').")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # network / hub failures when offline
        if pretrained:
            raise RuntimeError(
                f"could not download pretrained weights for '{name}' ({type(err).__name__}: {err}). "
                "This machine looks offline: pass weights=PATH (CLI: --weights FILE) with a local "
                ".safetensors/.pth/.npz file instead."
            ) from err
        raise
    if weights is not None:
        _load_weights(model, weights)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if mean is None:
        mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))  # type: ignore[assignment]
    if std is None:
        std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))  # type: ignore[assignment]
    assert mean is not None and std is not None
    vit = FrozenViT(model, name=name, score_layer=score_layer, mean=mean, std=std, kernels=kernels)
    vit.spec = {
        "name": name,
        "weights": str(Path(weights).resolve()) if weights is not None else None,
        "pretrained": pretrained,
        "img_size": vit.info.img_size,
        "patch_size": vit.info.patch_size,
        "score_layer": score_layer,
        "mean": list(vit.info.mean),
        "std": list(vit.info.std),
    }
    return vit
