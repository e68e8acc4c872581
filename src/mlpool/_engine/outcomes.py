"""What jobs end with: decided under the engine's lock, delivered after it.

::

    engine parts (under the lock) ── finish(job, ok, value) / cancel(job) ──► Outcomes.pending
                                          counts, latency, result expiry, memory back
    EngineLock.after_release (after the lock) ── decode ──► _engine.jobs.settle
    the caller, when it asks ── PickledResult.open ──► the result (_engine.results)

:class:`Outcomes` owns the outcomes decided and not yet delivered, the counts
and latencies ``stats()`` reports, and the shared memory a finished job
gives back. A result arrives as the worker's raw ``Done`` (or ``Failed``)
message; :meth:`Outcomes.decode`, after the lock is released, maps its
shared memory and unpickles a worker's exception, and leaves the result
pickled for its caller's thread (unpickled at once only when this is that
thread: a coroutine's loop that read its own job's reply). :class:`ManagerAlarm` is when the manager's
wait ends at the latest: a part that sets an earlier deadline asks for a
wake-up.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Mapping
from typing import Any

from mlpool._engine.jobs import Job, JobState, Outcome, new_outcome, running_loop
from mlpool._engine.metrics import LatencyRecorder, ModelRecorders
from mlpool._engine.regions import RegionPool, result_buffers
from mlpool._engine.registry import Registry
from mlpool._engine.results import PickledResult
from mlpool._engine.scheduler import Scheduler
from mlpool._engine.state import PoolState, PoolStats
from mlpool._engine.tracing import end as end_trace
from mlpool._processes.workers import WorkerHandle, WorkerState
from mlpool._wire.protocol import NOWHERE, Done, Failed
from mlpool._wire.serialization import unpack_exception, unpickling_error
from mlpool.errors import JobTimeoutError, WorkerCrashedError

# The manager's longest wait: deadlines may be further, the OS's timeouts may not.
MAX_WAIT = 3600.0


class ManagerAlarm:
    """When the manager thread's wait ends at the latest (under the engine's lock)."""

    __slots__ = ("wake_at", "need_wake")

    def __init__(self) -> None:
        self.wake_at: float | None = None  # set by the manager before each wait
        self.need_wake = False  # a caller thread must wake the manager when it releases the lock

    def note(self, deadline: float) -> None:
        """A deadline the manager must not sleep past."""
        if self.wake_at is None or deadline < self.wake_at:
            self.need_wake = True

    def plan(self, *deadlines: float | None) -> float | None:
        """The manager's next wait, in seconds, until the earliest of
        ``deadlines`` (None: no deadline, no timeout); noted in ``wake_at``."""
        due = [deadline for deadline in deadlines if deadline is not None]
        if not due:
            self.wake_at = None
            return None
        self.wake_at = min(due)
        # select() refuses timeouts past about 24.8 days; an early wake-up is harmless.
        return min(MAX_WAIT, max(0.0, self.wake_at - time.monotonic()))

    def soon(self) -> None:
        """Something changed that the manager thread must act on (shutdown, a recycled worker)."""
        self.need_wake = True


class Outcomes:
    """Outcomes decided under the lock, waiting for ``take``; counts and latencies."""

    def __init__(
        self,
        registry: Registry[Job],
        regions: RegionPool,
        alarm: ManagerAlarm,
        model_groups: Mapping[str, str] | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        """``model_groups``: model name -> its group's name, for the per-model
        figures; ``lock``: the engine's (counts also change outside it)."""
        self.lock = lock or threading.Lock()
        self._registry = registry
        self._regions = regions
        self._alarm = alarm
        self.pending: list[Outcome] = []  # decided, not delivered yet (see EngineLock.after_release)
        self.latency = LatencyRecorder()
        self.per_model = ModelRecorders(model_groups or {}, self.latency)  # PoolStats.models
        self.counts = dict.fromkeys(("completed", "failed", "crashed", "timed_out", "cancelled"), 0)
        self._undecodable = self._count_undecodable  # bound once: every result carries it

    def finish(self, job: Job, ok: bool, value: Any) -> None:
        """Decide ``job``'s outcome: its result, its error, or its worker's raw Done/Failed."""
        job.to(JobState.FINISHED)
        if job.worker is None:  # never sent, or back in the queue: nobody reads its memory
            self.release_memory(job)
        self.pending.append(new_outcome((job, ok, value, False)))
        now = time.monotonic()
        self.counts["completed" if ok else _kind(ok, value)] += 1
        run = value.seconds if type(value) is Done or type(value) is Failed else None
        self.latency.observe(now - job.submitted_at, run)
        if self.per_model.several:
            self.per_model.observe(job.model, now - job.submitted_at, ok)
        if job.deadline is not None or job.key is not None:  # else the registry has nothing of it
            expiry = self._registry.finished(job, now, keep_result=True)
            if expiry is not None:
                self._alarm.note(expiry)

    def _count_undecodable(self, model: str) -> None:
        """A job counted as completed failed after all: its caller could not
        unpickle its result (in the caller's thread, without the lock)."""
        with self.lock:
            self.counts["completed"] -= 1
            self.counts["failed"] += 1
            self.per_model.count_failed(model)

    def cancel(self, job: Job) -> None:
        """``job`` was cancelled: its caller gets CancelledError; its id is forgotten."""
        job.to(JobState.FINISHED)
        if job.worker is None:
            self.release_memory(job)
        self.pending.append(new_outcome((job, False, None, True)))
        self.counts["cancelled"] += 1
        self._registry.finished(job, time.monotonic(), keep_result=False)

    def release_memory(self, job: Job, *, keep_offer: bool = False) -> None:
        """Give the job's shared memory back to the pool; no process reads it now."""
        if job.payload.shared:
            job.payload.release(self._regions)
        if job.result_offer is not None and not keep_offer:
            self._regions.give(job.result_offer)
            job.result_offer = None

    def snapshot(
        self, state: PoolState, workers: list[WorkerHandle], scheduler: Scheduler, slots: Mapping[str, int], *,
        retried: int, restarts: int, recycled: int, unfetched: int,
        versions: Mapping[str, tuple[int, dict[int, int]]],
    ) -> PoolStats:  # fmt: skip
        """``pool.stats()``: the counts and latencies here, with the engine's
        state, workers, queue and each group's worker slots (under the engine's lock)."""
        alive = [w for w in workers if w.state is not WorkerState.EXITED]
        serving = [w for w in alive if w.state is not WorkerState.STARTING]
        counts = self.counts
        running_of: dict[str, int] = {}
        for worker in alive:
            for job in worker.inflight:
                running_of[job.model] = running_of.get(job.model, 0) + 1
        running, total_slots = sum(running_of.values()), sum(slots.values())
        return PoolStats(
            state=state.value,
            workers_alive=len(serving),
            workers_busy=sum(1 for w in alive if w.inflight),
            queue_depth=scheduler.queued,
            jobs_running=running,
            jobs_completed=counts["completed"],
            jobs_failed=counts["failed"],
            jobs_crashed=counts["crashed"],
            jobs_timed_out=counts["timed_out"],
            jobs_cancelled=counts["cancelled"],
            jobs_retried=retried,
            worker_restarts=restarts,
            workers_recycled=recycled,
            results_unfetched=unfetched,
            **self.latency.stats_fields(),
            models=self.per_model.stats(
                scheduler.queued_of, [w.group for w in serving], counts, running_of, slots, versions
            ),
            saturation=(running + scheduler.queued) / total_slots if total_slots else 0.0,
        )

    def decode(self, outcome: Outcome) -> Outcome:
        """Turn a worker's raw Done/Failed into a PickledResult or the exception (outside the lock)."""
        job, _, value = outcome[:3]
        kind = type(value)
        if job.forwarded:  # a pool host's job: its API process decodes it, in the room it offered
            if kind is Done and job.result_offer is not None:
                self._regions.give(job.result_offer)  # our descriptor of the offer, closed
                job.result_offer = None
            return outcome if kind is not Failed else new_outcome((job, False, ForwardedFailure(value), False))
        if kind is Done:
            offer, job.result_offer = job.result_offer, None
            if value.where == NOWHERE and offer is None and job.loop is not None and job.loop is running_loop():
                # Delivered in its caller's own thread (the coroutine's loop read it): unpickled now, in place.
                try:
                    decoded = new_outcome((job, True, pickle.loads(value.result), False))
                except (Exception, SystemExit) as exc:  # the data's fault: nothing from the other side ends us
                    # (A Ctrl-C goes through: EngineLock.after_release gives the outcome back to deliver later.)
                    self._count_undecodable(job.model)
                    decoded = new_outcome((job, False, unpickling_error(_result_of(job), exc), False))
            else:  # left pickled for its caller's thread; its shared memory is mapped now
                try:
                    buffers = (
                        None if value.where == NOWHERE and offer is None
                        else result_buffers(value.spans, value.where, value.fd, offer, self._regions)  # type: ignore[arg-type]  # a forwarded job's (foreign) offer left above
                    )  # fmt: skip
                except Exception as exc:  # out of memory or descriptors to map it
                    self._count_undecodable(job.model)
                    decoded = new_outcome((job, False, exc, False))
                else:
                    pickled = PickledResult(value.result, buffers, job.id, job.fn_name, job.model, self._undecodable)
                    decoded = new_outcome((job, True, pickled, False))
        elif kind is Failed:
            decoded = new_outcome((job, False, unpack_exception(value.error, value.traceback), False))
        else:
            decoded = outcome
        if job.trace is not None:
            kind_name = "cancelled" if decoded.cancelled else _kind(decoded.ok, decoded.value)
            end_trace(job, value, decoded.ok, decoded.value, kind_name)
        return decoded


class ForwardedFailure(Exception):
    """A pool host's job failed in its worker: the worker's Failed, as sent,
    for the API process that made the job to unpickle."""

    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.job_id)
        self.failed = failed


def _result_of(job: Job) -> str:
    return f"the result of job {job.id} ({job.fn_name})"


def _kind(ok: bool, value: Any) -> str:
    """Which ``stats()`` count an outcome adds to: every finished job counts once."""
    if ok:
        return "completed"
    if isinstance(value, WorkerCrashedError):
        return "crashed"
    if isinstance(value, JobTimeoutError):
        return "timed_out"
    return "failed"  # the function raised, or the pool broke or shut down under it
