"""The C allocator's part in a memory budget: glibc set up so the RSS tracks live tensors, and trimming.

On CPU (and a Jetson's unified memory) torch's tensors come from glibc ``malloc``. With glibc's defaults a
freed activation stays in the heap and the RSS high-water mark creeps up with fragmentation (ViT-Tiny 64
px, batch 16, 30 CPU steps with evaluations in between: +127 MB after the first step, +201 MB after 20),
and glibc's *dynamic* mmap threshold moves while training runs, so early steps (the planner's probes) and
later ones do not even use the same regime. Modes (:data:`ALLOCATOR_MODES`; the choice is measured in
benchmarks/PERFORMANCE.md, "The allocator"):

* ``trim`` (budgeted training's default): a fixed 32 MiB mmap threshold, so the regime never changes
  (tensors over 32 MiB, e.g. large evaluation batches, are their own mappings; all others are heap
  memory that a step frees and the next step reuses without a page fault), and ``malloc_trim(0)`` at
  every epoch start and before evaluation (:func:`at_epoch_boundary`, called by the budget guard), where
  the allocation pattern changes. The guard also trims whenever it reads a usage over the budget, before
  it halves anything. Between two steps of an epoch the RSS stays at the step's own peak.
* ``trim-steps``: the same and ``malloc_trim(0)`` after every step (:func:`at_step_boundary`): the RSS
  goes back to the live tensors between steps, paid with re-faulting the step's heap on every step.
* ``mmap``: a fixed 64 KiB mmap threshold, every tensor its own mapping, returned to the OS when freed: the
  RSS tracks live tensors at every moment, paid with a page fault on every first touch (+30-60 % CPU
  time per step).
* ``default``: glibc untouched; the planner then multiplies measured increments by ``UNTUNED_FACTOR``.

A mode may name its own threshold (``NAME:KIB``; ``0`` keeps glibc's dynamic one) for measurements. The
environment's ``MALLOC_MMAP_THRESHOLD_`` takes precedence over any mode. A threshold, once fixed, stays
fixed for the process. Other C libraries: nothing is changed and every function here is a no-op.
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
    "at_epoch_boundary",
    "at_step_boundary",
    "parse_allocator_mode",
    "setup_allocator",
    "trim_allocator",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class AllocatorMode:
    """How glibc is set up: a fixed mmap threshold (None = glibc's dynamic one) and when the heap is trimmed
    (``never``, ``epochs``: at every epoch start and before evaluation, ``steps``: after every step too)."""

    name: str
    mmap_threshold_kib: int | None
    trim: str

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
    "trim": AllocatorMode("trim", 32 * 1024, "epochs"),
    "trim-steps": AllocatorMode("trim-steps", 32 * 1024, "steps"),
    "mmap": AllocatorMode("mmap", 64, "never"),
    "default": AllocatorMode("default", None, "never"),
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
    """A name of :data:`ALLOCATOR_MODES`, optionally ``NAME:KIB`` with its own fixed mmap threshold in KiB."""
    name, sep, kib = spec.strip().partition(":")
    if name not in ALLOCATOR_MODES:
        raise ValueError(
            f"unknown allocator mode {spec!r}; choose one of {', '.join(ALLOCATOR_MODES)} "
            "(optionally NAME:KIB, e.g. trim:1024)"
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
    return AllocatorMode(name, threshold or None, base.trim)


def setup_allocator(mode: str | AllocatorMode = DEFAULT_ALLOCATOR_MODE) -> bool:
    """Set glibc up for ``mode`` (process-wide); True when the mode is in force (False on other libcs).

    With ``MALLOC_MMAP_THRESHOLD_`` in the environment glibc is left as the user set it (True). The mmap
    threshold is fixed with ``mallopt``, the trim threshold at twice it (glibc's own rule when it adjusts
    the threshold), so the heap is not shrunk and regrown in the middle of a step.
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
    if m.trim != "never":
        when = "every step" if m.trim == "steps" else "epoch starts and before evaluation"
        return f"glibc, mmap threshold {threshold}, malloc_trim at {when} (mode {m.spec})"
    return f"glibc, mmap threshold {threshold} (freed tensors return to the OS; mode {m.spec})"


def trim_allocator() -> None:
    """Give free heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def at_step_boundary() -> None:
    """What the mode does between two training steps: ``malloc_trim(0)`` in ``trim-steps``, else nothing."""
    if _MODE.trim == "steps":
        trim_allocator()


def at_epoch_boundary() -> None:
    """At an epoch start and before evaluation: ``malloc_trim(0)`` unless the mode never trims."""
    if _MODE.trim != "never":
        trim_allocator()
