"""Where a setting comes from: a CLI flag, else an ``EDGECL_*`` variable, else the systemd env file.

Shared by ``edgecl serve`` and ``edgecl doctor`` so both read the same value the service will use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SettingLookup", "read_env_file"]


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
