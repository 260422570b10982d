"""The public CPS-Prompt reference code's training step, run from its checkout for ``step_bench.py``.

The reference (laymond1/cps-prompt, a Mammoth fork) is never copied here: this module puts its checkout
on ``sys.path`` and builds the step from its own modules -- ``models.cps_prompt.CPSPrompt`` (its
``observe`` is the step) and ``models.cps_prompt_utils.model.PromptModel`` (its network: CODA-Prompt
prefixes over a patched timm-style ViT).  The repository has no CODA-Prompt model class; its CODA step
here is CPS-Prompt's at ``reduction_ratio = 0`` (``CriticalPatchSampling`` then returns every token,
and ``observe``'s phase-1 branch is CODA-Prompt's step: forward with ``train=True``, CE over the seen
classes plus the prompt loss, backward, clip, Adam).  Its plain CODA network
(``models.prompt_utils.model.PromptModel(prompt_flag='coda')``) cannot train on a CPU: its ViT adds
the prompt loss in place into a leaf tensor (``torch.zeros(..., requires_grad=True).to(device)`` is a
copy only on a GPU), which autograd refuses.

Only what the step never runs is shimmed, so the Mammoth framework and its datasets need not be
installed: the ``models`` / ``utils`` / ``datasets`` package ``__init__`` files (they import the whole
framework and ``chdir``), ``ContinualModel`` (a minimal ``nn.Module`` holding ``net``, ``loss``,
``args`` and building Adam as Mammoth's ``get_optimizer`` does for ``--optimizer adam``),
``get_dataset`` (class and task counts), ``ArgumentParser``, ``CosineSchedule`` (never stepped inside a
step) and ``binary_to_boolean_type``. ``timm.create_model(..., pretrained=True)`` is answered offline
with the same randomly initialised ``vit_tiny_patch16_224`` edgecl's worker builds (same seed), so
both sides run the same weights on the same input.
"""

from __future__ import annotations

import contextlib
import sys
import types
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _module(name: str, path: Path | None = None, **attrs: Any) -> types.ModuleType:
    """Register a module object under ``name`` (a package searching ``path`` when given)."""
    mod = types.ModuleType(name)
    if path is not None:
        mod.__path__ = [str(path)]
    for key, value in attrs.items():
        setattr(mod, key, value)
    sys.modules[name] = mod
    return mod


def install_shims(ref: Path) -> None:
    """Make the reference's step modules importable without the Mammoth framework around them."""
    import torch
    from torch import nn

    if not (ref / "models" / "cps_prompt_utils" / "model.py").is_file():
        raise ValueError(
            f"--reference {ref} is not a CPS-Prompt checkout (no models/cps_prompt_utils/model.py); "
            "pass the path of a laymond1/cps-prompt clone."
        )
    sys.path.insert(0, str(ref))

    class ContinualModel(nn.Module):
        """What ``CPSPrompt`` uses of Mammoth's ContinualModel (Adam as its ``get_optimizer``)."""

        def __init__(self, backbone: nn.Module, loss: Callable[..., Any], args: Namespace, transform: Any,
                     dataset: Any = None) -> None:  # fmt: skip
            super().__init__()
            self.net, self.loss, self.args, self.transform, self.dataset = (
                backbone,
                loss,
                args,
                transform,
                dataset,
            )
            self.current_task = 0
            self.n_past_classes = 0
            self.n_seen_classes = dataset.N_CLASSES if dataset is not None else 0

        def get_parameters(self) -> Iterator[nn.Parameter]:
            return self.net.parameters()

        def get_optimizer(self) -> torch.optim.Optimizer:
            if self.args.optimizer.lower() != "adam":
                raise ValueError(
                    f"the reference shim builds only --optimizer adam, not {self.args.optimizer}"
                )
            return torch.optim.Adam(
                list(self.get_parameters()), lr=self.args.lr, weight_decay=self.args.optim_wd
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class CosineSchedule:
        """Stepped once per epoch by Mammoth, never inside a step: not needed here."""

        def __init__(self, optimizer: Any, K: int) -> None:  # noqa: N803 (the reference's name)
            self.optimizer, self.K = optimizer, K

    def get_dataset(args: Namespace) -> Any:
        raise ValueError("the reference shim needs dataset= (class and task counts) passed to CPSPrompt")

    _module("models", ref / "models")
    _module("models.utils", ref / "models" / "utils")
    _module("models.utils.continual_model", ContinualModel=ContinualModel)
    _module("utils", ref / "utils", binary_to_boolean_type=lambda v: str(v).lower() in {"1", "true"})
    _module("utils.args", ArgumentParser=object)
    _module("utils.schedulers", CosineSchedule=CosineSchedule)
    _module("datasets", ref / "datasets", get_dataset=get_dataset)


@contextlib.contextmanager
def offline_timm(seed: int) -> Iterator[None]:
    """``timm.create_model(name, pretrained=True)`` -> the seeded random model edgecl's worker builds."""
    import timm
    import torch

    real = timm.create_model

    def create(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # as step_bench's edgecl worker: seed, then load_backbone's create_model
            return real(name, pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = real


def reference_args(overrides: dict[str, Any], epochs: int) -> Namespace:
    """CPS-Prompt's arguments as its README's CIFAR-100 command sets them, with ``overrides``."""
    args = Namespace(
        vit_type="tiny",
        e_prompt_layer_idx=[0, 1, 2, 3, 4],
        e_prompt_pool_size=100,
        e_prompt_length=8,
        ortho_mu=0.0,
        pull_constraint_coeff=1.0,
        reduction_ratio=0.5,
        sampling="critical_score",
        temperature=0.1,
        phase_ratio=0.4,
        clip_grad=1.0,
        use_scheduler=False,
        optimizer="adam",
        lr=1e-3,
        optim_wd=0.0,
        n_epochs=epochs,
    )
    renames = {"reduction_rate": "reduction_ratio", "pool_size": "e_prompt_pool_size"}
    for key, value in overrides.items():
        key = renames.get(key, key)
        if not hasattr(args, key):
            raise ValueError(f"reference variant option {key!r} is not a CPS-Prompt argument")
        setattr(args, key, value)
    return args


def build_reference(ref: Path, name: str, overrides: dict[str, Any], classes: int, tasks: int, epochs: int,
                    seed: int) -> Any:  # fmt: skip
    """The reference's ``CPSPrompt`` model; ``coda_prompt`` is the same network at reduction ratio 0."""
    import torch.nn.functional as F

    install_shims(ref)
    from models.cps_prompt import CPSPrompt

    if name == "coda_prompt":
        overrides = {**overrides, "reduction_ratio": 0.0}  # CriticalPatchSampling passes x through at 0
    elif name != "cps_prompt":
        raise ValueError(f"reference variants are coda_prompt and cps_prompt, not {name!r}")
    dataset = Namespace(N_CLASSES=classes, N_TASKS=tasks)
    args = reference_args(overrides, epochs)
    with offline_timm(seed):
        model = CPSPrompt(None, F.cross_entropy, args, None, dataset=dataset)
    model.begin_task(dataset)
    model.begin_epoch(0, dataset)  # the running-loss counters observe updates
    return model


def reference_step(model: Any, mode: str, x: Any, y: Any) -> Callable[[], object]:
    """The callable timed for ``mode``: one ``observe`` (phase1 / phase2_recompute) or an inference."""
    import torch

    args = model.args
    if mode == "phase1":
        epoch = 0
    elif mode == "phase2_recompute":
        epoch = args.n_epochs - 1
        if epoch < int(args.n_epochs * args.phase_ratio):
            raise ValueError("phase2_recompute needs phase_ratio < 1 (the last epoch is then phase 2)")
    elif mode == "inference":

        def infer() -> object:
            model.net.eval()
            with torch.no_grad():
                return model(x)

        return infer
    else:
        raise ValueError(f"the reference runs modes phase1, phase2_recompute and inference, not {mode!r}")

    def step() -> object:
        model.net.train()
        return model.observe(x, y, x, epoch=epoch)

    return step


def reference_commit(ref: Path) -> str | None:
    """The checked-out commit of the reference (for the results), read without running git."""
    head = ref / ".git" / "HEAD"
    try:
        text = head.read_text().strip()
        if text.startswith("ref: "):
            return (ref / ".git" / text[5:]).read_text().strip()
        return text
    except OSError:
        return None
