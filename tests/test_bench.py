"""``edgecl bench``: run planning, aggregation and ratios, failure reporting, and a tiny end-to-end bench."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from edgecl.bench import CSV_COLUMNS, RunOutcome, RunPlan, aggregate, plan_runs, write_outputs
from edgecl.bench.report import RUNS_CSV_COLUMNS, run_figures
from edgecl.bench.runs import error_summary, tail_lines
from edgecl.cli import main


def _spec(method: str, seed: int) -> dict[str, Any]:
    return {"method": method, "seed": seed, "method_options": {}, "tasks": 2}


def _results(
    method: str, acc: list[list[float]], peak: float, train: float, start: float = 900.0
) -> dict[str, Any]:
    """A results dict shaped like the trainer's (with telemetry and the worker's memory series)."""
    from edgecl.train.metrics import summarize

    tasks = [
        {
            "task": i,
            "average_accuracy": sum(r) / len(r),
            "peak_memory_mb": peak,
            "train_seconds": train / 2,
            "telemetry": {"task": {"cpu_s": train}},
        }
        for i, r in enumerate(acc)
    ]
    return {
        "method": method,
        "config": {"phase_ratio": 0.4} if method != "coda_prompt" else {},
        "accuracy_matrix": acc,
        **summarize(acc),
        "tasks": tasks,
        "class_order": ["a", "b", "c", "d"],
        "telemetry": {
            "peak_memory_mb": peak,
            "train_seconds": train,
            "energy_j": None,
            "nulls": {"energy_j": "no sensor: test"},
            "run": {"peak_cuda_allocated_mb": None},
        },
        "memory_series": {
            "t_s": [0.0, 1.0, 2.0],
            "rss_mb": [100.0, start, peak],
            "events": [{"t_s": 1.0, "event": "run start"}],
        },
    }


def _outcome(method: str, seed: int, results: dict[str, Any] | None, error: str | None = None) -> RunOutcome:
    plan = RunPlan(f"s{seed}-{method}", method, seed, _spec(method, seed), [("main", method)])
    if results is None:
        return RunOutcome(plan, "failed", 1, 1.0, None, error)
    return RunOutcome(plan, "ok", 0, 10.0, results)


def test_plan_runs_shares_identical_specs_between_main_and_ablation() -> None:
    plans = plan_runs(_spec, ["cps_prompt", "coda_prompt", "patchdropout"], [0, 1], ablation="cps")
    assert len(plans) == 10  # per seed: 3 main runs + PatchDropout(λ=1) + CPS(λ=1)
    by_rows = {(p.seed, tuple(p.rows)): p for p in plans}
    assert (0, (("main", "cps_prompt"), ("ablation", "+CPS+DPCT"))) in by_rows
    assert (1, (("main", "coda_prompt"), ("ablation", "CODA-Prompt"))) in by_rows
    cps_no_dpct = by_rows[(0, (("ablation", "+CPS"),))]
    assert cps_no_dpct.method == "cps_prompt" and cps_no_dpct.spec["method_options"] == {"phase_ratio": 1.0}
    assert len({p.run_id for p in plans}) == len(plans)
    with pytest.raises(ValueError, match="unknown ablation"):
        plan_runs(_spec, ["cps_prompt"], [0], ablation="nope")


def test_aggregate_mean_std_and_reference_ratios_exactly_one() -> None:
    outcomes = [
        _outcome("cps_prompt", 0, _results("cps_prompt", [[0.8], [0.6, 0.7]], 1000.0, 30.0)),
        _outcome("cps_prompt", 1, _results("cps_prompt", [[0.9], [0.5, 0.9]], 1010.0, 34.0)),
        _outcome("coda_prompt", 0, _results("coda_prompt", [[0.8], [0.6, 0.8]], 1200.0, 60.0)),
        _outcome("coda_prompt", 1, None, "ValueError: boom"),
        _outcome("l2p", 0, None, "RuntimeError: broken"),
    ]
    rows = aggregate(outcomes, "main", ["cps_prompt", "coda_prompt", "l2p"], "cps_prompt")
    cps, coda, l2p = rows
    assert cps["status"] == "ok" and cps["n_ok"] == 2 and cps["seeds"] == [0, 1]
    assert cps["final_average_accuracy_mean"] == pytest.approx(0.675)
    assert cps["final_average_accuracy_std"] == pytest.approx(0.0353553, rel=1e-4)
    assert cps["peak_memory_mb"] == pytest.approx(1005.0)
    for fig in ("peak_memory_mb", "train_seconds", "peak_above_start_mb", "train_cpu_seconds"):
        assert cps[f"{fig}_ratio"] == 1.0  # exactly
    assert cps["energy_j"] is None and cps["energy_j_ratio"] is None
    assert coda["status"] == "partial" and coda["error"] == "seed 1: ValueError: boom"
    assert coda["final_average_accuracy_std"] is None
    assert coda["peak_memory_mb_ratio"] == pytest.approx(1200.0 / 1005.0)
    assert coda["train_seconds_ratio"] == pytest.approx(60.0 / 32.0)
    assert coda["peak_above_start_mb_ratio"] == pytest.approx(300.0 / 105.0)
    assert coda["train_cpu_seconds"] == pytest.approx(120.0)  # two tasks × 60 s CPU each
    assert l2p["status"] == "failed" and "RuntimeError: broken" in l2p["error"]
    assert l2p["peak_memory_mb_ratio"] is None
    assert run_figures(outcomes[0].results or {})["accuracy_curve"] == [0.8, pytest.approx(0.65)]


def test_aggregate_without_a_finished_reference_gives_no_ratios() -> None:
    outcomes = [
        _outcome("cps_prompt", 0, None, "boom"),
        _outcome("coda_prompt", 0, _results("coda_prompt", [[0.5]], 900.0, 5.0)),
    ]
    rows = aggregate(outcomes, "main", ["cps_prompt", "coda_prompt"], "cps_prompt")
    assert rows[0]["status"] == "failed" and rows[1]["peak_memory_mb_ratio"] is None


def test_write_outputs_columns_and_failed_rows(tmp_path: Path) -> None:
    outcomes = [
        _outcome("cps_prompt", 0, _results("cps_prompt", [[0.8], [0.6, 0.7]], 1000.0, 30.0)),
        _outcome("l2p", 0, None, "RuntimeError: broken | pipe"),
    ]
    rows = aggregate(outcomes, "main", ["cps_prompt", "l2p"], "cps_prompt")
    meta = {
        "command": "edgecl bench ...",
        "machine": {"cpu": "test"},
        "seeds": [0],
        "settings": {},
        "class_orders": {"0": ["a", "b"]},
    }
    paths = write_outputs(tmp_path, meta, rows, [], outcomes, [])
    with paths["results.csv"].open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        got = {r["label"]: r for r in reader}
    assert got["cps_prompt"]["peak_memory_mb_ratio"] == "1.0" and got["l2p"]["status"] == "failed"
    with paths["runs.csv"].open() as fh:
        assert tuple(csv.DictReader(fh).fieldnames or ()) == RUNS_CSV_COLUMNS
    md = paths["results.md"].read_text()
    assert "FAILED: seed 0: RuntimeError: broken \\| pipe" in md and "no sensor: test" in md
    data = json.loads(paths["results.json"].read_text())
    assert data["runs"][1]["status"] == "failed" and data["runs"][0]["results"]["accuracy_matrix"]


def test_tail_lines_strips_ansi_and_redraws() -> None:
    raw = b"start\n\x1b[2Kbar 1/3\rbar 2/3\rbar 3/3\n\nTraceback\nValueError: bad\n"
    assert tail_lines(raw, 3) == "bar 3/3\nTraceback\nValueError: bad"
    assert error_summary(1, "x\nValueError: bad", None) == "ValueError: bad"
    assert error_summary(1, "", "RuntimeError: own") == "RuntimeError: own"
    assert "SIGKILL" in error_summary(-9, "", None)


def test_build_specs_routes_method_options() -> None:
    import argparse

    from edgecl.commands.bench import register
    from edgecl.commands.bench_specs import build_specs

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--reduction-rate", "0.25", "--set", "lr=0.002", "--tasks", "2"])
    request = {
        "args": {k: v for k, v in vars(args).items() if k not in {"func", "bench_parser", "command"}},
        "methods": ["cps_prompt", "coda_prompt"],
        "method_sets": {"coda_prompt": ["pool_size=-1"]},
    }
    out = build_specs(request)
    cps, coda = out["specs"]["cps_prompt"], out["specs"]["coda_prompt"]
    assert cps["method_options"] == {"reduction_rate": 0.25, "lr": 0.002} and cps["tasks"] == 2
    assert coda["method_options"] == {"lr": 0.002, "pool_size": -1}  # strict: the run reports the bad value
    assert out["dropped"] == {"coda_prompt": ["reduction_rate"]}
    assert "cps_prompt" in out["methods"] and out["machine"]["cores"]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """Two real methods and one that cannot be built, 2 tasks, 1 epoch, synthetic data, a 32 px random ViT."""
    out = tmp_path_factory.mktemp("bench")
    rc = main(
        [
            "bench",
            "--methods",
            "cps_prompt,coda_prompt,nosuch",
            "--data",
            "synthetic",
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--tasks",
            "2",
            "--epochs",
            "1",
            "--limit-per-class",
            "4",
            "--test-limit-per-class",
            "2",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    return rc, out


@pytest.mark.slow
def test_tiny_bench_writes_every_file_with_reference_ratios_of_one(tiny_bench: tuple[int, Path]) -> None:
    rc, out = tiny_bench
    assert rc == 1  # one run failed; everything is still written
    for name in (
        "results.md",
        "results.csv",
        "runs.csv",
        "results.json",
        "accuracy_per_task.png",
        "memory_over_time.png",
        "efficiency_ratios.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = {r["label"]: r for r in reader}
    assert [rows[m]["status"] for m in ("cps_prompt", "coda_prompt")] == ["ok", "ok"]
    data = json.loads((out / "results.json").read_text())
    cps = next(r for r in data["main"] if r["label"] == "cps_prompt")
    assert cps["peak_memory_mb_ratio"] == 1.0 and cps["train_seconds_ratio"] == 1.0
    assert cps["train_cpu_seconds_ratio"] == 1.0 and cps["peak_above_start_mb_ratio"] == 1.0
    assert cps["peak_memory_mb"] > 0 and cps["train_seconds"] > 0
    coda = next(r for r in data["main"] if r["label"] == "coda_prompt")
    assert coda["peak_memory_mb_ratio"] == pytest.approx(coda["peak_memory_mb"] / cps["peak_memory_mb"])
    assert data["command"].startswith("edgecl bench --methods cps_prompt,coda_prompt,nosuch")
    assert data["machine"]["cpu"] and data["seeds"] == [0] and len(data["class_orders"]["0"]) == 4
    ok_runs = [r for r in data["runs"] if r["status"] == "ok"]
    assert len(ok_runs) == 2
    for run in ok_runs:
        assert len(run["results"]["accuracy_matrix"]) == 2 and run["spec"]["method"] == run["method"]
        assert run["results"]["memory_series"]["rss_mb"]


@pytest.mark.slow
def test_tiny_bench_reports_the_failed_run_with_its_error(tiny_bench: tuple[int, Path]) -> None:
    _, out = tiny_bench
    data = json.loads((out / "results.json").read_text())
    bad = next(r for r in data["main"] if r["label"] == "nosuch")
    assert bad["status"] == "failed" and "unknown method 'nosuch'" in bad["error"]
    run = next(r for r in data["runs"] if r["method"] == "nosuch")
    assert run["returncode"] == 1 and "Traceback" in run["stderr_tail"]
    md = (out / "results.md").read_text()
    assert "FAILED: seed 0: ValueError: unknown method 'nosuch'" in md
    with (out / "runs.csv").open() as fh:
        statuses = {r["method"]: r["status"] for r in csv.DictReader(fh)}
    assert statuses == {"cps_prompt": "ok", "coda_prompt": "ok", "nosuch": "failed"}
