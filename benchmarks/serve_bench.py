"""Benchmark of the daemon on this machine: upload throughput (images/s) and predict latency (p50/p99).

Starts ``edgecl serve`` in a subprocess on a free loopback port with a temporary data dir, then, over HTTP:

1. uploads ``--uploads`` tasks of ``--images`` SYNTHETIC JPEGs each (``--classes`` class folders in a zip),
   timing each request end to end (transfer, decode + verify of every image, staging, commit);
2. trains a small task for one epoch so a model is in service;
3. sends ``--requests`` sequential one-image predictions (and batches of ``--batch``), timing each request;
4. sends one-image predictions while a job trains a large task (then cancels that job).

Usage::

    .venv/bin/python benchmarks/serve_bench.py                      # reference weights when ../shared exists
    .venv/bin/python benchmarks/serve_bench.py --weights none --img-size 64 --patch-size 8 --image-px 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from edgecl.data.synthetic import make_synthetic

TOKEN = "bench-token-0123456789abcdef"
SHARED_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "vit_tiny_p8_64_tin100.safetensors"
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def synthetic_jpegs(classes: int, per_class: int, px: int, seed: int) -> dict[str, list[bytes]]:
    """SYNTHETIC JPEG bytes per class (procedural gratings drawn at 32 px, resized to ``px``)."""
    images, labels = make_synthetic(classes, per_class, img_size=32, seed=seed)
    out: dict[str, list[bytes]] = {}
    for img, y in zip(images, labels, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((px, px)).save(buf, format="JPEG", quality=90)
        out.setdefault(f"class-{seed:02d}-{y:03d}", []).append(buf.getvalue())
    return out


def zip_task(images: dict[str, list[bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for label, blobs in images.items():
            for i, blob in enumerate(blobs):
                zf.writestr(f"{label}/{i:05d}.jpg", blob)
    return buf.getvalue()


def start_server(workdir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    """``edgecl serve`` with a profile for the chosen backbone; returns (process, base URL) once ready."""
    weights = None if args.weights == "none" else args.weights
    profile = workdir / "bench.yaml"
    profile.write_text(
        "device: cpu\nprecision: fp32\nmethod: cps_prompt\nmethod_options: {expected_tasks: 10}\n"
        f"batch_size: 16\nepochs: 1\nthreads: {args.threads}\nbackbone: vit_tiny_patch16_224\n"
        f"img_size: {args.img_size}\npatch_size: {args.patch_size}\n"
        f"weights: {json.dumps(str(weights)) if weights else 'null'}\ninference_engine: torch\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "edgecl",
        "serve",
        "--profile",
        str(profile),
        "--data-dir",
        str(workdir / "data"),
        "--port",
        str(port),
        "--env-file",
        "",
        "--log-level",
        "warning",
    ]
    if weights is None:
        cmd.append("--allow-random-backbone")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    env["EDGECL_TOKEN"] = TOKEN
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(workdir / 'server.log').read_text()[-3000:]}")
        try:
            if (
                httpx.get(
                    f"{url}/readyz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
                ).status_code
                == 200
            ):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("server not ready after 300 s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="edgecl-bench-") as tmp:
        proc, url = start_server(Path(tmp), args)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600)
        try:
            per_class = args.images // args.classes
            uploads = []
            first: dict[str, list[bytes]] = {}
            for u in range(args.uploads):
                images = synthetic_jpegs(args.classes, per_class, args.image_px, seed=u)
                first = first or images
                body = zip_task(images)
                t0 = time.perf_counter()
                r = client.post("/v1/tasks", files={"file": (f"task{u}.zip", body)})
                seconds = time.perf_counter() - t0
                r.raise_for_status()
                uploads.append(
                    {
                        "images": r.json()["num_images"],
                        "seconds": seconds,
                        "bytes": len(body),
                        "server_seconds": r.json()["seconds"],
                    }
                )
            rates = [u["images"] / u["seconds"] for u in uploads]
            # a small task to have a model in service quickly
            small = synthetic_jpegs(2, 16, args.image_px, seed=99)
            r = client.post("/v1/tasks", files={"file": ("small.zip", zip_task(small))})
            r.raise_for_status()
            t0 = time.perf_counter()
            job = client.post("/v1/jobs", json={"task_ids": [r.json()["id"]], "epochs": 1}).json()["job_id"]
            while client.get(f"/v1/jobs/{job}").json()["status"] not in ("done", "failed", "cancelled"):
                time.sleep(0.2)
            train_s = time.perf_counter() - t0
            queries = [blob for blobs in first.values() for blob in blobs]

            def one(i: int) -> float:
                t = time.perf_counter()
                client.post(
                    "/v1/predict", files={"file": ("q.jpg", queries[i % len(queries)])}
                ).raise_for_status()
                return time.perf_counter() - t

            for i in range(args.warmup):
                one(i)
            single = [one(i) for i in range(args.requests)]
            batched = []
            for i in range(max(1, args.requests // 4)):
                files = [
                    ("files", (f"q{j}.jpg", queries[(i * args.batch + j) % len(queries)]))
                    for j in range(args.batch)
                ]
                t0 = time.perf_counter()
                client.post("/v1/predict", files=files).raise_for_status()
                batched.append(time.perf_counter() - t0)
            # predictions while a job trains a large task (then the job is cancelled)
            job = client.post("/v1/jobs", json={"task_ids": [1], "epochs": 1}).json()["job_id"]
            while client.get(f"/v1/jobs/{job}").json()["status"] == "queued":
                time.sleep(0.1)
            training = []
            for i in range(args.requests // 2):
                if client.get(f"/v1/jobs/{job}").json()["status"] != "running":
                    break
                training.append(one(i))
            client.delete(f"/v1/jobs/{job}")
        finally:
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": args.threads,
        },
        "backbone": {"weights": args.weights, "img_size": args.img_size, "patch_size": args.patch_size},
        "upload": {
            "tasks": len(uploads),
            "images_per_task": uploads[0]["images"],
            "image_px": args.image_px,
            "images_per_s_median": round(statistics.median(rates), 1),
            "images_per_s_min": round(min(rates), 1),
            "images_per_s_max": round(max(rates), 1),
            "mb_per_task": round(uploads[0]["bytes"] / 2**20, 2),
        },
        "train_small_task_1_epoch_s": round(train_s, 1),
        "predict_1_image_ms": {
            "n": len(single),
            "p50": round(1000 * percentile(single, 50), 1),
            "p99": round(1000 * percentile(single, 99), 1),
            "mean": round(1000 * statistics.mean(single), 1),
        },
        f"predict_{args.batch}_images_ms": {
            "n": len(batched),
            "p50": round(1000 * percentile(batched, 50), 1),
            "p99": round(1000 * percentile(batched, 99), 1),
        },
        "predict_1_image_while_training_ms": {
            "n": len(training),
            "p50": round(1000 * percentile(training, 50), 1) if training else None,
            "p99": round(1000 * percentile(training, 99), 1) if training else None,
        },
    }


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_weights = str(SHARED_WEIGHTS) if SHARED_WEIGHTS.is_file() else "none"
    parser.add_argument("--weights", default=default_weights, help="backbone weights file or 'none' (random)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the daemon")
    parser.add_argument("--uploads", type=int, default=5, help="tasks uploaded")
    parser.add_argument("--images", type=int, default=400, help="images per task")
    parser.add_argument("--classes", type=int, default=8, help="classes per task")
    parser.add_argument("--image-px", type=int, default=64, help="side of the uploaded JPEGs")
    parser.add_argument("--requests", type=int, default=200, help="one-image predict requests")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="images per batched predict request")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
