"""Inference over an export or a checkpoint: :class:`OnnxPredictor` (onnxruntime) and
:class:`TorchPredictor` (PyTorch eager) behind :class:`Predictor`'s interface::

    probs, labels = predictor.predict(["a.jpg", "b.png"])   # or PIL images, or a tensor batch
    top = predictor.predict_topk(images, k=5)               # [[(label, prob), ...], ...]

:func:`open_predictor` picks the engine from the path (an ``.onnx`` file or a checkpoint directory).
Preprocessing comes from the model's :class:`~edgecl.export.info.ModelInfo`, so both engines see the same
tensors. An int8/fp16 file is served like any other (its ``precision`` is in the metadata).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from edgecl.data.transforms import to_rgb
from edgecl.export.info import INPUT_NAME, ModelFileError, ModelInfo, existing_file, first_line, model_info
from edgecl.export.runtime import Provider, session
from edgecl.export.writer import require_rebuildable

if TYPE_CHECKING:
    from edgecl.train.model_io import LoadedModel

__all__ = [
    "ImageLike",
    "Images",
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "load_image",
    "open_predictor",
    "topk",
]

ImageLike = str | os.PathLike | Image.Image
"""One image: a file path or a PIL image."""
Images = Tensor | ImageLike | Sequence[ImageLike]
"""What the predictors accept: a tensor batch, one image, or a sequence of images."""


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; errors name the file."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    p = Path(image)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    try:
        with Image.open(p) as img:
            return to_rgb(img)
    except Exception as err:
        raise ValueError(f"cannot read image {p}: {first_line(err)}") from err


def topk(probs: Tensor, classes: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Per row of ``probs`` (``N x C``), the ``min(k, C)`` best (label, probability) pairs, best first."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    values, indices = probs.float().topk(min(k, probs.shape[1]), dim=1)
    return [
        [(classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist(), strict=True)]
        for vs, ix in zip(values, indices, strict=True)
    ]


class Predictor(ABC):
    """One model behind one interface: preprocessing from its :class:`ModelInfo`, logits, probabilities."""

    engine: str
    """``onnxruntime`` or ``torch``."""
    info: ModelInfo
    batch_size: int
    """Images per forward; longer inputs are processed in chunks."""

    @property
    def class_names(self) -> list[str]:
        """Labels of the probability columns."""
        return self.info.classes

    def preprocess(self, images: Images) -> Tensor:
        """A float ``N x 3 x S x S`` batch ready for :meth:`logits`.

        Float tensors (``N x 3 x S x S`` or ``3 x S x S``) are taken as already eval-transformed; uint8
        tensors, PIL images and image paths go through ``eval_transform(img_size, mean, std)``.
        """
        from edgecl.data.transforms import eval_transform

        s = self.info.img_size
        transform = eval_transform(s, self.info.mean, self.info.std)
        if isinstance(images, Tensor):
            x = images.unsqueeze(0) if images.dim() == 3 else images
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"expected images N x 3 x H x W, got a tensor of shape {tuple(images.shape)}"
                )
            if x.dtype == torch.uint8:
                return torch.stack([transform(img) for img in x]) if len(x) else x.float()
            if tuple(x.shape[-2:]) != (s, s):
                raise ValueError(
                    f"float images must be eval-transformed N x 3 x {s} x {s}, got {tuple(x.shape)}; pass "
                    "uint8 tensors, PIL images or paths to have them transformed"
                )
            return x.float()
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not items:
            return torch.zeros(0, 3, s, s)
        return torch.stack([transform(load_image(i)) for i in items])

    @abstractmethod
    def logits(self, x: Tensor) -> Tensor:
        """Logits ``N x C`` (float32, CPU) of a preprocessed batch, in one forward."""

    def predict(self, images: Images) -> tuple[Tensor, list[str]]:
        """(probabilities ``N x C`` float32 on CPU, top-1 label per image), in chunks of ``batch_size``."""
        if isinstance(images, Tensor):
            batch = images.unsqueeze(0) if images.dim() == 3 else images
            chunks: Iterator[Any] = (
                batch[i : i + self.batch_size] for i in range(0, len(batch), self.batch_size)
            )
        else:
            items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
            chunks = (items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size))
        parts = [torch.softmax(self.logits(self.preprocess(c)).float(), dim=1) for c in chunks]
        probs = torch.cat(parts) if parts else torch.zeros(0, self.info.num_classes)
        labels = [self.info.classes[i] for i in probs.argmax(1).tolist()] if len(probs) else []
        return probs, labels

    def predict_topk(self, images: Images, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, its ``k`` most probable (label, probability) pairs, best first."""
        return topk(self.predict(images)[0], self.info.classes, k)


class OnnxPredictor(Predictor):
    """An edgecl ONNX export run with onnxruntime.

    ``providers`` (names or ``(name, options)`` pairs, :mod:`edgecl.export.runtime`) defaults to CUDA when
    onnxruntime has it, else CPU; ``threads`` sets onnxruntime's intra-op threads (None: its default).
    Raises :class:`ModelFileError` for a missing, corrupt, non-ONNX or non-edgecl file, or one whose input
    does not match its metadata.
    """

    engine = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[Provider] | None = None,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        p = existing_file(path)
        try:
            self.session = session(str(p), threads, providers)
        except Exception as err:
            raise ModelFileError(f"{p} is not a valid ONNX model: {first_line(err)}") from err
        self.path = p
        self.batch_size = batch_size
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(p))
        self.precision = self.info.extra.get("precision", "fp32")
        """``fp32``, ``int8`` or ``fp16`` (files from before the key was written are fp32)."""
        self._check_signature()

    def _check_signature(self) -> None:
        s, n = self.info.img_size, self.info.num_classes
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelFileError(
                f"{self.path} has {len(inputs)} inputs; an edgecl export has one ({INPUT_NAME})"
            )
        inp = inputs[0]
        dims = list(inp.shape)
        if inp.type != "tensor(float)" or len(dims) != 4 or dims[1:] != [3, s, s]:
            raise ModelFileError(
                f"{self.path}: input {inp.name!r} is {inp.type} {dims}, but its metadata (img_size={s}) "
                f"needs tensor(float) [batch, 3, {s}, {s}]"
            )
        out = outputs[0]
        shape = list(out.shape)
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != n):
            raise ModelFileError(
                f"{self.path}: output {out.name!r} has shape {shape}, but its metadata lists {n} classes"
            )
        self.input_name, self.output_name = inp.name, out.name

    def logits(self, x: Tensor) -> Tensor:
        """onnxruntime logits of a preprocessed batch."""
        feed = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])


class TorchPredictor(Predictor):
    """A loaded checkpoint run with PyTorch eager (no autograd), the reference for :class:`OnnxPredictor`."""

    engine = "torch"

    def __init__(self, model: LoadedModel, batch_size: int = 32) -> None:
        self.model = model
        self.batch_size = batch_size
        self.info = model_info(model)
        self.device = next(model.method.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | os.PathLike[str],
        weights: str | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> TorchPredictor:
        """Load the last committed model of ``directory`` (``weights`` overrides a moved backbone file)."""
        from edgecl.train.model_io import load_model

        require_rebuildable(directory, weights)
        return cls(load_model(Path(directory), weights=weights, device=device), batch_size=batch_size)

    def logits(self, x: Tensor) -> Tensor:
        """PyTorch logits of a preprocessed batch over the learned classes."""
        with torch.inference_mode():
            out = self.model.method(x.to(self.device))[:, : self.info.num_classes]
        return out.float().cpu()


def open_predictor(
    model: str | os.PathLike[str],
    weights: str | None = None,
    device: str = "cpu",
    providers: Sequence[Provider] | None = None,
    threads: int | None = None,
    batch_size: int = 32,
) -> Predictor:
    """:class:`TorchPredictor` for a checkpoint directory, :class:`OnnxPredictor` for an ONNX file."""
    p = Path(model)
    if p.is_dir():
        return TorchPredictor.from_checkpoint(p, weights=weights, device=device, batch_size=batch_size)
    return OnnxPredictor(p, providers=providers, threads=threads, batch_size=batch_size)
