"""Writing an ONNX file: trace, stamp the metadata, validate, parity-check, convert, replace atomically.

Two exporters trace the same :class:`~edgecl.export.graph.InferenceGraph`: ``torchscript`` (the default:
on ViT-Tiny CPS-Prompt it exports in seconds, and its graph runs as fast as the other's) and ``dynamo``
(``torch.onnx.export(dynamo=True)`` with onnxscript's optimizer; ~35x slower to export, a slightly larger
file, same latency: PERFORMANCE.md, "ONNX inference"). Nothing is patched while tracing: an op without an
ONNX operator fails the export with its name (a method keeps input-independent solves out of its forward,
as the Hash task identifier does). The fp32 graph always passes a parity check against PyTorch; an
int8/fp16 variant (:mod:`edgecl.export.variants`) is then derived from it and measured, not bounded.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

import edgecl
from edgecl.export.graph import InferenceGraph, example_batch, exportable_reason
from edgecl.export.info import INPUT_NAME, OUTPUT_NAME, ModelInfo, first_line, model_info
from edgecl.export.runtime import session
from edgecl.export.variants import PRECISIONS, Precision, write_variant

if TYPE_CHECKING:
    from edgecl.backbone import FrozenViT
    from edgecl.train.model_io import LoadedModel

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "MIN_OPSET",
    "PARITY_TOLERANCE",
    "ExportError",
    "ExportInfo",
    "Exporter",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "require_rebuildable",
    "validate_opset",
]

Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[Exporter, ...] = ("torchscript", "dynamo")
DEFAULT_OPSET = 17
"""The torchscript exporter's default; the dynamo exporter's default and minimum is 18."""
MIN_OPSET = 17
_MIN_OPSET = {"torchscript": MIN_OPSET, "dynamo": 18}
PARITY_TOLERANCE = 1e-4
"""Largest max-abs logit difference between onnxruntime and PyTorch that an fp32 export accepts."""
_TRACE_BATCH = 2
_PARITY_BATCH = 4
_VARIANT_BATCH = 16
_EXPORT_LOCK = threading.Lock()
"""``torch.onnx.export`` keeps global state: one export at a time per process."""


class ExportError(RuntimeError):
    """A model could not be exported, or its export failed validation or the parity check."""


@dataclass(frozen=True)
class ExportInfo:
    """The result of one export."""

    path: Path
    method: str
    classes: list[str]
    opset: int
    img_size: int
    parity_max_abs: float
    """Max |onnxruntime logit - PyTorch logit| of the fp32 graph on the parity batch."""
    parity_batch: int
    top1_agree: bool
    """Whether the fp32 graph and PyTorch picked the same top-1 class for every image of the parity batch."""
    size_bytes: int
    seconds: float
    metadata: dict[str, str]
    exporter: str = "torchscript"
    precision: str = "fp32"
    variant_max_abs: float | None = None
    """int8/fp16 only: max |logit difference| from PyTorch fp32 on a random batch of ``variant_batch``."""
    variant_top1_agreement: float | None = None
    """int8/fp16 only: fraction of that batch where the variant's top-1 equals PyTorch fp32's."""
    variant_batch: int = _VARIANT_BATCH


def validate_opset(opset: int, exporter: str = "torchscript") -> None:
    """A ``ValueError`` naming ``--opset`` when ``opset`` is outside ``exporter``'s range."""
    from torch.onnx import _constants

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if exporter == "torchscript":
        top = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    else:
        top = int(getattr(_constants, "ONNX_MAX_OPSET", 23))
    low = _MIN_OPSET[exporter]
    if not low <= opset <= top:
        raise ValueError(
            f"opset must be between {low} and {top} (the {exporter} exporter's range), got {opset}"
        )


def _trace(graph: InferenceGraph, x: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    """Write ``graph`` traced on ``x`` to ``path`` with a dynamic batch axis."""
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 (progress lines)
            program = torch.onnx.export(
                graph,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}},
                optimize=True,  # onnxscript's optimizer (constant folding, dead code, fusions)
                verbose=False,
            )
        assert program is not None
        program.save(str(path), external_data=False)
        return
    torch.onnx.export(
        graph,
        (x,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )


def _stamp(path: Path, metadata: dict[str, str], info: ModelInfo) -> None:
    """Replace the file's metadata and producer fields with edgecl's."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "edgecl"
    proto.producer_version = edgecl.__version__
    proto.doc_string = f"edgecl {info.method} over {info.backbone}: {info.num_classes} classes"
    onnx.save(proto, str(path))


def _run(path: Path, x: torch.Tensor) -> torch.Tensor:
    """onnxruntime (CPU, this process's torch thread count) logits of ``x``."""
    sess = session(str(path), torch.get_num_threads(), ["CPUExecutionProvider"])
    return torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]).float()


def export_model(
    model: LoadedModel,
    out_path: str | os.PathLike[str],
    opset: int | None = None,
    tolerance: float = PARITY_TOLERANCE,
    exporter: Exporter = "torchscript",
    precision: Precision = "fp32",
) -> ExportInfo:
    """Export ``model``'s inference path to ``out_path`` (validated, parity-checked, written atomically).

    Raises :class:`ExportError` when the method cannot be exported (naming why), when ``onnx.checker``
    rejects the graph, or when the fp32 graph differs from PyTorch by more than ``tolerance`` (max abs
    logit) on a fresh random batch; ``out_path`` is then left as it was. ``precision`` ``int8`` / ``fp16``
    writes that variant of the checked fp32 graph instead, with its measured difference from PyTorch.
    """
    import onnx

    if opset is None:
        opset = _MIN_OPSET.get(exporter, DEFAULT_OPSET)
    validate_opset(opset, exporter)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
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
    graph = InferenceGraph(method, info.num_classes)
    was_training = method.training
    method.eval()
    s, n = info.img_size, info.num_classes
    metadata = {
        **info.to_metadata(),
        "opset": str(opset),
        "exporter": exporter,
        "precision": precision,
        "input": f"{INPUT_NAME}: float32 batch x 3 x {s} x {s}, eval transform "
        "(resize, center crop, [0, 1], (x - mean) / std)",
        "output": f"{OUTPUT_NAME}: float32 batch x {n} logits, columns in the order of classes",
    }
    temps: list[Path] = []

    def temp(tag: str) -> Path:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{tag}.", suffix=".tmp")
        os.close(fd)
        temps.append(Path(name))
        return temps[-1]

    tmp = temp("fp32")
    try:
        with _EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings; parity below is the check
            try:
                _trace(graph, example_batch(_TRACE_BATCH, info, seed=0), tmp, opset, exporter)
            except Exception as err:
                raise ExportError(
                    f"method '{info.method}' could not be exported to ONNX ({exporter}, opset {opset}): "
                    f"{type(err).__name__}: {first_line(err)}"
                ) from err
        _stamp(tmp, {**metadata, "precision": "fp32"}, info)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            raise ExportError(
                f"the exported graph of '{info.method}' fails onnx.checker: {first_line(err)}"
            ) from err
        x = example_batch(_PARITY_BATCH, info, seed=1)
        with torch.inference_mode():
            ref = graph(x).float()
        try:
            got = _run(tmp, x)
        except Exception as err:
            raise ExportError(
                f"onnxruntime cannot run the exported graph of '{info.method}' on a batch of {_PARITY_BATCH} "
                f"(traced with {_TRACE_BATCH}): {first_line(err)}; the trace probably froze a batch-size or "
                "data-dependent value"
            ) from err
        diff = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
        if not diff <= tolerance:
            raise ExportError(
                f"parity check failed for '{info.method}': onnxruntime logits {tuple(got.shape)} differ from "
                f"PyTorch {tuple(ref.shape)} by {diff:.3g} (max abs) > {tolerance:g} on a random batch of "
                f"{_PARITY_BATCH}. The inference path is probably data-dependent (Python control flow on "
                "tensor values), which tracing freezes to the example batch"
            )
        top1 = bool((got.argmax(1) == ref.argmax(1)).all())
        variant_diff = variant_agree = None
        if precision != "fp32":
            final = temp(precision)
            try:
                write_variant(tmp, final, precision)
                _stamp(final, metadata, info)
                xv = example_batch(_VARIANT_BATCH, info, seed=2)
                with torch.inference_mode():
                    ref_v = graph(xv).float()
                got_v = _run(final, xv)
            except Exception as err:
                raise ExportError(
                    f"the {precision} variant of '{info.method}' could not be written or run: "
                    f"{type(err).__name__}: {first_line(err)}"
                ) from err
            if not bool(torch.isfinite(got_v).all()):
                raise ExportError(f"the {precision} variant of '{info.method}' gives non-finite logits")
            variant_diff = float((got_v - ref_v).abs().max())
            variant_agree = float((got_v.argmax(1) == ref_v.argmax(1)).float().mean())
            tmp = final
        os.replace(tmp, out)
    finally:
        method.train(was_training)
        for t in temps:
            t.unlink(missing_ok=True)
    return ExportInfo(
        path=out,
        method=info.method,
        classes=list(info.classes),
        opset=opset,
        img_size=info.img_size,
        parity_max_abs=diff,
        parity_batch=_PARITY_BATCH,
        top1_agree=top1,
        size_bytes=out.stat().st_size,
        seconds=time.perf_counter() - start,
        metadata=metadata,
        exporter=exporter,
        precision=precision,
        variant_max_abs=variant_diff,
        variant_top1_agreement=variant_agree,
    )


def export_onnx(
    model: LoadedModel, path: str | os.PathLike[str], opset: int | None = None, precision: Precision = "fp32"
) -> Path:
    """:func:`export_model` returning only the written path (the daemon's entry point)."""
    return export_model(model, path, opset=opset, precision=precision).path


def require_rebuildable(directory: str | os.PathLike[str], weights: str | None) -> None:
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
    opset: int | None = None,
    backbone: FrozenViT | None = None,
    exporter: Exporter = "torchscript",
    precision: Precision = "fp32",
) -> ExportInfo:
    """Load the last committed model of ``checkpoint_dir`` and :func:`export_model` it to ``out_path``.

    ``weights`` overrides a moved backbone weights file; ``backbone`` reuses an already loaded one (the
    daemon's shared backbone).
    """
    from edgecl.train.model_io import load_model

    validate_opset(opset if opset is not None else _MIN_OPSET.get(exporter, DEFAULT_OPSET), exporter)
    if backbone is None:
        require_rebuildable(checkpoint_dir, weights)
    return export_model(
        load_model(Path(checkpoint_dir), weights=weights, backbone=backbone),
        out_path,
        opset=opset,
        exporter=exporter,
        precision=precision,
    )
