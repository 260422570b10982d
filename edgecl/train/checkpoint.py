"""Atomic checkpoints: tensors in safetensors, everything else in JSON, committed by one rename.

Layout of a checkpoint directory::

    checkpoint.json                 # the commit point: names the tensor file below
    tensors-<seq>.safetensors       # method state, optimizer state, torch RNG state

The JSON is written to a temp file and renamed over ``checkpoint.json`` after the tensor file is
fully written and fsynced, so a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint", "flatten_optimizer", "unflatten_optimizer"]

META = "checkpoint.json"


class Checkpoint(dict):  # type: ignore[type-arg]
    """A loaded checkpoint: ``meta`` (JSON) and ``tensors`` (name -> tensor)."""

    @property
    def meta(self) -> dict[str, Any]:
        """The JSON part."""
        return self["meta"]  # type: ignore[no-any-return]

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The tensor part."""
        return self["tensors"]  # type: ignore[no-any-return]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def flatten_optimizer(
    state: dict[str, Any], prefix: str = "optim"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entry in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().cpu().contiguous()
                plain[key] = {"__tensor__": f"{prefix}.{pid}.{key}"}
            else:
                plain[key] = value
        rest["state"][str(pid)] = plain
    return tensors, rest


def unflatten_optimizer(rest: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in rest["state"].items():
        state[int(pid)] = {
            k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
            for k, v in entry.items()
        }
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Torch (CPU and CUDA) RNG states as tensors; Python and NumPy states as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in meta:
        n = meta["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if "python" in meta:
        p = meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(directory: str | Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write one checkpoint atomically into ``directory`` and drop older tensor files."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    previous = _read_meta(d)
    seq = int(previous.get("seq", 0)) + 1 if previous else 1
    name = f"tensors-{seq:06d}.safetensors"
    tmp = d / f".{name}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, d / name)
    meta = {**meta, "seq": seq, "tensors": name}
    _atomic_write_bytes(d / META, json.dumps(meta, indent=1, sort_keys=True).encode())
    for old in d.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return d / META


def _read_meta(d: Path) -> dict[str, Any] | None:
    path = d / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint metadata {path} is corrupt: {err}") from err


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read the last committed checkpoint of ``directory``; a clear error when there is none."""
    d = Path(directory)
    meta = _read_meta(d)
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {d} (expected {d / META})")
    tensor_path = d / meta["tensors"]
    if not tensor_path.is_file():
        raise ValueError(f"checkpoint {d} names {meta['tensors']} but the file is missing")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:
        raise ValueError(f"checkpoint tensors {tensor_path} are unreadable: {err}") from err
    return Checkpoint(meta=meta, tensors=tensors)


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a committed checkpoint."""
    return (Path(directory) / META).is_file()
