"""Hostile uploads against ``edgecl serve``: status, CPU seconds and peak RSS per upload, and the malformed
upload corpus's tally (tried / accepted / 5xx), for one or two versions of the code.

1. Hostile uploads at the daemon's default limits, sent over HTTP to a real ``edgecl serve`` (uvicorn, random
   backbone) pinned to one core: CPU is the server's utime+stime delta (``/proc/PID/stat``), peak RSS its
   ``VmHWM`` after ``clear_refs`` minus its RSS before the request.
2. The corpus of ``tests/upload_corpus.py`` (at its small limits) through ``create_app`` under a TestClient.

Usage (each tree is a checkout of edgecl; the corpus always comes from this checkout)::

    git archive BASE | tar -x -C /tmp/edgecl-before
    taskset -c 1 nice -n 5 .venv/bin/python benchmarks/upload_abuse.py --tree before=/tmp/edgecl-before \\
        --tree after=. --out benchmarks/results/upload_abuse.json
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from corpus_builders import build_tar, build_zip, entries_of, image, palette, png_chunk  # noqa: E402

TOKEN = "abuse-token-0123456789abcdef"
PROFILE = (
    "device: cpu\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\nweights: null\nthreads: 1\n"
)


# ------------------------------------------------------------------------------------------ the uploads
@functools.cache
def _flat_idat(width: int, height: int) -> bytes:
    row0 = b"\x01" + bytes([40, 90, 160]) + bytes(3 * width - 3)  # Sub filter: one colour, then zeros
    rest = (b"\x02" + bytes(3 * width)) * (height - 1)  # Up filter: same as the row above
    comp = zlib.compressobj(9)
    return comp.compress(row0) + comp.compress(rest) + comp.flush()


def flat_png(width: int, height: int, tag: int) -> bytes:
    """A flat ``width`` x ``height`` RGB PNG (its pixel data compressed once), unique by a text chunk."""
    idat = _flat_idat(width, height)
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"tEXt", b"id\x00%d" % tag)
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zeros_tar_gz(members: int, size: int) -> bytes:
    """tar.gz of ``members`` files of ``size`` zero bytes, streamed through zlib."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    out, block = [], bytes(2**20)
    for i in range(members):
        info = tarfile.TarInfo(f"zeros/{i}.png")
        info.size = size
        out.append(comp.compress(info.tobuf()))
        for _ in range(size // len(block)):
            out.append(comp.compress(block))
        out.append(comp.compress(bytes(size % len(block) + (-size % 512))))
    out.append(comp.compress(bytes(10240)) + comp.flush())
    return b"".join(out)


def zip_member_patch(data: bytes, name: str, method: int | None = None, flip_at: int | None = None) -> bytes:
    """A zip with member ``name``'s method changed (local and central header) or a data byte flipped."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    u16 = lambda at: int.from_bytes(data[at : at + 2], "little")  # noqa: E731
    out = bytearray(data)
    if method is not None:
        central = data.index(b"PK\x01\x02")
        while data[central + 46 : central + 46 + u16(central + 28)] != name.encode():
            central += 46 + u16(central + 28) + u16(central + 30) + u16(central + 32)
        for at in (info.header_offset + 8, central + 10):
            out[at : at + 2] = method.to_bytes(2, "little")
    if flip_at is not None:
        start = info.header_offset + 30 + u16(info.header_offset + 26) + u16(info.header_offset + 28)
        out[start + flip_at] ^= 0xFF
    return bytes(out)


def hostile_cases(work: Path) -> list[dict[str, Any]]:
    """The hostile uploads of issue 24 at full size, written to ``work``; each a dict of request parts."""
    colors = iter(palette(400))
    small = {f"h{k}/{i}.png": image(next(colors), 16) for k in ("a", "b") for i in range(4)}

    def zipped(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as zf:
            for n, d in members.items():
                zf.writestr(n, d)
        return buf.getvalue()

    cases: list[tuple[str, str, bytes, dict[str, str]]] = []
    deflated = zipped({f"d{k}": v for k, v in small.items()})
    cases.append(
        (
            "corrupt deflate member (zlib.error)",
            "z1.zip",
            zip_member_patch(deflated, "dha/0.png", flip_at=0),
            {},
        )
    )
    cases.append(
        ("zip compression method 9", "z2.zip", zip_member_patch(deflated, "dha/0.png", method=9), {})
    )
    lz = zipped({f"l{k}": v for k, v in small.items()}, zipfile.ZIP_LZMA)
    cases.append(("corrupt LZMA member", "z3.zip", zip_member_patch(lz, "lha/0.png", flip_at=12), {}))
    eight = build_tar({f"t{k}": v for k, v in small.items()})
    third = 2 * 1024
    cases.append(
        ("tar, third header checksum broken", "t.tar", eight[:third] + b"X" + eight[third + 1 :], {})
    )
    gz = gzip.compress(build_tar({f"g{k}": v for k, v in small.items()}), mtime=0)
    cases.append(("tar.gz, gzip CRC broken", "t.tar.gz", gz[:-8] + bytes([gz[-8] ^ 1]) + gz[-7:], {}))
    nested = "[" * 50_000 + "]" * 50_000
    cases.append(("labels nested 50,000 deep", "x.png", image(next(colors), 16), {"labels": nested}))
    cases.append(("tar.gz of 100 x 40 MB zeros", "bomb.tar.gz", zeros_tar_gz(100, 40 * 10**6), {}))
    pngs = {f"big{'ab'[i % 2]}/{i}.png": flat_png(4096, 4096, i) for i in range(120)}
    cases.append(("120 flat 4096x4096 PNGs in a zip", "flat.zip", build_zip(entries_of(pngs, method=0)), {}))
    known = {f"{'cat' if i % 2 else 'dog'}/{i}.png": flat_png(4096, 4096, 1000 + i) for i in range(60)}
    cases.append(
        ("known classes, 60 x 4096x4096 PNGs", "known.zip", build_zip(entries_of(known, method=0)), {})
    )
    control = {f"ok{i % 10}/{i}.jpg": image(c, 128, "JPEG") for i, c in enumerate(palette(2000)[400:1400])}
    cases.append(("control: a valid zip of 1000 JPEGs, 128 px", "ok.zip", build_zip(entries_of(control)), {}))
    out = []
    for title, filename, data, fields in cases:
        path = work / filename
        path.write_bytes(data)
        out.append(
            {"case": title, "filename": filename, "path": str(path), "fields": fields, "bytes": len(data)}
        )
    return out


# ----------------------------------------------------------------------------------------- the server
def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_server(tree: Path, work: Path, cases: list[dict[str, Any]], cpu: str) -> list[dict[str, Any]]:
    """Start ``edgecl serve`` from ``tree`` pinned to ``cpu`` and send every case; the measurements."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = work / f"data-{tree.name}"
    (work / "p.yaml").write_text(PROFILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    env.update(PYTHONPATH=str(tree), EDGECL_TOKEN=TOKEN, OMP_NUM_THREADS="1")
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "edgecl", "serve", "--profile", str(work / "p.yaml")]
    cmd += ["--data-dir", str(data_dir), "--port", str(port), "--allow-random-backbone", "--env-file", ""]
    log = (work / f"server-{tree.name}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tree)  # cwd: sys.path[0]
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    results = []
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/readyz", headers=auth, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server did not start: see {log.name}")
            time.sleep(0.5)
        cols = iter(palette(400)[-4:])
        seed = {f"{c}/{i}.png": image(next(cols), 12) for c in ("cat", "dog") for i in range(2)}
        r = httpx.post(
            f"{url}/v1/tasks", headers=auth, files={"file": ("s.zip", build_zip(entries_of(seed)))}
        )
        assert r.status_code == 201, r.text
        for case in cases:
            time.sleep(1.0)  # let the previous request's threads settle
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            rss0, cpu0 = proc_mem_mb(proc.pid, "VmRSS"), proc_cpu(proc.pid)
            files = {"file": (case["filename"], Path(case["path"]).read_bytes())}
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/tasks", headers=auth, files=files, data=case["fields"], timeout=900)
            wall = time.perf_counter() - t0
            cpu_s = proc_cpu(proc.pid) - cpu0
            peak = proc_mem_mb(proc.pid, "VmHWM") - rss0
            is_json = r.headers.get("content-type", "").startswith("application/json")
            body = r.json() if is_json else {"detail": r.text[:200]}
            results.append(
                {
                    "case": case["case"],
                    "upload_bytes": case["bytes"],
                    "status": r.status_code,
                    "json": is_json,
                    "detail": str(body.get("detail", ""))[:160],
                    "images": body.get("num_images"),
                    "cpu_s": round(cpu_s, 2),
                    "peak_rss_increase_mb": round(peak, 1),
                    "wall_s": round(wall, 2),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return results


# ----------------------------------------------------------------------------------------- the corpus
CORPUS_CHILD = r"""
import dataclasses, json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from starlette.testclient import TestClient
from upload_corpus import KNOWN, Limits, bad_uploads, good_uploads
from corpus_builders import build_zip, entries_of, image, palette
from edgecl.data.ingest import IngestLimits
from edgecl.profiles import load_profile
from edgecl.serve import ServeSettings, create_app
lim = Limits()
want = dict(max_images=lim.images, max_members=lim.members, max_image_pixels=lim.image_pixels,
            max_total_pixels=lim.total_pixels, max_image_bytes=lim.image_bytes,
            max_total_bytes=lim.total_bytes,
            expansion_grace_bytes=lim.expansion_grace, max_labels_bytes=lim.labels_bytes,
            listing_budget_bytes=lim.listing_budget, max_classes=50)
have = {f.name for f in dataclasses.fields(IngestLimits)}
root = Path(tempfile.mkdtemp())
(root / "p.yaml").write_text(sys.argv[2])
settings = ServeSettings(profile=load_profile(str(root / "p.yaml")), data_dir=root / "d", token="t" * 20,
                         token_source="t", allow_random_backbone=True,
                         limits=IngestLimits(**{k: v for k, v in want.items() if k in have}))
(root / "d").mkdir()
client = TestClient(create_app(settings), raise_server_exceptions=False)
auth = {"Authorization": "Bearer " + "t" * 20}
cols = iter(palette(4096)[-10:])
seed = {f"{c}/{i}.png": image(next(cols), 12) for c in KNOWN for i in range(2)}
r = client.post("/v1/tasks", headers=auth, files={"file": ("s.zip", build_zip(entries_of(seed)))})
assert r.status_code == 201, r.text
out = {"bad": {}, "good": {}}
for kind, ups in (("bad", bad_uploads(lim)), ("good", good_uploads())):
    for up in ups:
        r = client.post("/v1/tasks", headers=auth, files=up.files, data=up.data)
        out[kind][up.case] = [r.status_code, r.headers.get("content-type", "").split(";")[0]]
print(json.dumps(out))
"""


def run_corpus(tree: Path, cpu: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = ["taskset", "-c", cpu, sys.executable, "-c", CORPUS_CHILD, str(REPO / "tests"), PROFILE]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)  # cwd is sys.path[0]
    if done.returncode:
        raise RuntimeError(f"corpus run failed:\n{done.stderr[-3000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    bad = raw["bad"].values()
    good = raw["good"].values()
    return {
        "bad_tried": len(raw["bad"]),
        "bad_accepted": sum(1 for s, _ in bad if s < 300),
        "bad_5xx": sum(1 for s, _ in bad if s >= 500),
        "bad_4xx_json": sum(1 for s, t in bad if 400 <= s < 500 and t == "application/json"),
        "bad_accepted_cases": sorted(k for k, (s, _) in raw["bad"].items() if s < 300),
        "bad_5xx_cases": sorted(k for k, (s, _) in raw["bad"].items() if s >= 500),
        "good_tried": len(raw["good"]),
        "good_accepted": sum(1 for s, _ in good if s == 201),
        "good_refused_cases": sorted(k for k, (s, _) in raw["good"].items() if s != 201),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of an edgecl checkout")
    ap.add_argument("--cpu", default="0", help="core the measured processes are pinned to")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "upload_abuse.json")
    ap.add_argument("--skip-hostile", action="store_true")
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": os.uname().nodename, "cpu": args.cpu, "versions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = [] if args.skip_hostile else hostile_cases(work)
        for spec in args.tree:
            name, _, path = spec.partition("=")
            tree = Path(path).resolve()
            print(f"== {name}: {tree}", flush=True)
            version: dict[str, Any] = {"corpus": run_corpus(tree, args.cpu)}
            print(json.dumps(version["corpus"]), flush=True)
            if cases:
                version["hostile"] = run_server(tree, work, cases, args.cpu)
            report["versions"][name] = version
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
