"""What answers ``POST /v1/predict``: a :class:`Predictor` over the last committed model, swapped atomically.

Two engines implement the same small interface, ``predict(images) -> probabilities``:

* :class:`TorchPredictor` runs the loaded method (sharing the frozen backbone with the trainer).
* :class:`OnnxRuntimePredictor` exports the committed model with :mod:`edgecl.export` and runs it in
  onnxruntime: fp32 (``inference_engine: onnxruntime``), int8 dynamic-quantised (``onnxruntime-int8``,
  the fastest on CPUs) or fp16 (``onnxruntime-fp16``, for GPUs). That module is imported lazily: a
  profile asking for an onnxruntime engine without it fails at startup (:func:`check_engine`), a ``torch``
  profile never needs it.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from edgecl.backbone import FrozenViT
    from edgecl.train.model_io import LoadedModel

__all__ = [
    "ModelHolder",
    "OnnxRuntimePredictor",
    "Predictor",
    "TorchPredictor",
    "build_predictor",
    "check_engine",
]

ENGINES = ("torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-fp16")
"""The profile's ``inference_engine`` values (``edgecl.profiles`` lists the same)."""
_PRECISION = {"onnxruntime": "fp32", "onnxruntime-int8": "int8", "onnxruntime-fp16": "fp16"}


class Predictor(Protocol):
    """An inference engine over one committed model version."""

    version: int
    """Tasks in the model (1 after the first task); grows by one with every committed task."""
    class_names: list[str]
    """Labels of the probability columns, in learning order."""
    engine: str
    meta: dict[str, Any]
    """The committed checkpoint's metadata (method, config, records, accuracy matrix)."""

    def predict(self, images: Tensor) -> Tensor:
        """Class probabilities ``N x C`` for a batch of normalised images ``N x 3 x H x W``."""
        ...


def model_version(meta: dict[str, Any]) -> int:
    """The version of a committed model: how many tasks it has learned."""
    return int(meta["task"]) + 1


@dataclass
class TorchPredictor:
    """Runs the loaded method with torch (no autograd), in chunks of ``batch_size``."""

    model: LoadedModel
    device: str = "cpu"
    batch_size: int = 64
    engine: str = "torch"
    version: int = field(init=False)
    class_names: list[str] = field(init=False)
    meta: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.version = model_version(self.model.meta)
        self.class_names = list(self.model.class_names)
        self.meta = self.model.meta

    @torch.inference_mode()
    def predict(self, images: Tensor) -> Tensor:
        """Softmax over the learned classes."""
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device)
            out.append(torch.softmax(self.model.logits(x).float(), dim=1).cpu())
        return torch.cat(out)


class OnnxRuntimePredictor:
    """The committed model exported to ONNX (by :mod:`edgecl.export`, in ``precision``) and run with
    onnxruntime."""

    def __init__(
        self,
        model: LoadedModel,
        onnx_path: Path,
        providers: list[str] | None = None,
        precision: str = "fp32",
    ) -> None:
        export = load_export_module()
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        path = Path(export.export_onnx(model, onnx_path, precision=precision) or onnx_path)
        self.session = export.session(str(path), None, providers)
        self.input_name = self.session.get_inputs()[0].name
        self.engine = "onnxruntime" if precision == "fp32" else f"onnxruntime-{precision}"
        self.precision = precision
        self.version = model_version(model.meta)
        self.class_names = list(model.class_names)
        self.meta = model.meta
        self.path = path

    def predict(self, images: Tensor) -> Tensor:
        """Softmax of the exported model's logits (extra head columns beyond the learned classes dropped)."""
        (logits,) = self.session.run(None, {self.input_name: images.float().cpu().numpy()})[:1]
        t = torch.from_numpy(logits)[:, : len(self.class_names)]
        return torch.softmax(t.float(), dim=1)


def load_export_module() -> Any:
    """``edgecl.export``, which must provide ``export_onnx(model, path, precision=...) -> path`` and
    ``session(path, threads, providers)``."""
    try:
        module = importlib.import_module("edgecl.export")
    except ModuleNotFoundError as err:
        if err.name not in ("edgecl.export", "onnx", "onnxscript"):
            raise
        raise RuntimeError(
            "the profile sets inference_engine: onnxruntime, but ONNX export is not available "
            f"({err}); install an edgecl with edgecl/export.py, or set inference_engine: torch in the profile"
        ) from err
    missing = [name for name in ("export_onnx", "session") if not callable(getattr(module, name, None))]
    if missing:
        raise RuntimeError(
            f"edgecl.export has no {' or '.join(missing)} function, which inference_engine: onnxruntime "
            "needs; set inference_engine: torch in the profile"
        )
    return module


def check_engine(engine: str) -> None:
    """Fail early (at startup) when ``engine`` cannot work on this installation."""
    if engine not in ENGINES:
        raise ValueError(f"inference_engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine in _PRECISION:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                f"the profile sets inference_engine: {engine} but onnxruntime cannot be imported ({err}); "
                "pip install onnxruntime (onnxruntime-gpu on a Jetson), or use inference_engine: torch"
            ) from err
        load_export_module()


def build_predictor(
    engine: str, model_dir: Path, backbone: FrozenViT, device: str, onnx_dir: Path | None = None
) -> Predictor:
    """Load the committed model in ``model_dir`` over the shared ``backbone`` for ``engine``."""
    from edgecl.train.model_io import load_model

    model = load_model(model_dir, backbone=backbone, device=device)
    if engine in _PRECISION:
        folder = onnx_dir or model_dir.parent / "onnx"
        precision = _PRECISION[engine]
        suffix = "" if precision == "fp32" else f"-{precision}"
        target = folder / f"model-v{model_version(model.meta)}{suffix}.onnx"
        predictor = OnnxRuntimePredictor(model, target, precision=precision)
        for old in folder.glob("model-v*.onnx*"):  # earlier versions (a running session keeps its inode)
            if old.name != predictor.path.name and not old.name.startswith(predictor.path.name):
                old.unlink(missing_ok=True)
        return predictor
    return TorchPredictor(model, device=device)


class ModelHolder:
    """The current predictor; :meth:`swap` replaces it atomically, readers never see a half-loaded model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._predictor: Predictor | None = None

    def get(self) -> Predictor | None:
        """The predictor in service (None before the first task is learned)."""
        with self._lock:
            return self._predictor

    def swap(self, predictor: Predictor) -> Predictor | None:
        """Put ``predictor`` in service; returns the one it replaces."""
        with self._lock:
            old, self._predictor = self._predictor, predictor
        return old
