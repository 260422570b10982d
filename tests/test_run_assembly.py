"""One run assembly: the same spec gives the same accuracy matrix through ``edgecl train`` (an ImageFolder)
and through the daemon (the same images uploaded as two tasks, trained by one job, each task continuing the
committed model). Both use ``edgecl.runner``; the daemon passes its store-backed stream and loaded backbone.
A tiny random ViT (saved as a weights file, so both load the same one); SYNTHETIC images."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from starlette.testclient import TestClient

from edgecl.cli import main as cli_main
from edgecl.data.synthetic import write_synthetic_folder
from edgecl.profiles import load_profile
from edgecl.train.checkpoint import load_checkpoint

TOKEN = "assembly-token-0123456789abcdef"
EPOCHS, BATCH, SEED = 2, 4, 3
OPTIONS = {"expected_tasks": 2, "pool_size": 4, "lr": 0.01}


def _zip(folders: list[Path]) -> bytes:
    """Class folders as a zip, members in sorted order (the order an ImageFolder scan sees them in)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for folder in folders:
            for path in sorted(folder.iterdir()):
                zf.write(path, f"{folder.name}/{path.name}")
    return buf.getvalue()


def test_cli_and_daemon_give_the_same_accuracy_matrix(tmp_path: Path) -> None:
    torch.manual_seed(11)
    weights = tmp_path / "vit.safetensors"
    save_file(
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0).state_dict(),
        weights,
    )
    data = tmp_path / "folder"
    write_synthetic_folder(data / "train", 4, 6, img_size=32, fmt="PNG")
    shutil.copytree(
        data / "train", data / "val"
    )  # test images = training images, as an upload without hold-out

    out = tmp_path / "cli.json"
    # fmt: off
    code = cli_main([
        "train", "--method", "cps_prompt", "--data", str(data), "--tasks", "2", "--weights", str(weights),
        "--img-size", "32", "--patch-size", "8", "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
        "--seed", str(SEED), "--threads", "1", "--no-telemetry", "--quiet", "--out", str(out),
        "--model-dir", str(tmp_path / "cli-model"),
        *[arg for k, v in OPTIONS.items() for arg in ("--set", f"{k}={v}")],
    ])
    # fmt: on
    assert code == 0
    cli = json.loads(out.read_text())

    from edgecl.serve import ServeSettings, create_app

    (tmp_path / "p.yaml").write_text(
        f"device: cpu\nmethod: cps_prompt\nmethod_options: {json.dumps(OPTIONS)}\nbatch_size: {BATCH}\n"
        f"epochs: {EPOCHS}\nthreads: 1\nbackbone: vit_tiny_patch16_224\nimg_size: 32\npatch_size: 8\n"
        f"weights: {weights}\ninference_engine: torch\nsampler_period_s: 0.5\n"
    )
    settings = ServeSettings(
        profile=load_profile(str(tmp_path / "p.yaml")),
        data_dir=tmp_path / "daemon",
        token=TOKEN,
        token_source="test",
        eval_fraction=0.0,
    )
    classes = sorted((data / "train").iterdir())
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        ids = []
        for folders in (classes[:2], classes[2:]):
            r = client.post("/v1/tasks", files={"file": ("t.zip", _zip(folders))})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        job_id = client.post("/v1/jobs", json={"task_ids": ids, "seed": SEED}).json()["job_id"]
        deadline = time.monotonic() + 300
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
            "done",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "done", job
        model = client.get("/v1/model").json()

    assert model["classes"] == cli["class_order"]
    assert model["metrics"]["accuracy_matrix"] == cli["accuracy_matrix"]
    assert len(cli["accuracy_matrix"]) == 2
    assert cli["final_average_accuracy"] >= 0.5  # it learned (chance: 0.25)
    # and the very same model: every learned tensor (prompts, keys, head) agrees
    ours, theirs = load_checkpoint(tmp_path / "cli-model"), load_checkpoint(tmp_path / "daemon" / "model")
    assert sorted(ours.tensors) == sorted(theirs.tensors) and ours.tensors
    for name, tensor in ours.tensors.items():
        assert torch.allclose(tensor, theirs.tensors[name], rtol=0, atol=1e-6), name
