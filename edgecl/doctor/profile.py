"""Checks of what a run is configured with: the profile and its memory budget, the backbone weights file."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecl.doctor.report import FAIL, OK, WARN, Check

if TYPE_CHECKING:
    from edgecl.profiles import Profile

NO_WEIGHTS = "none: pass --weights FILE, nothing can be downloaded offline"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
"""Formats :func:`edgecl.backbone.load_state_dict_file` and timm's ``.npz`` loader accept."""


def _float_or_none(value: Any, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number of MB, got {value!r}") from err
    if number <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return number


def check_profile(
    name: str, source: str, budget_override: Any, budget_source: str | None
) -> tuple[Check, Profile | None]:
    """Load the profile; report its device and memory budget (the env override wins) against the RAM."""
    from edgecl.profiles import list_profiles, load_profile

    try:
        profile = load_profile(name)
    except (ValueError, FileNotFoundError, OSError) as err:
        return (
            Check(
                "profile",
                FAIL,
                f"profile {name!r} ({source}) cannot be loaded: {err}",
                fix=(
                    "pass --profile NAME|PATH or set EDGECL_PROFILE (and EDGECL_PROFILES_DIR); available: "
                    f"{', '.join(list_profiles()) or 'none found'}"
                ),
                details={"name": name, "source": source},
            ),
            None,
        )
    import psutil

    try:
        override = _float_or_none(budget_override, "EDGECL_MEMORY_BUDGET_MB")
    except ValueError as err:
        return (
            Check(
                "profile",
                FAIL,
                str(err),
                fix="set EDGECL_MEMORY_BUDGET_MB to a number of MB, or empty for the profile's budget",
            ),
            profile,
        )
    budget = override if override is not None else profile.memory_budget_mb
    vm = psutil.virtual_memory()
    total_mb, avail_mb = vm.total / 2**20, vm.available / 2**20
    details = {
        "name": profile.name,
        "source": profile.source,
        "selected_by": source,
        "device": profile.device,
        "precision": profile.precision,
        "method": profile.method,
        "backbone": profile.backbone,
        "inference_engine": profile.inference_engine,
        "memory_budget_mb": budget,
        "memory_budget_source": budget_source if override is not None else "profile",
    }
    budget_text = "no memory budget" if budget is None else f"memory budget {budget:.0f} MB"
    msg = f"{profile.name} ({profile.source}): device {profile.device}, {profile.precision}, {budget_text}"
    if budget is not None and budget > total_mb:
        return (
            Check(
                "profile",
                WARN,
                f"{msg}, more than this machine's {total_mb:.0f} MB RAM",
                fix="lower memory_budget_mb in the profile or EDGECL_MEMORY_BUDGET_MB",
                details=details,
            ),
            profile,
        )
    if budget is not None and budget > avail_mb:
        return (
            Check(
                "profile",
                WARN,
                f"{msg}, but only {avail_mb:.0f} MB RAM is available now",
                fix=(
                    "stop other services (on a Jetson `sudo systemctl set-default multi-user.target` frees "
                    "the desktop's ~0.8 GB) or lower the budget"
                ),
                details=details,
            ),
            profile,
        )
    return Check("profile", OK, msg, details=details), profile


def _describe_weights(path: Path) -> str:
    """Cheap integrity check of a weights file's container; raises ValueError when it is damaged."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("truncated safetensors file (no header)")
            (size,) = struct.unpack("<Q", head)
            if size > path.stat().st_size - 8:
                raise ValueError("truncated safetensors file (header larger than the file)")
            header = json.loads(fh.read(size))
        tensors = [k for k in header if k != "__metadata__"]
        return f"safetensors, {len(tensors)} tensors"
    if suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise ValueError("not a valid .npz (zip) archive")
        return "numpy .npz archive"
    with path.open("rb") as fh:
        fh.read(1)
    return f"{suffix[1:]} checkpoint"


def check_weights(weights: str | None, source: str | None) -> Check:
    """Backbone weights must be a local file: an offline device cannot download them."""
    if not weights:
        return Check(
            "weights",
            WARN,
            f"backbone weights: {NO_WEIGHTS}",
            fix="copy the backbone file to the device and pass --weights FILE or set EDGECL_WEIGHTS",
            details={"path": None},
        )
    path = Path(weights).expanduser()
    details: dict[str, Any] = {"path": str(path), "source": source}
    fix = "pass --weights FILE or set EDGECL_WEIGHTS to a .safetensors, .pth/.pt/.bin/.ckpt or .npz file"
    if not path.is_file():
        return Check(
            "weights", FAIL, f"backbone weights {path} ({source}) not found", fix=fix, details=details
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        return Check(
            "weights",
            FAIL,
            f"backbone weights {path}: unsupported format '{path.suffix}'",
            fix=fix,
            details=details,
        )
    try:
        kind = _describe_weights(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return Check("weights", FAIL, f"backbone weights {path} unreadable: {err}", fix=fix, details=details)
    details.update(size_mb=round(path.stat().st_size / 2**20, 1), format=kind)
    return Check("weights", OK, f"{path} ({kind}, {details['size_mb']} MB)", details=details)
