"""TelemetryCallback driven through its hooks by hand, and the efficiency ratio table."""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar

import pytest

from edgecl.methods.base import Phase
from edgecl.telemetry import PsutilBackend, Sampler, TelemetryCallback, ratio_rows, render_ratio_table
from edgecl.telemetry.backends import CUDA_ALLOCATED_MB, CUDA_RESERVED_MB, POWER_W, Backend, Capabilities
from edgecl.train.callbacks import Callback


class ConstantPower(Backend):
    name: ClassVar[str] = "fake_power"

    def __init__(self, watts: float) -> None:
        self.watts = watts

    def capabilities(self) -> Capabilities:
        return Capabilities(power_w=True)

    def read(self) -> dict[str, float]:
        return {POWER_W: self.watts}


class FixedCuda(Backend):
    name: ClassVar[str] = "fake_cuda"

    def __init__(self, mb: float) -> None:
        self.mb = mb

    def capabilities(self) -> Capabilities:
        return Capabilities(device_memory=True)

    def read(self) -> dict[str, float]:
        return {CUDA_ALLOCATED_MB: self.mb, CUDA_RESERVED_MB: self.mb * 1.5}


def _train_task(cb: TelemetryCallback, trainer: Any, task: int, phases: list[Phase]) -> dict[str, Any]:
    """Call the hooks the trainer calls for one task; sleep stands in for epochs and for evaluation."""
    start = time.monotonic()
    cb.on_task_start(trainer, task)
    for phase in phases:
        cb.on_phase_start(trainer, task, phase)
        time.sleep(0.04)
        cb.sampler.sample()  # at least two samples in the phase, however loaded the machine is
        live = cb.latest()
        assert live["region"] == f"task{task}/{phase.value}" and live["phase"] == phase.value
        assert live["task"] == task and live["elapsed_s"] > 0 and live["energy_j"] > 0
        cb.on_phase_end(trainer, task, phase)
    cb.on_train_end(trainer, task)
    trained = time.monotonic() - start
    time.sleep(0.05)  # evaluation: not part of the task's training region
    record: dict[str, Any] = {"task": task}
    cb.on_task_end(trainer, task, record)
    assert record["train_seconds"] <= trained  # evaluation excluded
    return record


def test_callback_writes_task_phase_and_run_telemetry() -> None:
    sampler = Sampler([ConstantPower(25.0), PsutilBackend()], period_s=0.01)
    cb = TelemetryCallback(sampler, idle_seconds=0.05)
    trainer: Any = object()  # the callback treats the trainer as opaque
    assert cb.latest() == {"region": None}
    cb.on_run_start(trainer)
    assert sampler.running
    records = [_train_task(cb, trainer, t, [Phase.SPARSE, Phase.HEAD]) for t in range(2)]
    results: dict[str, Any] = {"tasks": records}
    cb.on_run_end(trainer, results)
    assert not sampler.running

    for record in records:
        tel = record["telemetry"]
        assert set(tel) == {"task", "phases"} and set(tel["phases"]) == {"sparse", "head"}
        task = tel["task"]
        assert record["train_seconds"] == task["wall_s"]
        assert record["train_seconds"] >= sum(p["wall_s"] for p in tel["phases"].values())
        assert record["peak_memory_mb"] == task["peak_rss_mb"] > 1.0  # no CUDA: the RSS peak
        assert task["energy_j"] == pytest.approx(25.0 * task["wall_s"], rel=1e-6)
        assert task["idle_power_w"] == pytest.approx(25.0)  # measured once at run start, reused
        assert tel["phases"]["sparse"]["energy_source"] == "integrated"
    tel = results["telemetry"]
    assert tel["energy_j"] == pytest.approx(sum(r["telemetry"]["task"]["energy_j"] for r in records))
    assert tel["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in records))
    assert tel["peak_memory_mb"] == max(r["peak_memory_mb"] for r in records)
    assert tel["run"]["wall_s"] > tel["train_seconds"]  # the run includes evaluation
    assert [b["name"] for b in tel["backends"]] == ["fake_power", "psutil"]
    json.dumps(results)


def test_callback_reports_cuda_peak_and_null_energy_reason() -> None:
    cb = TelemetryCallback(backends=[FixedCuda(640.0), PsutilBackend()], period_s=0.01)
    trainer: Any = object()  # the callback treats the trainer as opaque
    cb.on_run_start(trainer)
    record = _train_task_no_power(cb, trainer)
    results: dict[str, Any] = {}
    cb.on_run_end(trainer, results)
    assert not cb.sampler.running
    assert record["peak_memory_mb"] == 640.0  # CUDA was used: the allocated peak, not RSS
    task = record["telemetry"]["task"]
    assert task["energy_j"] is None and task["nulls"]["energy_j"].startswith("no sensor")
    assert record["telemetry"]["phases"]["joint"]["peak_cuda_reserved_mb"] == 960.0
    assert results["telemetry"]["energy_j"] is None
    assert results["telemetry"]["nulls"]["energy_j"].startswith("no sensor")
    assert results["telemetry"]["peak_memory_mb"] == 640.0


def _train_task_no_power(cb: TelemetryCallback, trainer: Any) -> dict[str, Any]:
    cb.on_task_start(trainer, 0)
    cb.on_phase_start(trainer, 0, Phase.JOINT)
    time.sleep(0.02)
    cb.on_phase_end(trainer, 0, Phase.JOINT)
    cb.on_train_end(trainer, 0)
    record: dict[str, Any] = {}
    cb.on_task_end(trainer, 0, record)
    return record


def test_callback_stops_the_sampler_on_exception() -> None:
    sampler = Sampler([ConstantPower(5.0)], period_s=0.01)
    cb = TelemetryCallback(sampler)
    trainer: Any = object()  # the callback treats the trainer as opaque
    cb.on_run_start(trainer)
    cb.on_task_start(trainer, 0)
    cb.on_phase_start(trainer, 0, Phase.SPARSE)
    cb.on_exception(trainer, KeyboardInterrupt())
    assert not sampler.running
    assert cb.latest() == {"region": None}


# ----------------------------------------------------------------------------------------------- ratios

RESULTS = [
    {"method": "coda_prompt", "peak_memory_mb": 900.0, "train_seconds": 300.0, "energy_j": None},
    {"method": "cps_prompt", "peak_memory_mb": 450.0, "train_seconds": 120.0, "energy_j": 2400.0},
    {"method": "l2p", "peak_memory_mb": 675.0, "train_seconds": 180.0, "energy_j": 3600.0},
]


def test_ratio_rows_reference_is_exactly_one_and_none_propagates() -> None:
    rows = ratio_rows(RESULTS)
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["coda_prompt", "cps_prompt", "l2p"]
    for fig in ("peak_memory_mb", "train_seconds", "energy_j"):
        assert by["cps_prompt"][f"{fig}_ratio"] == 1.0
        assert type(by["cps_prompt"][f"{fig}_ratio"]) is float
    assert by["coda_prompt"]["peak_memory_mb_ratio"] == 2.0
    assert by["coda_prompt"]["train_seconds_ratio"] == 2.5
    assert by["coda_prompt"]["energy_j_ratio"] is None
    assert by["l2p"]["energy_j_ratio"] == 1.5
    no_ref_energy = ratio_rows([{**RESULTS[1], "energy_j": None}, RESULTS[2]])
    assert no_ref_energy[0]["energy_j_ratio"] is None and no_ref_energy[1]["energy_j_ratio"] is None


def test_ratio_rows_needs_the_reference() -> None:
    with pytest.raises(ValueError, match="'cps_prompt'"):
        ratio_rows([RESULTS[0], RESULTS[2]])
    with pytest.raises(ValueError, match="appears 2 times"):
        ratio_rows([RESULTS[1], RESULTS[1]])


@pytest.mark.parametrize("fmt", ["markdown", "rich"])
def test_render_ratio_table(fmt: str) -> None:
    text = render_ratio_table(ratio_rows(RESULTS), fmt=fmt)
    assert "no sensor" in text and "cps_prompt" in text
    assert "450.0 MB (1.00×)" in text and "900.0 MB (2.00×)" in text and "3600.0 J (1.50×)" in text
    if fmt == "markdown":
        lines = text.strip().splitlines()
        assert lines[0].startswith("| Method | Peak memory (× cps_prompt)") and len(lines) == 5
    with pytest.raises(ValueError, match="fmt"):
        render_ratio_table([], fmt="html")


class _SlowEpochThenCrash(Callback):
    """Spends ``seconds`` in the first epoch's first step, then dies after that epoch's checkpoint."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, trainer: Any, task: int, epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == (0, 1):
            time.sleep(self.seconds)

    def on_epoch_end(self, trainer: Any, task: int, epoch: int, logs: dict[str, Any]) -> None:
        if epoch == 0:
            raise KeyboardInterrupt("simulated kill")


def test_a_resumed_task_counts_its_training_before_the_restart(tiny_vit: Any, tmp_path: Any) -> None:
    """train_seconds (and energy) of a task resumed from an epoch checkpoint = the time carried in the
    checkpoint + the time since the restart, not only the latter."""
    from edgecl.data import synthetic_stream
    from edgecl.methods import create_method
    from edgecl.train.checkpoint import load_checkpoint
    from edgecl.train.trainer import TrainConfig, Trainer

    def run(callbacks: list[Callback], resume: Any = None) -> dict[str, Any]:
        stream = synthetic_stream(1, classes_per_task=2, per_class=4, test_per_class=2, img_size=32)
        method = create_method("cps_prompt", tiny_vit, {"expected_tasks": 1, "pool_size": 4})
        config = TrainConfig(epochs=2, batch_size=8, checkpoint_dir=str(tmp_path / "ckpt"))
        return Trainer(method, stream, config, callbacks).fit(resume_from=resume)

    first = TelemetryCallback(Sampler([ConstantPower(10.0)], period_s=0.01))
    with pytest.raises(KeyboardInterrupt):
        run([first, _SlowEpochThenCrash(0.5)])
    carried = load_checkpoint(tmp_path / "ckpt").meta["telemetry"]
    assert carried["task"] == 0 and carried["epochs_done"] == 1 and carried["train_seconds"] >= 0.5
    assert carried["energy_j"] > 0
    second = TelemetryCallback(Sampler([ConstantPower(10.0)], period_s=0.01))
    results = run([second], resume=tmp_path / "ckpt")
    record = results["tasks"][0]
    task = record["telemetry"]["task"]
    since = task["since_resume"]
    assert record["telemetry"]["before_resume"] == carried
    assert record["train_seconds"] == task["wall_s"] == carried["train_seconds"] + since["wall_s"]
    assert task["energy_j"] == carried["energy_j"] + since["energy_j"]
    assert results["telemetry"]["train_seconds"] == record["train_seconds"]
