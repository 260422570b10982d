"""Device profiles: the shipped ones load; unknown keys and bad values are errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgecl.profiles import Profile, list_profiles, load_profile

SHIPPED = ("cpu", "jetson-orin-nano-8gb", "x86-cuda")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_validate(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name and profile.source.endswith(f"{name}.yaml")
    assert profile.memory_budget_mb and profile.memory_budget_mb > 0
    assert profile.method_config().reduction_rate <= profile.max_reduction_rate
    assert name in list_profiles()


def test_shipped_scopes() -> None:
    assert load_profile("cpu").memory_scope == "rss"
    assert load_profile("jetson-orin-nano-8gb").memory_scope == "unified"
    assert load_profile("x86-cuda").memory_scope == "cuda"


def _write(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_overrides_win_and_none_overrides_are_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path, {"memory_budget_mb": 2048, "device": "cpu"})
    assert load_profile(path, memory_budget_mb=1500).memory_budget_mb == 1500
    assert load_profile(path, memory_budget_mb=None).memory_budget_mb == 2048
    assert load_profile(path).name == "p"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['memory_budget'\]"):
        load_profile(_write(tmp_path, {"memory_budget": 100}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        load_profile("cpu", bogus=1)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"memory_budget_mb": -5}, "memory_budget_mb"),
        ({"memory_budget_mb": "lots"}, "memory_budget_mb"),
        ({"memory_budget_mb": True}, "memory_budget_mb"),
        ({"batch_size": "abc"}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 16.5}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"precision": "fp8"}, "precision"),
        ({"device": "tpu"}, "device"),
        ({"memory_scope": "vram"}, "memory_scope"),
        ({"device": "cpu", "memory_scope": "cuda"}, "memory_scope"),
        ({"device": "cpu", "precision": "fp16"}, "precision"),
        ({"max_reduction_rate": 1.0}, "max_reduction_rate"),
        ({"headroom_mb": -1}, "headroom_mb"),
        ({"tune_allocator": "yes"}, "tune_allocator"),
        ({"allow_autocast": 1}, "allow_autocast"),
        ({"threads": 0}, "threads"),
        ({"sampler_period_s": 0}, "sampler_period_s"),
        ({"telemetry_backends": "psutil"}, "telemetry_backends"),
        ({"telemetry_backends": [1]}, "telemetry_backends"),
        ({"inference_engine": "tensorrt"}, "inference_engine"),
        ({"method_options": [1, 2]}, "method_options"),
        ({"method": "no_such_method"}, "method"),
        ({"method_options": {"no_such_option": 1}}, "method_options"),
        ({"method_options": {"reduction_rate": "half"}}, "method_options.reduction_rate"),
        (
            {"method_options": {"reduction_rate": 0.9}, "max_reduction_rate": 0.75},
            "method_options.reduction_rate",
        ),
        ({"method_options": {"temperature": -1.0}}, "method_options.temperature"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"profile key '{key}'"):
        load_profile(_write(tmp_path, data))


def test_not_a_mapping_and_missing_profiles(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_profile(str(path))
    with pytest.raises(ValueError, match="unknown profile 'nope'; available: .*cpu"):
        load_profile("nope")
    with pytest.raises(FileNotFoundError):
        load_profile(str(tmp_path / "missing.yaml"))


def test_profiles_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab.yaml").write_text("device: cpu\nmemory_budget_mb: 900\n")
    monkeypatch.setenv("EDGECL_PROFILES_DIR", str(tmp_path))
    assert load_profile("lab").memory_budget_mb == 900
    assert "lab" in list_profiles()


def test_method_check_can_be_skipped_and_to_dict_round_trips(tmp_path: Path) -> None:
    path = _write(tmp_path, {"method_options": {"no_such_option": 1}})
    profile = load_profile(path, check_method=False)
    assert profile.method_options == {"no_such_option": 1}
    data = load_profile("cpu").to_dict()
    data.pop("source")
    assert Profile(**data).to_dict()["memory_budget_mb"] == 4096
