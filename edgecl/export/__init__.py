"""ONNX export of a trained model's whole inference path, its int8/fp16 variants, and the predictors.

Owns: tracing ``Method.forward`` (query pass, prompt composition, prompted pass, head) sliced to the
learned classes into one ONNX graph with a dynamic batch (:mod:`~edgecl.export.graph`,
:mod:`~edgecl.export.writer`), the metadata that makes a file self-describing (:mod:`~edgecl.export.info`),
int8 / fp16 variants (:mod:`~edgecl.export.variants`), onnxruntime sessions and providers
(:mod:`~edgecl.export.runtime`) and the onnxruntime / torch predictors behind one interface
(:mod:`~edgecl.export.predictor`). Whether a method can be exported is the method class's declaration
(``Method.export_problem()``), never a table here. Must not import the daemon (``edgecl.serve``), the
runner, the CLI commands or the budget planner: they use this package, not the other way round.
"""

from __future__ import annotations

from edgecl.export.graph import InferenceGraph, example_batch, exportable_reason
from edgecl.export.info import (
    FORMAT,
    INPUT_NAME,
    OUTPUT_NAME,
    ModelFileError,
    ModelInfo,
    model_info,
    read_onnx_info,
)
from edgecl.export.predictor import (
    ImageLike,
    Images,
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    load_image,
    open_predictor,
    topk,
)
from edgecl.export.runtime import DEFAULT_PROVIDERS, Provider, session
from edgecl.export.variants import PRECISIONS, Precision
from edgecl.export.writer import (
    DEFAULT_OPSET,
    EXPORTERS,
    MIN_OPSET,
    PARITY_TOLERANCE,
    Exporter,
    ExportError,
    ExportInfo,
    export_checkpoint,
    export_model,
    export_onnx,
    validate_opset,
)

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_PROVIDERS",
    "EXPORTERS",
    "FORMAT",
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE",
    "PRECISIONS",
    "ExportError",
    "ExportInfo",
    "Exporter",
    "ImageLike",
    "Images",
    "InferenceGraph",
    "ModelFileError",
    "ModelInfo",
    "OnnxPredictor",
    "Precision",
    "Predictor",
    "Provider",
    "TorchPredictor",
    "example_batch",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "exportable_reason",
    "load_image",
    "model_info",
    "open_predictor",
    "read_onnx_info",
    "session",
    "topk",
    "validate_opset",
]
