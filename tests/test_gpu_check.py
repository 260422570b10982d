"""``benchmarks/gpu_check.sh --cpu-dry-run``: every step of the GPU check (issue 20) runs on the CPU, right.

The check itself asserts what each step measured (energy a number or "no sensor", never 0; the impossible
budget refused with a larger minimum; the accepted budgets' peaks under the budget; parity of onnxruntime
and torch; the daemon trained, predicted and shut down cleanly on SIGTERM). This test runs it as the GPU
machine will (the shell script, a fresh output folder) and checks the report: every unit present and
passed, the CPU-only answers where the GPU gives numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgecl.methods.registry import list_methods

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECL_")}
    env["PYTHON"] = sys.executable
    env.pop("PYTHONPATH", None)
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    report = json.loads((out / "gpu_check.json").read_text())
    units = report["units"]
    expected = {"doctor", "bench", "serve", "export"}
    expected |= {f"train:{m}" for m in list_methods()}
    expected |= {f"budget:{b}" for b in ("probe", "comfortable", "tight", "impossible")}
    expected |= {f"precision:{p}" for p in ("fp32", "bf16", "fp16")}
    assert set(units) == expected
    bad = {n: u.get("error") for n, u in units.items() if u["status"] != "ok"}
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["mode"] == "cpu-dry-run" and report["counts"]["ok"] == len(expected)

    for m in list_methods():
        for task in units[f"train:{m}"]["result"]["tasks"]:
            assert task["energy_j"] is None or task["energy_j"] > 0, (m, task)
            if task["energy_j"] is None:
                assert task["energy_null_reason"].startswith("no sensor"), (m, task)
            assert task["peak_cuda_allocated_mb"] is None
    fp16 = units["precision:fp16"]["result"]
    assert fp16["refused"] and "CUDA" in fp16["message"]  # fp16 autocast is CUDA-only
    impossible = units["budget:impossible"]["result"]
    assert impossible["refused"] and impossible["minimum_mb"] > impossible["budget_mb"]
    comfortable = units["budget:comfortable"]["result"]
    assert not comfortable["refused"] and comfortable["measured_peak_mb"] <= comfortable["budget_mb"]
    serve = units["serve"]["result"]
    assert serve["exit_code"] in (0, -15) and serve["graceful"]  # uvicorn re-raises the SIGTERM it handled
    assert serve["job"]["status"] == "done" and serve["predict"]["images"] > 0
    assert serve["settings"]["device"] == "cpu" and serve["job"]["task_peak_cuda_allocated_mb"] == [None]
    assert units["export"]["result"]["top1_agreement"] >= 0.95
    rows = {r["method"]: r for r in units["bench"]["result"]["rows"]}
    assert set(rows) == {"cps_prompt", "coda_prompt", "patchdropout"}
    assert rows["cps_prompt"]["peak_memory_mb_ratio"] == pytest.approx(1.0)

    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in expected)
    assert (out / "gpu_check.log").stat().st_size > 0
