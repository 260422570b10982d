"""``edgecl fleet`` without Flower (a clear error, and edgecl still imports) and the app project it writes
(its run config reads back as the same fleet settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgecl.cli import main as cli_main

BLOCK_FLWR = "import sys; sys.modules['flwr'] = None\n"


def test_edgecl_imports_and_explains_without_flower(tmp_path: Path) -> None:
    code = BLOCK_FLWR + (
        "import edgecl.cli, edgecl.fleet.server, edgecl.fleet.device, edgecl.commands.fleet\n"
        "from edgecl.cli import main\n"
        f"raise SystemExit(main(['fleet', 'app', {str(tmp_path / 'app')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'edgecl[fleet]'" in proc.stderr
    assert not (tmp_path / "app").exists()


def test_app_project_round_trips_the_fleet_settings(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    import tomli  # a dependency of flwr (tomllib is Python >= 3.11 only)

    from edgecl.fleet.flower import config_from_run_config

    # fmt: off
    code = cli_main([
        "fleet", "app", str(tmp_path / "app"), "--tasks", "2", "--classes", "a,b,c,d", "--rounds", "4",
        "--epochs", "3", "--set", "pool_size=4", "--min-available-nodes", "3", "--min-train-replies", "2",
        "--round-timeout", "90", "--out", str(tmp_path / "h.json"),
    ])
    # fmt: on
    assert code == 0
    doc = tomli.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "edgecl.fleet.flower:server_app",
        "clientapp": "edgecl.fleet.flower:client_app",
    }
    config = config_from_run_config(doc["tool"]["flwr"]["app"]["config"])
    assert (config.tasks, config.classes, config.rounds) == (2, ["a", "b", "c", "d"], 4)
    assert (config.min_available_nodes, config.min_train_replies, config.round_timeout_s) == (3, 2, 90.0)
    assert config.spec["epochs"] == 3 and config.spec["method_options"] == {"pool_size": 4}
    assert config.out == str((tmp_path / "h.json").resolve())


def test_fleet_settings_are_checked() -> None:
    from edgecl.fleet.server import FleetConfig

    with pytest.raises(ValueError, match="cannot be federated"):
        FleetConfig(spec={"method": "dpw"}).validate()
    with pytest.raises(ValueError, match="tasks=2"):
        FleetConfig(tasks=2, classes=["a", "b", "c"]).validate()
    with pytest.raises(ValueError, match="min_train_replies"):
        FleetConfig(min_train_replies=0).validate()


def test_a_device_reads_the_daemons_store(tmp_path: Path) -> None:
    """``--store``: every uploaded task's images by class name (held-out images as test images)."""
    from edgecl.fleet.device import LocalData
    from edgecl.store import Store

    store = Store(tmp_path / "daemon")
    for t, classes in enumerate((["cat", "dog"], ["fox"])):
        staging = store.new_staging_dir()
        manifest = []
        for c, name in enumerate(classes):
            for j, split in enumerate(("train", "train", "eval")):
                rel = f"{name}/{j}.png"
                (staging / name).mkdir(exist_ok=True)
                (staging / rel).write_bytes(b"x")
                manifest.append((rel, c, split))
        counts, held_out = dict.fromkeys(classes, 2), dict.fromkeys(classes, 1)
        store.add_task(
            staging, name=f"t{t}", classes=classes, counts=counts, eval_counts=held_out, manifest=manifest
        )
    data = LocalData.from_store(tmp_path / "daemon")
    assert data.class_names() == ["cat", "dog", "fox"]
    assert {c: len(f) for c, f in data.train.items()} == {"cat": 2, "dog": 2, "fox": 2}
    assert {c: len(f) for c, f in data.test.items()} == {"cat": 1, "dog": 1, "fox": 1}
    assert all(Path(f).is_file() for files in data.train.values() for f in files)
    with pytest.raises(FileNotFoundError, match="no edgecl store"):
        LocalData.from_store(tmp_path / "nothing")
