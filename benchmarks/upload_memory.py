"""Memory of a real ``edgecl serve`` process while it receives large multipart uploads (issue #24 item 4).

Starts the daemon (random 32 px ViT, temporary data dir) pinned to one core, waits until it is ready and
idle, resets its RSS high-water mark (``/proc/PID/clear_refs``), then sends each scenario and reports the
daemon's peak RSS growth (``VmHWM`` after - ``VmRSS`` before) and its CPU seconds. The body is streamed from
a generator, so the client holds one part at a time; the parts are random bytes (the upload is refused at
validation: the cost measured is receiving and parsing it).

Scenarios (the ones the abuse probe measured):

* ``one``: one upload of ``--one-mb`` MB in 1 MB file parts;
* ``three``: three concurrent uploads of ``--three-mb`` MB each in 1 MB parts (the daemon runs with
  ``--max-concurrent-uploads 3`` so all three are received; with the default of 2 the third gets 429).

``--pythonpath DIR`` runs another checkout's code (e.g. the code before the change) in the daemon.

Usage::

    .venv/bin/python benchmarks/upload_memory.py --out benchmarks/results/upload_memory.json
    .venv/bin/python benchmarks/upload_memory.py --pythonpath ../main --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TOKEN = "memory-token-0123456789abcdef"
PROFILE = (
    "device: cpu\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\nweights: null\nthreads: 1\n"
    "epochs: 1\ninference_engine: torch\n"
)
MB = 2**20


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _body(total_mb: int, boundary: str) -> Iterator[bytes]:
    part = os.urandom(MB)
    for i in range(total_mb):
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="f{i:05d}.jpg"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        yield part
        yield b"\r\n"
    labels = json.dumps(["x"] * total_mb)
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{labels}\r\n'.encode()
    yield f"--{boundary}--\r\n".encode()


def _upload(url: str, total_mb: int, results: list[int]) -> None:
    boundary = f"edgecl-bench-{total_mb}-{threading.get_ident()}"
    r = httpx.post(
        f"{url}/v1/tasks",
        content=_body(total_mb, boundary),
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "content-type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=600,
    )
    results.append(r.status_code)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(pythonpath: str, one_mb: int, three_mb: int, core: int) -> dict[str, Any]:
    """Run both scenarios against a fresh daemon; returns the figures."""
    work = Path(tempfile.mkdtemp(prefix="edgecl-upload-mem-"))
    (work / "p.yaml").write_text(PROFILE)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    env.update(EDGECL_TOKEN=TOKEN, PYTHONPATH=pythonpath)
    cmd = [
        "taskset", "-c", str(core), "nice", "-n", "5", sys.executable, "-m", "edgecl", "serve",
        "--profile", str(work / "p.yaml"), "--data-dir", str(work / "data"), "--port", str(port),
        "--allow-random-backbone", "--env-file", "", "--max-request-mb", str(max(one_mb, three_mb) + 16),
    ]  # fmt: skip
    extra = ["--max-concurrent-uploads", "3"] if "--max-concurrent-uploads" in _help(pythonpath) else []
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen([*cmd, *extra], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if (
                    httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((work / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        pid = proc.pid  # taskset and nice exec the daemon: same process
        out: dict[str, Any] = {"pythonpath": pythonpath, "concurrency_flag": bool(extra)}
        for name, sizes in (("one", [one_mb]), ("three", [three_mb] * 3)):
            time.sleep(2)
            before = _status(pid)["VmRSS"]
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            cpu0 = _cpu_seconds(pid)
            statuses: list[int] = []
            threads = [threading.Thread(target=_upload, args=(url, mb, statuses)) for mb in sizes]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = _status(pid)
            out[name] = {
                "upload_mb": sizes,
                "statuses": sorted(statuses),
                "rss_before_mb": round(before / MB, 1),
                "peak_rss_mb": round(after["VmHWM"] / MB, 1),
                "peak_growth_mb": round((after["VmHWM"] - before) / MB, 1),
                "rss_after_mb": round(after["VmRSS"] / MB, 1),
                "server_cpu_s": round(_cpu_seconds(pid) - cpu0, 2),
                "wall_s": round(time.monotonic() - t0, 2),
            }
            print(name, out[name], flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def _help(pythonpath: str) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "edgecl", "serve", "--help"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
    return run.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pythonpath", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--one-mb", type=int, default=400)
    p.add_argument("--three-mb", type=int, default=300)
    p.add_argument("--core", type=int, default=1, help="CPU core the daemon is pinned to")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = measure(args.pythonpath, args.one_mb, args.three_mb, args.core)
    result["machine"] = {"cpus": os.cpu_count(), "kernel": os.uname().release, "note": "shared 2-core VM"}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
