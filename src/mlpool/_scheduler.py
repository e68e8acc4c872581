"""The queue and who takes what: pure logic, tested without processes.

::

    push(job) ──► pending: Job | BatchQueue, FIFO (a batched function's jobs
                  wait in one BatchQueue, which holds one place)
    plan(workers, ...) ──► (worker, jobs, estimate), one assignment at a time
                  ◄── the engine sends each, or refuses it, and may drop a
                      worker from ``workers`` (its last jobs before recycling)
    observe(fn, seconds, result bytes) ──► duration estimates, result sizes

Choosing a worker: an idle one first (one lent to the job's own event loop
before any other); a job expected to run under ``PIPELINE_BUDGET`` seconds,
and small enough to fit in a pipe's buffer, may also queue behind others in
the least loaded worker (at most ``MAX_INFLIGHT`` jobs each), so a worker
never idles while its next job crosses the pipe, and a hungry job never
waits behind another while a worker is idle. A batch goes to an idle worker
only; under load it waits for more items until its policy says go
(``hold_until``).

The scheduler owns the queue, its count of live jobs (the admission count)
and the estimates; jobs and workers are read, never changed, except a job's
state (QUEUED) and batch id. Under the engine's lock; time comes in as an
argument.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from mlpool._batching import BatchQueue
from mlpool._jobs import PIPELINE_BUDGET, Job, JobState

# At most this many jobs held by one worker at once.
MAX_INFLIGHT = 8
# Only jobs this small are sent to a worker that is busy: the bytes must fit
# in the pipe's buffer, or the sender would block until the worker reads.
PIPELINE_MAX_BYTES = 16 * 1024
# Functions whose duration (and result size) is remembered: the most recent first.
MAX_ESTIMATES = 1024
# Smoothing of each function's measured duration.
ESTIMATE_WEIGHT = 0.2


# A worker as the scheduler reads it (the engine's WorkerHandle): ``inflight``
# (the jobs it holds, in the order it runs them), ``backlog`` (estimated
# seconds of work in them), ``borrower`` (who reads its pipe: None for the
# manager, a thread's token, an event loop).
W = Any


class Scheduler:
    """The queue of jobs waiting for a worker, and the measures that place them."""

    def __init__(self) -> None:
        self._pending: deque[Job | BatchQueue] = deque()
        self._batches: dict[tuple[str, int], BatchQueue] = {}
        self.queued = 0  # jobs waiting (the admission count); cancelled ones leave at once
        self.hold_until: float | None = None  # a held batch goes at the latest then
        self._estimates: dict[int, float] = {}  # fn id -> seconds a call takes
        self._result_sizes: dict[int, int] = {}  # fn id -> bytes of shared memory its last result used

    # ------------------------------------------------------------ the queue

    def __bool__(self) -> bool:
        """Whether anything waits (cancelled jobs may still hold entries)."""
        return bool(self._pending)

    def push(self, job: Job, *, front: bool = False) -> None:
        """Queue ``job`` (a batched one in its batch); ``front``: it goes next."""
        job.state = JobState.QUEUED
        self.queued += 1
        if job.batch_policy is None:
            self._pending.appendleft(job) if front else self._pending.append(job)
            return
        key = (job.model, job.fn_id)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = BatchQueue(job.batch_policy)
        batch.jobs.appendleft(job) if front else batch.jobs.append(job)
        if not batch.in_queue:
            batch.in_queue = True
            self._pending.appendleft(batch) if front else self._pending.append(batch)

    def requeue(self, job: Job) -> None:
        """A job that never started goes back to the front."""
        job.worker = None
        job.batch_id = None
        self.push(job, front=True)

    def left(self, job: Job) -> None:
        """A queued job left the queue without being taken (cancelled, timed
        out): its place is free now; its entry is skipped when it comes up."""
        self.queued -= 1

    def drain(self) -> Iterator[Job]:
        """Every job still queued, emptying the queue."""
        while self._pending:
            entry = self._pending.popleft()
            if type(entry) is BatchQueue:
                entry.in_queue = False
                while entry.jobs:
                    job = entry.jobs.popleft()
                    if job.state is JobState.QUEUED:
                        yield job
            elif entry.state is JobState.QUEUED:
                yield entry
        self._batches.clear()
        self.queued = 0

    # ------------------------------------------------------------- placing

    def plan(
        self,
        workers: list[W],
        here: asyncio.AbstractEventLoop | None,
        now: float,
        others_busy: Callable[[], bool],
        unstick: Callable[[], bool],
    ) -> Iterator[tuple[W, list[Job], float]]:
        """Assignments ``(worker, jobs, estimate)`` in queue order, while a
        worker can take the next entry; the jobs left the queue (QUEUED still:
        the engine starts them). ``unstick()`` is asked when nothing fits (it
        may free a worker, e.g. a stopped loop's pipe); ``workers`` may shrink
        between assignments. Held batches keep their place."""
        self.hold_until = None
        pending = self._pending
        held: list[BatchQueue] = []
        busy: bool | None = None
        try:
            while pending and workers:
                entry = pending[0]
                if type(entry) is BatchQueue:
                    while entry.jobs and entry.jobs[0].state is not JobState.QUEUED:
                        entry.jobs.popleft()
                    if not entry.jobs:
                        pending.popleft()
                        entry.in_queue = False
                        continue
                    head, estimate, size = entry.jobs[0], None, 0  # a batch goes only to a worker holding nothing
                else:
                    head = entry
                    if head.state is not JobState.QUEUED:
                        pending.popleft()
                        continue
                    estimate, size = self._estimates.get(head.fn_id), head.payload.size
                worker = pick_worker(workers, head.loop, estimate, size)
                if worker is None:
                    if unstick():
                        continue
                    return
                if type(entry) is BatchQueue:
                    if busy is None:
                        busy = others_busy()
                    if entry.policy.should_hold(len(entry.jobs), head.submitted_at, now, busy):
                        pending.popleft()
                        held.append(entry)
                        until = entry.policy.hold_until(head.submitted_at)
                        self.hold_until = until if self.hold_until is None else min(self.hold_until, until)
                        continue
                pending.popleft()
                jobs = self._take_batch(entry) if type(entry) is BatchQueue else [entry]
                self.queued -= len(jobs)
                yield worker, jobs, PIPELINE_BUDGET if estimate is None else estimate
        finally:
            pending.extendleft(reversed(held))

    def _take_batch(self, batch: BatchQueue) -> list[Job]:
        """Up to max_batch_size live jobs of ``batch``, one batch id; the rest
        keeps a place at the back of the queue."""
        jobs: list[Job] = []
        while batch.jobs and len(jobs) < batch.policy.max_batch_size:
            job = batch.jobs.popleft()
            if job.state is JobState.QUEUED:
                jobs.append(job)
        if batch.jobs:
            self._pending.append(batch)
        else:
            batch.in_queue = False
        for job in jobs:
            job.batch_id = jobs[0].id
        return jobs

    # ------------------------------------------------------------ measures

    def estimate(self, fn_id: int) -> float:
        """Seconds a call of this function is expected to take."""
        return self._estimates.get(fn_id, PIPELINE_BUDGET)

    def result_size(self, fn_id: int) -> int | None:
        """Bytes of shared memory the function's last result used, if it used any."""
        return self._result_sizes.get(fn_id)

    def observe(self, fn_id: int, seconds: float, result_bytes: int | None) -> None:
        """A call of ``fn_id`` took ``seconds``; its result used ``result_bytes``
        of shared memory (None: none). Bounded: per-call functions come and go."""
        estimates = self._estimates
        previous = estimates.get(fn_id)
        if previous is None:
            if len(estimates) >= MAX_ESTIMATES:
                del estimates[next(iter(estimates))]
            estimates[fn_id] = seconds
        else:
            estimates[fn_id] = previous + ESTIMATE_WEIGHT * (seconds - previous)
        sizes = self._result_sizes
        if result_bytes is None:
            sizes.pop(fn_id, None)
        else:
            if fn_id not in sizes and len(sizes) >= MAX_ESTIMATES:
                del sizes[next(iter(sizes))]
            sizes[fn_id] = result_bytes


def pick_worker(
    workers: list[W], loop: asyncio.AbstractEventLoop | None, estimate: float | None, size: int
) -> W | None:
    """An idle worker, else (for a short, small job) the least loaded one with room.

    A worker lent to an event loop takes only that loop's jobs while it holds
    any; an idle one can be taken back by anyone.
    """
    spare = None  # an idle worker lent to another reader: taken back if nothing better
    for worker in workers:
        if not worker.inflight:
            if worker.borrower is loop:
                return worker
            if worker.borrower is None:
                if loop is None:
                    return worker
                spare = worker if spare is None or spare.borrower is not None else spare
            elif spare is None:
                spare = worker
    if spare is not None:
        return spare
    if estimate is None or estimate >= PIPELINE_BUDGET or size > PIPELINE_MAX_BYTES:
        return None
    best = None
    for worker in workers:
        if (
            (worker.borrower is None or worker.borrower is loop)
            and len(worker.inflight) < MAX_INFLIGHT
            and worker.backlog + estimate <= PIPELINE_BUDGET
            and (best is None or worker.backlog < best.backlog)
        ):
            best = worker
    return best
