"""The rules for a job's options: which method and options a job may use, given the committed model.

The first learned task fixes the method and its structural options (prompt pool, layers, ...: they decide
tensor shapes); later jobs may change only :data:`ADJUSTABLE_OPTIONS`. Used when a job is queued (to answer
409/422 at once) and again when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgecl.profiles import Profile
    from edgecl.store import TaskRecord

__all__ = [
    "ADJUSTABLE_OPTIONS",
    "JobConflict",
    "read_checkpoint_meta",
    "resolve_method_options",
    "train_count",
]

ADJUSTABLE_OPTIONS = frozenset({"lr", "optimizer", "weight_decay", "schedule", "clip_grad"})
"""Method options a later job may change; all others are fixed by the first learned task (shapes)."""


class JobConflict(ValueError):
    """A job that cannot continue the committed model (another method, or changed structural options)."""


def read_checkpoint_meta(directory: Path) -> dict[str, Any] | None:
    """The committed metadata of a checkpoint folder (no tensors loaded), or None when there is none."""
    from edgecl.train.checkpoint import META

    path = directory / META
    if not path.is_file():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def resolve_method_options(
    method: str, profile: Profile, explicit: dict[str, Any], model_meta: dict[str, Any] | None
) -> dict[str, Any]:
    """The method options a job trains with; ``ValueError`` for bad ones, :class:`JobConflict` when the job
    cannot continue the committed model."""
    from edgecl.methods.registry import build_config, saved_options

    if model_meta is None:
        base = dict(profile.method_options) if method == profile.method else {}
        options = {**base, **explicit}
        build_config(method, options)
        return options
    if model_meta.get("method") != method:
        raise JobConflict(
            f"the model in service was trained with method '{model_meta.get('method')}'; later tasks must "
            f"use the same method (got '{method}')"
        )
    saved = saved_options(method, model_meta.get("method_config") or {})
    fixed = sorted(
        k for k, v in explicit.items() if k not in ADJUSTABLE_OPTIONS and _norm(saved.get(k)) != _norm(v)
    )
    if fixed:
        raise JobConflict(
            f"option(s) {fixed} are fixed once the first task is learned (the model has "
            f"{ {k: saved.get(k) for k in fixed} }); only {sorted(ADJUSTABLE_OPTIONS)} may change"
        )
    options = {**saved, **{k: v for k, v in explicit.items() if k in ADJUSTABLE_OPTIONS}}
    build_config(method, options)
    return options


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train_count(task: TaskRecord) -> int:
    """Training images of a task (all images when none are held out)."""
    n = sum(1 for _, _, split in task.manifest if split == "train")
    return n or task.num_images
