"""Prometheus text exposition (format 0.0.4) of the daemon: counters kept here, gauges read at scrape time."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Counters", "Histogram", "MetricsWriter"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """A cumulative histogram with fixed upper bounds (seconds)."""

    buckets: Sequence[float] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.total += value
        self.n += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Counters:
    """Process-lifetime counters of requests (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.uploads = {"accepted": 0, "rejected": 0}
        self.images_ingested = 0
        self.upload_seconds = 0.0
        self.predict_requests = 0
        self.predict_images = 0
        self.predict_latency = Histogram()

    def upload(self, accepted: bool, images: int = 0, seconds: float = 0.0) -> None:
        """Count one upload."""
        with self._lock:
            self.uploads["accepted" if accepted else "rejected"] += 1
            self.images_ingested += images
            self.upload_seconds += seconds

    def predict(self, images: int, seconds: float) -> None:
        """Count one prediction request."""
        with self._lock:
            self.predict_requests += 1
            self.predict_images += images
            self.predict_latency.observe(seconds)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _labels(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    esc = {
        k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()
    }
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class MetricsWriter:
    """Builds the exposition text: one ``# HELP`` / ``# TYPE`` block per metric family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Mapping[str, str] | None, float | None]],
    ) -> None:
        """A gauge or counter family; samples with value None are left out."""
        rows = [(labels, value) for labels, value in samples if value is not None]
        if not rows:
            return
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            self.lines.append(f"{name}{_labels(labels)} {_fmt(value)}")

    def gauge(
        self, name: str, help_text: str, value: float | None, labels: Mapping[str, str] | None = None
    ) -> None:
        """One unlabelled (or single-labelled) gauge."""
        self.family(name, "gauge", help_text, [(labels, value)])

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        """A histogram family (``_bucket``, ``_sum``, ``_count``)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, count in zip(hist.buckets, hist.counts, strict=True):
            self.lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        self.lines.append(f'{name}_bucket{{le="+Inf"}} {hist.n}')
        self.lines.append(f"{name}_sum {_fmt(hist.total)}")
        self.lines.append(f"{name}_count {hist.n}")

    def text(self) -> str:
        """The exposition, newline-terminated."""
        return "\n".join(self.lines) + "\n"
