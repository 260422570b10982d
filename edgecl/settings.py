"""Where a setting comes from: a CLI flag, else an ``EDGECL_*`` variable, else the systemd env file.

Shared by ``edgecl serve`` and ``edgecl doctor`` so both read the same value the service will use, and so
both apply the same rule to the bearer token (:func:`check_token_value`, :func:`read_token_file`): what the
daemon refuses at start, the doctor reports as a failure, with the same words.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgecl.config import describe_validation_error

__all__ = [
    "MIN_TOKEN_LENGTH",
    "NEW_TOKEN_COMMAND",
    "ENV_PREFIX",
    "ServiceSettings",
    "SettingLookup",
    "TokenError",
    "check_token_value",
    "read_env_file",
    "read_token_file",
]

MIN_TOKEN_LENGTH = 16
"""Shortest bearer token the daemon accepts (from ``EDGECL_TOKEN`` or a token file)."""
NEW_TOKEN_COMMAND = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
"""Prints a token long and random enough (32 bytes, 43 characters)."""


class TokenError(ValueError):
    """A bearer token (or its file) the daemon refuses: ``problem`` says what, ``fix`` what to run."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; fix: {fix}")
        self.problem = problem
        self.fix = fix


def check_token_value(token: str, where: str = "EDGECL_TOKEN") -> None:
    """Raise :class:`TokenError` when ``token`` (read from ``where``) is shorter than the minimum."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"{where} is shorter than {MIN_TOKEN_LENGTH} characters",
            f"use a long random token, e.g. from {NEW_TOKEN_COMMAND}",
        )


def read_token_file(path: Path) -> str:
    """The token in an existing token file, or :class:`TokenError` when the daemon must refuse it: the file is
    unreadable, empty, holds fewer than :data:`MIN_TOKEN_LENGTH` characters, or group/other may read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or err
        raise TokenError(
            f"cannot read the token file {path} ({why})",
            f"make it readable by the user running edgecl only: sudo chown edgecl {path}; chmod 0600 {path}",
        ) from err
    if not text:
        raise TokenError(f"token file {path} is empty", "delete it to have a new token generated")
    check_token_value(text, f"the token in {path}")
    if mode & 0o077:
        raise TokenError(
            f"token file {path} has mode {mode:04o}: group or other users may read it", f"chmod 0600 {path}"
        )
    return text


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a systemd EnvironmentFile (KEY=VALUE lines, # or ; comments, optional quotes)."""
    out: dict[str, str] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


class SettingLookup:
    """Looks a setting up in flag > environment > env file order, remembering where each value came from."""

    def __init__(self, environ: Mapping[str, str], env_file: Mapping[str, str], env_file_path: str) -> None:
        self.environ = environ
        self.env_file = env_file
        self.env_file_path = env_file_path
        self.sources: dict[str, str] = {}

    def get(self, key: str, flag_value: Any, flag: str, env: str) -> Any | None:
        """The value of ``key`` and, in ``sources``, where it came from (empty strings count as unset)."""
        if flag_value not in (None, ""):
            self.sources[key] = flag
            return flag_value
        if self.environ.get(env):
            self.sources[key] = f"environment {env}"
            return self.environ[env]
        if self.env_file.get(env):
            self.sources[key] = f"{self.env_file_path} {env}"
            return self.env_file[env]
        return None


ENV_PREFIX = "EDGECL_"
FLAGS = {
    "profile": "--profile",
    "data_dir": "--data-dir",
    "host": "--host",
    "port": "--port",
    "memory_budget_mb": "--memory-budget-mb",
    "weights": "--weights",
}
"""The settings that also have a command-line flag (the others come from the environment only)."""

_Layers = tuple[Mapping[str, str], Mapping[str, str]]
_LAYERS: ContextVar[_Layers | None] = ContextVar("edgecl_layers", default=None)
"""The environment and env-file mappings of the :meth:`ServiceSettings.resolve` call in progress."""


class _MappingSource(PydanticBaseSettingsSource):
    """``EDGECL_<FIELD>`` values from a mapping (the process environment, or a parsed systemd env file)."""

    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The raw string of ``field_name`` (empty values count as unset, as in systemd)."""
        value = self.values.get(ENV_PREFIX + field_name.upper())
        return (value or None), field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(info, name)
            if value is not None:
                out[key] = value
        return out


class ServiceSettings(BaseSettings):
    """What ``edgecl serve`` (and ``edgecl doctor``) read from a flag, else ``EDGECL_<NAME>``, else the env
    file (a pydantic-settings model: strings from the environment are converted and checked here)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    profile: str | None = None
    """Device profile name or path (``EDGECL_PROFILE``); None = autodetected for the machine."""
    data_dir: str | None = None
    """Where the store, uploads and models live; None = the profile's ``data_dir``."""
    host: str | None = None
    """Listen address; None = 127.0.0.1."""
    port: int | None = Field(None, ge=0, lt=65536)
    """Listen port; None = 8470."""
    memory_budget_mb: float | None = Field(None, gt=0)
    """Overrides the profile's memory budget (MiB)."""
    weights: str | None = None
    """Backbone weights file; overrides the profile's."""
    profiles_dir: str | None = None
    """Extra folder searched first for profiles (``EDGECL_PROFILES_DIR``)."""
    token: str | None = Field(None, repr=False)
    """The bearer token itself (``EDGECL_TOKEN``; never logged)."""
    token_file: str | None = None
    """File holding the bearer token; None = ``DATA_DIR/token``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init values), then the environment, then the env file, as :meth:`resolve` gives them."""
        layers = _LAYERS.get()
        environ, env_file = layers if layers is not None else (os.environ, {})
        return init_settings, _MappingSource(settings_cls, environ), _MappingSource(settings_cls, env_file)

    @classmethod
    def resolve(
        cls,
        flags: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        env_file: Mapping[str, str] | None = None,
        env_file_path: str = "",
    ) -> tuple[ServiceSettings, dict[str, str]]:
        """(settings, where each set value came from); flag values that are None or empty are unset. A bad
        value is a ``ValueError`` naming the flag or variable it came from."""
        environ = os.environ if environ is None else environ
        env_file = env_file or {}
        given = {k: v for k, v in flags.items() if v not in (None, "")}
        sources: dict[str, str] = {}
        for name in cls.model_fields:
            env = ENV_PREFIX + name.upper()
            if name in given:
                sources[name] = FLAGS.get(name, name)
            elif environ.get(env):
                sources[name] = f"environment {env}"
            elif env_file.get(env):
                sources[name] = f"{env_file_path} {env}"
        token = _LAYERS.set((environ, env_file))
        try:
            return cls(**given), sources
        except ValidationError as err:
            text = describe_validation_error(err, cls).replace(" or null", "")  # unset = leave it empty
            for name, where in sources.items():
                text = text.replace(f"{name}: ", f"{name} (from {where}): ", 1)
            raise ValueError(f"setting {text}") from None
        finally:
            _LAYERS.reset(token)
