"""Checks of what ``edgecl serve`` needs: a writable data dir, a free port, an acceptable bearer token."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgecl.doctor.report import FAIL, OK, WARN, Check
from edgecl.settings import NEW_TOKEN_COMMAND, TokenError, check_token_value, read_token_file

MIN_FREE_MB = 1024
"""Less free space than this in the data dir is a warning (checkpoints, datasets and exports live there)."""


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def check_data_dir(data_dir: str, source: str) -> Check:
    """The data dir must be a writable folder (a temp file is made and removed) with room for checkpoints."""
    path = Path(data_dir).expanduser()
    details: dict[str, Any] = {"path": str(path), "source": source}
    fix = f"sudo install -d -o edgecl -g edgecl -m 0750 {path} (or pass --data-dir / set EDGECL_DATA_DIR)"
    if path.exists() and not path.is_dir():
        return Check(
            "data_dir", FAIL, f"data dir {path} exists but is not a folder", fix=fix, details=details
        )
    if not path.exists():
        base = _existing_ancestor(path)
        details["exists"] = False
        if base.is_dir() and os.access(base, os.W_OK | os.X_OK):
            return Check(
                "data_dir",
                WARN,
                f"data dir {path} ({source}) does not exist yet",
                fix=f"mkdir -p {path}, or let the service's StateDirectory= create /var/lib/edgecl",
                details=details,
            )
        return Check(
            "data_dir",
            FAIL,
            f"data dir {path} does not exist and {base} is not writable",
            fix=fix,
            details=details,
        )
    details["exists"] = True
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".edgecl-doctor-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return Check(
            "data_dir",
            FAIL,
            f"data dir {path} is not writable ({err.strerror or err})",
            fix=f"sudo chown -R edgecl:edgecl {path} (the user running edgecl), or pass --data-dir",
            details=details,
        )
    free_mb = shutil.disk_usage(path).free / 2**20
    details["free_mb"] = round(free_mb)
    if free_mb < MIN_FREE_MB:
        return Check(
            "data_dir",
            WARN,
            f"data dir {path} is writable but only {free_mb:.0f} MB is free",
            fix="free disk space or move the data dir to a larger disk (EDGECL_DATA_DIR)",
            details=details,
        )
    return Check("data_dir", OK, f"{path} writable, {free_mb:.0f} MB free", details=details)


def _answers_healthz(host: str, port: int) -> bool:
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in connect:
        connect = f"[{connect}]"
    try:
        with urllib.request.urlopen(f"http://{connect}:{port}/healthz", timeout=0.5) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_port(host: str, port: int) -> Check:
    """Bind ``host:port`` the way uvicorn does (SO_REUSEADDR) to see whether serve could listen there."""
    details: dict[str, Any] = {"host": host, "port": port}
    fix = f"stop what listens there (`ss -ltnp 'sport = :{port}'`) or choose another --port / EDGECL_PORT"
    if not 0 < port < 65536:
        return Check(
            "port", FAIL, f"port {port} is out of range", fix="use a port in 1024-65535", details=details
        )
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return Check(
            "port",
            FAIL,
            f"bind address {host!r} does not resolve ({err})",
            fix="set EDGECL_HOST",
            details=details,
        )
    family, socktype, proto, _, addr = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as err:
            details["errno"] = err.errno
            if err.errno == errno.EADDRINUSE:
                if _answers_healthz(host, port):
                    details["healthz"] = True
                    return Check(
                        "port",
                        WARN,
                        f"{host}:{port} is in use by a server answering /healthz (edgecl already running?)",
                        fix=f"fine if that is the edgecl service; otherwise {fix}",
                        details=details,
                    )
                return Check(
                    "port", FAIL, f"{host}:{port} is in use by another program", fix=fix, details=details
                )
            if err.errno == errno.EACCES:
                return Check(
                    "port",
                    FAIL,
                    f"no permission to bind port {port}",
                    fix="use a port >= 1024",
                    details=details,
                )
            if err.errno == errno.EADDRNOTAVAIL:
                return Check(
                    "port",
                    FAIL,
                    f"{host} is not an address of this machine",
                    fix="set EDGECL_HOST to 127.0.0.1, 0.0.0.0 or one of this machine's addresses",
                    details=details,
                )
            return Check("port", FAIL, f"cannot bind {host}:{port}: {err}", fix=fix, details=details)
    return Check("port", OK, f"{host}:{port} is free", details=details)


def check_token(
    token: str | None, token_file: str | None, source: str | None, data_dir: str | None = None
) -> Check:
    """The bearer token, judged by the rule the daemon enforces (:func:`edgecl.settings.read_token_file`):
    a token or token file serve would refuse at start is a failure; none configured is a warning."""
    if token:
        try:
            check_token_value(token)
        except TokenError as err:
            return Check("token", FAIL, err.problem, fix=err.fix, details={"from": "EDGECL_TOKEN"})
        return Check(
            "token",
            OK,
            "bearer token from EDGECL_TOKEN (prefer EDGECL_TOKEN_FILE: the environment is visible to others)",
            details={"from": "EDGECL_TOKEN"},
        )
    fix = (
        f"create one: (umask 077; {NEW_TOKEN_COMMAND} > FILE), owned by the service user, and set "
        "EDGECL_TOKEN_FILE=FILE"
    )
    if token_file:
        path = Path(token_file).expanduser()
        details: dict[str, Any] = {"from": "EDGECL_TOKEN_FILE", "path": str(path), "source": source}
    elif data_dir and (Path(data_dir).expanduser() / "token").exists():
        path = Path(data_dir).expanduser() / "token"
        details = {"from": "data dir", "path": str(path), "source": "DATA_DIR/token"}
    else:
        return Check(
            "token",
            WARN,
            "no EDGECL_TOKEN_FILE or EDGECL_TOKEN set (serve creates DATA_DIR/token with a random token)",
            fix=fix,
            details={"from": None},
        )
    if not path.exists():
        return Check(
            "token",
            WARN,
            f"token file {path} does not exist yet (serve creates it with a random token, mode 0600)",
            fix=fix,
            details=details,
        )
    try:
        read_token_file(path)
    except TokenError as err:
        return Check("token", FAIL, err.problem, fix=err.fix, details=details)
    mode = stat.S_IMODE(path.stat().st_mode)
    details["mode"] = f"{mode:04o}"
    return Check("token", OK, f"token file {path} (mode {mode:04o})", details=details)
