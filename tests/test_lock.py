"""The lock is a full, current resolution of pyproject.toml: every direct requirement (runtime, dev and
fleet extras, for x86_64 Linux / Python 3.11) is pinned there to a version its range admits."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (a Jetson's): the same parser under its old name
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK_ENV = {"platform_machine": "x86_64", "sys_platform": "linux", "python_version": "3.11"}


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements-dev.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"lock line without an exact pin: {line!r}"
            pins[canonicalize_name(name.split("[", 1)[0])] = Version(version.split(";", 1)[0].strip())
    return pins


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "fleet"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or Marker(str(r.marker)).evaluate(LOCK_ENV)]


def test_every_direct_requirement_is_pinned_within_its_range() -> None:
    pins = _pins()
    stale = []
    for req in _direct_requirements():
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            stale.append(f"{req} (lock: {pinned})")
    assert not stale, f"requirements-dev.lock is stale, run `make lock`: {stale}"


def test_lock_pins_the_constrained_torch() -> None:
    constraints = {
        canonicalize_name(Requirement(line).name): Requirement(line).specifier
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    pins = _pins()
    for name, spec in constraints.items():
        assert spec.contains(pins[name]), f"{name}: lock {pins[name]} outside constraints.txt {spec}"
