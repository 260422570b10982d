"""The import structure of ``edgecl``: every module imports on its own, and nothing imports in a circle.

Cycles are looked for in grimp's static import graph, which has every ``import`` statement, function-level
ones included (a function-level import hides a cycle from the interpreter, not from the design). Left out:
imports under ``if TYPE_CHECKING:`` (annotations only, never executed: a callback module naming the
``Trainer`` type is the callback contract, not a dependency) and a module's import of its own ancestor
package (Python runs ``edgecl/x/__init__.py`` before any ``edgecl.x.y`` anyway, so that edge adds
nothing). Cycles are checked between modules and between the top-level parts of the package
(``edgecl.train``, ``edgecl.methods``, ``edgecl.budget``, ``edgecl.runner``, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgecl"

KNOWN_PACKAGE_EDGES: set[tuple[str, str]] = set()
"""Known module-to-module edges that close a cycle between top-level parts, each with its issue."""

LAYERS = {
    # lower part: parts it must not import (directly or through others)
    "edgecl.train": ("edgecl.budget", "edgecl.runner", "edgecl.commands", "edgecl.serve", "edgecl.bench"),
    "edgecl.budget": ("edgecl.runner", "edgecl.commands", "edgecl.serve", "edgecl.bench", "edgecl.export"),
    "edgecl.precision": ("edgecl.budget", "edgecl.train", "edgecl.methods"),
    # the oneDNN linears are a leaf under the backbone (torch only)
    "edgecl.kernels": ("edgecl.backbone", "edgecl.methods", "edgecl.train", "edgecl.budget"),
    # issue 19 / 18.9: methods know the Method contract only; the TII callback lives in edgecl.train
    "edgecl.methods": ("edgecl.train", "edgecl.budget", "edgecl.runner", "edgecl.serve", "edgecl.export"),
    # the model and data layers know nothing above them
    "edgecl.backbone": ("edgecl.methods", "edgecl.train", "edgecl.data", "edgecl.budget", "edgecl.telemetry"),
    "edgecl.sampling": ("edgecl.backbone", "edgecl.methods", "edgecl.train"),
    "edgecl.data": ("edgecl.backbone", "edgecl.methods", "edgecl.train", "edgecl.serve", "edgecl.store"),
    "edgecl.store": ("edgecl.backbone", "edgecl.methods", "edgecl.train", "edgecl.serve", "edgecl.data"),
    "edgecl.telemetry": (
        "edgecl.budget",
        "edgecl.runner",
        "edgecl.serve",
        "edgecl.commands",
        "edgecl.export",
    ),
    "edgecl.export": ("edgecl.budget", "edgecl.runner", "edgecl.serve", "edgecl.commands", "edgecl.bench"),
    "edgecl.runner": ("edgecl.serve", "edgecl.commands", "edgecl.bench"),
    "edgecl.serve": ("edgecl.commands", "edgecl.bench", "edgecl.cli"),
}
"""The layering the package docstrings state (edgecl.budget's in particular)."""


def _modules() -> list[str]:
    """Every module of the edgecl source tree, by file (``__main__`` runs the CLI, so it is left out)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def _cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _graph(package: str) -> grimp.ImportGraph:
    return grimp.build_graph(package, exclude_type_checking_imports=True, cache_dir=None)


def _module_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Direct imports between modules, without a module's imports of its own ancestors."""
    return {
        m: {t for t in graph.find_modules_directly_imported_by(m) if not m.startswith(t + ".")}
        for m in graph.modules
    }


def _part(module: str) -> str:
    """The top-level part a module belongs to (``edgecl.train.trainer`` -> ``edgecl.train``)."""
    return ".".join(module.split(".")[:2])


def _part_edges(
    module_edges: Mapping[str, Iterable[str]], known: set[tuple[str, str]]
) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Imports between top-level parts, each with the module edges behind it (``known`` ones left out)."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for m, targets in module_edges.items():
        for t in targets:
            a, b = _part(m), _part(t)
            if a != b and b != t.split(".")[0] and (m, t) not in known:
                out.setdefault(a, {}).setdefault(b, []).append((m, t))
    return out


def _describe(cycles: list[list[str]], edges: Mapping[str, Iterable[str]]) -> str:
    return "; ".join(
        " / ".join(f"{a} -> {b}" for a in comp for b in sorted(edges.get(a, ())) if b in comp)
        for comp in cycles
    )


# ---- the detector itself, on packages with a known answer -------------------------------------------------
def _write_package(root: Path, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_cycle_check_finds_a_cycle_hidden_in_a_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a -> b at module level, b -> a inside a function: one cycle {a, b}; c -> a only under TYPE_CHECKING
    and the package's own re-export of its children are no cycle."""
    _write_package(
        tmp_path,
        "cyclepkg",
        {
            "__init__.py": "from cyclepkg import a\n",
            "a.py": "import cyclepkg.b\n",
            "b.py": "def f():\n    from cyclepkg import a\n    return a\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cyclepkg.a\n",
            "sub/__init__.py": "from cyclepkg.sub import d\n",
            "sub/d.py": "import cyclepkg.sub\nimport cyclepkg.c\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = _graph("cyclepkg")
    edges = _module_edges(graph)
    assert _cycles(edges) == [["cyclepkg.a", "cyclepkg.b"]]
    assert "cyclepkg.a" not in edges["cyclepkg.c"]  # TYPE_CHECKING only
    assert edges["cyclepkg.sub.d"] == {"cyclepkg.c"}  # its own ancestor left out
    parts = _part_edges(edges, set())
    assert _cycles({a: set(b) for a, b in parts.items()}) == [["cyclepkg.a", "cyclepkg.b"]]
    known = _part_edges(edges, {("cyclepkg.b", "cyclepkg.a")})
    assert _cycles({a: set(b) for a, b in known.items()}) == []


# ---- edgecl ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edgecl_graph() -> grimp.ImportGraph:
    return _graph("edgecl")


def test_no_import_cycle_between_modules(edgecl_graph: grimp.ImportGraph) -> None:
    edges = _module_edges(edgecl_graph)
    assert set(_modules()) <= set(edges) | {"edgecl.__main__"}
    cycles = _cycles(edges)
    assert not cycles, f"import cycles between modules: {_describe(cycles, edges)}"


def test_no_import_cycle_between_parts_of_the_package(edgecl_graph: grimp.ImportGraph) -> None:
    parts = _part_edges(_module_edges(edgecl_graph), KNOWN_PACKAGE_EDGES)
    edges = {a: set(b) for a, b in parts.items()}
    cycles = _cycles(edges)
    detail = "; ".join(
        f"{a} -> {b} ({', '.join(f'{m} -> {t}' for m, t in parts[a][b])})"
        for comp in cycles
        for a in comp
        for b in sorted(edges.get(a, ()))
        if b in comp
    )
    assert not cycles, f"import cycles between parts of edgecl: {detail}"
    full = _module_edges(edgecl_graph)
    for importer, imported in KNOWN_PACKAGE_EDGES:  # a known exception that no longer exists must go
        assert imported in full.get(importer, set()), (
            f"{importer} -> {imported} is gone: drop it from the list"
        )


@pytest.mark.parametrize("lower", sorted(LAYERS))
def test_layering(edgecl_graph: grimp.ImportGraph, lower: str) -> None:
    """A lower part reaches none of the parts above it, through any chain of imports."""
    for upper in LAYERS[lower]:
        chain = edgecl_graph.find_shortest_chain(importer=lower, imported=upper, as_packages=True)
        assert chain is None, f"{lower} must not import {upper}: {' -> '.join(chain or ())}"


IMPORT_EACH = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    failures = {}
    for name in sys.argv[1:]:
        for loaded in [m for m in sys.modules if m == "edgecl" or m.startswith("edgecl.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-3)
    print(json.dumps(failures))
    """
)


def test_every_module_imports_on_its_own() -> None:
    """Each module in a clean ``edgecl`` namespace (one interpreter; edgecl's modules cleared in between),
    so none depends on another having been imported first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *_modules()],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())
