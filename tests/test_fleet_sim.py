"""The fleet in one process (the server's strategy code over direct calls): devices with different subsets
of a task's classes, a device that drops out for a round and rejoins, one that sends wrong-shape updates,
and the end state (every device holds the same parameters, and the fleet learned). Tiny random ViT,
SYNTHETIC images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file

from edgecl.data.synthetic import write_synthetic_folder
from edgecl.fleet.device import FleetDevice, LocalData
from edgecl.fleet.protocol import TrainReply, TrainRequest
from edgecl.fleet.server import FleetConfig, FleetServer, LocalTransport
from edgecl.train.checkpoint import load_checkpoint

RECIPE = {
    "method": "cps_prompt",
    "method_options": {"pool_size": 4, "lr": 0.01},
    "epochs": 2,
    "batch_size": 4,
    "img_size": 32,
    "patch_size": 8,
    "seed": 3,
}


class WrongShapeDevice(FleetDevice):
    """Trains honestly, then sends a prompt tensor with one component too many."""

    def train(self, req: TrainRequest) -> TrainReply:
        reply = super().train(req)
        assert reply.update is not None
        name = next(k for k in reply.update.tensors if k.startswith("prompt."))
        t = reply.update.tensors[name]
        reply.update.tensors[name] = torch.cat([t, t[:1]])
        return reply


def _weights(tmp: Path) -> Path:
    torch.manual_seed(11)
    path = tmp / "vit.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    save_file(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_fleet_with_subsets_dropout_rejoin_and_a_bad_device(tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    write_synthetic_folder(tmp_path / "all" / "train", 4, 12, img_size=32)
    write_synthetic_folder(tmp_path / "all" / "val", 4, 6, img_size=32, split="test")
    data = LocalData.from_image_folder(tmp_path / "all")
    names = sorted(data.train)  # tasks: [c0, c1], [c2, c3]
    a = LocalData({c: files[0::3] for c, files in data.train.items()}, data.test)
    # b has one class of each task only: its head rows for c1 and c3 never go up
    b = LocalData({c: data.train[c][1::3] for c in (names[0], names[2])}, data.test)
    c = LocalData({k: files[2::3] for k, files in data.train.items()}, data.test)
    local = {"weights": str(weights), "threads": 1}
    devices = {
        "a": FleetDevice(a, tmp_path / "a", local=local, name="a"),
        "b": FleetDevice(b, tmp_path / "b", local=local, name="b"),
        "c": FleetDevice(c, tmp_path / "c", local=local, name="c"),
        "bad": WrongShapeDevice(c, tmp_path / "bad", local=local, name="bad"),
    }
    transport = LocalTransport(devices)

    def churn(server: FleetServer, record: dict[str, Any]) -> None:
        # c drops out for task 0's second round, and is back for task 1
        if (record["task"], record["round"]) == (0, 0):
            transport.offline.add("c")
        if (record["task"], record["round"]) == (0, 1):
            transport.offline.discard("c")

    server = FleetServer(FleetConfig(tasks=2, rounds=2, spec=RECIPE, out=str(tmp_path / "history.json")))
    server.on_round = churn
    result = server.run(transport)
    history = result["history"]

    assert result["plan"] == [names[:2], names[2:]]  # the sorted union of the devices' classes
    assert [(h["task"], h["round"]) for h in history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for h in history:
        assert "bad" in h["refused"] and "shape" in h["refused"]["bad"]
    assert history[0]["accepted"] == ["a", "b", "c"]
    # the round without c still happened, with the two others
    assert history[1]["sampled"] == ["a", "b", "bad"] and history[1]["accepted"] == ["a", "b"]
    assert history[1]["version"] == history[0]["version"] + 1
    # c rejoined: it trained from the global model it was sent (its update named that version)
    assert history[2]["accepted"] == ["a", "b", "c"]
    # b sends only the head rows of its classes
    assert history[2]["bytes_up"]["b"] < history[2]["bytes_up"]["a"]

    # it learned: the first model is at chance on task 0, the final one well above chance on both tasks
    first = history[0]["received_accuracy"][0]
    final = result["final"]["accuracy"]
    assert len(final) == 2
    assert sum(final) / 2 >= 0.75 and final[0] >= first + 0.25, (first, final)

    # every device ends with the same parameters, committed as a model edgecl can load
    digests = set(result["final"]["digests"].values())
    assert len(digests) == 1 and len(result["final"]["digests"]) == 4
    committed = [load_checkpoint(tmp_path / n / "model") for n in ("a", "b", "c")]
    for other in committed[1:]:
        assert sorted(other.tensors) == sorted(committed[0].tensors)
        for name, tensor in committed[0].tensors.items():
            assert torch.equal(tensor, other.tensors[name]), name
    assert committed[0].meta["classes_learned"] == names and committed[0].meta["task_complete"]
