"""benchmarks/step_bench.py: variant parsing, the whole-task formula, a tiny run (one process per mode)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
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


def test_pairs_and_reference_variants(bench: ModuleType) -> None:
    sbs = bench.side_by_side
    assert sbs.parse_pairs(
        "coda_prompt@phase1+inference,cps_prompt:reduction_rate=0.4,pool_size=10@phase1"
    ) == [
        ("coda_prompt", "phase1"),
        ("coda_prompt", "inference"),
        ("cps_prompt:reduction_rate=0.4,pool_size=10", "phase1"),
    ]
    with pytest.raises(ValueError, match="variant@mode"):
        sbs.parse_pairs("coda_prompt")
    assert sbs.variant_ref("coda_prompt", "phase1") == "coda_prompt"
    assert sbs.variant_ref("coda_prompt", "phase2_recompute") is None  # CODA has no phase 2
    assert sbs.variant_ref("cps_prompt:reduction_rate=0.4", "phase1") == "cps_prompt:reduction_rate=0.4"
    # the reference's phase 2 and inference do not depend on r: one variant stands for all
    assert sbs.variant_ref("cps_prompt:reduction_rate=0.4", "inference") == "cps_prompt:reduction_rate=0.5"
    assert sbs.variant_ref("l2p", "phase1") is None


def test_ratios_are_taken_within_rounds(bench: ModuleType) -> None:
    sbs = bench.side_by_side

    def rec(impl: str, kernels: str | None, cpu: float, rnd: int) -> dict[str, Any]:
        return {**_rec("coda_prompt", "phase1", 2 * cpu), "impl": impl, "kernels": kernels, "round": rnd,
                "cpu_s_per_step": cpu, "peak_above_idle_mb": 1.0, "idle_rss_mb": 2.0, "s_per_step_min": 1.0,
                "batch": 16}  # fmt: skip

    # round 1 ran under twice the load: both sides doubled, the within-round ratio stays 0.5 / 0.8
    results = [
        rec(impl, kern, cpu * load, rnd)
        for rnd, load in enumerate((1.0, 2.0, 1.1))
        for impl, kern, cpu in (("reference", None, 2.0), ("edgecl", "auto", 1.0), ("edgecl", "torch", 1.6))
    ]
    out = {(r["kernels"], r["compared"]): r for r in sbs.ratios(results, ["auto", "torch"])}
    assert out[("auto", "vs_reference")]["cpu_s_per_step_ratio"] == pytest.approx(0.5)
    assert out[("torch", "vs_reference")]["cpu_s_per_step_ratio"] == pytest.approx(0.8)
    assert out[("auto", "vs_torch_kernels")]["cpu_s_per_step_ratio"] == pytest.approx(0.625)
    assert out[("auto", "vs_reference")]["cpu_s_per_step_ratio_rounds"] == pytest.approx([0.5, 0.5, 0.5])
    summary = {(r["impl"], r["kernels"]): r for r in sbs.summarize(results)}
    assert summary[("reference", None)]["cpu_s_per_step"] == pytest.approx(2.2)  # median of 2, 4, 2.2
    assert summary[("edgecl", "auto")]["rounds"] == 3


REFERENCE = Path(os.environ.get("CPS_PROMPT_REF", "/work/ref/cps-prompt"))


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE / "models" / "cps_prompt.py").is_file(), reason="no CPS-Prompt checkout")
def test_reference_step_runs_from_its_checkout(bench: ModuleType, tmp_path: Path) -> None:
    """The reference's own CPSPrompt.observe, one step per mode, beside edgecl's, on the same weights."""
    out = tmp_path / "side.json"
    args = ["--reference", str(REFERENCE), "--pairs", "cps_prompt:reduction_rate=0.5@phase1+inference",
            "--batch", "2", "--steps", "1", "--warmup", "0", "--classes", "2", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    refs = [r for r in data["results"] if r["impl"] == "reference"]
    assert {r["mode"] for r in refs} == {"phase1", "inference"} and all(r["s_per_step"] > 0 for r in refs)
    assert refs[0]["reduction_ratio"] == 0.5 and refs[0]["reference_commit"]
    assert {r["compared"] for r in data["side_by_side"]} == {"vs_reference"}


def test_roofline_flop_counts_by_hand() -> None:
    spec = importlib.util.spec_from_file_location("roofline", SCRIPT.parent / "roofline.py")
    assert spec is not None and spec.loader is not None
    rf = importlib.util.module_from_spec(spec)
    sys.modules["roofline"] = rf  # dataclasses look their module up
    spec.loader.exec_module(rf)
    d = 192
    # one full block, 197 tokens, no prefix: qkv 3D^2 + proj D^2 + fc1/fc2 8D^2 MACs per token, attention
    # 2 * 197^2 * D MACs (scores and weighted values); FLOPs = 2 x MACs
    assert rf.block_fwd(197, 0, d, False) == 2 * (197 * 12 * d * d + 2 * 197 * 197 * d)
    # CLS-only: keys/values of all tokens, the rest for one token
    assert rf.block_fwd(197, 4, d, True) == 2 * (197 * 2 * d * d + 10 * d * d + 2 * 201 * d)
    # backward of the first block: no qkv input gradient
    assert rf.block_bwd(99, 4, d, False, True) == 2 * (99 * 9 * d * d + 4 * 99 * 103 * d)
    s = rf.Shapes()
    assert rf.kept_tokens(s, 0.5) == 99 and rf.kept_tokens(s, 0.4) == 118
    embed = 2 * 196 * 768 * d * 16
    # the reference embeds twice and runs its last blocks in full; edgecl inference = its phase 2 step
    inf_e, inf_r = (
        rf.step_flops(s, "edgecl", "inference", None),
        rf.step_flops(s, "reference", "inference", None),
    )
    extra = 2 * 16 * (rf.block_fwd(197, 0, d, False) - rf.block_fwd(197, 0, d, True))
    assert inf_r - inf_e == embed + extra
    assert rf.step_flops(s, "edgecl", "phase2_recompute", None) == inf_e
    assert rf.step_flops(s, "edgecl", "phase1", 0.5) < rf.step_flops(s, "edgecl", "phase1", 0.4)
    with pytest.raises(ValueError, match="phase1"):
        rf.step_flops(s, "edgecl", "cache_build", None)
