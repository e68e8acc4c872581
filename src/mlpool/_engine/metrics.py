"""Job latency bookkeeping for PoolStats and the Prometheus collector.

Cheap enough to run for every job under the manager's lock: a bounded
window of recent latencies (for percentiles) and cumulative histogram
buckets (for Prometheus, which wants counts since start).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mlpool._engine.state import ModelStats

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


class ModelRecorders:
    """Per-model counts and latencies, for ``PoolStats.models``.

    A pool of one model records nothing more per job: its model's figures
    are the pool's (``pool`` and the pool's counts, read at ``stats``).
    """

    __slots__ = ("_groups", "_pool", "_recorders", "_counts", "several")

    def __init__(self, model_groups: Mapping[str, str], pool: LatencyRecorder) -> None:
        """``model_groups``: model name -> the name of the group that loads it."""
        self._groups = dict(model_groups)
        self._pool = pool
        self.several = several = len(self._groups) > 1  # else observe() records nothing
        self._recorders = {name: LatencyRecorder(512) for name in self._groups} if several else {}
        self._counts = {name: [0, 0] for name in self._groups} if several else {}  # completed, failed

    def observe(self, model: str, latency: float, ok: bool) -> None:
        """A job of ``model`` finished (not cancelled) ``latency`` seconds after submission."""
        recorder = self._recorders.get(model)
        if recorder is not None:
            recorder.observe(latency, None)
            self._counts[model][0 if ok else 1] += 1

    def count_failed(self, model: str) -> None:
        """A job of ``model`` counted as completed failed after all (its result could not be unpickled)."""
        counts = self._counts.get(model)
        if counts is not None:
            counts[0] -= 1
            counts[1] += 1

    def stats(
        self, queued_of: Callable[[str], int], worker_groups: Iterable[str], pool_counts: Mapping[str, int],
        running_of: Mapping[str, int], slots_of: Mapping[str, int],
        versions: Mapping[str, tuple[int, dict[int, int]]],
    ) -> dict[str, ModelStats]:  # fmt: skip
        """Each model's stats: ``queued_of(model)``, the group of each live
        worker, the pool's outcome counts (for a pool of one model), each
        model's jobs running, each group's worker slots, and each model's
        version and workers per version."""
        alive: dict[str, int] = {}
        for group in worker_groups:
            alive[group] = alive.get(group, 0) + 1
        out = {}
        for name, group in self._groups.items():
            recorder = self._recorders.get(name)
            if recorder is None:
                recorder = self._pool
                completed = pool_counts.get("completed", 0)
                failed = sum(pool_counts.get(kind, 0) for kind in ("failed", "crashed", "timed_out"))
            else:
                completed, failed = self._counts[name]
            p50, _, p99 = recorder.percentiles()
            queued, slots = queued_of(name), slots_of.get(group, 0)
            version, by_version = versions.get(name, (1, {}))
            out[name] = ModelStats(
                group, queued, alive.get(group, 0), completed, failed, p50, p99,
                recorder.cumulative_buckets(), recorder.total, recorder.count,
                (running_of.get(name, 0) + queued) / slots if slots else 0.0, version, by_version,
            )  # fmt: skip
        return out
