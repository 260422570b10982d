"""Device profiles: YAML files that say how much memory edgecl may use and how it trains there.

A profile is looked up by path, or by name in ``$EDGECL_PROFILES_DIR``, ``/etc/edgecl/profiles`` and
the repository's ``profiles/`` folder. Unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Profile", "load_profile", "profile_search_path", "list_profiles"]

_PRECISIONS = {"fp32", "bf16", "fp16", "auto"}
_DEVICES = {"auto", "cpu", "cuda"}
_ENGINES = {"torch", "onnxruntime"}


@dataclass
class Profile:
    """Everything device-specific about training and serving on one kind of machine."""

    name: str = "cpu"
    description: str = ""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    memory_budget_mb: float | None = None
    """What edgecl may use, whole process (see README "Memory budget"); None = no budget."""
    precision: str = "fp32"
    """``fp32``, ``bf16``, ``fp16`` or ``auto`` (the planner may lower precision to fit the budget)."""
    allow_autocast: bool = True
    """Whether the planner may switch to bf16/fp16 autocast to fit the budget."""
    method: str = "cps_prompt"
    method_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the method's config dataclass (e.g. ``reduction_rate: 0.4``)."""
    max_reduction_rate: float = 0.75
    """Highest CPS reduction rate r the planner may choose to fit the budget."""
    batch_size: int = 16
    epochs: int = 5
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""
    backbone: str = "vit_tiny_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    weights: str | None = None
    """Local backbone weights file (offline devices need one)."""
    sampler_period_s: float = 0.1
    telemetry_backends: list[str] = field(default_factory=list)
    """Force these telemetry backends (empty = autodetect)."""
    data_dir: str = "/var/lib/edgecl"
    inference_engine: str = "torch"
    """``torch`` or ``onnxruntime`` for the daemon's predictions."""
    source: str = ""
    """Where the profile was read from (filled by the loader)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending key."""
        if self.device not in _DEVICES:
            raise ValueError(f"profile key 'device' must be one of {sorted(_DEVICES)}, got {self.device!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(
                f"profile key 'precision' must be one of {sorted(_PRECISIONS)}, got {self.precision!r}"
            )
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ValueError(f"profile key 'memory_budget_mb' must be > 0, got {self.memory_budget_mb}")
        if not 0.0 <= self.max_reduction_rate < 1.0:
            raise ValueError(f"profile key 'max_reduction_rate' must be in [0, 1), got {self.max_reduction_rate}")
        for key in ("batch_size", "epochs"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"profile key '{key}' must be >= 1, got {getattr(self, key)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"profile key 'threads' must be >= 1, got {self.threads}")
        if self.sampler_period_s <= 0:
            raise ValueError(f"profile key 'sampler_period_s' must be > 0, got {self.sampler_period_s}")
        if self.inference_engine not in _ENGINES:
            raise ValueError(
                f"profile key 'inference_engine' must be one of {sorted(_ENGINES)}, got {self.inference_engine!r}"
            )
        if not isinstance(self.method_options, dict):
            raise ValueError("profile key 'method_options' must be a mapping")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for results and the doctor)."""
        return dataclasses.asdict(self)


def profile_search_path() -> list[Path]:
    """Folders searched for ``NAME.yaml``, first match wins."""
    dirs: list[Path] = []
    env = os.environ.get("EDGECL_PROFILES_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path("/etc/edgecl/profiles"))
    dirs.append(Path(__file__).resolve().parent.parent / "profiles")
    return dirs


def list_profiles() -> list[str]:
    """Names of the profiles found on the search path."""
    names: set[str] = set()
    for d in profile_search_path():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} or os.sep in name_or_path:
        if not p.is_file():
            raise FileNotFoundError(f"profile file not found: {p}")
        return p
    for d in profile_search_path():
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise ValueError(
        f"unknown profile '{name_or_path}'; available: {', '.join(list_profiles()) or 'none'} "
        f"(searched {', '.join(str(d) for d in profile_search_path())})"
    )


def load_profile(name_or_path: str, **overrides: Any) -> Profile:
    """Load and validate a profile by name or path; keyword ``overrides`` (non-None) win over the file."""
    path = _resolve(name_or_path)
    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"profile {path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
    data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["source"] = str(path)
    try:
        profile = Profile(**data)
    except TypeError as err:
        raise ValueError(f"profile {path}: {err}") from err
    for key in ("memory_budget_mb", "max_reduction_rate", "sampler_period_s"):
        value = getattr(profile, key)
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"profile {path}: key '{key}' must be a number, got {value!r}")
    profile.validate()
    return profile
