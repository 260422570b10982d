"""The C allocator's part in a memory budget: glibc set up so the RSS tracks live tensors, and trimming.

On CPU (and a Jetson's unified memory) torch's tensors come from glibc ``malloc``. With glibc's defaults a
freed activation stays in the heap and the RSS high-water mark creeps up with fragmentation (ViT-Tiny 64
px, batch 16, 30 CPU steps with evaluations in between: +127 MB after the first step, +201 MB after 20),
so a peak cannot be planned and the memory never goes back to a shared DRAM. Modes
(:data:`ALLOCATOR_MODES`, chosen by measurement in benchmarks/PERFORMANCE.md, "The allocator"):

* ``trim`` (budgeted training's default): a fixed 32 MiB mmap threshold (glibc's dynamic threshold would
  move the regime while training runs, so probe steps would not see the steps that follow) and
  ``malloc_trim(0)`` at every step boundary (:func:`at_step_boundary`, called by the budget guard): each
  step starts from a trimmed heap, as the planner's probe steps do, and reuses freed memory inside the
  step without a page fault. Tensors over 32 MiB (large evaluation batches) are their own mappings.
* ``mmap``: a fixed 64 KiB mmap threshold, every tensor its own mapping, returned to the OS when freed: the
  strictest tracking, paid with a page fault on every first touch (+30-60 % step time on CPU).
* ``default``: glibc untouched; the planner then multiplies measured increments by ``UNTUNED_FACTOR``.

A mode may name its own threshold (``trim:KIB``, ``mmap:KIB``; ``trim:0`` keeps glibc's dynamic one) for
measurements. The environment's ``MALLOC_MMAP_THRESHOLD_`` takes precedence over any mode. Other C
libraries: nothing is changed and every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALLOCATOR_MODES",
    "DEFAULT_ALLOCATOR_MODE",
    "AllocatorMode",
    "allocator_description",
    "allocator_mode",
    "allocator_tracks_live_tensors",
    "at_step_boundary",
    "parse_allocator_mode",
    "setup_allocator",
    "trim_allocator",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class AllocatorMode:
    """How glibc is set up: a fixed mmap threshold (None = glibc's dynamic one) and step-boundary trims."""

    name: str
    mmap_threshold_kib: int | None
    trim_at_step_boundaries: bool

    @property
    def tracks_live_tensors(self) -> bool:
        """Whether the RSS at a step's start is the live tensors' (what the planner's probes assume)."""
        return self.name != "default"

    @property
    def spec(self) -> str:
        """The mode as :func:`parse_allocator_mode` reads it."""
        kib = 0 if self.mmap_threshold_kib is None else self.mmap_threshold_kib
        return self.name if ALLOCATOR_MODES.get(self.name) == self else f"{self.name}:{kib}"


ALLOCATOR_MODES = {
    "trim": AllocatorMode("trim", 32 * 1024, True),
    "mmap": AllocatorMode("mmap", 64, False),
    "default": AllocatorMode("default", None, False),
}
DEFAULT_ALLOCATOR_MODE = "trim"
"""What budgeted training sets up (profiles' ``tune_allocator: true``)."""

_LIBC: Any = None
_MODE: AllocatorMode = ALLOCATOR_MODES["default"]


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            name = ctypes.util.find_library("c") or "libc.so.6"
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(name)
                if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version"):
                    _LIBC = lib
    return _LIBC


def parse_allocator_mode(spec: str) -> AllocatorMode:
    """``trim``, ``mmap`` or ``default``, optionally ``NAME:KIB`` with a fixed mmap threshold in KiB."""
    name, sep, kib = spec.strip().partition(":")
    if name not in ALLOCATOR_MODES:
        raise ValueError(
            f"unknown allocator mode {spec!r}; choose one of {', '.join(ALLOCATOR_MODES)} "
            "(optionally NAME:KIB, e.g. trim:32768)"
        )
    base = ALLOCATOR_MODES[name]
    if not sep:
        return base
    if name == "default":
        raise ValueError("allocator mode 'default' takes no threshold; use trim:KIB or mmap:KIB")
    try:
        threshold = int(kib)
    except ValueError:
        raise ValueError(f"allocator mode {spec!r}: the threshold must be an integer KiB") from None
    if not 0 <= threshold <= 32 * 1024:
        raise ValueError(f"allocator mode {spec!r}: glibc takes a threshold of 0..32768 KiB (0 = dynamic)")
    if threshold == 0 and name == "mmap":
        raise ValueError("allocator mode 'mmap' needs a fixed threshold (mmap:KIB with KIB >= 1)")
    return AllocatorMode(name, threshold or None, base.trim_at_step_boundaries)


def setup_allocator(mode: str | AllocatorMode = DEFAULT_ALLOCATOR_MODE) -> bool:
    """Set glibc up for ``mode`` (process-wide); True when the mode is in force (False on other libcs).

    With ``MALLOC_MMAP_THRESHOLD_`` in the environment glibc is left as the user set it (True). The mmap
    threshold is fixed with ``mallopt``, the trim threshold at twice it (glibc's own rule when it adjusts
    the threshold): in ``trim`` mode memory goes back at step boundaries, not in the middle of a step.
    """
    global _MODE
    m = parse_allocator_mode(mode) if isinstance(mode, str) else mode
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return True
    libc = _libc()
    if not libc:
        return False
    if m.mmap_threshold_kib is not None and m != _MODE:
        threshold = m.mmap_threshold_kib * 1024
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        if not (ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1):
            return False
    _MODE = m
    return True


def allocator_mode() -> AllocatorMode:
    """The mode :func:`setup_allocator` put in force (``default`` before any call)."""
    return _MODE


def allocator_tracks_live_tensors() -> bool:
    """Whether freed tensors go back to the OS (a mode other than ``default``, or the environment's)."""
    return _MODE.tracks_live_tensors or bool(os.environ.get("MALLOC_MMAP_THRESHOLD_"))


def allocator_description() -> str:
    """How the C allocator is set up for this process (for plans and reports)."""
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if env:
        return f"glibc, MALLOC_MMAP_THRESHOLD_={env}"
    if not _libc():
        return "platform default"
    m = _MODE
    if m.name == "default":
        return "glibc default (dynamic mmap threshold)"
    threshold = "dynamic" if m.mmap_threshold_kib is None else f"{m.mmap_threshold_kib} KiB"
    if m.trim_at_step_boundaries:
        return f"glibc, mmap threshold {threshold}, malloc_trim at step boundaries (mode {m.spec})"
    return f"glibc, mmap threshold {threshold} (freed tensors return to the OS; mode {m.spec})"


def trim_allocator() -> None:
    """Give free heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def at_step_boundary() -> None:
    """What the mode does between two training steps: ``malloc_trim(0)`` in ``trim`` mode, else nothing."""
    if _MODE.trim_at_step_boundaries:
        trim_allocator()
