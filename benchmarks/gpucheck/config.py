"""The GPU check's settings: sizes of the GPU run and of the CPU dry run, and the context every unit gets."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GPU_DATA = REPO / ".gpu" / "data"
DATA_SUBSET = GPU_DATA / "tin-subset"
WEIGHTS = GPU_DATA / "vit_tiny_p8_64_tin100.safetensors"
TOKEN = "gpu-check-token-0123456789abcdef"
BENCH_METHODS = ("cps_prompt", "coda_prompt", "patchdropout")
PRECISIONS = ("fp32", "bf16", "fp16")
BUDGETS = ("tight", "comfortable", "impossible")


@dataclass
class Sizes:
    """How big each step is; :func:`gpu_sizes` and :func:`dry_run_sizes` are the two settings."""

    device: str
    backbone: str
    """timm ViT of the training, precision, serve and export steps (random unless there are weights)."""
    big_backbone: str
    """timm ViT of the budget and bench steps (always random)."""
    tasks: int
    classes: int
    per_class: int | None
    test_per_class: int | None
    epochs: int
    batch: int
    img: int | None
    patch: int | None
    pool_size: int | None
    """Prompt pool size for methods that have one (None: the method's default)."""
    big_img: int
    big_patch: int
    big_batch: int
    big_per_class: int
    bench: tuple[str, int, int, int]
    """(timm ViT, image size, patch size, batch) of ``edgecl bench`` (random weights)."""
    unit_limit_s: dict[str, float]
    total_limit_s: float


def gpu_sizes() -> Sizes:
    """The real check: 3 tasks x 5 classes, 2 epochs, batch 32; 224/16 batch 32 for budget and bench."""
    return Sizes(
        device="cuda",
        backbone="vit_tiny_patch16_224",
        big_backbone="vit_tiny_patch16_224",
        tasks=3,
        classes=15,
        per_class=None,
        test_per_class=None,
        epochs=2,
        batch=32,
        img=None,
        patch=None,
        pool_size=None,
        big_img=224,
        big_patch=16,
        big_batch=32,
        big_per_class=64,
        bench=("vit_tiny_patch16_224", 224, 16, 32),
        unit_limit_s={
            "doctor": 90,
            "train": 100,
            "budget": 100,
            "precision": 100,
            "bench": 210,
            "serve": 150,
            "export": 120,
        },
        total_limit_s=420,
    )


def dry_run_sizes() -> Sizes:
    """The CPU dry run: the same steps on 2 tasks x 2 classes of 32 px synthetic images and timm's 6-block
    ``test_vit``; budget and bench on ViT-Tiny at 64 px (enough activations for a budget to bite)."""
    return Sizes(
        device="cpu",
        backbone="test_vit",
        big_backbone="vit_tiny_patch16_224",
        tasks=2,
        classes=4,
        per_class=6,
        test_per_class=3,
        epochs=2,
        batch=4,
        img=32,
        patch=8,
        pool_size=10,
        big_img=64,
        big_patch=8,
        big_batch=16,
        big_per_class=8,
        bench=("test_vit", 32, 8, 8),
        unit_limit_s={
            "doctor": 120,
            "train": 240,
            "budget": 240,
            "precision": 180,
            "bench": 240,
            "serve": 180,
            "export": 120,
        },
        total_limit_s=600,
    )


@dataclass
class Context:
    """What every unit is told (JSON, so a child process can receive it)."""

    mode: str
    """``gpu`` or ``cpu-dry-run``."""
    work: str
    data: str
    """An ImageFolder root (train/, val/) or ``synthetic``."""
    weights: str | None
    sizes: Sizes
    started: float = field(default_factory=time.time)

    @property
    def dry(self) -> bool:
        """Whether this is the CPU dry run."""
        return self.mode == "cpu-dry-run"

    def to_json(self) -> str:
        """For ``--unit`` children."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        """Inverse of :meth:`to_json`."""
        raw = json.loads(text)
        raw["sizes"] = Sizes(**{**raw["sizes"], "bench": tuple(raw["sizes"]["bench"])})
        return cls(**raw)


class CheckFailed(AssertionError):
    """A unit ran but what it measured is wrong (the message says what); ``partial`` keeps the figures."""

    def __init__(self, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


def _require(condition: bool, message: str, partial: dict[str, Any] | None = None) -> None:
    """Raise :class:`CheckFailed` (with the figures measured so far) unless ``condition``."""
    if not condition:
        raise CheckFailed(message, partial)
