"""Where a setting comes from: a CLI flag, else an ``EDGECL_*`` variable, else the systemd env file.

Shared by ``edgecl serve`` and ``edgecl doctor`` so both read the same value the service will use, and so
both apply the same rule to the bearer token (:func:`check_token_value`, :func:`read_token_file`): what the
daemon refuses at start, the doctor reports as a failure, with the same words.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MIN_TOKEN_LENGTH",
    "NEW_TOKEN_COMMAND",
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
