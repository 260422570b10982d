"""Rebuild a trained model from a checkpoint directory (for predict, export and the daemon)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgecl.backbone import FrozenViT, load_backbone
from edgecl.methods.base import Method
from edgecl.methods.registry import create_method, saved_options
from edgecl.train.checkpoint import load_checkpoint

__all__ = ["LoadedModel", "load_model", "backbone_from_spec"]


@dataclass
class LoadedModel:
    """A method in eval mode with the class names its logits index, in learning order."""

    method: Method
    class_names: list[str]
    meta: dict[str, Any]

    @property
    def backbone(self) -> FrozenViT:
        """The frozen backbone under the method."""
        return self.method.backbone

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the learned classes only."""
        return self.method(x)[:, : len(self.class_names)]


def backbone_from_spec(spec: dict[str, Any], weights: str | None = None) -> FrozenViT:
    """``load_backbone`` from a checkpoint's backbone spec; ``weights`` overrides a moved weights file."""
    w = weights or spec.get("weights")
    if w is not None and not Path(w).is_file():
        raise FileNotFoundError(
            f"the checkpoint's backbone weights {w} are missing; pass --weights FILE with the same weights"
        )
    return load_backbone(
        spec["name"],
        weights=w,
        pretrained=bool(spec.get("pretrained")) and w is None,
        img_size=spec.get("img_size"),
        patch_size=spec.get("patch_size"),
        score_layer=int(spec.get("score_layer", -1)),
        mean=tuple(spec["mean"]) if spec.get("mean") else None,
        std=tuple(spec["std"]) if spec.get("std") else None,
    )


def load_model(
    directory: str | Path, weights: str | None = None, backbone: FrozenViT | None = None, device: str = "cpu"
) -> LoadedModel:
    """Load the last committed checkpoint of ``directory`` as an inference model."""
    c = load_checkpoint(directory)
    meta = c.meta
    if meta.get("format") != "edgecl-checkpoint/1":
        raise ValueError(f"{directory} is not an edgecl checkpoint (format {meta.get('format')!r})")
    bb = backbone or backbone_from_spec(meta["backbone"], weights)
    cfg = saved_options(meta["method"], meta["method_config"])
    method = create_method(meta["method"], bb, cfg)
    method.load_checkpoint_meta(meta["method_meta"])
    state = {k.removeprefix("method."): v for k, v in c.tensors.items() if k.startswith("method.")}
    missing, unexpected = method.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not match method {meta['method']}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    method.to(device).eval()
    classes = list(meta.get("classes_learned") or [])
    if not classes:
        raise ValueError(f"checkpoint {directory} holds no finished task yet; nothing to predict with")
    return LoadedModel(method, classes, meta)
