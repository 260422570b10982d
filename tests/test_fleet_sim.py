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
from edgecl.methods.analytic import AnalyticHeadMixin
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


class RecordingDevice(FleetDevice):
    """Records the features its closed-form head fits are computed from (the test's pooled-data check)."""

    fits: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    current = ""

    def train(self, req: TrainRequest) -> TrainReply:
        RecordingDevice.current = self.name
        return super().train(req)


def _pooled_ridge(
    feats: list[torch.Tensor], labels: list[torch.Tensor], classes: int, lam: float
) -> torch.Tensor:
    """The ridge solution (float64) on the pooled features of every task: ``(D+1) x classes``."""
    x = torch.cat(feats).double()
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.one_hot(torch.cat(labels), classes).double()
    return torch.linalg.solve(xa.T @ xa + lam * torch.eye(xa.shape[1], dtype=torch.float64), xa.T @ y)


@pytest.mark.slow
def test_fleet_ridge_head_is_the_pooled_data_solution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cps_prompt with phase2_head=ridge: after every round the global head is the ridge solution of the
    accepted devices' pooled features (plus the earlier tasks' final rounds), and the fleet learns."""
    weights = _weights(tmp_path)
    write_synthetic_folder(tmp_path / "all" / "train", 4, 12, img_size=32)
    write_synthetic_folder(tmp_path / "all" / "val", 4, 6, img_size=32, split="test")
    data = LocalData.from_image_folder(tmp_path / "all")
    names = sorted(data.train)
    shards = {
        "a": LocalData({k: f[0::3] for k, f in data.train.items()}, data.test),
        "b": LocalData({k: data.train[k][1::3] for k in (names[0], names[2])}, data.test),
        "c": LocalData({k: f[2::3] for k, f in data.train.items()}, data.test),
    }
    local = {"weights": str(weights), "threads": 1}
    devices = {n: RecordingDevice(d, tmp_path / n, local=local, name=n) for n, d in shards.items()}
    fit_head = AnalyticHeadMixin.fit_head

    def recording_fit(self: AnalyticHeadMixin, feats: torch.Tensor, labels: torch.Tensor) -> None:
        RecordingDevice.fits.append((RecordingDevice.current, feats.detach().clone(), labels.clone()))
        fit_head(self, feats, labels)

    monkeypatch.setattr(AnalyticHeadMixin, "fit_head", recording_fit)
    monkeypatch.setattr(RecordingDevice, "fits", [])
    transport = LocalTransport(devices)
    recipe = {**RECIPE, "method_options": {**RECIPE["method_options"], "phase2_head": "ridge"}}
    server = FleetServer(FleetConfig(tasks=2, rounds=2, spec=recipe))
    done: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # each finished task's last round
    gaps: list[float] = []

    def check(server: FleetServer, record: dict[str, Any]) -> None:
        # the fits of this round's accepted devices, then the head the pooled features give
        fits = [(x, y) for n, x, y in RecordingDevice.fits if n in record["accepted"]]
        RecordingDevice.fits.clear()
        assert server.model is not None and len(fits) == len(record["accepted"]) == 3
        feats = [x for d in done for x in d[0]] + [x for x, _ in fits]
        labels = [y for d in done for y in d[1]] + [y for _, y in fits]
        t = server.model.tensors
        sol = _pooled_ridge(feats, labels, len(server.model.classes), 1.0)
        for got, want in ((t["head.weight"], sol[:-1].T), (t["head.bias"], sol[-1])):
            gaps.append(float((got.double() - want).abs().max() / want.abs().max()))
        x = torch.cat([x for x, _ in fits]).double()
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        assert torch.allclose(t["analytic.gram_task"].double(), xa.T @ xa, rtol=1e-5, atol=1e-3)
        if record["round"] == 1:
            done.append(([x for x, _ in fits], [y for _, y in fits]))

    server.on_round = check
    result = server.run(transport)
    # float32 statistics: relative gaps of a few 1e-5 (an averaged head would be off by O(1))
    assert len(gaps) == 8 and max(gaps) < 1e-3, gaps
    # it learned: well above chance (1/4) on both tasks
    final = result["final"]["accuracy"]
    assert len(final) == 2 and min(final) >= 0.75, final
    assert len(set(result["final"]["digests"].values())) == 1
    # the committed model holds the statistics of both tasks: the Gram matrix of all pooled features
    committed = load_checkpoint(tmp_path / "a" / "model")
    x = torch.cat([x for d in done for x in d[0]]).double()
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    assert torch.allclose(
        committed.tensors["method.analytic.gram_past"].double(), xa.T @ xa, rtol=1e-5, atol=1e-3
    )
    assert not committed.tensors["method.analytic.gram_task"].any()
