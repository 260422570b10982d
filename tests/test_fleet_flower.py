"""Fleet learning over real Flower processes on loopback: ``edgecl fleet server`` (a SuperLink), three
``edgecl fleet device`` (SuperNodes, each with its own shard of a SYNTHETIC stream and a tiny random ViT),
``edgecl fleet app`` + ``edgecl fleet run`` (the ServerApp). Asserts that the global model's accuracy rises
over the rounds and that every device ends with the same committed parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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

from fleet_procs import EDGECL, fleet_processes, free_port, stop, wait_port  # noqa: E402


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


def _tls_and_key(tmp: Path) -> Path:
    """The README's commands: a CA, a SuperLink certificate for 127.0.0.1, a SuperNode EC key pair."""
    d = tmp / "certificates"
    d.mkdir()
    # fmt: off
    commands = [
        ["openssl", "genrsa", "-out", "ca.key", "2048"],
        ["openssl", "req", "-new", "-x509", "-key", "ca.key", "-sha256", "-subj", "/O=edgecl fleet CA",
         "-days", "365", "-out", "ca.crt"],
        ["openssl", "genrsa", "-out", "server.key", "2048"],
        ["openssl", "req", "-new", "-key", "server.key", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-out", "server.csr"],
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "365", "-sha256", "-copy_extensions", "copy", "-out", "server.pem"],
        ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", "device-1"],
    ]
    # fmt: on
    for cmd in commands:
        subprocess.run(cmd, cwd=d, check=True, capture_output=True, timeout=120)
    return d


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tls_and_supernode_authentication(tmp_path: Path) -> None:
    """Over TLS with --enable-supernode-auth: an unregistered device is refused, a registered one joins."""
    if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen are needed to create the keys")
    certs = _tls_and_key(tmp_path)
    (tmp_path / "data" / "train" / "x").mkdir(parents=True)
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home)}
    port = free_port()
    conn = f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    (home / "config.toml").write_text(f'[superlink]\ndefault = "edgecl"\n\n[superlink.edgecl]\n{conn}')
    # fmt: off
    server = [*EDGECL, "server", "--certificates", str(certs), "--host", "127.0.0.1", "--port", str(port),
              "--enable-supernode-auth"]
    device = [*EDGECL, "device", "--root-certificates", str(certs / "ca.crt"),
              "--superlink", f"127.0.0.1:{port}", "--data", str(tmp_path / "data"),
              "--work-dir", str(tmp_path / "work"),
              "--auth-private-key", str(certs / "device-1"), "--port", str(free_port())]
    # fmt: on
    procs = []
    try:
        link = subprocess.Popen(server, env=env, stdout=(tmp_path / "superlink.log").open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        procs.append(link)
        wait_port(port, 90, link)
        refused = subprocess.run(device, env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode != 0 and "Failed to activate SuperNode" in refused.stdout + refused.stderr
        flwr = str(Path(sys.executable).parent / "flwr")
        subprocess.run([flwr, "supernode", "register", str(certs / "device-1.pub"), "edgecl"], env=env,
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        joined = subprocess.Popen(device, env=env, stdout=(tmp_path / "device.log").open("wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        procs.append(joined)
        deadline = time.monotonic() + 240
        while "SuperNode ID:" not in (tmp_path / "device.log").read_text():
            assert joined.poll() is None and time.monotonic() < deadline, (
                tmp_path / "device.log"
            ).read_text()
            time.sleep(1)
        listed = subprocess.run(
            [flwr, "supernode", "list", "edgecl"], env=env, capture_output=True, text=True, timeout=120
        )
        assert "online" in listed.stdout, listed.stdout
    finally:
        stop(procs)
