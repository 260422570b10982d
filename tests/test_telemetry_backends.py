"""Telemetry backends on fake sysfs trees and stand-in modules: RAPL, jtop, INA3221 hwmon, NVML, detection."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgecl.telemetry import backends as B
from edgecl.telemetry.backends import (
    ENERGY_J,
    POWER_W,
    HwmonBackend,
    JtopBackend,
    NvmlBackend,
    PsutilBackend,
    RaplBackend,
    jtop_total_power_w,
)

# ------------------------------------------------------------------------------------------------ RAPL


def _zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    d = root / zone
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d / "energy_uj"


@pytest.fixture
def rapl_tree(tmp_path: Path) -> dict[str, Path]:
    """A powercap tree: package-0 with core and dram sub-zones, and a psys zone (which must be skipped)."""
    return {
        "pkg": _zone(tmp_path, "intel-rapl:0", "package-0", 100_000),
        "core": _zone(tmp_path, "intel-rapl:0:0", "core", 50_000),
        "dram": _zone(tmp_path, "intel-rapl:0:1", "dram", 10_000),
        "psys": _zone(tmp_path, "intel-rapl:1", "psys", 900_000),
    }


def test_rapl_counts_package_and_dram_only(tmp_path: Path, rapl_tree: dict[str, Path]) -> None:
    rapl = RaplBackend(root=tmp_path)
    assert rapl.available()
    caps = rapl.capabilities()
    assert caps.energy_counter and not caps.power_w
    assert "package-0" in caps.detail and "package-0/dram" in caps.detail and "psys" not in caps.detail
    e0 = rapl.read()[ENERGY_J]
    rapl_tree["pkg"].write_text("400000\n")  # +0.3 J
    rapl_tree["dram"].write_text("60000\n")  # +0.05 J
    rapl_tree["core"].write_text("999999\n")  # inside the package: ignored
    rapl_tree["psys"].write_text("100\n")  # overlaps the package: ignored
    assert rapl.read()[ENERGY_J] - e0 == pytest.approx(0.35, abs=1e-12)


def test_rapl_unwraps_at_max_energy_range(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 990_000, max_uj=1_000_000)
    rapl = RaplBackend(root=tmp_path)
    e0 = rapl.read()[ENERGY_J]
    pkg.write_text("5000\n")  # wrapped: 10_000 to the top, then 5_000
    e1 = rapl.read()[ENERGY_J]
    pkg.write_text("25000\n")
    e2 = rapl.read()[ENERGY_J]
    assert e1 - e0 == pytest.approx(0.015, abs=1e-12)
    assert e2 - e1 == pytest.approx(0.020, abs=1e-12)


def test_rapl_permission_error_is_reported_with_the_fix(tmp_path: Path, rapl_tree: dict[str, Path]) -> None:
    def root_only(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text()

    rapl = RaplBackend(root=tmp_path, reader=root_only)
    assert not rapl.available()
    why = rapl.capabilities().reason("energy_counter")
    assert why is not None
    assert "5.10" in why and "chmod 0444" in why and "udev" in why and str(tmp_path) in why


def test_rapl_permission_error_reaches_autodetect_notes(
    tmp_path: Path, rapl_tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = B.read_text

    def root_only(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(B, "read_text", root_only)
    with pytest.raises(ValueError, match="chmod 0444"):
        B.detect(["rapl"], rapl_root=tmp_path)
    described = {d["name"]: d for d in B.describe_backends(["rapl"], rapl_root=tmp_path)}
    assert described["rapl"]["available"] is False
    assert "udev" in described["rapl"]["cannot"]["energy_counter"]


def test_rapl_absent_tree_is_unavailable_with_reason(tmp_path: Path) -> None:
    rapl = RaplBackend(root=tmp_path / "nowhere")
    assert not rapl.available()
    assert "no RAPL package zones" in (rapl.capabilities().reason("energy_counter") or "")


# ------------------------------------------------------------------------------------------------ jtop


def _rail(mw: float, online: bool = True) -> dict[str, Any]:
    """One rail as jtop 4.x reports it (``jetson.power['rail'][NAME]``)."""
    return {"online": online, "type": "INA3221", "status": "ok", "volt": 5000, "curr": mw / 5,
            "power": mw, "avg": mw * 0.9, "warn": 32760, "crit": 32760}  # fmt: skip


ORIN_NANO_POWER = {
    "rail": {"VDD_IN": _rail(6816), "VDD_CPU_GPU_CV": _rail(1488), "VDD_SOC": _rail(1456)},
    "tot": {"volt": 5072, "curr": 1344, "power": 6816, "avg": 6100, "name": "VDD_IN"},
}
NANO_POWER = {
    "rail": {"POM_5V_GPU": _rail(400), "POM_5V_IN": _rail(3200), "POM_5V_CPU": _rail(800)},
    "tot": {"power": 3200, "avg": 3000, "name": "POM_5V_IN"},
}
OTHER_POWER = {
    "rail": {"VDD_GPU_SOC": _rail(2000), "VDD_CPU_CV": _rail(1000), "VIN_SYS_5V0": _rail(1500),
             "OFFLINE": _rail(9999, online=False)},
    "tot": {"power": 4500, "avg": 4000, "name": "ALL"},
}  # fmt: skip


class FakeJetson:
    """Stands in for a connected ``jtop`` client: ``power`` and ``memory`` as recorded from a board."""

    def __init__(self, power: dict[str, Any], ram_used_kb: float = 3_145_728) -> None:
        self.power = power
        self.memory = {"RAM": {"tot": 7_620_000, "used": ram_used_kb, "free": 1_000_000}}
        self.closed = False

    def ok(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("power", "watts", "source"),
    [(ORIN_NANO_POWER, 6.816, "VDD_IN"), (NANO_POWER, 3.2, "POM_5V_IN"), (OTHER_POWER, 4.5, "sum of rails")],
)
def test_jtop_total_board_power(power: dict[str, Any], watts: float, source: str) -> None:
    assert jtop_total_power_w(power) == (pytest.approx(watts), source)
    jtop = JtopBackend(client=FakeJetson(power))
    assert jtop.available()
    caps = jtop.capabilities()
    assert caps.power_w and caps.device_memory and not caps.energy_counter
    assert source in caps.detail
    values = jtop.read()
    assert values[POWER_W] == pytest.approx(watts)
    assert values[B.DEVICE_MEMORY_MB] == pytest.approx(3072.0)


def test_jtop_without_rails_uses_tot_and_injected_client_is_not_closed() -> None:
    client = FakeJetson({"rail": {}, "tot": {"power": 5000, "name": "VDD_IN"}})
    jtop = JtopBackend(client=client)
    assert jtop.read()[POWER_W] == pytest.approx(5.0)
    jtop.close()
    assert not client.closed
    assert jtop_total_power_w({}) is None


# ----------------------------------------------------------------------------------------------- hwmon


def _write(d: Path, files: dict[str, object]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (d / name).write_text(f"{value}\n")


def test_hwmon_ina3221_current_layout(tmp_path: Path) -> None:
    _write(tmp_path / "1-0040" / "hwmon" / "hwmon3", {
        "name": "ina3221",
        "in1_label": "VDD_IN", "in1_input": 5072, "curr1_input": 1344,
        "in2_label": "VDD_CPU_GPU_CV", "in2_input": 5000, "curr2_input": 300,
        "in3_label": "VDD_SOC", "in3_input": 5000, "curr3_input": 290,
        "in4_input": 12,  # shunt voltage: no label, not a rail
        "in7_label": "sum of shunt voltages", "in7_input": 40,
    })  # fmt: skip
    _write(tmp_path / "1-0048" / "hwmon" / "hwmon4", {"name": "tmp451", "in1_label": "X", "in1_input": 1})
    hw = HwmonBackend(root=str(tmp_path / "*" / "hwmon" / "hwmon*"))
    assert hw.available()
    assert hw.rails_w() == pytest.approx({"VDD_IN": 6.816768, "VDD_CPU_GPU_CV": 1.5, "VDD_SOC": 1.45})
    assert hw.read() == {POWER_W: pytest.approx(6.816768)}
    assert "board power from VDD_IN" in hw.capabilities().detail


def test_hwmon_older_layout_and_sum_of_rails(tmp_path: Path) -> None:
    _write(tmp_path / "6-0040" / "iio:device0", {
        "rail_name_0": "POM_5V_IN", "in_power0_input": 3200,
        "rail_name_1": "POM_5V_GPU", "in_power1_input": 400,
    })  # fmt: skip
    assert HwmonBackend(root=tmp_path / "6-0040" / "iio:device0").read() == {POWER_W: pytest.approx(3.2)}
    _write(tmp_path / "7-0041" / "iio:device1", {
        "rail_name_0": "VDD_SYS_GPU", "in_voltage0_input": 19000, "in_current0_input": 100,
        "rail_name_1": "VDD_SYS_CPU", "in_voltage1_input": 19000, "in_current1_input": 50,
    })  # fmt: skip
    hw = HwmonBackend(root=tmp_path / "7-0041" / "iio:device1")
    assert hw.read() == {POWER_W: pytest.approx(2.85)}
    assert "sum of rails" in hw.capabilities().detail


def test_hwmon_absent_is_unavailable_with_reason(tmp_path: Path) -> None:
    hw = HwmonBackend(root=str(tmp_path / "none*"))
    assert not hw.available()
    assert "no INA3221 files" in (hw.capabilities().reason("power_w") or "")


# ------------------------------------------------------------------------------------------------ NVML


class FakeNVMLError(Exception):
    """Like ``pynvml.NVMLError``: carries the NVML return code in ``.value``."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_nvml(
    energy_mj: list[int] | None = None,
    power_mw: int | None = None,
    used_bytes: int | None = None,
    instant_mw: int | None = None,
) -> SimpleNamespace:
    """A stand-in ``pynvml``: each figure is supported when its value is given, else NOT_SUPPORTED (3)."""

    def supported(value: Any) -> Any:
        if value is None:
            raise FakeNVMLError(3)
        return value

    nvml = SimpleNamespace(
        NVMLError=FakeNVMLError,
        NVML_ERROR_NOT_SUPPORTED=3,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetName=lambda h: b"Stand-in GPU",
        nvmlDeviceGetTotalEnergyConsumption=lambda h: supported(energy_mj[0] if energy_mj else None),
        nvmlDeviceGetPowerUsage=lambda h: supported(power_mw),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=supported(used_bytes), total=8 * 2**30),
    )
    if instant_mw is not None:
        nvml.NVML_FI_DEV_POWER_INSTANT = 186
        nvml.nvmlDeviceGetFieldValues = lambda h, ids: [
            SimpleNamespace(fieldId=ids[0], nvmlReturn=0, value=SimpleNamespace(uiVal=instant_mw))
        ]
    return nvml


def test_nvml_not_supported_is_no_sensor_never_zero() -> None:
    nvml = NvmlBackend(index=0, nvml=fake_nvml())
    assert not nvml.available()
    caps = nvml.capabilities()
    assert caps.reason("energy_counter") == "NVML total energy: NOT_SUPPORTED on this device"
    assert caps.reason("power_w") == "NVML power: NOT_SUPPORTED on this device"
    assert nvml.read() == {}  # no key, so nothing can be summed into a 0 J


def test_nvml_jetson_like_memory_only() -> None:
    nvml = NvmlBackend(index=0, nvml=fake_nvml(used_bytes=512 * 2**20))
    assert nvml.available()
    assert nvml.capabilities().measures() == ["device_memory"]
    assert nvml.read() == {B.DEVICE_MEMORY_MB: 512.0}


def test_nvml_counter_and_power_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = [1_000_000]
    nvml = NvmlBackend(nvml=fake_nvml(energy_mj=counter, power_mw=180_000, used_bytes=2**30))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvml.capabilities().measures() == ["power_w", "energy_counter", "device_memory"]
    assert nvml._handle == "gpu1"  # index taken from CUDA_VISIBLE_DEVICES
    first = nvml.read()
    counter[0] += 250_000
    second = nvml.read()
    assert second[ENERGY_J] - first[ENERGY_J] == pytest.approx(250.0)
    assert second[POWER_W] == pytest.approx(180.0)
    instant = NvmlBackend(index=0, nvml=fake_nvml(power_mw=180_000, instant_mw=250_000))
    assert "instantaneous" in instant.capabilities().detail
    assert instant.read()[POWER_W] == pytest.approx(250.0)


def test_nvml_missing_library_is_unavailable() -> None:
    def no_library() -> None:
        raise FakeNVMLError(12)

    stub = fake_nvml(power_mw=1)
    stub.nvmlInit = no_library
    nvml = NvmlBackend(nvml=stub)
    assert not nvml.available()
    assert "NVML unavailable" in (nvml.capabilities().reason("power_w") or "")


# ------------------------------------------------------------------------------------------- detection


def test_detect_forced_and_autodetected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B.TorchCudaBackend, "available", lambda self: False)  # skip importing torch here
    assert [b.name for b in B.detect_backends(["psutil"])] == ["psutil"]
    with pytest.raises(ValueError, match="unknown telemetry backend 'bogus'"):
        B.detect_backends(["bogus"])
    with pytest.raises(ValueError, match="'rapl' is not available"):
        B.detect_backends(["rapl"], rapl_root=tmp_path)
    found = B.detect(
        jtop_client=FakeJetson(ORIN_NANO_POWER),
        nvml_module=fake_nvml(),
        rapl_root=tmp_path,
        hwmon_root=tmp_path,
    )
    names = [b.name for b in found.backends]
    assert names[:2] == ["jtop", "psutil"]
    assert "jtop reads the same" in found.rejected["hwmon"]
    assert "NOT_SUPPORTED" in found.rejected["nvml"]
    assert "no RAPL package zones" in found.rejected["rapl"]
    described = found.describe()
    assert [d["name"] for d in described if d["used"]] == names
    assert all({"name", "available", "used"} <= set(d) for d in described)


def test_psutil_backend_reads_this_process() -> None:
    ps = PsutilBackend()
    assert ps.is_self and ps.available()
    values = ps.read()
    assert values[B.RSS_MB] > 1.0 and values[B.CPU_S] > 0.0
    assert ps.capabilities().reason("power_w") == "psutil has no power sensor"
