"""Every registered method trains a 3-task and a 7-task stream with its default pool (issue #17.3).

Before the pools were split with the remainder spread, CODA/CPS/PatchDropout/I-Prompt refused any task
count that does not divide 100 ("pool_size=100 must be divisible by expected_tasks=3"). Checked here with
exact facts, not accuracies: the head holds every class, each task's head rows are trained in that task,
a split pool covers all ``pool_size`` components in :func:`split_pool`'s sizes, and each task's own
components move while that task trains.
"""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

from edgecl.backbone import FrozenViT
from edgecl.data import synthetic_stream
from edgecl.methods import create_method, list_methods
from edgecl.methods.layers import split_pool
from edgecl.train import Callback, TrainConfig, Trainer


@pytest.fixture(scope="module")
def vit6() -> FrozenViT:
    """A random 6-block ViT-Tiny at 32 px / patch 16 (4 patches): every method's default layers exist."""
    torch.manual_seed(1234)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=6, num_classes=0)
    return FrozenViT(model, name="tiny-6")


class TaskSnapshots(Callback):
    """Copies of the head and the prompt pool (when split per task) at the start and end of every task."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.end: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.method.trainable_state_dict().items()}

    def on_train_end(self, trainer: Trainer, task: int) -> None:
        self.end[task] = self._state(trainer)

    def on_epoch_start(self, trainer: Trainer, task: int, epoch: int) -> None:
        if epoch == 0:  # after begin_task: the head has grown and the task's components are initialised
            self.start[task] = self._state(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [3, 7])
@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_any_task_count(vit6: FrozenViT, name: str, tasks: int) -> None:
    """Default options (CODA's pool of 100 split 34/33/33 or 15/15/14/14/14/14/14) plus a faster lr."""
    check_trains(vit6, name, tasks, {})


def test_cps_prompt_trains_three_tasks_with_a_remainder(vit6: FrozenViT) -> None:
    """The fast-suite case: a pool of 10 over 3 tasks is 4, 3, 3 components."""
    check_trains(vit6, "cps_prompt", 3, {"pool_size": 10})


def check_trains(vit6: FrozenViT, name: str, tasks: int, options: dict[str, Any]) -> None:
    """Train ``name`` over a ``tasks``-task synthetic stream; check head rows and pool split (see above)."""
    stream = synthetic_stream(tasks, classes_per_task=2, per_class=4, test_per_class=2, img_size=32)
    torch.manual_seed(0)
    method = create_method(name, vit6, {"expected_tasks": tasks, "lr": 0.01, **options})
    snaps = TaskSnapshots()
    results = Trainer(method, stream, TrainConfig(epochs=2, batch_size=4), [snaps]).fit()

    assert [len(row) for row in results["accuracy_matrix"]] == list(range(1, tasks + 1))
    assert method.head.num_classes == 2 * tasks
    for t, task in enumerate(stream.tasks):
        before, after = snaps.start[t], snaps.end[t]
        rows = torch.tensor(task.classes)
        assert before["head.weight"].shape[0] == task.classes[-1] + 1  # grown to this task's classes
        assert not torch.equal(before["head.weight"][rows], after["head.weight"][rows]), f"task {t} head"

    prompt: Any = getattr(method, "prompt", None)
    bounds = getattr(prompt, "bounds", None)
    pooled = bounds is not None and getattr(prompt, "allocation", "per_task") == "per_task"
    if pooled:
        size = method.cfg.pool_size  # type: ignore[attr-defined]
        assert bounds[-1] == size
        assert [b - a for a, b in zip(bounds, bounds[1:], strict=False)] == split_pool(size, tasks)
        key = next(k for k in snaps.end[0] if k.startswith("prompt."))
        for t in range(tasks):
            own = slice(bounds[t], bounds[t + 1])
            assert not torch.equal(snaps.start[t][key][own], snaps.end[t][key][own]), f"task {t} components"
    elif name in {"coda_prompt", "cps_prompt", "patchdropout", "iprompt"}:
        pytest.fail(f"{name} should split its pool per task")
