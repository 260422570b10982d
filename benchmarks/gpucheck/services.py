"""Units of the service steps: ``edgecl bench``, ``edgecl serve`` on loopback, ONNX export + onnxruntime."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from gpucheck.config import BENCH_METHODS, TOKEN, Context, _require
from gpucheck.training import _method_options, _spec


def unit_bench(ctx: Context, arg: str) -> dict[str, Any]:
    """``edgecl bench`` at the big size for the three methods of the seed paper's table."""
    s = ctx.sizes
    out_dir = Path(ctx.work) / "bench"
    cmd = [sys.executable, "-m", "edgecl", "bench", "--methods", ",".join(BENCH_METHODS)]
    cmd += ["--data", "synthetic", "--tasks", "2", "--num-classes", "4"]
    cmd += [
        "--limit-per-class",
        str(s.big_per_class),
        "--test-limit-per-class",
        str(max(4, s.big_per_class // 4)),
    ]
    backbone, img, patch, batch = s.bench
    cmd += ["--backbone", backbone, "--img-size", str(img), "--patch-size", str(patch)]
    cmd += ["--batch-size", str(batch)]
    if ctx.dry:
        cmd += ["--threads", "1"]
    cmd += ["--epochs", "1", "--device", s.device, "--out", str(out_dir), "--no-plots", "--quiet"]
    cmd += ["--timeout-per-run", str(int(s.unit_limit_s["bench"] / 2))]
    if s.pool_size is not None:
        cmd += ["--pool-size", str(s.pool_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=s.unit_limit_s["bench"], check=False)
    data = json.loads((out_dir / "results.json").read_text())
    keys = ("peak_memory_mb", "train_seconds", "energy_j")
    rows = [
        {
            "method": r["label"],
            "status": r["status"],
            "final_average_accuracy": r.get("final_average_accuracy_mean"),
            **{k: r.get(k) for k in keys},
            **{f"{k}_ratio": r.get(f"{k}_ratio") for k in keys},
            "energy_note": r.get("energy_note"),
        }
        for r in data["main"]
    ]
    out = {
        "command": data.get("command"),
        "exit_code": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "reference": data.get("reference"),
        "rows": rows,
        "stderr_tail": proc.stderr[-1500:],
    }
    _require(proc.returncode == 0, f"edgecl bench exited {proc.returncode}: {proc.stderr[-500:]}", out)
    _require(all(r["status"] == "ok" for r in rows), "a bench run failed", out)
    if not ctx.dry:
        _require(all(r["energy_j"] for r in rows), "bench energy missing on the GPU", out)
    return out


def _images(ctx: Context, classes: int, per_class: int, split: str) -> dict[str, list[bytes]]:
    """JPEG bytes per class: from the data subset (its first classes), else synthetic gratings."""
    if ctx.data != "synthetic":
        root = Path(ctx.data) / split
        out: dict[str, list[bytes]] = {}
        for d in sorted(p for p in root.iterdir() if p.is_dir())[:classes]:
            out[d.name] = [f.read_bytes() for f in sorted(d.iterdir())[:per_class]]
        return out
    from PIL import Image

    from edgecl.data.synthetic import make_synthetic

    images, labels = make_synthetic(classes, per_class, img_size=32, seed=7, split=split)
    out = {}
    for img, y in zip(images, labels, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
        out.setdefault(f"class-{y:02d}", []).append(buf.getvalue())
    return out


def _zip(images: dict[str, list[bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for label, blobs in images.items():
            for i, blob in enumerate(blobs):
                zf.writestr(f"{label}/{i:04d}.jpg", blob)
    return buf.getvalue()


def unit_serve(ctx: Context, arg: str) -> dict[str, Any]:
    """``edgecl serve`` on loopback: upload a task, train it, predict held-out images, shut down."""
    import httpx

    s = ctx.sizes
    work = Path(ctx.work) / "serve"
    work.mkdir(parents=True, exist_ok=True)
    opts = _method_options(ctx, "cps_prompt", 2)
    img, patch = (64, 8) if ctx.weights else (s.img or 224, s.patch or 16)
    profile = work / "gpu-check.yaml"
    profile.write_text(
        f"device: {s.device}\nprecision: auto\nallow_autocast: true\nmethod: cps_prompt\n"
        f"method_options: {json.dumps(opts)}\nbatch_size: {s.batch}\nepochs: {s.epochs}\n"
        f"backbone: {s.backbone if not ctx.weights else 'vit_tiny_patch16_224'}\n"
        f"img_size: {img}\npatch_size: {patch}\n"
        f"weights: {json.dumps(ctx.weights) if ctx.weights else 'null'}\ninference_engine: torch\n"
        f"data_dir: {json.dumps(str(work / 'data'))}\n" + ("threads: 1\n" if ctx.dry else "")
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
        str(work / "data"),
    ]
    cmd += ["--port", str(port), "--env-file", "", "--log-level", "info"]
    if not ctx.weights:
        cmd.append("--allow-random-backbone")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    env["EDGECL_TOKEN"] = TOKEN
    log_path = work / "server.log"
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    try:
        t0 = time.perf_counter()
        deadline = time.monotonic() + 120
        while True:
            _require(proc.poll() is None, f"server exited: {log_path.read_text()[-2000:]}", out)
            try:
                ready = client.get("/readyz", timeout=5)
                if ready.status_code == 200:
                    out["settings"] = ready.json().get("settings")
                    break
            except httpx.HTTPError:
                pass
            _require(time.monotonic() < deadline, "server not ready after 120 s", out)
            time.sleep(0.3)
        out["ready_s"] = round(time.perf_counter() - t0, 2)
        per_class = s.per_class or 40
        train_images = _images(ctx, 4, per_class, "train")
        t0 = time.perf_counter()
        r = client.post("/v1/tasks", files={"file": ("task.zip", _zip(train_images))})
        _require(r.status_code in (200, 201), f"upload answered {r.status_code}: {r.text[:300]}", out)
        task = r.json()
        out["upload"] = {"seconds": round(time.perf_counter() - t0, 3), "images": task.get("num_images")}
        t0 = time.perf_counter()
        r = client.post("/v1/jobs", json={"task_ids": [task["id"]], "epochs": s.epochs})
        _require(r.status_code in (200, 201, 202), f"job answered {r.status_code}: {r.text[:300]}", out)
        job_id = r.json()["job_id"]
        job: dict[str, Any] = {}
        while time.perf_counter() - t0 < s.unit_limit_s["serve"] * 0.6:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.3)
        out["job"] = {
            "status": job.get("status"),
            "seconds": round(time.perf_counter() - t0, 2),
            "error": job.get("error"),
            "telemetry": job.get("telemetry"),
            "task_peak_cuda_allocated_mb": [
                ((t.get("telemetry") or {}).get("task") or {}).get("peak_cuda_allocated_mb")
                for t in job.get("results") or []
            ],
        }
        _require(job.get("status") == "done", f"job ended {job.get('status')}: {job.get('error')}", out)
        model = client.get("/v1/model").json()
        out["model_classes"] = len(model.get("classes", []))
        queries = _images(ctx, 4, s.test_per_class or 10, "val" if ctx.data != "synthetic" else "test")
        files = [
            ("files", (f"{label}-{i}.jpg", blob))
            for label, blobs in queries.items()
            for i, blob in enumerate(blobs)
        ]
        t0 = time.perf_counter()
        r = client.post("/v1/predict", files=files)
        _require(r.status_code == 200, f"predict answered {r.status_code}: {r.text[:300]}", out)
        answer = r.json()
        predicted = [p["label"] for p in answer["predictions"]]
        truth = [label for label, blobs in queries.items() for _ in blobs]
        out["predict"] = {
            "images": len(predicted),
            "seconds": round(time.perf_counter() - t0, 3),
            "engine": answer.get("engine"),
            "accuracy": sum(p == t for p, t in zip(predicted, truth, strict=True)) / max(len(truth), 1),
            "chance": 0.25,
        }
        tel = client.get("/v1/telemetry")
        out["telemetry_backends"] = (
            [b.get("name") for b in (tel.json().get("backends") or []) if b.get("available")]
            if tel.status_code == 200
            else None
        )
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit_code"] = "killed after 60 s"
        out["server_log_tail"] = log_path.read_text(errors="replace")[-1500:]
    # uvicorn re-raises the SIGTERM it handled once it has shut down, so -15 is a clean stop (systemd's too)
    log_text = log_path.read_text(errors="replace")
    out["graceful"] = "Application shutdown complete" in log_text and "Traceback" not in log_text
    _require(out["exit_code"] in (0, -signal.SIGTERM), f"serve exited {out['exit_code']} after SIGTERM", out)
    _require(out["graceful"], "no clean shutdown in the server log (or a traceback in it)", out)
    if not ctx.dry:
        device = (out.get("settings") or {}).get("device")
        _require(device == "cuda", f"the daemon runs on {device!r}, not cuda", out)
        peaks = out["job"]["task_peak_cuda_allocated_mb"]
        _require(bool(peaks) and None not in peaks, f"no CUDA peak in the job's tasks: {peaks}", out)
    return out


PARITY_ON_DEVICE = 2e-2
"""Largest max-abs logit difference accepted between onnxruntime and PyTorch on the device. Looser than the
export's own CPU check (1e-4): cuDNN convolutions run in TF32 by default (the patch embedding), and the GPU's
reduction orders differ; top-1 agreement is the figure that matters for serving. [GUESS, to be read off
the first GPU run.]"""


def unit_export(ctx: Context, arg: str) -> dict[str, Any]:
    """Train one task with a model dir, export it, and compare onnxruntime with PyTorch on the device."""
    import onnxruntime as ort
    import torch

    from edgecl.export import OnnxPredictor, TorchPredictor, export_model
    from edgecl.runner import build_backbone, run_training
    from edgecl.train.model_io import load_model

    model_dir = Path(ctx.work) / "export-model"
    spec = _spec(ctx, "cps_prompt", tasks=ctx.sizes.tasks, epochs=1, model_dir=str(model_dir))
    backbone = build_backbone(spec)  # one backbone object: a random one cannot be rebuilt from the checkpoint
    results = run_training(spec, backbone=backbone)
    backbone.cpu()
    info = export_model(load_model(model_dir, backbone=backbone), Path(ctx.work) / "model.onnx")
    onnx_pred = OnnxPredictor(info.path)
    torch_pred = TorchPredictor(load_model(model_dir, backbone=backbone, device=ctx.sizes.device))
    from edgecl.runner import build_stream

    stream = build_stream(spec, backbone)
    xs = torch.stack(
        [
            stream.tasks[t].test[i][0]
            for t in range(len(stream.tasks))
            for i in range(min(8, len(stream.tasks[t].test)))
        ]
    )
    timings = {}
    t0 = time.perf_counter()
    a = onnx_pred.logits(xs)
    timings["onnxruntime_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    b = torch_pred.logits(xs)
    timings["torch_s"] = round(time.perf_counter() - t0, 4)
    diff = float((a - b).abs().max())
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    out = {
        "onnx_mb": round(info.size_bytes / 2**20, 2),
        "export_seconds": round(info.seconds, 2),
        "export_parity_cpu_max_abs": info.parity_max_abs,
        "ort_available_providers": ort.get_available_providers(),
        "ort_session_providers": onnx_pred.session.get_providers(),
        "torch_device": str(torch_pred.device),
        "images": int(xs.shape[0]),
        "max_abs_logit_diff_ort_vs_torch_device": diff,
        "top1_agreement": agree,
        "timings": timings,
        "final_average_accuracy": results["final_average_accuracy"],
    }
    _require(
        diff <= PARITY_ON_DEVICE,
        f"onnxruntime and torch on {torch_pred.device} differ by {diff:.3g} (max abs logit)",
        out,
    )
    _require(agree >= 0.95, f"top-1 agreement {agree:.2f} < 0.95", out)
    return out
