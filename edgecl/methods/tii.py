"""Task-identity inference (TII) from frozen-feature class statistics, and a callback that measures it.

Methods with one component per task (Hash routers, DPW slots) need the task of a test image without a
task id. :class:`ClassStatsTaskIdentifier` classifies the frozen backbone's CLS feature over every class
seen so far and maps the predicted class to its task. It keeps class statistics only (no exemplars):
per-class sums and counts plus one pooled within-class scatter matrix, all registered buffers, so
checkpoints hold them. Two classifiers over those statistics:

* ``lda`` -- the Gaussian classifier with a shared (shrunk) covariance: the closed-form linear classifier
  that HiDe-Prompt's TII head approximates by training on features replayed from class Gaussians
  (digest §3.2-1). Default.
* ``ncm`` -- nearest class mean by cosine similarity (no covariance), the cheapest fallback.

:class:`TaskIdentificationCallback` measures TII accuracy on the *test* images of every seen task after
each task (the method API gives no labels during evaluation) and writes it into the task's record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from edgecl.train.callbacks import Callback

if TYPE_CHECKING:
    from edgecl.train.trainer import Trainer

__all__ = [
    "TII_KINDS",
    "ClassStatsTaskIdentifier",
    "SupportsTaskIdentification",
    "TaskIdentificationCallback",
    "collect_features",
]

TII_KINDS = ("lda", "ncm")


@runtime_checkable
class SupportsTaskIdentification(Protocol):
    """A method that can name the task of each input image (``B`` task indices)."""

    def predict_task(self, x: Tensor) -> Tensor:
        """Predicted task index per image, ``B`` (long)."""
        ...


class ClassStatsTaskIdentifier(nn.Module):
    """Classifies frozen features over all fitted classes and returns the classes' tasks.

    Buffers grow with the classes (``grow``); a checkpoint loader must call ``grow(num_classes)`` before
    ``load_state_dict``. Statistics are float64 so pooled scatter over many images stays exact enough.
    """

    def __init__(self, dim: int, kind: str = "lda", shrinkage: float = 0.1) -> None:
        super().__init__()
        if kind not in TII_KINDS:
            raise ValueError(f"tii kind must be one of {TII_KINDS}, got {kind!r}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"tii shrinkage must be in [0, 1], got {shrinkage}")
        self.dim = dim
        self.kind = kind
        self.shrinkage = shrinkage
        self.register_buffer("class_sum", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("scatter", torch.zeros(dim, dim, dtype=torch.float64))

    class_sum: Tensor
    class_count: Tensor
    class_task: Tensor
    scatter: Tensor

    @property
    def num_classes(self) -> int:
        """Class slots allocated (fitted or not)."""
        return int(self.class_count.shape[0])

    @property
    def fitted(self) -> bool:
        """Whether any class has statistics."""
        return bool((self.class_count > 0).any())

    def grow(self, num_classes: int) -> None:
        """Allocate class slots up to ``num_classes`` (never shrinks)."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        self.class_sum = torch.cat([self.class_sum, self.class_sum.new_zeros(extra, self.dim)])
        self.class_count = torch.cat([self.class_count, self.class_count.new_zeros(extra)])
        self.class_task = torch.cat([self.class_task, self.class_task.new_full((extra,), -1)])

    @torch.no_grad()
    def fit(self, feats: Tensor, labels: Tensor, task: int) -> None:
        """Add the statistics of new classes (global ids ``labels``) that belong to ``task``."""
        if feats.dim() != 2 or feats.shape[1] != self.dim or feats.shape[0] != labels.shape[0]:
            raise ValueError(f"expected N x {self.dim} features and N labels, got {tuple(feats.shape)}")
        f = feats.to(self.class_sum.device, torch.float64)
        y = labels.to(self.class_sum.device, torch.long)
        self.grow(int(y.max()) + 1)
        for c in torch.unique(y).tolist():
            if self.class_count[c] > 0:
                raise ValueError(f"class {c} already has TII statistics (class-incremental streams only)")
            fc = f[y == c]
            centred = fc - fc.mean(0, keepdim=True)
            self.class_sum[c] = fc.sum(0)
            self.class_count[c] = fc.shape[0]
            self.class_task[c] = task
            self.scatter += centred.T @ centred

    def class_means(self) -> Tensor:
        """Per-class mean features, ``C x D`` (zeros for unfitted slots)."""
        return self.class_sum / self.class_count.clamp_min(1.0).unsqueeze(1)

    def covariance(self) -> Tensor:
        """Pooled within-class covariance shrunk towards ``tr/D · I`` by ``shrinkage`` (plus a tiny ridge)."""
        n = float(self.class_count.sum())
        c = int((self.class_count > 0).sum())
        cov = self.scatter / max(n - c, 1.0)
        iso = torch.trace(cov) / self.dim
        eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        cov = (1.0 - self.shrinkage) * cov + self.shrinkage * iso * eye
        return cov + 1e-6 * iso.clamp_min(1e-12) * eye

    @torch.no_grad()
    def class_scores(self, feats: Tensor) -> Tensor:
        """Scores ``B x C`` over all class slots (higher = more likely); unfitted slots are -inf."""
        if not self.fitted:
            raise RuntimeError("task identifier has no class statistics yet (end_task was never called)")
        f = feats.to(self.class_sum.device, torch.float64)
        means = self.class_means()
        if self.kind == "ncm":
            scores = nn.functional.normalize(f, dim=1) @ nn.functional.normalize(means, dim=1).T
        else:
            pm = torch.linalg.solve(self.covariance(), means.T).T  # Σ⁻¹ μ_c, C x D
            scores = f @ pm.T - 0.5 * (means * pm).sum(1)
        return scores.masked_fill(self.class_count <= 0, float("-inf"))

    def predict_class(self, feats: Tensor) -> Tensor:
        """Predicted global class id per feature, ``B``."""
        return self.class_scores(feats).argmax(1)

    def predict_task(self, feats: Tensor) -> Tensor:
        """Predicted task per feature (the task of the predicted class), ``B``."""
        return self.class_task[self.predict_class(feats)].to(feats.device)


@torch.no_grad()
def collect_features(
    extract: Callable[[Tensor], Tensor], loader: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``extract(x)`` over a loader: (features ``N x D`` float32, labels ``N``)."""
    feats, labels = [], []
    for x, y in loader:
        feats.append(extract(x.to(device)).float())
        labels.append(torch.as_tensor(y).to(device))
    return torch.cat(feats), torch.cat(labels)


class TaskIdentificationCallback(Callback):
    """After each task, TII accuracy on the test images of every seen task, written into the task record.

    Keys: ``task_identification_accuracy`` (over all seen test images) and
    ``task_identification_accuracy_per_task``. Methods without ``predict_task`` are skipped. Uses its own
    seeded loaders, so the global RNG (and with it exact resume) is untouched.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    @torch.no_grad()
    def on_task_end(self, trainer: Trainer, task: int, record: dict[str, Any]) -> None:
        """Measure TII on tasks ``0..task``'s test sets."""
        method = trainer.method
        if not isinstance(method, SupportsTaskIdentification):
            return
        was_training = method.training
        method.eval()
        per_task, hits, total = [], 0, 0
        bs = self.batch_size or trainer.config.eval_batch_size
        for j in range(task + 1):
            gen = torch.Generator()
            gen.manual_seed(0)
            loader = DataLoader(trainer.stream.tasks[j].test, batch_size=bs, shuffle=False, generator=gen)
            h = n = 0
            for x, _ in loader:
                pred = method.predict_task(x.to(trainer.device))
                h += int((pred.cpu() == j).sum())
                n += int(pred.shape[0])
            per_task.append(h / max(n, 1))
            hits, total = hits + h, total + n
        record["task_identification_accuracy"] = hits / max(total, 1)
        record["task_identification_accuracy_per_task"] = per_task
        method.train(was_training)
