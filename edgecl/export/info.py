"""What an edgecl ONNX file says about itself: the metadata format, and reading it back.

Every export stores a :class:`ModelInfo` as ONNX ``metadata_props`` (classes, preprocessing, provenance),
so a file alone is enough to serve it. Reading needs ``onnx`` only, never the trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgecl

if TYPE_CHECKING:
    from edgecl.train.model_io import LoadedModel

__all__ = [
    "FORMAT",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ModelFileError",
    "ModelInfo",
    "existing_file",
    "first_line",
    "model_info",
    "read_onnx_info",
]

FORMAT = "edgecl-onnx/1"
"""Value of the ``edgecl_format`` metadata key; files without it are not edgecl exports."""
INPUT_NAME = "images"
"""Graph input: float32 ``batch x 3 x S x S``, eval-transformed (resize, center crop, [0, 1], normalised)."""
OUTPUT_NAME = "logits"
"""Graph output: float32 ``batch x C`` logits over the learned classes, in ``classes`` order."""


class ModelFileError(ValueError):
    """A model file is missing, corrupt, not ONNX, or not a (compatible) edgecl export."""


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

    p = existing_file(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as err:
        raise ModelFileError(f"{p} is not a readable ONNX model: {first_line(err)}") from err
    if not proto.graph.node:
        raise ModelFileError(f"{p} is not an ONNX model: it holds no graph")
    return ModelInfo.from_metadata({m.key: m.value for m in proto.metadata_props}, str(p))


def existing_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path` if it is an existing file; otherwise the error that says what it is."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"{p} is not a file (a checkpoint directory needs the torch engine)")
    return p


def first_line(err: BaseException) -> str:
    """The first line of an error message (or its type name), for one-line error reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
