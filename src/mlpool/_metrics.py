"""Job latency bookkeeping for PoolStats and the Prometheus collector.

Cheap enough to run for every job under the manager's lock: a bounded
window of recent latencies (for percentiles) and cumulative histogram
buckets (for Prometheus, which wants counts since start).
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

# Seconds; from a pipe round trip to a slow model.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LatencyRecorder:
    """Latency from submission to outcome, and the workers' own run time."""

    __slots__ = ("_recent", "_run", "buckets", "total", "count")

    def __init__(self, window: int = 2048) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self._run: deque[float] = deque(maxlen=window)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, latency: float, run_seconds: float | None) -> None:
        self._recent.append(latency)
        if run_seconds is not None:
            self._run.append(run_seconds)
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
        self.total += latency
        self.count += 1

    def percentiles(self) -> tuple[float | None, float | None, float | None]:
        """p50, p95, p99 of the recent window (None before the first job)."""
        if not self._recent:
            return None, None, None
        ordered = sorted(self._recent)
        last = len(ordered) - 1
        return tuple(ordered[min(last, int(q * len(ordered)))] for q in (0.5, 0.95, 0.99))  # type: ignore[return-value]

    def mean_run(self) -> float | None:
        """Mean time a worker spent in a scoring function, over the recent window."""
        return sum(self._run) / len(self._run) if self._run else None

    def stats_fields(self) -> dict[str, Any]:
        """The latency fields of :class:`~mlpool.PoolStats`, for every engine."""
        p50, p95, p99 = self.percentiles()
        return {
            "latency_p50": p50, "latency_p95": p95, "latency_p99": p99, "run_seconds_mean": self.mean_run(),
            "latency_buckets": self.cumulative_buckets(), "latency_sum": self.total, "latency_count": self.count,
        }  # fmt: skip

    def cumulative_buckets(self) -> tuple[tuple[float, int], ...]:
        """``(upper bound, jobs at or under it)`` pairs, ending with +Inf, as Prometheus wants."""
        out = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            running += count
            out.append((bound, running))
        return tuple(out)
