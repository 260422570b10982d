"""Device profiles: YAML files that say how much memory edgecl may use and how it trains there.

A profile is looked up by path, or by name in ``$EDGECL_PROFILES_DIR``, ``/etc/edgecl/profiles`` and
the repository's ``profiles/`` folder. Unknown keys and bad values are errors that name the key
(``method_options`` keys are checked against the method's config, e.g. ``method_options.reduction_rate``).
Memory figures are MiB (2**20 bytes), written "MB" throughout edgecl.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MEMORY_SCOPES", "Profile", "list_profiles", "load_profile", "profile_search_path"]

_PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DEVICES = ("auto", "cpu", "cuda")
_ENGINES = ("torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-fp16")
MEMORY_SCOPES = ("auto", "rss", "cuda", "unified")
"""What the budget covers: ``rss`` = peak process RSS (CPU), ``cuda`` = peak CUDA allocated (discrete GPU;
RSS reported separately), ``unified`` = RSS plus CUDA memory (Jetson: CPU and GPU share DRAM), ``auto`` =
``rss`` on CPU, ``unified`` on an integrated GPU, ``cuda`` on a discrete one."""


@dataclass
class Profile:
    """Everything device-specific about training and serving on one kind of machine."""

    name: str = "cpu"
    description: str = ""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    memory_budget_mb: float | None = None
    """What edgecl may use, whole process (see ``memory_scope``); None = no budget."""
    memory_scope: str = "auto"
    """What the budget covers, one of :data:`MEMORY_SCOPES`."""
    headroom_mb: float | None = None
    """Safety margin the planner keeps below the budget; None = automatic (see ``edgecl.budget``)."""
    tune_allocator: bool = True
    """Let the planner fix glibc's mmap threshold so freed tensors go back to the OS (RSS tracks live
    tensors, which makes the peak predictable); no effect on other C libraries."""
    precision: str = "fp32"
    """``fp32``, ``bf16``, ``fp16`` or ``auto`` (fp32, lowered by the planner only to fit the budget)."""
    allow_autocast: bool = True
    """Whether the planner may switch to bf16/fp16 autocast to fit the budget."""
    method: str = "cps_prompt"
    method_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the method's config dataclass (e.g. ``reduction_rate: 0.4``)."""
    max_reduction_rate: float = 0.75
    """Highest CPS reduction rate r the planner may choose to fit the budget."""
    batch_size: int = 16
    eval_batch_size: int = 64
    """Batch of evaluation and phase-2 feature caching (the planner may lower it to fit the budget)."""
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
    """The daemon's predictions: ``torch``, ``onnxruntime`` (fp32), ``onnxruntime-int8`` (dynamic int8, the
    fastest on CPUs) or ``onnxruntime-fp16`` (for GPUs); see README, "ONNX inference"."""
    source: str = ""
    """Where the profile was read from (filled by the loader)."""

    def validate(self, check_method: bool = False) -> None:
        """Raise ``ValueError`` naming the offending key; ``check_method`` also builds the method config
        (imports torch) so unknown or bad ``method_options`` are caught before training."""
        _check_types(self)
        _check_choice("device", self.device, _DEVICES)
        _check_choice("precision", self.precision, _PRECISIONS)
        _check_choice("memory_scope", self.memory_scope, MEMORY_SCOPES)
        _check_choice("inference_engine", self.inference_engine, _ENGINES)
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ValueError(f"profile key 'memory_budget_mb' must be > 0, got {self.memory_budget_mb}")
        if self.headroom_mb is not None and not self.headroom_mb >= 0:
            raise ValueError(f"profile key 'headroom_mb' must be >= 0, got {self.headroom_mb}")
        if not 0.0 <= self.max_reduction_rate < 1.0:
            raise ValueError(
                f"profile key 'max_reduction_rate' must be in [0, 1), got {self.max_reduction_rate}"
            )
        for key in ("batch_size", "eval_batch_size", "epochs", "threads", "img_size", "patch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"profile key '{key}' must be >= 1, got {value}")
        if not self.sampler_period_s > 0:
            raise ValueError(f"profile key 'sampler_period_s' must be > 0, got {self.sampler_period_s}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError(
                "profile key 'precision': fp16 autocast needs device cuda (use bf16 or fp32 on cpu)"
            )
        if self.memory_scope in ("cuda", "unified") and self.device == "cpu":
            raise ValueError(
                f"profile key 'memory_scope': {self.memory_scope!r} needs a CUDA device, got cpu"
            )
        rate = self.method_options.get("reduction_rate")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > self.max_reduction_rate:
            raise ValueError(
                f"profile key 'method_options.reduction_rate' ({rate}) exceeds 'max_reduction_rate' "
                f"({self.max_reduction_rate})"
            )
        if check_method:
            self.method_config()

    def method_config(self) -> Any:
        """The validated config of ``method`` with ``method_options`` (errors name the profile key)."""
        from edgecl.methods import build_config, get_method_class

        try:
            defaults = get_method_class(self.method).Config()
        except ValueError as err:
            raise ValueError(f"profile key 'method': {err}") from err
        for key, value in self.method_options.items():
            default = getattr(defaults, key, None)
            if default is None or value is None:
                continue
            kind = float if isinstance(default, float) else type(default)
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if isinstance(default, tuple):
                ok = isinstance(value, (list, tuple))
            if not ok or (isinstance(value, bool) and kind is not bool):
                raise ValueError(
                    f"profile key 'method_options.{key}' must be {kind.__name__} like the default "
                    f"{default!r}, got {value!r}"
                )
        try:
            return build_config(self.method, self.method_options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"profile key 'method_options': {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for results and the doctor)."""
        return dataclasses.asdict(self)


# ---- type checks --------------------------------------------------------------------------------
_NUMBER = (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    # key: (accepted types, None allowed)
    "name": ((str,), False),
    "description": ((str,), False),
    "device": ((str,), False),
    "memory_budget_mb": (_NUMBER, True),
    "memory_scope": ((str,), False),
    "headroom_mb": (_NUMBER, True),
    "tune_allocator": ((bool,), False),
    "precision": ((str,), False),
    "allow_autocast": ((bool,), False),
    "method": ((str,), False),
    "method_options": ((dict,), False),
    "max_reduction_rate": (_NUMBER, False),
    "batch_size": ((int,), False),
    "eval_batch_size": ((int,), False),
    "epochs": ((int,), False),
    "threads": ((int,), True),
    "backbone": ((str,), False),
    "img_size": ((int,), True),
    "patch_size": ((int,), True),
    "weights": ((str,), True),
    "sampler_period_s": (_NUMBER, False),
    "telemetry_backends": ((list,), False),
    "data_dir": ((str,), False),
    "inference_engine": ((str,), False),
    "source": ((str,), False),
}


def _type_name(types: tuple[type, ...], nullable: bool) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
    }
    text = "a number" if types == _NUMBER else " or ".join(names[t] for t in types)
    return text + (" or null" if nullable else "")


def _check_types(profile: Profile) -> None:
    for key, (types, nullable) in _TYPES.items():
        value = getattr(profile, key)
        if value is None and nullable:
            continue
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise ValueError(f"profile key '{key}' must be {_type_name(types, nullable)}, got {value!r}")
    if not all(isinstance(b, str) for b in profile.telemetry_backends):
        raise ValueError(
            f"profile key 'telemetry_backends' must be a list of strings, got {profile.telemetry_backends!r}"
        )
    bad = [k for k in profile.method_options if not isinstance(k, str)]
    if bad:
        raise ValueError(f"profile key 'method_options' has non-string keys {bad}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"profile key '{key}' must be one of {list(choices)}, got {value!r}")


# ---- lookup -------------------------------------------------------------------------------------
def profile_search_path() -> list[Path]:
    """Folders searched for ``NAME.yaml``, first match wins."""
    dirs: list[Path] = []
    env = os.environ.get("EDGECL_PROFILES_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path("/etc/edgecl/profiles"))
    dirs.append(Path(__file__).resolve().parent.parent / "profiles")  # a source checkout / editable install
    dirs.append(Path(sys.prefix) / "share" / "edgecl" / "profiles")  # a wheel install (data-files)
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


def load_profile(name_or_path: str, *, check_method: bool = True, **overrides: Any) -> Profile:
    """Load and validate a profile by name or path; keyword ``overrides`` (non-None) win over the file.

    ``check_method`` also validates ``method``/``method_options`` against the method registry (this
    imports torch); errors always name the offending key.
    """
    path = _resolve(name_or_path)
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"profile {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(data) - known) + sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"profile {path}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
    data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["source"] = str(path)
    profile = Profile(**data)
    try:
        profile.validate(check_method=check_method)
    except ValueError as err:
        raise ValueError(f"profile {path}: {err}") from err
    return profile
