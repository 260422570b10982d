"""Checks of the libraries: versions of what edgecl runs on, and whether torch sees a CUDA device."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from edgecl.doctor.report import FAIL, OK, Check

PACKAGES = ("torch", "torchvision", "timm", "onnxruntime", "numpy", "psutil", "fastapi", "jetson-stats")
REQUIRED_PACKAGES = ("torch", "torchvision", "timm")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _install_fix(jetson: bool) -> str:
    if jetson:
        return (
            "install the L4T PyTorch for the system python3 (sudo pip3 install --index-url "
            "https://pypi.jetson-ai-lab.io/jp6/cu126 torch==2.8.0 torchvision==0.23.0), then rerun "
            "deploy/install.sh; never PyPI's torch on a Jetson"
        )
    return "pip install -c constraints.txt . (or rerun deploy/install.sh)"


def check_packages(jetson: bool, engine: str | None) -> Check:
    """Versions of the libraries edgecl runs on; torch, torchvision and timm are required."""
    versions = {name: _version(name) for name in PACKAGES}
    try:
        import edgecl

        versions["edgecl"] = edgecl.__version__
    except ImportError:  # pragma: no cover - we are running inside edgecl
        versions["edgecl"] = None
    missing = [p for p in REQUIRED_PACKAGES if versions[p] is None]
    if engine == "onnxruntime" and versions["onnxruntime"] is None:
        missing.append("onnxruntime")
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    if missing:
        return Check(
            "packages",
            FAIL,
            f"missing {', '.join(missing)} ({shown})",
            fix=_install_fix(jetson),
            details=versions,
        )
    return Check("packages", OK, shown, details=versions)


def check_cuda(jetson: bool, device: str | None) -> Check:
    """Whether torch sees a CUDA device; a ``device: cuda`` profile without one is blocking."""
    details: dict[str, Any] = {"available": False}
    try:
        import torch
    except Exception as err:  # an L4T wheel with a missing shared library raises OSError, not ImportError
        return Check(
            "cuda",
            FAIL,
            f"torch cannot be imported ({type(err).__name__}: {err})",
            fix=_install_fix(jetson),
            details={"available": False, "error": str(err)},
        )
    details["torch"] = torch.__version__
    details["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        details.update(
            available=True,
            device_count=torch.cuda.device_count(),
            name=torch.cuda.get_device_name(index),
            capability=f"{props.major}.{props.minor}",
            total_memory_mb=round(props.total_memory / 2**20),
        )
        return Check(
            "cuda",
            OK,
            f"{details['name']} (sm_{props.major}{props.minor}, {details['total_memory_mb']} MB), "
            f"torch {torch.__version__} built for CUDA {torch.version.cuda}",
            details=details,
        )
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
        fix = (
            _install_fix(True)
            if jetson
            else "install a CUDA build of torch (constraints.txt pins one) and a matching NVIDIA driver"
        )
    elif jetson:
        why = "torch is a CUDA build but sees no GPU"
        fix = (
            "add the user to the video and render groups (sudo usermod -aG video,render USER; the service "
            "gets them from SupplementaryGroups=) and, in Docker, run with --runtime nvidia"
        )
    else:
        why = f"torch is built for CUDA {torch.version.cuda} but sees no GPU"
        fix = (
            "check `nvidia-smi` works and the driver supports that CUDA version; in Docker pass --gpus all "
            "(nvidia-container-toolkit)"
        )
    if device == "cuda":
        return Check("cuda", FAIL, f"the profile needs CUDA but {why}", fix=fix, details=details)
    return Check("cuda", OK, f"no CUDA ({why}): training and inference run on the CPU", details=details)
