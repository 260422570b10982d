"""ONNX export of a trained model's whole inference path, and two inference engines with one interface.

Export (:func:`export_checkpoint`, :func:`export_model`, :func:`export_onnx`) traces ``Method.forward``
-- query pass, prompt composition, prompted pass, head -- sliced to the learned classes, into one ONNX
graph (dynamic batch, opset >= 17) whose metadata carries everything inference needs (classes,
preprocessing, provenance). Every export is checked with ``onnx.checker`` and by running onnxruntime
against PyTorch on a fresh random batch; the file is only written (atomically) when both pass.

Inference: :class:`OnnxPredictor` (onnxruntime) and :class:`TorchPredictor` (PyTorch eager over a
checkpoint) share :class:`Predictor`'s interface::

    probs, labels = predictor.predict(["a.jpg", "b.png"])   # or PIL images, or a tensor batch
    top = predictor.predict_topk(images, k=5)               # [[(label, prob), ...], ...]

:func:`open_predictor` picks the engine from the path (an ``.onnx`` file or a checkpoint directory).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

import edgecl

if TYPE_CHECKING:
    from edgecl.backbone import FrozenViT
    from edgecl.methods.base import Method
    from edgecl.train.model_io import LoadedModel

__all__ = [
    "DEFAULT_OPSET",
    "FORMAT",
    "INPUT_NAME",
    "MIN_OPSET",
    "NOT_EXPORTABLE",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE",
    "ExportError",
    "ExportInfo",
    "ModelFileError",
    "ModelInfo",
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "exportable_reason",
    "load_image",
    "model_info",
    "open_predictor",
    "read_onnx_info",
    "topk",
]

FORMAT = "edgecl-onnx/1"
"""Value of the ``edgecl_format`` metadata key; files without it are not edgecl exports."""
INPUT_NAME = "images"
"""Graph input: float32 ``batch x 3 x S x S``, eval-transformed (resize, center crop, [0, 1], normalised)."""
OUTPUT_NAME = "logits"
"""Graph output: float32 ``batch x C`` logits over the learned classes, in ``classes`` order."""
DEFAULT_OPSET = 17
MIN_OPSET = 17
PARITY_TOLERANCE = 1e-4
"""Largest max-abs logit difference between onnxruntime and PyTorch that an export accepts."""
_TRACE_BATCH = 2
_PARITY_BATCH = 4

NOT_EXPORTABLE: dict[str, str] = {
    "dpw": (
        "DPW's class-incremental inference is data-dependent: it runs a different set of prompted passes "
        "per sample and batch (ensemble pruning and argmax slot routing decide in Python on tensor values, "
        "which a traced graph would freeze to the example batch), and its task Gaussians call "
        "torch.linalg.solve_triangular on the input features, which has no ONNX operator. Serve DPW with "
        "the torch engine (inference_engine: torch)"
    ),
}
"""Registered methods that cannot be exported, with the reason :func:`export_model` raises.

A method class may also declare ``onnx_unsupported = "reason"`` itself (checked first)."""

_FOLDABLE: tuple[tuple[Any, str], ...] = (
    (torch.linalg, "solve"),
    (torch.linalg, "solve_triangular"),
    (torch.linalg, "inv"),
    (torch.linalg, "cholesky"),
    (torch.linalg, "cholesky_ex"),
    (torch.linalg, "eigh"),
    (torch, "inverse"),
    (torch, "trace"),
)
"""Ops without an ONNX operator. Where all their tensor arguments are independent of the input images
(statistics of buffers, e.g. a task identifier's covariance solve) they are evaluated once at export and
stored as constants; where they depend on the input, tracing reaches them and the export fails."""

_JIT: Any = torch._C
"""TorchScript tracer hooks (``_get_tracing_state`` and friends) that the folding wrappers use."""

_EXPORT_LOCK = threading.Lock()
"""``torch.onnx.export`` keeps global state: one export at a time per process."""

ImageLike = str | os.PathLike | Image.Image
"""One image: a file path or a PIL image."""
Images = Tensor | ImageLike | Sequence[ImageLike]
"""What the predictors accept: a tensor batch, one image, or a sequence of images."""


class ExportError(RuntimeError):
    """A model could not be exported, or its export failed validation or the parity check."""


class ModelFileError(ValueError):
    """A model file is missing, corrupt, not ONNX, or not a (compatible) edgecl export."""


# --------------------------------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs to know about a model; stored as ONNX ``metadata_props`` by the export."""

    classes: list[str]
    """Labels of the logit columns, in learning order."""
    method: str
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backbone: str
    """timm model name of the frozen backbone."""
    patch_size: int | None = None
    checkpoint_seq: int | None = None
    """``seq`` of the checkpoint the model came from (grows with every commit)."""
    checkpoint_task: int | None = None
    """0-based index of the last task the checkpoint had finished."""
    edgecl_version: str = edgecl.__version__
    extra: dict[str, str] = field(default_factory=dict)
    """Other metadata keys of the file (opset, input/output descriptions)."""

    @property
    def num_classes(self) -> int:
        """Logit columns."""
        return len(self.classes)

    def to_metadata(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props``."""
        props = {
            "edgecl_format": FORMAT,
            "edgecl_version": self.edgecl_version,
            "method": self.method,
            "classes": json.dumps(self.classes),
            "num_classes": str(self.num_classes),
            "img_size": str(self.img_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "backbone": self.backbone,
            "patch_size": "" if self.patch_size is None else str(self.patch_size),
            "checkpoint_seq": "" if self.checkpoint_seq is None else str(self.checkpoint_seq),
            "checkpoint_task": "" if self.checkpoint_task is None else str(self.checkpoint_task),
        }
        return {**self.extra, **props}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], source: str) -> ModelInfo:
        """Parse ``metadata_props``; a :class:`ModelFileError` names ``source`` and the bad key."""
        if "edgecl_format" not in props:
            raise ModelFileError(
                f"{source} is an ONNX model but not an edgecl export: it has no edgecl metadata "
                "(edgecl_format, classes, img_size, mean, std); export models with `edgecl export`"
            )
        if props["edgecl_format"] != FORMAT:
            raise ModelFileError(
                f"{source} has edgecl_format {props['edgecl_format']!r}; this edgecl reads {FORMAT!r}"
            )

        def get(key: str, parse: Callable[[str], Any]) -> Any:
            if key not in props:
                raise ModelFileError(f"{source} lacks the edgecl metadata key {key!r}")
            try:
                return parse(props[key])
            except (ValueError, TypeError) as err:
                raise ModelFileError(f"{source} has invalid metadata {key}={props[key]!r}: {err}") from err

        def optional_int(text: str) -> int | None:
            return int(text) if text else None

        def triple(text: str) -> tuple[float, float, float]:
            values = json.loads(text)
            if not isinstance(values, list) or len(values) != 3:
                raise ValueError("expected a JSON list of 3 numbers")
            return (float(values[0]), float(values[1]), float(values[2]))

        def names(text: str) -> list[str]:
            values = json.loads(text)
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                raise ValueError("expected a non-empty JSON list of strings")
            return values

        own = {
            "edgecl_format", "edgecl_version", "method", "classes", "num_classes", "img_size", "mean", "std",
            "backbone", "patch_size", "checkpoint_seq", "checkpoint_task",
        }  # fmt: skip
        return cls(
            classes=get("classes", names),
            method=get("method", str),
            img_size=get("img_size", int),
            mean=get("mean", triple),
            std=get("std", triple),
            backbone=props.get("backbone", ""),
            patch_size=optional_int(props.get("patch_size", "")),
            checkpoint_seq=get("checkpoint_seq", optional_int) if "checkpoint_seq" in props else None,
            checkpoint_task=get("checkpoint_task", optional_int) if "checkpoint_task" in props else None,
            edgecl_version=props.get("edgecl_version", ""),
            extra={k: v for k, v in props.items() if k not in own},
        )


def model_info(model: LoadedModel) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded checkpoint."""
    info = model.backbone.info
    meta = model.meta
    seq, task = meta.get("seq"), meta.get("task")
    return ModelInfo(
        classes=list(model.class_names),
        method=str(meta.get("method", model.method.name)),
        img_size=info.img_size,
        mean=info.mean,
        std=info.std,
        backbone=info.name,
        patch_size=info.patch_size,
        checkpoint_seq=None if seq is None else int(seq),
        checkpoint_task=None if task is None else int(task),
    )


def read_onnx_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The edgecl metadata of an ONNX file (weights not loaded); :class:`ModelFileError` if it has none."""
    import onnx

    p = _existing_file(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as err:
        raise ModelFileError(f"{p} is not a readable ONNX model: {_first_line(err)}") from err
    if not proto.graph.node:
        raise ModelFileError(f"{p} is not an ONNX model: it holds no graph")
    return ModelInfo.from_metadata({m.key: m.value for m in proto.metadata_props}, str(p))


# --------------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class ExportInfo:
    """The result of one export."""

    path: Path
    method: str
    classes: list[str]
    opset: int
    img_size: int
    parity_max_abs: float
    """Max |onnxruntime logit - PyTorch logit| on the parity batch."""
    parity_batch: int
    top1_agree: bool
    """Whether both engines picked the same top-1 class for every image of the parity batch."""
    folded_ops: tuple[str, ...]
    """Input-independent ops without an ONNX operator that were evaluated at export (see ``_FOLDABLE``)."""
    size_bytes: int
    seconds: float
    metadata: dict[str, str]


class _InferenceGraph(nn.Module):
    """The exported function: ``method(images)`` sliced to the learned classes."""

    def __init__(self, method: Method, num_classes: int) -> None:
        super().__init__()
        self.method = method
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``B x C`` over the learned classes."""
        return self.method(images)[:, : self.num_classes]


def exportable_reason(method: Method | str) -> str | None:
    """Why ``method`` (an instance or a registered name) cannot be exported, or None when it can."""
    if isinstance(method, str):
        from edgecl.methods.registry import get_method_class

        cls: type = get_method_class(method)
        name = method
    else:
        cls, name = type(method), method.name
    own = getattr(cls, "onnx_unsupported", None)
    if isinstance(own, str) and own:
        return own
    return NOT_EXPORTABLE.get(name)


def _depends_on_input(tensor: Tensor, graph_input: Any) -> bool:
    """Whether the traced value of ``tensor`` is computed from the graph's first input (the images)."""
    try:
        value = _JIT._get_value_trace(tensor)
    except RuntimeError:
        return False  # not seen by the tracer: a fresh constant
    target = graph_input.unique()
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v.unique() == target:
            return True
        if v.unique() in seen:
            continue
        seen.add(v.unique())
        stack.extend(v.node().inputs())
    return False


@contextlib.contextmanager
def _fold_input_independent_ops(folded: list[str]) -> Iterator[None]:
    """While tracing, evaluate ``_FOLDABLE`` ops on input-independent arguments eagerly (as constants).

    Other threads are unaffected: the wrappers call the original op whenever this thread is not tracing.
    """
    if not all(hasattr(_JIT, n) for n in ("_get_tracing_state", "_set_tracing_state", "_get_value_trace")):
        yield
        return
    saved = []

    def make(fn: Callable[..., Any], qualname: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state = _JIT._get_tracing_state()
            if state is None:
                return fn(*args, **kwargs)
            graph_input = next(iter(state.graph().inputs()))
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if any(_depends_on_input(t, graph_input) for t in tensors):
                return fn(*args, **kwargs)
            _JIT._set_tracing_state(None)
            try:
                out = fn(*args, **kwargs)
            finally:
                _JIT._set_tracing_state(state)
            if qualname not in folded:
                folded.append(qualname)
            return out

        return wrapper

    for owner, name in _FOLDABLE:
        fn = getattr(owner, name, None)
        if fn is None:
            continue
        qualname = f"{owner.__name__}.{name}"
        setattr(owner, name, make(fn, qualname))
        saved.append((owner, name, fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _example_batch(n: int, info: ModelInfo, seed: int) -> Tensor:
    """Eval-transformed random images: uniform pixels in [0, 1], normalised."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, info.img_size, info.img_size, generator=gen)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return (x - mean) / std


def _session(source: str | bytes, threads: int | None, providers: Sequence[str] | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    available = ort.get_available_providers()
    wanted = list(providers) if providers else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(source, sess_options=options, providers=chosen)


def _validate_opset(opset: int) -> None:
    from torch.onnx import _constants

    top = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    if not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset must be between {MIN_OPSET} and {top} (the exporter's range), got {opset}")


def export_model(
    model: LoadedModel,
    out_path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportInfo:
    """Export ``model``'s inference path to ``out_path`` (validated, parity-checked, written atomically).

    Raises :class:`ExportError` when the method cannot be exported (naming why), when ``onnx.checker``
    rejects the graph, or when onnxruntime differs from PyTorch by more than ``tolerance`` (max abs
    logit) on a fresh random batch; ``out_path`` is then left as it was.
    """
    import onnx

    _validate_opset(opset)
    start = time.perf_counter()
    method = model.method
    reason = exportable_reason(method)
    if reason:
        raise ExportError(f"method '{method.name}' cannot be exported to ONNX: {reason}")
    info = model_info(model)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if next(method.parameters()).device.type != "cpu":
        method = copy.deepcopy(method).cpu()  # export and compare on CPU (no TF32, same kernels as ORT)
    graph = _InferenceGraph(method, info.num_classes)
    was_training = method.training
    method.eval()
    folded: list[str] = []
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _EXPORT_LOCK, contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")  # tracer and deprecation warnings; parity below is the check
            stack.enter_context(_fold_input_independent_ops(folded))
            try:
                torch.onnx.export(
                    graph,
                    (_example_batch(_TRACE_BATCH, info, seed=0),),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
            except Exception as err:
                raise ExportError(
                    f"method '{info.method}' could not be exported to ONNX (opset {opset}): "
                    f"{type(err).__name__}: {_first_line(err)}"
                ) from err
        proto = onnx.load(str(tmp))
        s, n = info.img_size, info.num_classes
        metadata = {
            **info.to_metadata(),
            "opset": str(opset),
            "input": f"{INPUT_NAME}: float32 batch x 3 x {s} x {s}, eval transform "
            "(resize, center crop, [0, 1], (x - mean) / std)",
            "output": f"{OUTPUT_NAME}: float32 batch x {n} logits, columns in the order of classes",
        }
        del proto.metadata_props[:]
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        proto.producer_name = "edgecl"
        proto.producer_version = edgecl.__version__
        proto.doc_string = f"edgecl {info.method} over {info.backbone}: {info.num_classes} classes"
        onnx.save(proto, str(tmp))
        del proto
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            raise ExportError(
                f"the exported graph of '{info.method}' fails onnx.checker: {_first_line(err)}"
            ) from err
        x = _example_batch(_PARITY_BATCH, info, seed=1)
        with torch.inference_mode():
            ref = graph(x).float()
        try:
            session = _session(str(tmp), torch.get_num_threads(), ["CPUExecutionProvider"])
            got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        except Exception as err:
            raise ExportError(
                f"onnxruntime cannot run the exported graph of '{info.method}' on a batch of {_PARITY_BATCH} "
                f"(traced with {_TRACE_BATCH}): {_first_line(err)}; the trace probably froze a batch-size or "
                "data-dependent value"
            ) from err
        diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
        if not diff <= tolerance:
            hint = f"; ops folded to constants at export: {', '.join(folded)}" if folded else ""
            raise ExportError(
                f"parity check failed for '{info.method}': onnxruntime logits {tuple(got.shape)} differ from "
                f"PyTorch {tuple(ref.shape)} by {diff:.3g} (max abs) > {tolerance:g} on a random batch of "
                f"{_PARITY_BATCH}. The inference path is probably data-dependent (Python control flow on "
                f"tensor values), which tracing freezes to the example batch{hint}"
            )
        top1 = bool((got.argmax(1) == ref.argmax(1)).all())
        os.replace(tmp, out)
    finally:
        method.train(was_training)
        tmp.unlink(missing_ok=True)
    return ExportInfo(
        path=out,
        method=info.method,
        classes=list(info.classes),
        opset=opset,
        img_size=info.img_size,
        parity_max_abs=diff,
        parity_batch=_PARITY_BATCH,
        top1_agree=top1,
        folded_ops=tuple(folded),
        size_bytes=out.stat().st_size,
        seconds=time.perf_counter() - start,
        metadata=metadata,
    )


def export_onnx(model: LoadedModel, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> Path:
    """:func:`export_model` returning only the written path (the daemon's entry point)."""
    return export_model(model, path, opset=opset).path


def _require_rebuildable(directory: str | os.PathLike[str], weights: str | None) -> None:
    """Refuse checkpoints whose random-init backbone cannot be rebuilt (the model would be wrong)."""
    from edgecl.train.checkpoint import META

    meta_path = Path(directory) / META
    if not meta_path.is_file():
        return  # load_model names the missing checkpoint
    try:
        spec = json.loads(meta_path.read_text()).get("backbone") or {}
    except (OSError, ValueError, AttributeError):
        return  # load_model reports the corrupt checkpoint
    if weights is None and not spec.get("weights") and not spec.get("pretrained"):
        raise ValueError(
            f"checkpoint {directory} was trained on a randomly initialised backbone ({spec.get('name')}, no "
            "weights file, not pretrained), which cannot be rebuilt to match; train with --weights FILE"
        )


def export_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    backbone: FrozenViT | None = None,
) -> ExportInfo:
    """Load the last committed model of ``checkpoint_dir`` and :func:`export_model` it to ``out_path``.

    ``weights`` overrides a moved backbone weights file; ``backbone`` reuses an already loaded one (the
    daemon's shared backbone).
    """
    from edgecl.train.model_io import load_model

    _validate_opset(opset)
    if backbone is None:
        _require_rebuildable(checkpoint_dir, weights)
    return export_model(
        load_model(Path(checkpoint_dir), weights=weights, backbone=backbone), out_path, opset=opset
    )


# --------------------------------------------------------------------------------------------------
# inference


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; errors name the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    p = Path(image)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except Exception as err:
        raise ValueError(f"cannot read image {p}: {_first_line(err)}") from err


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

    ``providers`` defaults to CUDA when onnxruntime has it, else CPU; ``threads`` sets onnxruntime's
    intra-op threads (None: its default). Raises :class:`ModelFileError` for a missing, corrupt, non-ONNX
    or non-edgecl file, or one whose input does not match its metadata.
    """

    engine = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        p = _existing_file(path)
        try:
            self.session = _session(str(p), threads, providers)
        except Exception as err:
            raise ModelFileError(f"{p} is not a valid ONNX model: {_first_line(err)}") from err
        self.path = p
        self.batch_size = batch_size
        self.info = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(p))
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

        _require_rebuildable(directory, weights)
        return cls(load_model(Path(directory), weights=weights, device=device), batch_size=batch_size)

    def logits(self, x: Tensor) -> Tensor:
        """PyTorch logits of a preprocessed batch over the learned classes."""
        with torch.inference_mode():
            out = self.model.method(x.to(self.device))[:, : self.info.num_classes]
        return out.float().cpu()


def _existing_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"{p} is not a file (a checkpoint directory needs the torch engine)")
    return p


def open_predictor(
    model: str | os.PathLike[str],
    weights: str | None = None,
    device: str = "cpu",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    batch_size: int = 32,
) -> Predictor:
    """:class:`TorchPredictor` for a checkpoint directory, :class:`OnnxPredictor` for an ONNX file."""
    p = Path(model)
    if p.is_dir():
        return TorchPredictor.from_checkpoint(p, weights=weights, device=device, batch_size=batch_size)
    return OnnxPredictor(p, providers=providers, threads=threads, batch_size=batch_size)
