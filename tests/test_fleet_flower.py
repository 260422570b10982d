"""Fleet learning over real Flower processes on loopback: ``edgecl fleet server`` (a SuperLink), three
``edgecl fleet device`` (SuperNodes, each with its own shard of a SYNTHETIC stream and a tiny random ViT),
``edgecl fleet app`` + ``edgecl fleet run`` (the ServerApp). Asserts that the global model's accuracy rises
over the rounds and that every device ends with the same committed parameters."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from edgecl.data.synthetic import write_synthetic_folder
from edgecl.fleet.device import LocalData
from edgecl.fleet.partition import partition
from edgecl.train.checkpoint import load_checkpoint

pytest.importorskip("flwr")

from fleet_procs import EDGECL, fleet_processes  # noqa: E402


def _shard_folders(tmp: Path, devices: int) -> list[Path]:
    write_synthetic_folder(tmp / "all" / "train", 4, 12, img_size=32)
    write_synthetic_folder(tmp / "all" / "val", 4, 6, img_size=32, split="test")
    roots = []
    for i, shard in enumerate(partition(LocalData.from_image_folder(tmp / "all"), devices)):
        root = tmp / f"device-{i}-data"
        for split, classes in (("train", shard.train), ("val", shard.test)):
            for name, files in classes.items():
                (root / split / name).mkdir(parents=True)
                for f in files:
                    shutil.copy(f, root / split / name)
        roots.append(root)
    return roots


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_supernodes_learn_together_and_end_identical(tmp_path: Path) -> None:
    torch.manual_seed(11)
    weights = tmp_path / "vit.safetensors"
    save_file(
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0).state_dict(),
        weights,
    )
    roots = _shard_folders(tmp_path, 3)
    history = tmp_path / "history.json"
    # fmt: off
    subprocess.run([
        *EDGECL, "app", str(tmp_path / "app"), "--tasks", "2", "--rounds", "1", "--epochs", "2",
        "--batch-size", "4", "--img-size", "32", "--patch-size", "8", "--seed", "3", "--set", "pool_size=4",
        "--set", "lr=0.01", "--min-available-nodes", "3", "--round-timeout", "300", "--out", str(history),
    ], check=True)
    devices = [
        ["--data", str(root), "--work-dir", str(tmp_path / f"work-{i}"), "--weights", str(weights),
         "--threads", "1"]
        for i, root in enumerate(roots)
    ]
    # fmt: on
    with fleet_processes(tmp_path, devices) as port:
        run = subprocess.run(
            [*EDGECL, "run", str(tmp_path / "app"), "--superlink", f"127.0.0.1:{port}", "--insecure"],
            capture_output=True,
            text=True,
            timeout=800,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert history.is_file(), run.stdout[-3000:]
    doc = json.loads(history.read_text())
    rounds, final = doc["history"], doc["final"]
    assert [(r["task"], r["round"]) for r in rounds] == [(0, 0), (1, 0)]
    assert all(len(r["accepted"]) == 3 and not r["refused"] for r in rounds), rounds
    # the untrained model is near chance on task 0; after the fleet's rounds it knows both tasks
    first = rounds[0]["received_accuracy"][0]
    assert rounds[1]["received_accuracy"][0] >= first + 0.25, rounds
    assert len(final["accuracy"]) == 2 and min(final["accuracy"]) >= 0.7, final
    # every device committed the same parameters
    assert len(final["digests"]) == 3 and len(set(final["digests"].values())) == 1, final
    models = [load_checkpoint(tmp_path / f"work-{i}" / "model") for i in range(3)]
    for other in models[1:]:
        assert sorted(other.tensors) == sorted(models[0].tensors)
        assert all(torch.equal(t, other.tensors[k]) for k, t in models[0].tensors.items())
