"""Device profiles: YAML files that say how much memory edgecl may use and how it trains there.

A profile is looked up by path, or by name in ``$EDGECL_PROFILES_DIR``, ``/etc/edgecl/profiles`` and
the repository's ``profiles/`` folder. A profile is a pydantic model (:class:`Profile`);
unknown keys and bad values are errors that name the key (``method_options`` keys are checked against the
method's config model, e.g. ``method_options.reduction_rate``).
Memory figures are MiB (2**20 bytes), written "MB" throughout edgecl.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, model_validator

from edgecl.config import ConfigModel, FieldProblem

__all__ = ["MEMORY_SCOPES", "Profile", "list_profiles", "load_profile", "profile_search_path"]

Precision = Literal["fp32", "bf16", "fp16", "auto"]
Device = Literal["auto", "cpu", "cuda"]
Engine = Literal["torch", "onnxruntime", "onnxruntime-int8", "onnxruntime-fp16"]
MemoryScope = Literal["auto", "rss", "cuda", "unified"]
MEMORY_SCOPES: tuple[str, ...] = get_args(MemoryScope)
"""What the budget covers: ``rss`` = peak process RSS (CPU), ``cuda`` = peak CUDA allocated (discrete GPU;
RSS reported separately), ``unified`` = RSS plus CUDA memory (Jetson: CPU and GPU share DRAM), ``auto`` =
``rss`` on CPU, ``unified`` on an integrated GPU, ``cuda`` on a discrete one."""

_KEY = "profile key '{key}'"


class Profile(ConfigModel):
    """Everything device-specific about training and serving on one kind of machine.

    A strict pydantic model: YAML values must already have the right type (``batch_size: 16``, not
    ``"16"``; ``true``, not ``yes``), unknown keys are errors; every error names the profile key.
    """

    name: str = "cpu"
    description: str = ""
    device: Device = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    memory_budget_mb: float | None = Field(None, gt=0)
    """What edgecl may use, whole process (see ``memory_scope``); None = no budget."""
    memory_scope: MemoryScope = "auto"
    """What the budget covers, one of :data:`MEMORY_SCOPES`."""
    headroom_mb: float | None = Field(None, ge=0)
    """Safety margin the planner keeps below the budget; None = automatic (see ``edgecl.budget``)."""
    tune_allocator: bool = True
    """Let the planner fix glibc's mmap threshold so freed tensors go back to the OS (RSS tracks live
    tensors, which makes the peak predictable); no effect on other C libraries."""
    precision: Precision = "fp32"
    """``fp32``, ``bf16``, ``fp16`` or ``auto`` (fp32, lowered by the planner only to fit the budget)."""
    allow_autocast: bool = True
    """Whether the planner may switch to bf16/fp16 autocast to fit the budget."""
    method: str = "cps_prompt"
    """A registered method (checked with ``method_options`` when the profile is loaded)."""
    method_options: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the method's config model (e.g. ``reduction_rate: 0.4``)."""
    max_reduction_rate: float = Field(0.75, ge=0.0, lt=1.0)
    """Highest CPS reduction rate r the planner may choose to fit the budget."""
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    """Batch of evaluation and phase-2 feature caching (the planner may lower it to fit the budget)."""
    epochs: int = Field(5, ge=1)
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads; None keeps torch's default."""
    backbone: str = "vit_tiny_patch16_224"
    img_size: int | None = Field(None, ge=1)
    patch_size: int | None = Field(None, ge=1)
    weights: str | None = None
    """Local backbone weights file (offline devices need one)."""
    sampler_period_s: float = Field(0.1, gt=0)
    telemetry_backends: list[str] = Field(default_factory=list)
    """Force these telemetry backends (empty = autodetect)."""
    data_dir: str = "/var/lib/edgecl"
    inference_engine: Engine = "torch"
    """The daemon's predictions: ``torch``, ``onnxruntime`` (fp32), ``onnxruntime-int8`` (dynamic int8, the
    fastest on CPUs) or ``onnxruntime-fp16`` (for GPUs); see README, "ONNX inference"."""
    source: str = ""
    """Where the profile was read from (filled by the loader)."""

    @model_validator(mode="after")
    def _device_rules(self) -> Profile:
        if self.precision == "fp16" and self.device == "cpu":
            raise FieldProblem("precision", "fp16 autocast needs device cuda (use bf16 or fp32 on cpu)")
        if self.memory_scope in ("cuda", "unified") and self.device == "cpu":
            raise FieldProblem("memory_scope", f"{self.memory_scope!r} needs a CUDA device, got cpu")
        rate = self.method_options.get("reduction_rate")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > self.max_reduction_rate:
            raise FieldProblem(
                "method_options.reduction_rate",
                f"{rate} is above max_reduction_rate={self.max_reduction_rate}",
            )
        return self

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "") -> Profile:
        """Validate a profile mapping; the ``ValueError`` names every bad key (``profile key 'epochs'``)."""
        return cls.from_options(data, where=where, noun="key", key_format=_KEY)

    def validate(self, check_method: bool = False) -> None:  # type: ignore[override]
        """Re-check every key; ``check_method`` also builds the method config (imports torch) so unknown or
        bad ``method_options`` are caught before training. ``ValueError`` names the offending key."""
        Profile.from_mapping(self.model_dump())
        if check_method:
            self.method_config()

    def method_config(self) -> Any:
        """The validated config of ``method`` with ``method_options`` (errors name the profile key)."""
        from edgecl.methods import get_method_class

        try:
            config_cls = get_method_class(self.method).Config
        except ValueError as err:
            raise ValueError(f"profile key 'method': {err}") from err
        return config_cls.from_options(
            self.method_options,
            key_format="profile key 'method_options.{key}'",
            unknown_prefix=f"profile key 'method_options': method '{self.method}': ",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for results and the doctor); ``Profile(**d)`` reads it back."""
        return self.model_dump()


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
    data.setdefault("name", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["source"] = str(path)
    profile = Profile.from_mapping(data, where=f"profile {path}")
    if check_method:
        try:
            profile.method_config()
        except ValueError as err:
            raise ValueError(f"profile {path}: {err}") from err
    return profile
