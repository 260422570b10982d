"""Shared fixtures: a tiny random ViT, synthetic streams, and the ../shared assets when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from edgecl.backbone import FrozenViT, load_backbone

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGECL_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "datasets" / "tinyimagenet-100-heldout"
SHARED_WEIGHTS = SHARED / "weights" / "vit_tiny_p8_64_tin100.safetensors"

TEST_THREADS = int(os.environ.get("EDGECL_TEST_THREADS", "1"))

needs_shared = pytest.mark.skipif(
    not (SHARED_DATA.is_dir() and SHARED_WEIGHTS.is_file()),
    reason=f"shared dataset/weights not found under {SHARED}",
)


@pytest.fixture(autouse=True)
def _threads_and_seed() -> None:
    """Seeded tests on one torch thread by default (tiny models gain nothing from more; CI has 2 shared
    cores). ``EDGECL_TEST_THREADS=2`` runs the suite on two threads: no test may depend on the count."""
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)


def narrow_vit(name: str) -> FrozenViT:
    """A seeded random 6-block ViT of width 96 at 32 px / patch 8: every method's default prompt layers fit,
    and exporting (linear in depth) stays fast."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6, embed_dim=96, num_heads=3, num_classes=0
    )
    return FrozenViT(vit, name=name)


@pytest.fixture(scope="session")
def tiny_vit() -> FrozenViT:
    """A randomly initialised ViT-Tiny at 32 px / patch 8 (16 patches + CLS, 12 blocks, 3 heads)."""
    torch.manual_seed(1234)
    return load_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)


@pytest.fixture(scope="session")
def ref_vit() -> FrozenViT:
    """The shared reference ViT-Tiny (64 px, patch 8)."""
    if not SHARED_WEIGHTS.is_file():
        pytest.skip(f"reference weights not found: {SHARED_WEIGHTS}")
    return load_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, weights=SHARED_WEIGHTS)
