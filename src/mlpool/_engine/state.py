"""The pool's lifecycle states and the snapshot ``pool.stats()`` returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mlpool._processes.logs import pool_state_changed


class PoolState(enum.Enum):
    STARTING = "starting"  # workers are loading models; jobs queue up
    RUNNING = "running"  # serving
    CLOSING = "closing"  # shutdown asked: no new jobs, draining, then stopping workers
    CLOSED = "closed"  # every worker reaped, manager thread gone
    BROKEN = "broken"  # workers cannot be kept alive; every job is refused

    def to(self, new: PoolState) -> PoolState:
        """``new``, if the pool may go there from this state; else a RuntimeError (a bug)."""
        if new not in _POOL_MOVES[self]:
            raise RuntimeError(f"mlpool internal error: the pool cannot go from {self.value} to {new.value}")
        pool_state_changed(self, new)
        return new


_POOL_MOVES: dict[PoolState, frozenset[PoolState]] = {
    PoolState.STARTING: frozenset({PoolState.RUNNING, PoolState.CLOSING, PoolState.BROKEN}),
    PoolState.RUNNING: frozenset({PoolState.CLOSING, PoolState.BROKEN}),
    PoolState.CLOSING: frozenset({PoolState.CLOSED, PoolState.BROKEN}),
    PoolState.BROKEN: frozenset({PoolState.CLOSED}),  # the manager thread ends
    PoolState.CLOSED: frozenset(),
}


def refusal(state: PoolState, broken_reason: str = "") -> Exception | None:
    """The error a job submitted in ``state`` gets, or None if the pool takes jobs then."""
    if state is PoolState.RUNNING or state is PoolState.STARTING:
        return None
    from mlpool.errors import PoolBrokenError, PoolClosedError

    if state is PoolState.BROKEN:
        return PoolBrokenError(f"the pool is broken and takes no jobs: {broken_reason}")
    what = "is shutting down" if state is PoolState.CLOSING else "is shut down"
    return PoolClosedError(f"the pool {what} and takes no new jobs")


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool, from :meth:`mlpool.MLPool.stats`."""

    state: str
    workers_alive: int
    workers_busy: int
    queue_depth: int
    jobs_running: int
    jobs_completed: int
    jobs_failed: int
    jobs_crashed: int
    jobs_timed_out: int
    jobs_cancelled: int
    jobs_retried: int
    worker_restarts: int  # replacements after a crash, a timeout or an interrupt
    workers_recycled: int  # graceful replacements (max_jobs_per_worker, max_memory_per_worker)
    results_unfetched: int  # finished job-id results waiting for get_result
    latency_p50: float | None  # seconds from submission to outcome, over the last 2048 jobs
    latency_p95: float | None
    latency_p99: float | None
    run_seconds_mean: float | None  # mean time in the scoring function, same window
    latency_buckets: tuple[tuple[float, int], ...]  # cumulative (upper bound, count) since start
    latency_sum: float  # seconds, since start
    latency_count: int
    models: dict[str, ModelStats] = field(default_factory=dict)  # the same per model, by name
    # (jobs running + jobs queued) / worker slots: 1.0 means every worker is
    # busy and nothing waits; above 1, jobs wait. The autoscaling signal (see
    # docs/reference.md "Autoscaling"). 0.0 with nb_workers=0 (no workers).
    saturation: float = 0.0
    # With share_across_processes: this API process's own part (the rest is the whole pool's).
    process: ProcessStats | None = None

    @property
    def estimated_wait(self) -> float:
        """Seconds a new job would wait for a worker, from the queue depth and
        recent run times (0 when unknown): an honest ``Retry-After``."""
        if not self.run_seconds_mean or not self.queue_depth:
            return 0.0
        return self.queue_depth * self.run_seconds_mean / max(1, self.workers_alive)


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model's part of :class:`PoolStats` (``stats().models[name]``)."""

    group: str  # the worker group that loads it: "" for the shared workers, else the model's name
    queue_depth: int  # its jobs waiting for a worker
    workers: int  # workers alive that load it (its group's)
    jobs_completed: int
    jobs_failed: int  # every error outcome: the function's own, crashed, timed out
    latency_p50: float | None  # seconds from submission to outcome, over its recent jobs
    latency_p99: float | None
    latency_buckets: tuple[tuple[float, int], ...]  # cumulative (upper bound, count) since start
    latency_sum: float
    latency_count: int
    # (its jobs running + queued) / its group's worker slots (see PoolStats.saturation).
    saturation: float = 0.0
    # 1 at start, one more with every reload_models of it that its first new worker survived.
    version: int = 1
    # version -> workers alive that serve it: one entry, except while a reload rolls.
    workers_by_version: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """One API process's own jobs in a pool it shares (``stats().process``)."""

    pid: int  # this API process
    host_pid: int  # the pool host (0 while none is attached)
    processes: int  # API processes attached to the host now
    jobs_in_flight: int  # sent to the host, not answered yet
    jobs_submitted: int
    jobs_completed: int
    jobs_failed: int
    jobs_cancelled: int
    results_unfetched: int  # this process's job-id results waiting for get_result
