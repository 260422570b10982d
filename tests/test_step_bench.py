"""benchmarks/step_bench.py: variant parsing, the whole-task formula, a tiny run (one process per mode)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("step_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["step_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_variant_parsing(bench: ModuleType) -> None:
    assert bench.parse_variant("coda_prompt") == ("coda_prompt", {})
    assert bench.parse_variant("cps_prompt:reduction_rate=0.4,sampling=topk") == (
        "cps_prompt",
        {"reduction_rate": 0.4, "sampling": "topk"},
    )
    assert bench._split_variants("cps_prompt:reduction_rate=0.4,sampling=topk,l2p") == [
        "cps_prompt:reduction_rate=0.4,sampling=topk",
        "l2p",
    ]
    with pytest.raises(ValueError, match="bad option"):
        bench.parse_variant("cps_prompt:reduction_rate")


def _rec(variant: str, mode: str, s: float, **extra: Any) -> dict[str, Any]:
    return {"variant": variant, "mode": mode, "s_per_step": s, "cpu_s_per_step": s / 2, **extra}


def test_task_estimate_formula(bench: ModuleType) -> None:
    cps = "cps_prompt:reduction_rate=0.5"
    results = [
        _rec("coda_prompt", "phase1", 2.0),
        _rec(cps, "phase1", 1.0),
        _rec(cps, "phase2_recompute", 1.5),
        _rec(cps, "phase2_cached", 0.01),
        _rec(cps, "cache_build", 6.4, s_per_image=0.1, batch=64),
    ]
    est = bench.task_estimate(results, cps, "coda_prompt", epochs=20, phase_ratio=0.4, batch=16, images=100)
    steps = math.ceil(100 / 16)
    assert est["phase1_epochs"] == 8 and est["phase2_epochs"] == 12 and est["steps_per_epoch"] == steps
    expected = 8 * steps * 1.0 + 100 * 0.1 + 12 * steps * 0.01
    assert est["cps_task_seconds"] == pytest.approx(expected)
    assert est["coda_task_seconds"] == pytest.approx(20 * steps * 2.0)
    assert est["ratio"] == pytest.approx(expected / (20 * steps * 2.0))
    assert est["ratio_without_cache"] == pytest.approx((8 * steps + 12 * steps * 1.5) / (20 * steps * 2.0))
    cpu = bench.task_estimate(results, cps, "coda_prompt", 20, 0.4, 16, 100, key="cpu_s_per_step")
    assert cpu["figure"] == "cpu_s_per_step" and cpu["cps_task_seconds"] == pytest.approx(expected / 2)
    assert cpu["ratio"] == pytest.approx(est["ratio"])
    assert bench.task_estimate(results[:2], cps, "coda_prompt", 20, 0.4, 16, 100) is None


def test_tiny_run_writes_json(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "step_bench.json"
    args = [
        "--img-size", "32", "--patch-size", "8", "--batch", "2", "--cache-batch", "2", "--steps", "2",
        "--warmup", "0", "--methods", "cps_prompt:reduction_rate=0.5,expected_tasks=2,pool_size=10",
        "--modes", "phase1,phase2_cached,cache_build", "--classes", "2", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert {"command", "settings", "machine", "reference", "results", "ratios", "task_estimates"} <= set(data)
    assert data["settings"]["batch"] == 2 and data["machine"]["load_average"] is not None
    recs = data["results"]
    assert [r["mode"] for r in recs] == ["phase1", "phase2_cached", "cache_build"]
    keys = {"s_per_step", "s_per_step_min", "steps", "idle_rss_mb", "peak_rss_mb", "peak_above_idle_mb"}
    for r in recs:
        assert keys | {"pid", "cpu_s_per_step"} <= set(r), r
        assert r["steps"] == 2 and r["s_per_step"] > 0 and r["peak_above_idle_mb"] >= 0
    assert recs[0]["phase"] == "sparse" and recs[0]["kept_patches"] == 8  # floor(0.5 * 16)
    assert recs[2]["s_per_image"] == pytest.approx(recs[2]["s_per_step"] / 2)
    assert len({r["pid"] for r in recs}) == len(recs)  # each mode in its own process
