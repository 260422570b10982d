"""Frozen means bit-identical: with weight decay and Adam, training a later task leaves every element a
method declares frozen (and every parameter outside the task's optimizer) exactly as it was (#18.4).

A closed-form head (``phase2_head=ridge``, the default of the DPCT methods) re-solves every seen class's
row from the accumulated statistics by design: there the head must equal that solve, and every other frozen
element (earlier prompt components) must still be bit-identical."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import TaskInfo, create_method, get_method_class, list_methods
from edgecl.train import Callback, TrainConfig, Trainer


def small_overrides(name: str, **extra: Any) -> dict[str, Any]:
    """Two tasks and small pools, for whichever of these fields the method's config has."""
    fields = set(get_method_class(name).Config.model_fields)
    opts: dict[str, Any] = {"expected_tasks": 2, **extra}
    if "pool_size" in fields and name != "hash":
        opts["pool_size"] = 10
    return opts


class _AtTaskStart(Callback):
    """At task 1's start: every parameter, the optimised ones and the method's frozen masks."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.optimised: set[str] = set()
        self.masks: dict[str, torch.Tensor] = {}

    def on_task_start(self, trainer: Trainer, task: int) -> None:
        if task != 1:
            return
        m = trainer.method
        assert trainer.optimizer is not None
        ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        named = {n: p for n, p in m.named_parameters() if not n.startswith("backbone.")}
        self.params = {n: p.detach().clone() for n, p in named.items()}
        self.optimised = {n for n, p in named.items() if id(p) in ids}
        self.masks = {n: mask.expand_as(named[n]).clone() for n, mask in m.frozen_masks().items()}


def _cases() -> list[tuple[str, str | None]]:
    """Every method with its SGD head, and the ones with a closed-form phase-2 head with ridge too."""
    out: list[tuple[str, str | None]] = []
    for name in list_methods():
        if "phase2_head" in get_method_class(name).Config.model_fields:
            out += [(name, "sgd"), (name, "ridge")]
        else:
            out.append((name, None))
    return out


@pytest.mark.parametrize(("name", "head"), _cases())
def test_frozen_elements_bit_identical_under_weight_decay(
    tiny_vit: FrozenViT, name: str, head: str | None
) -> None:
    torch.manual_seed(0)
    extra: dict[str, Any] = (
        {"weight_decay": 0.1} if head is None else {"weight_decay": 0.1, "phase2_head": head}
    )
    method = create_method(name, tiny_vit, small_overrides(name, **extra))
    stream = synthetic_stream(2, classes_per_task=2, per_class=4, test_per_class=2, img_size=32)
    probe = _AtTaskStart()
    Trainer(method, stream, TrainConfig(epochs=2, batch_size=4, eval_batch_size=8), [probe]).fit()
    after = {n: p.detach() for n, p in method.named_parameters() if not n.startswith("backbone.")}
    assert "head.weight" in probe.masks and bool(probe.masks["head.weight"][:2].all())  # task 0's rows
    moved = 0
    if head == "ridge":  # every seen row re-solved by the closed form, not by an optimiser step
        weight, bias = method.analytic.ridge(method.head.num_classes, method.cfg.ridge_lambda)
        assert torch.equal(method.head.weight.detach(), weight) and torch.equal(
            method.head.bias.detach(), bias
        )
        assert not torch.equal(
            after["head.weight"][:2], probe.params["head.weight"][:2]
        )  # earlier rows moved
        for n in ("head.weight", "head.bias"):
            before = probe.params.pop(n)
            moved += int((after[n][: before.shape[0]] != before).sum())
    for n, before in probe.params.items():
        if n not in probe.optimised:
            assert torch.equal(after[n], before), f"{n} is outside the optimizer but changed"
            continue
        mask = probe.masks.get(n)
        if mask is not None:
            assert torch.equal(after[n][mask], before[mask]), f"frozen elements of {n} changed"
            free = ~mask
        else:
            free = torch.ones_like(before, dtype=torch.bool)
        moved += int((after[n][free] != before[free]).sum())
    assert moved > 0, "nothing trainable moved: the check would pass vacuously"


def test_masks_name_real_parameters(tiny_vit: FrozenViT) -> None:
    for name in list_methods():
        method = create_method(name, tiny_vit, small_overrides(name))
        method.begin_task(TaskInfo(0, [0, 1], 0))
        method.begin_task(TaskInfo(1, [2, 3], 2))
        params = dict(method.named_parameters())
        for key, mask in method.frozen_masks().items():
            assert key in params, (name, key)
            assert mask.dtype == torch.bool and mask.expand_as(params[key]).shape == params[key].shape
