"""The typed config layer: pool splits for any task count, error text, string coercion, CLI errors."""

from __future__ import annotations

import pytest

from edgecl.cli import main as cli_main
from edgecl.config import coerce_strings, parse_assignments
from edgecl.methods import build_config, list_methods
from edgecl.methods.layers import pool_bounds, split_pool
from edgecl.methods.registry import coerce_options, get_method_class


@pytest.mark.parametrize(
    ("tasks", "sizes"),
    [
        (1, [100]),
        (2, [50, 50]),
        (3, [34, 33, 33]),
        (7, [15, 15, 14, 14, 14, 14, 14]),  # 100 = 7 * 14 + 2
        (10, [10] * 10),
        (11, [10] + [9] * 10),  # 100 = 11 * 9 + 1
    ],
)
def test_split_spreads_the_remainder_over_the_first_tasks(tasks: int, sizes: list[int]) -> None:
    assert split_pool(100, tasks) == sizes
    bounds = pool_bounds(100, tasks)
    assert bounds[0] == 0 and bounds[-1] == 100
    assert [b - a for a, b in zip(bounds, bounds[1:], strict=False)] == sizes


def test_split_refuses_fewer_components_than_tasks() -> None:
    assert split_pool(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least 4"):
        split_pool(3, 4)


@pytest.mark.parametrize("tasks", [1, 2, 3, 7, 10, 11])
def test_every_pool_method_accepts_any_task_count(tasks: int) -> None:
    for name in list_methods():
        cfg = build_config(name, {"expected_tasks": tasks})
        assert cfg.expected_tasks == tasks


def test_per_task_pools_grow_with_the_task_count_unless_set() -> None:
    assert build_config("dualprompt", {"expected_tasks": 13}).e_pool_size == 13  # type: ignore[attr-defined]
    assert build_config("dualprompt", {"expected_tasks": 3}).e_pool_size == 10  # type: ignore[attr-defined]
    assert build_config("cps_prompt", {"expected_tasks": 120}).pool_size == 120  # type: ignore[attr-defined]
    with pytest.raises(
        ValueError, match=r"e_pool_size: 10 .* expected_tasks=13; set e_pool_size to at least 13"
    ):
        build_config("dualprompt", {"expected_tasks": 13, "e_pool_size": 10})
    with pytest.raises(
        ValueError, match=r"method 'coda_prompt': pool_size: .* at least 5 \(--set pool_size=5\)"
    ):
        build_config("coda_prompt", {"expected_tasks": 5, "pool_size": 4})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pool_size": -1}, "method 'cps_prompt': pool_size: must be >= 1 (got -1)"),
        ({"lr": 0}, "method 'cps_prompt': lr: must be > 0 (got 0)"),
        (
            {"sampling": "random"},
            "method 'cps_prompt': sampling: must be one of 'critical', 'uniform' or 'topk' (got 'random')",
        ),
        ({"clip_grad": -1.0}, "method 'cps_prompt': clip_grad: must be > 0 or null (got -1.0)"),
        ({"reduction_rate": "half"}, "method 'cps_prompt': reduction_rate: must be a number (got 'half')"),
        ({"min_prompt_epochs": 1.5}, "method 'cps_prompt': min_prompt_epochs: must be an integer (got 1.5)"),
        ({"layers": [0, -2]}, "method 'cps_prompt': layers: item 1 must be >= 0 (got -2)"),
        ({"prompt_length": 7}, "method 'cps_prompt': prompt_length: must be an even number"),
    ],
)
def test_errors_name_the_key_the_rule_and_the_value(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_config("cps_prompt", options)
    assert str(err.value).startswith(message)


def test_unknown_options_are_listed_with_a_suggestion() -> None:
    with pytest.raises(ValueError) as err:
        build_config("l2p", {"top_kk": 3})
    text = str(err.value)
    assert text.startswith(
        "method 'l2p': unknown option(s) ['top_kk'] (did you mean 'top_k'?); valid options: "
    )
    assert "pool_size" in text and "pull_constraint" in text


def test_cross_field_rules_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"^method 'hash': top_k: must be <= pool_size=4 \(got 5\)$"):
        build_config("hash", {"pool_size": 4, "top_k": 5})
    with pytest.raises(ValueError, match=r"^method 'dpw': rwm: needs activation='condact'"):
        build_config("dpw", {"activation": "softmax"})


def test_assignment_is_validated() -> None:
    cfg = build_config("cps_prompt")
    cfg.reduction_rate = 0.25  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^reduction_rate: must be < 1 \(got 1.5\)$"):
        cfg.reduction_rate = 1.5  # type: ignore[attr-defined]
    assert cfg.reduction_rate == 0.25  # type: ignore[attr-defined]


def test_strings_are_converted_by_the_model_and_checked_when_built() -> None:
    raw = parse_assignments(["reduction-rate=0.3", "layers=0,2", "clip_grad=none", "sampling=topk"])
    assert raw == {"reduction_rate": "0.3", "layers": "0,2", "clip_grad": "none", "sampling": "topk"}
    options = coerce_options("cps_prompt", raw)
    assert options == {"reduction_rate": 0.3, "layers": (0, 2), "clip_grad": None, "sampling": "topk"}
    assert coerce_options("hash", {"hdr": "false", "layers": "[1, 3]"}) == {"hdr": False, "layers": (1, 3)}
    assert coerce_options("cps_prompt", {"pool_size": "-1"}) == {"pool_size": -1}  # the model judges it
    with pytest.raises(
        ValueError, match=r"^method 'cps_prompt': pool_size: must be an integer \(got 'abc'\)$"
    ):
        coerce_options("cps_prompt", {"pool_size": "abc"})
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_assignments(["pool_size"])
    cls = get_method_class("cps_prompt").Config
    assert coerce_strings(cls, {"nope": "1"}) == {"nope": "1"}  # unknown keys are left for the model to name


def test_checkpointed_configs_load_back() -> None:
    """``describe_config`` output (tuples become JSON lists) builds the same config again."""
    import json

    for name in list_methods():
        cfg = build_config(name, {"expected_tasks": 3})
        dumped = json.loads(json.dumps(cfg.model_dump()))
        assert build_config(name, dumped) == cfg


def test_field_docstrings_are_descriptions() -> None:
    fields = get_method_class("cps_prompt").Config.model_fields
    assert "fraction of patches dropped" in (fields["reduction_rate"].description or "")
    assert "34, 33, 33" in (fields["pool_size"].description or "")


def test_cli_prints_config_errors_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "train",
        "--method",
        "cps_prompt",
        "--set",
        "pool_size=-1",
        "--img-size",
        "32",
        "--patch-size",
        "8",
    ]
    assert cli_main([*argv, "--tasks", "2", "--epochs", "1", "--no-telemetry", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "edgecl train: error: method 'cps_prompt': pool_size: must be >= 1 (got -1)" in err
    assert "Traceback" not in err
    assert cli_main(["train", "--method", "cps_prompt", "--sampling", "best", "--tasks", "2"]) == 2
    assert "sampling: must be one of 'critical', 'uniform' or 'topk' (got 'best')" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("classes", "tasks", "sizes"),
    [(100, 7, [15, 15, 14, 14, 14, 14, 14]), (10, 3, [4, 3, 3]), (10, 10, [1] * 10), (6, 1, [6])],
)
def test_classes_split_into_any_number_of_tasks(classes: int, tasks: int, sizes: list[int]) -> None:
    from edgecl.data.stream import split_tasks

    splits = split_tasks(classes, tasks)
    assert [len(r) for r in splits] == sizes
    assert [c for r in splits for c in r] == list(range(classes))  # contiguous, every class once
    with pytest.raises(ValueError, match=f"choose --tasks between 1 and {classes}"):
        split_tasks(classes, classes + 1)


def test_synthetic_stream_with_a_remainder_and_too_few_expected_tasks(tiny_vit: object) -> None:
    from edgecl.runner import RunSpec, build_run

    spec = RunSpec(method="linear_probe", tasks=3, num_classes=7, limit_per_class=2, test_limit_per_class=1)
    _, stream, _ = build_run(spec, backbone=tiny_vit)  # type: ignore[arg-type]
    assert [t.classes for t in stream.tasks] == [[0, 1, 2], [3, 4], [5, 6]]
    spec = RunSpec(method="dualprompt", tasks=3, limit_per_class=2, method_options={"expected_tasks": 2})
    with pytest.raises(
        ValueError, match="expected_tasks=2 is less than the stream's 3 tasks; set --expected-tasks 3"
    ):
        build_run(spec, backbone=tiny_vit)  # type: ignore[arg-type]


def test_service_settings_flag_env_envfile_and_errors_name_the_source() -> None:
    from edgecl.settings import ServiceSettings

    environ = {"EDGECL_PORT": "9002", "EDGECL_HOST": "e", "EDGECL_DATA_DIR": ""}
    env_file = {"EDGECL_PORT": "1", "EDGECL_WEIGHTS": "w.safetensors", "EDGECL_DATA_DIR": "/d"}
    s, sources = ServiceSettings.resolve({"port": "", "host": "h"}, environ, env_file, "/etc/edgecl.env")
    assert (s.port, s.host, s.weights, s.data_dir, s.profile) == (9002, "h", "w.safetensors", "/d", None)
    assert sources == {
        "host": "--host",
        "port": "environment EDGECL_PORT",
        "weights": "/etc/edgecl.env EDGECL_WEIGHTS",
        "data_dir": "/etc/edgecl.env EDGECL_DATA_DIR",  # an empty variable counts as unset (systemd)
    }
    with pytest.raises(
        ValueError, match=r"port \(from environment EDGECL_PORT\): must be an integer \(got 'x'\)"
    ):
        ServiceSettings.resolve({}, {"EDGECL_PORT": "x"})
    with pytest.raises(ValueError, match=r"port \(from --port\): must be < 65536 \(got 70000\)"):
        ServiceSettings.resolve({"port": 70000}, {})
    with pytest.raises(ValueError, match=r"memory_budget_mb \(from .*EDGECL_MEMORY_BUDGET_MB\): must be > 0"):
        ServiceSettings.resolve({}, {}, {"EDGECL_MEMORY_BUDGET_MB": "-5"}, "f.env")
    assert "s3cret-value" not in repr(ServiceSettings.resolve({}, {"EDGECL_TOKEN": "s3cret-value" * 2})[0])
