"""Settings of ``edgecl serve``: flag, then ``EDGECL_*`` environment variable, then the service's env file,
then the profile, then the built-in default (the order ``edgecl doctor`` checks). Empty values count as unset,
as in systemd's ``EnvironmentFile=``. The first three layers are one pydantic-settings model
(:class:`edgecl.settings.ServiceSettings`), which converts and checks the strings (a bad ``EDGECL_PORT`` names
the variable); the profile is a :class:`~edgecl.profiles.Profile` model.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecl.data.ingest import IngestLimits
from edgecl.profiles import Profile, load_profile
from edgecl.settings import ServiceSettings, check_token_value, read_env_file, read_token_file

__all__ = [
    "DEFAULT_ENV_FILE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ServeSettings",
    "read_env_file",
    "resolve_device",
    "resolve_precision",
    "resolve_settings",
    "resolve_token",
]

log = logging.getLogger("edgecl.serve")

DEFAULT_ENV_FILE = "/etc/edgecl/edgecl.env"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470


@dataclass
class ServeSettings:
    """Everything the daemon runs with, resolved and validated."""

    profile: Profile
    data_dir: Path
    token: str
    token_source: str
    """``EDGECL_TOKEN`` or the token file's path (never the token itself)."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow_random_backbone: bool = False
    """Accept ``weights: null`` (a randomly initialised backbone): tests and benchmarks only."""
    allow_known_classes: bool = False
    """Accept uploads whose classes an earlier task already has."""
    limits: IngestLimits = field(default_factory=IngestLimits)
    max_request_bytes: int = 512 * 2**20
    eval_fraction: float = 0.1
    """Share of each class held out of training to measure accuracy (per upload)."""
    max_predict_images: int = 64
    predict_concurrency: int = 2
    max_concurrent_uploads: int = 2
    """Uploads received and validated at once; more answer 429 with ``Retry-After``."""
    upload_retry_after_s: int = 5
    """The ``Retry-After`` (seconds) of that 429."""
    backbone_seed: int = 0
    """Seed of the random backbone init (same weights on every start, so a resumed job stays valid)."""
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """The torch device from the profile (``auto`` resolved)."""
        return resolve_device(self.profile.device)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for logs and ``/readyz`` (no secrets)."""
        return {
            "profile": self.profile.name,
            "profile_source": self.profile.source,
            "data_dir": str(self.data_dir),
            "host": self.host,
            "port": self.port,
            "device": self.device,
            "threads": self.profile.threads,
            "memory_budget_mb": self.profile.memory_budget_mb,
            "inference_engine": self.profile.inference_engine,
            "weights": self.profile.weights,
            "random_backbone": self.profile.weights is None,
            "token_source": self.token_source,
            "allow_known_classes": self.allow_known_classes,
            "sources": dict(self.sources),
        }


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str, allow_autocast: bool) -> str:
    """``auto`` becomes bf16 (or fp16) on CUDA when autocast is allowed, else fp32."""
    if precision != "auto":
        return precision
    if device != "cuda" or not allow_autocast:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _default_profile_name() -> str:
    try:
        from edgecl.doctor import default_profile_name
    except ImportError:
        return "cpu"
    return default_profile_name()


def resolve_token(token: str | None, token_file: str | None, data_dir: Path) -> tuple[str, str]:
    """(token, where it came from): ``EDGECL_TOKEN``, else the token file (created 0600 with a random token
    when missing), else ``DATA_DIR/token`` (likewise). The file's path is logged, the token never."""
    if token:
        check_token_value(token)
        return token, "EDGECL_TOKEN"
    path = Path(token_file).expanduser() if token_file else data_dir / "token"
    if path.exists():
        text = read_token_file(path)
        log.info("bearer token read from %s", path)
        return text, str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise ValueError(
            f"cannot create the token file {path} ({err.strerror}); create it yourself (umask 077; "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE) or set EDGECL_TOKEN_FILE"
        ) from err
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value + "\n")
    os.chmod(path, 0o600)
    log.warning(
        "created a new bearer token in %s (mode 0600); clients send 'Authorization: Bearer <token>'", path
    )
    return value, str(path)


def resolve_settings(
    *,
    profile: str | None = None,
    data_dir: str | None = None,
    host: str | None = None,
    port: int | str | None = None,
    memory_budget_mb: float | str | None = None,
    weights: str | None = None,
    env_file: str | None = DEFAULT_ENV_FILE,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> ServeSettings:
    """Resolve every setting (see the module docstring) and the bearer token; ``options`` are the other
    :class:`ServeSettings` fields (``allow_random_backbone``, ``limits``, ...)."""
    environ = os.environ if environ is None else environ
    file_values: dict[str, str] = {}
    env_file_path = env_file or ""
    if env_file_path and Path(env_file_path).is_file():
        file_values = read_env_file(env_file_path)
    flags = {
        "profile": profile,
        "data_dir": data_dir,
        "host": host,
        "port": port,
        "memory_budget_mb": memory_budget_mb,
        "weights": weights,
    }
    given, sources = ServiceSettings.resolve(flags, environ, file_values, env_file_path)
    profile_name = given.profile
    if profile_name is None:
        profile_name = _default_profile_name()
        sources["profile"] = "autodetected for this machine"
    if given.profiles_dir and not environ.get("EDGECL_PROFILES_DIR"):
        os.environ["EDGECL_PROFILES_DIR"] = given.profiles_dir  # the profile loader reads the environment
    prof = load_profile(profile_name, memory_budget_mb=given.memory_budget_mb, weights=given.weights)
    if given.weights is None and prof.weights:
        sources["weights"] = "profile"
    allow_random = bool(options.get("allow_random_backbone"))
    if prof.weights is None and not allow_random:
        raise ValueError(
            f"no backbone weights: profile {prof.name} has weights: null and neither --weights nor "
            "EDGECL_WEIGHTS is set. Devices are offline, so copy a weights file (.safetensors/.pth/.npz) "
            f"for {prof.backbone} and pass --weights FILE. (--allow-random-backbone runs a random ViT: "
            "tests only.)"
        )
    if prof.weights is not None and not Path(prof.weights).expanduser().is_file():
        raise ValueError(f"backbone weights file not found: {prof.weights} (from {sources.get('weights')})")
    dir_value = given.data_dir
    if dir_value is None:
        dir_value, sources["data_dir"] = prof.data_dir, "profile"
    data_path = Path(dir_value).expanduser().resolve()
    host_value = given.host or DEFAULT_HOST
    port_value = DEFAULT_PORT if given.port is None else given.port
    token_value, token_file = given.token, given.token_file
    data_path.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(data_path).free < 256 * 2**20:
        log.warning("less than 256 MB free in %s: uploads and checkpoints may fail", data_path)
    token_text, token_source = resolve_token(token_value, token_file, data_path)
    return ServeSettings(
        profile=prof,
        data_dir=data_path,
        token=token_text,
        token_source=token_source,
        host=host_value,
        port=port_value,
        sources=dict(sorted(sources.items())),
        **options,
    )
