"""``edgecl doctor``: honest telemetry report on this machine, blocking problems with fixes, exit codes."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecl import doctor
from edgecl.doctor import FAIL, NO_WEIGHTS, OK, WARN, DoctorOptions, SystemPaths, run_doctor

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_power_hardware_here() -> bool:
    """A plain CPU machine (no RAPL, Jetson or NVIDIA driver), where 'no power sensor' is the truth."""
    return (
        not list(Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj"))
        and not Path("/etc/nv_tegra_release").exists()
        and shutil.which("nvidia-smi") is None
        and not Path("/proc/driver/nvidia/version").exists()
    )


def assert_honest_telemetry(telemetry: dict) -> None:
    """psutil is always there; the power verdict matches what the backends themselves say."""
    details = telemetry["details"]
    assert "psutil" in details["available"]
    psutil_row = next(b for b in details["backends"] if b["name"] == "psutil")
    assert psutil_row["available"] and "process_memory" in psutil_row["measures"]
    measuring = [
        b["name"] for b in details["backends"] if {"power_w", "energy_counter"} & set(b.get("measures", []))
    ]
    assert details["power_sources"] == measuring
    assert details["power_sensor"] is bool(measuring)
    if no_power_hardware_here():
        assert not measuring
        assert telemetry["status"] == WARN
        assert "no power sensor" in telemetry["message"]
    elif not measuring:
        assert "no power sensor" in telemetry["message"]


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory: pytest.TempPathFactory) -> doctor.Report:
    """One full in-process run with the cpu profile, a writable data dir and a free port, no env file."""
    data = tmp_path_factory.mktemp("data")
    options = DoctorOptions(profile="cpu", data_dir=str(data), port=free_port(), env_file=None)
    return run_doctor(options, environ={})


def test_in_process_report_is_honest_about_telemetry(cpu_report: doctor.Report) -> None:
    assert_honest_telemetry(
        json.loads(json.dumps(cpu_report.to_dict()))["checks"][_index(cpu_report, "telemetry")]
    )
    assert cpu_report.get("profile").details["memory_budget_mb"] == 4096
    assert cpu_report.get("data_dir").status == OK
    assert cpu_report.get("port").status == OK
    assert cpu_report.get("weights").status == WARN
    assert NO_WEIGHTS in cpu_report.get("weights").message
    assert cpu_report.exit_code == 0, [c.message for c in cpu_report.checks if c.status == FAIL]
    for check in cpu_report.checks:
        if check.status != OK:
            assert check.fix and "Fix:" in check.message, check


def _index(report: doctor.Report, name: str) -> int:
    return [c.name for c in report.checks].index(name)


def test_cli_json_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "edgecl", "doctor", "--json", "--profile", "cpu", "--env-file", ""]
    cmd += ["--data-dir", str(tmp_path), "--port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    out = json.loads(proc.stdout)
    assert proc.returncode == out["exit_code"] == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in out["checks"]}
    assert_honest_telemetry(checks["telemetry"])
    expected = {"platform", "jetson", "python", "packages", "cuda", "profile", "weights", "data_dir", "port"}
    assert expected <= set(checks)
    assert out["settings"]["sources"]["profile"] == "--profile"
    assert checks["platform"]["details"]["cores_logical"] == os.cpu_count()


def test_cli_exits_nonzero_on_blocking_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgecl.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["doctor", "--profile", "cpu", "--env-file", "", "--data-dir", str(tmp_path), "--port", str(port)]
        )
    text = capsys.readouterr().out
    assert code == 1
    assert "FAIL  port" in text and "--port" in text and "blocking" in text


def test_data_dir_that_is_not_writable_fails_with_fix(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        check = doctor.check_data_dir(str(bad), "--data-dir")
        assert check.status == FAIL and "Fix:" in check.message and str(bad) in check.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a mode-0500 folder")
def test_read_only_data_dir_fails(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    check = doctor.check_data_dir(str(ro), "--data-dir")
    assert check.status == FAIL and "not writable" in check.message and "chown" in check.fix


def test_missing_data_dir_is_a_warning(tmp_path: Path) -> None:
    check = doctor.check_data_dir(str(tmp_path / "new" / "dir"), "profile")
    assert check.status == WARN and "mkdir -p" in check.message


def test_busy_port_fails_with_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        check = doctor.check_port("127.0.0.1", port)
    assert check.status == FAIL
    assert "in use" in check.message and "EDGECL_PORT" in check.message


@contextlib.contextmanager
def healthz_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_port_held_by_a_running_daemon_is_a_warning() -> None:
    with healthz_server() as port:
        check = doctor.check_port("127.0.0.1", port)
    assert check.status == WARN and "/healthz" in check.message


def test_port_errors() -> None:
    assert doctor.check_port("127.0.0.1", 70000).status == FAIL
    assert doctor.check_port("192.0.2.123", free_port()).status == FAIL  # TEST-NET address, not ours


def test_weights(tmp_path: Path) -> None:
    missing = doctor.check_weights(None, None)
    assert missing.status == WARN and NO_WEIGHTS in missing.message
    assert doctor.check_weights(str(tmp_path / "nope.safetensors"), "--weights").status == FAIL
    odd = tmp_path / "w.onnx"
    odd.write_bytes(b"x")
    assert "unsupported format" in doctor.check_weights(str(odd), "--weights").message

    import torch
    from safetensors.torch import save_file

    good = tmp_path / "vit.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(good))
    ok = doctor.check_weights(str(good), "--weights")
    assert ok.status == OK and "2 tensors" in ok.message
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    assert doctor.check_weights(str(broken), "--weights").status == FAIL


def test_fake_jetson(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x\n"
    )
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00")
    paths = SystemPaths(tegra_release=release, device_tree_model=model, jtop_socket=tmp_path / "jtop.sock")
    check = doctor.check_jetson(paths)
    assert check.details == {
        "is_jetson": True,
        "l4t": "36.4.3",
        "model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        "nv_tegra_release": release.read_text().strip(),
    }
    assert doctor.default_profile_name(paths) == "jetson-orin-nano-8gb"
    jtop = doctor.check_jtop_socket(paths)
    assert jtop.status == WARN and "jetson-stats" in jtop.fix
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(paths.jtop_socket))
        assert doctor.check_jtop_socket(paths).status == OK


def test_fake_rapl(tmp_path: Path) -> None:
    readable = tmp_path / "intel-rapl:0"
    readable.mkdir()
    (readable / "energy_uj").write_text("123456\n")
    assert doctor.check_rapl(SystemPaths(powercap_root=tmp_path)).status == OK
    root_only = tmp_path / "intel-rapl:1"
    root_only.mkdir()
    (root_only / "energy_uj").mkdir()  # unreadable as a file, even for root
    check = doctor.check_rapl(SystemPaths(powercap_root=tmp_path))
    assert check.status == WARN and "intel-rapl:1" in check.message and "udev" in check.fix
    assert doctor.check_rapl(SystemPaths(powercap_root=tmp_path / "none")).status == OK


def test_settings_precedence(tmp_path: Path) -> None:
    env_file = tmp_path / "edgecl.env"
    env_file.write_text(
        '# comment\nEDGECL_PORT=1\nEDGECL_HOST="127.0.0.1"\nEDGECL_DATA_DIR=/nonexistent/x\nEDGECL_WEIGHTS=\n'
    )
    port = free_port()
    report = run_doctor(
        DoctorOptions(profile="cpu", data_dir=str(tmp_path), env_file=str(env_file)),
        environ={"EDGECL_PORT": str(port), "EDGECL_MEMORY_BUDGET_MB": "512"},
    )
    sources = report.settings["sources"]
    assert report.settings["port"] == str(port) and sources["port"] == "environment EDGECL_PORT"
    assert sources["host"] == f"{env_file} EDGECL_HOST"
    assert sources["data_dir"] == "--data-dir"
    assert "weights" not in sources  # empty value = unset
    assert report.get("profile").details["memory_budget_mb"] == 512.0
    assert report.settings["env_file"]["status"] == "read"


def test_bad_profile_and_budget_fail() -> None:
    check, profile = doctor.check_profile("no-such-profile", "--profile", None, None)
    assert check.status == FAIL and profile is None and "cpu" in check.fix
    check, _ = doctor.check_profile("cpu", "--profile", "lots", "environment EDGECL_MEMORY_BUDGET_MB")
    assert check.status == FAIL and "EDGECL_MEMORY_BUDGET_MB" in check.message


def test_token_file_modes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-long-enough-token\n")
    token.chmod(0o644)
    readable = doctor.check_token(None, str(token), "x")
    assert readable.status == FAIL and f"chmod 0600 {token}" in readable.fix
    token.chmod(0o600)
    assert doctor.check_token(None, str(token), "x").status == OK
    token.write_text("abc\n")
    short = doctor.check_token(None, str(token), "x")
    assert short.status == FAIL and "shorter than 16" in short.message
    assert doctor.check_token("short", None, None).status == FAIL
    assert doctor.check_token("x" * 16, None, None).status == OK
    assert doctor.check_token(None, None, None).status == WARN
    assert doctor.check_token(None, str(tmp_path / "missing"), "x").status == WARN
    data = tmp_path / "data"
    data.mkdir()
    (data / "token").write_text("abc\n")  # what serve reads when no token is configured
    (data / "token").chmod(0o600)
    assert doctor.check_token(None, None, None, str(data)).status == FAIL


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("fifteen-chars-x", 0o600),
        ("sixteen-chars-xx", 0o600),
        ("sixteen-chars-xx", 0o640),
        ("sixteen-chars-xx", 0o604),
        ("  ", 0o600),
        ("fifteen-chars-x", 0o644),
    ],
)
def test_doctor_fails_exactly_the_token_files_serve_refuses(tmp_path: Path, text: str, mode: int) -> None:
    from edgecl.serve.config import resolve_token

    token = tmp_path / "token"
    token.write_text(text + "\n")
    token.chmod(mode)
    try:
        resolve_token(None, str(token), tmp_path)
        refused = None
    except ValueError as err:
        refused = str(err)
    check = doctor.check_token(None, str(token), "x")
    assert (check.status == FAIL) is (refused is not None), (check, refused)
    if refused is not None:
        assert check.message.split(". Fix: ")[0] in refused and check.fix in refused


def test_read_env_file(tmp_path: Path) -> None:
    f = tmp_path / "e.env"
    f.write_text("; note\n\nA=1\nB = 'two words'\nnot a line\nC=\n")
    assert doctor.read_env_file(f) == {"A": "1", "B": "two words", "C": ""}
