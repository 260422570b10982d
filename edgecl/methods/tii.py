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

Both are linear in the (for ``ncm`` normalised) feature, so :meth:`ClassStatsTaskIdentifier.fit` solves
for the class weights once (``Σ⁻¹ μ_c`` for ``lda``) and keeps them as buffers: predicting is one matrix
product, with nothing left that ONNX lacks an operator for. The trainer callback that measures TII
accuracy lives in :mod:`edgecl.train.task_identification` (methods do not import the trainer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "TII_KINDS",
    "ClassStatsTaskIdentifier",
    "SupportsTaskIdentification",
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
    ``class_weight`` / ``class_bias`` are the linear classifier solved from them by :meth:`fit` (a
    checkpoint without them, written before they existed, gets them solved on load).
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
        self.register_buffer("class_weight", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("class_bias", torch.zeros(0, dtype=torch.float64))

    class_sum: Tensor
    class_count: Tensor
    class_task: Tensor
    scatter: Tensor
    class_weight: Tensor
    """``C x D``: ``Σ⁻¹ μ_c`` (``lda``) or the unit class means (``ncm``); zeros for unfitted slots."""
    class_bias: Tensor
    """``C``: ``-½ μ_c·Σ⁻¹ μ_c`` (``lda``) or zeros (``ncm``)."""

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
        self.class_weight = torch.cat([self.class_weight, self.class_weight.new_zeros(extra, self.dim)])
        self.class_bias = torch.cat([self.class_bias, self.class_bias.new_zeros(extra)])

    @torch.no_grad()
    def fit(self, feats: Tensor, labels: Tensor, task: int) -> None:
        """Add the statistics of new classes (global ids ``labels``) that belong to ``task``, then solve the
        classifier over all classes once (the pooled covariance changes with every fit)."""
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
        self.class_weight, self.class_bias = self._solve(self.class_sum, self.class_count, self.scatter)

    def class_means(self) -> Tensor:
        """Per-class mean features, ``C x D`` (zeros for unfitted slots)."""
        return _means(self.class_sum, self.class_count)

    def covariance(self) -> Tensor:
        """Pooled within-class covariance shrunk towards ``tr/D · I`` by ``shrinkage`` (plus a tiny ridge)."""
        return _covariance(self.class_count, self.scatter, self.shrinkage)

    def _solve(self, class_sum: Tensor, class_count: Tensor, scatter: Tensor) -> tuple[Tensor, Tensor]:
        """(weight ``C x D``, bias ``C``) of the linear classifier over these statistics."""
        means = _means(class_sum, class_count)
        if self.kind == "ncm":
            return nn.functional.normalize(means, dim=1), means.new_zeros(means.shape[0])
        pm = torch.linalg.solve(_covariance(class_count, scatter, self.shrinkage), means.T).T  # Σ⁻¹ μ_c
        return pm, -0.5 * (means * pm).sum(1)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Solve ``class_weight`` / ``class_bias`` for a checkpoint saved before they were buffers."""
        stats = [prefix + k for k in ("class_sum", "class_count", "scatter")]
        if prefix + "class_weight" not in state_dict and all(k in state_dict for k in stats):
            weight, bias = self._solve(*(state_dict[k].to(torch.float64) for k in stats))
            state_dict[prefix + "class_weight"], state_dict[prefix + "class_bias"] = weight, bias
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def class_scores(self, feats: Tensor) -> Tensor:
        """Scores ``B x C`` over all class slots (higher = more likely); unfitted slots are -inf."""
        if not self.fitted:
            raise RuntimeError("task identifier has no class statistics yet (end_task was never called)")
        f = feats.to(self.class_sum.device, torch.float64)
        if self.kind == "ncm":
            f = nn.functional.normalize(f, dim=1)
        scores = f @ self.class_weight.T + self.class_bias
        return scores.masked_fill(self.class_count <= 0, float("-inf"))

    def predict_class(self, feats: Tensor) -> Tensor:
        """Predicted global class id per feature, ``B``."""
        return self.class_scores(feats).argmax(1)

    def predict_task(self, feats: Tensor) -> Tensor:
        """Predicted task per feature (the task of the predicted class), ``B``."""
        return self.class_task[self.predict_class(feats)].to(feats.device)


def _means(class_sum: Tensor, class_count: Tensor) -> Tensor:
    """Per-class means (zeros for empty slots)."""
    return class_sum / class_count.clamp_min(1.0).unsqueeze(1)


def _covariance(class_count: Tensor, scatter: Tensor, shrinkage: float) -> Tensor:
    """Pooled within-class covariance from the scatter, shrunk towards ``tr/D · I``, plus a tiny ridge."""
    dim = scatter.shape[0]
    n = float(class_count.sum())
    c = int((class_count > 0).sum())
    cov = scatter / max(n - c, 1.0)
    iso = torch.trace(cov) / dim
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    cov = (1.0 - shrinkage) * cov + shrinkage * iso * eye
    return cov + 1e-6 * iso.clamp_min(1e-12) * eye


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
