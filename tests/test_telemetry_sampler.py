"""Sampler and Meter: integration math, counter wrap, nested peaks, idle baseline, real RSS peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from edgecl.telemetry import Meter, PsutilBackend, RaplBackend, Sampler
from edgecl.telemetry.backends import CUDA_ALLOCATED_MB, CUDA_RESERVED_MB, POWER_W, Backend, Capabilities

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class PowerBackend(Backend):
    """Power given by a function of the sampler's clock (a stand-in for a board sensor)."""

    name: ClassVar[str] = "fake_power"

    def __init__(self, watts: Callable[[], float]) -> None:
        self.watts = watts

    def capabilities(self) -> Capabilities:
        return Capabilities(power_w=True)

    def read(self) -> dict[str, float]:
        return {POWER_W: self.watts()}


class CudaLikeBackend(Backend):
    """Peak-since-reset semantics of ``torch.cuda.max_memory_allocated`` on a value the test sets."""

    name: ClassVar[str] = "fake_cuda"

    def __init__(self) -> None:
        self.peak = self.current = 0.0

    def set(self, mb: float) -> None:
        self.current = mb
        self.peak = max(self.peak, mb)

    def capabilities(self) -> Capabilities:
        return Capabilities(device_memory=True)

    def read(self) -> dict[str, float]:
        return {CUDA_ALLOCATED_MB: self.peak, CUDA_RESERVED_MB: self.peak}

    def reset_peaks(self) -> None:
        self.peak = self.current


def test_trapezoid_is_exact_for_constant_and_linear_power() -> None:
    clock = FakeClock()
    t0 = clock.t
    const = PowerBackend(lambda: 50.0)
    ramp = PowerBackend(lambda: 10.0 + 2.0 * (clock.t - t0))
    ramp.name = "ramp"  # type: ignore[misc]
    sampler = Sampler([const, ramp], period_s=0.1, clock=clock)
    rid = sampler.open_region()
    for _ in range(100):
        clock.t += 0.1
        sampler.sample()
    stats = sampler.close_region(rid)
    assert stats.wall_s == pytest.approx(10.0)
    assert stats.energy["fake_power"] == (pytest.approx(500.0, rel=1e-9), "integrated")
    assert stats.energy["ramp"] == (pytest.approx(10.0 * 10 + 10.0**2, rel=1e-9), "integrated")
    assert stats.energy_j == pytest.approx(700.0)


def test_constant_power_real_run_within_two_percent() -> None:
    sampler = Sampler([PowerBackend(lambda: 40.0)], period_s=0.01)
    with Meter(sampler, "const") as meter:
        time.sleep(0.4)
    res = meter.result()
    assert not sampler.running  # the meter started the sampler, so it stopped it
    assert res.energy_source == "integrated"
    assert res.energy_j == pytest.approx(40.0 * res.wall_s, rel=0.02)
    assert res.wall_s >= 0.4 and res.energy_j >= 40.0 * 0.4 * 0.98
    assert res.mean_power_w == pytest.approx(40.0, rel=0.02)
    assert res.samples >= 5 and res.period_s == 0.01
    assert res.sources == ["fake_power"]


def test_counter_delta_across_a_wrap(tmp_path: Path) -> None:
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    energy = zone / "energy_uj"
    energy.write_text("262143000000\n")
    clock = FakeClock()
    sampler = Sampler([RaplBackend(root=tmp_path)], period_s=0.1, clock=clock)
    rid = sampler.open_region()
    for raw in (262143300000, 1_000_000, 5_000_000):  # wraps after the first step
        clock.t += 1.0
        energy.write_text(f"{raw}\n")
        sampler.sample()
    stats = sampler.close_region(rid)
    expected_uj = (262143328850 - 262143000000) + 5_000_000
    assert stats.energy["rapl"] == (pytest.approx(expected_uj / 1e6), "counter")
    assert stats.energy_source == "counter"


def test_nested_regions_keep_the_outer_peak_across_inner_resets() -> None:
    clock = FakeClock()
    cuda = CudaLikeBackend()
    sampler = Sampler([cuda], clock=clock)
    cuda.set(10)
    outer = sampler.open_region()
    cuda.set(500)
    cuda.set(20)  # the 500 MB spike happened between samples
    inner = sampler.open_region()  # folds the 500 into the outer region, then resets the peak to 20
    cuda.set(200)
    cuda.set(20)
    inner_stats = sampler.close_region(inner)
    outer_stats = sampler.close_region(outer)
    assert inner_stats.peaks[CUDA_ALLOCATED_MB] == 200
    assert outer_stats.peaks[CUDA_ALLOCATED_MB] == 500


def test_nested_meters_and_cuda_peak_reporting() -> None:
    cuda = CudaLikeBackend()
    sampler = Sampler([PowerBackend(lambda: 20.0), cuda], period_s=0.005).start()
    try:
        with Meter(sampler, "task") as task:
            with Meter(sampler, "sparse") as sparse:
                cuda.set(300)
                time.sleep(0.05)
                cuda.set(50)
            with Meter(sampler, "head") as head:
                cuda.set(120)
                time.sleep(0.05)
        assert sampler.running  # an outside sampler is left running
    finally:
        sampler.stop()
    t, s, h = task.result(), sparse.result(), head.result()
    assert (t.peak_cuda_allocated_mb, s.peak_cuda_allocated_mb, h.peak_cuda_allocated_mb) == (300, 300, 120)
    assert t.peak_memory_mb == 300
    assert t.wall_s >= s.wall_s + h.wall_s
    assert t.energy_j is not None and s.energy_j is not None and h.energy_j is not None
    assert t.energy_j >= s.energy_j + h.energy_j
    assert t.peak_rss_mb is None and "no psutil backend" in t.nulls["peak_rss_mb"]
    json.dumps(t.to_dict())


def test_idle_baseline_and_energy_above_idle() -> None:
    busy = threading.Event()
    sampler = Sampler([PowerBackend(lambda: 40.0 if busy.is_set() else 10.0)], period_s=0.01)
    with Meter(sampler, "idle probe", idle_seconds=0.15) as probe:
        pass
    assert probe.result().idle_power_w == pytest.approx(10.0)
    busy.set()
    with Meter(sampler, "work", baseline=probe) as meter:  # idle measured once, reused (as the callback does)
        time.sleep(0.2)
    res = meter.result()
    assert res.idle_power_w == pytest.approx(10.0)
    assert res.energy_j == pytest.approx(40.0 * res.wall_s)
    assert res.energy_above_idle_j == pytest.approx(30.0 * res.wall_s)
    assert "idle_power_w" not in res.nulls and "energy_above_idle_j" not in res.nulls


def test_no_power_sensor_gives_null_energy_with_reason_never_zero() -> None:
    sampler = Sampler([PsutilBackend()], period_s=0.05, notes={"rapl": "RAPL ... root-only ... chmod 0444"})
    with Meter(sampler, "cpu") as meter:
        sum(range(100_000))
    res = meter.result()
    for key in ("energy_j", "energy_source", "mean_power_w", "energy_above_idle_j"):
        assert getattr(res, key) is None
        assert res.nulls[key].startswith("no sensor: psutil has no power sensor")
    assert "rapl: RAPL ... root-only ... chmod 0444" in res.nulls["energy_j"]
    assert res.nulls["idle_power_w"] == "not measured: idle_seconds is 0"
    assert res.peak_rss_mb is not None and res.peak_rss_mb > 1.0
    assert res.cpu_s is not None and res.cpu_s >= 0.0
    assert set(res.nulls) >= {"peak_cuda_allocated_mb", "peak_cuda_reserved_mb", "peak_device_memory_mb"}


def test_samples_since_a_mark_and_bounded_history() -> None:
    clock = FakeClock()
    sampler = Sampler([PowerBackend(lambda: 1.0)], clock=clock, history=5)
    for _ in range(3):
        clock.t += 1
        sampler.sample()
    mark = sampler.mark()
    for _ in range(10):
        clock.t += 1
        sampler.sample()
    since = sampler.samples_since(mark)
    assert len(since) == 5  # capped ring buffer
    assert all(t > mark for t, _ in since)
    assert since[-1][1] == {"fake_power": {POWER_W: 1.0}}


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


ALLOCATE_300MB = textwrap.dedent(
    """
    import sys, time
    print("ready", flush=True)
    sys.stdin.readline()
    block = bytearray(300 * 2**20)
    block[::4096] = b"\\x01" * len(range(0, len(block), 4096))  # touch every page
    print("allocated", flush=True)
    time.sleep(1.0)
    """
)


def test_psutil_measures_a_child_that_touches_300mb() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", ALLOCATE_300MB], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        backend = PsutilBackend(pid=proc.pid)
        baseline = backend.read()["rss_mb"]
        sampler = Sampler([backend], period_s=0.02)
        with Meter(sampler, "child") as meter:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "allocated"
            time.sleep(0.1)
        res = meter.result()
    finally:
        proc.kill()
        proc.wait()
    assert res.peak_rss_mb is not None
    assert res.peak_rss_mb - baseline >= 300.0
    assert res.cpu_s is not None and res.cpu_s > 0.0  # the child's CPU time (it zeroed and touched 300 MB)


SPIKE_BETWEEN_SAMPLES = textwrap.dedent(
    """
    import json
    from edgecl.telemetry import Meter, PsutilBackend, Sampler
    own_hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024.0
    backend = PsutilBackend()
    sampler = Sampler([backend], period_s=60.0)  # the thread never samples inside the region
    start = backend.read()["rss_mb"]
    size_mb = max(200, int(own_hwm - start) + 200)  # must set a new mark of this process's own
    with Meter(sampler, "spike") as meter:
        block = bytearray(size_mb * 2**20)
        block[::4096] = b"\\x01" * len(range(0, len(block), 4096))
        del block
    res = meter.result()
    print(json.dumps({"start": start, "end": backend.read()["rss_mb"], "peak": res.peak_rss_mb,
                      "samples": res.samples, "size_mb": size_mb}))
    """
)
# Linux carries the parent's RSS high-water mark across fork+exec into a child's ru_maxrss (not into its
# VmHWM): the big parent holds 600 MB touched, more than the child's spike, when the child starts.
VIA_SMALL_PARENT = (
    "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
)
VIA_BIG_PARENT = (
    "import subprocess, sys\nblock = bytearray(600 * 2**20)\n"
    "block[::4096] = b'\\x01' * (len(block) // 4096)\n"
    "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
)


@pytest.mark.parametrize("parent", [VIA_SMALL_PARENT, VIA_BIG_PARENT], ids=["small-parent", "big-parent"])
def test_high_water_mark_catches_a_spike_the_sampler_missed(parent: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", parent, SPIKE_BETWEEN_SAMPLES],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["samples"] == 2  # only the region's own start and end samples
    assert got["end"] - got["start"] < 100.0  # the block was freed before the end sample
    assert got["peak"] - got["start"] >= got["size_mb"] - 5.0
